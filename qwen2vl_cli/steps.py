"""One decode step for every row of a batch, and the ways it is made: eager (reading only the
cache positions written so far), compiled by inductor, or captured in a CUDA graph. The batch
(decode.py) chooses once, when it starts, and runs the step it got; on a CPU, StepThreads picks
the threads its eager steps run on."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from qwen2vl_cli.config import debug_enabled


@dataclass
class Rows:
    """What the loop keeps on the device for every slot of the batch."""

    attend: torch.Tensor  # (B, L) bool: the cache positions each row may attend to
    text_position: torch.Tensor  # (B,) the next token's text position (padding not counted)
    rope_deltas: torch.Tensor  # (B, 1) M-RoPE offset of text after the media
    seen: torch.Tensor | None  # (B, V + 1) bool: tokens in the row so far, for the repetition penalty
    ended: torch.Tensor  # (B,) bool
    step: torch.Tensor  # () long: tokens chosen so far (columns of `out` written)
    out: torch.Tensor  # (B, steps) long: the token chosen at each step
    cache_argument: str = "cache"  # the language model's name for its KV cache, read once (not every step)
    start: torch.Tensor | None = None  # (B,) long: the column of `out` with the slot's row's first token
    minimum: torch.Tensor | None = None  # (B,) long: the fewest tokens before it may end


def cache_argument(model) -> str | None:
    """What the language model calls its KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    names = inspect.signature(model.model.language_model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in names), None)


@cache
def _window_layer() -> type:
    """The static cache layer qvl uses, made once (a compiled step is specialised to its class)."""
    from transformers.cache_utils import StaticLayer

    class Window(StaticLayer):
        """A static layer that hands attention its first `visible` positions (all when None): an
        eager step then reads none of the cache's empty part. Compiled and captured steps need one
        shape, and see it all."""

        visible: int | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return (keys, values) if self.visible is None else (keys[:, :, : self.visible], values[:, :, : self.visible])

    return Window


def static_cache(model, length: int):
    """transformers' static cache, its full-attention layers able to show an eager step only the
    positions written so far (`show`)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=length)
    window = _window_layer()
    cache.layers = [window(max_cache_len=length) if type(layer) is StaticLayer else layer for layer in cache.layers]
    return cache


def show(cache, visible: int | None) -> None:
    """Let attention see the first `visible` positions of every layer (None: all of them)."""
    for layer in cache.layers:
        layer.visible = visible


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def batch_bucket(rows: int) -> int:
    """The batch a compiled or captured step runs: the next of 1, 2, 4, 8, 16, 32 (then multiples
    of 16), so a server's or --each's changing batch sizes reuse a few steps."""
    return next((b for b in BATCH_BUCKETS if b >= rows), -(-rows // 16) * 16)


def cache_bucket(length: int) -> int:
    """A compiled or captured step is specialised to its cache's length: lengths are rounded up
    (to 1024, 2048, then multiples of 2048) so a few shapes serve every prompt. The rows attend
    only to the positions they filled."""
    return 1024 if length <= 1024 else -(-length // 2048) * 2048


def use_compile_cache() -> str:
    """Inductor's on-disk cache under the user's cache directory (unless TORCHINDUCTOR_CACHE_DIR
    names one): the second run of a shape compiles from it in seconds instead of tens of seconds.
    Inductor writes its own default (a folder in the shared temp directory) into the variable the
    first time it is asked, which importing a model class of transformers does: that one is replaced."""
    import os
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "qvl" / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@cache
def compiled_step() -> Callable:
    """`decode_one_token` compiled by inductor, one per process: its code is specialised per shape
    (batch bucket x cache length) and kept in inductor's on-disk cache, so a later run starts warm."""
    import torch._dynamo.config as dynamo

    if not debug_enabled():  # the compiler's own warnings (no CUDA toolkit, recompiles) are not the user's business
        import logging
        import warnings

        for name in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # torchao's int8 tensors (--quantize) lack a hash for AOT autograd's cache: the step still compiles and is cached by inductor
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    # Past dynamo's default of 8 shapes a step would quietly run eagerly; the buckets make a few dozen at most.
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return torch.compile(decode_one_token, dynamic=False, fullgraph=True)


def _mask(attend: torch.Tensor, attn: str, dtype: torch.dtype) -> torch.Tensor:
    """The step's attention mask in the form the attention implementation takes."""
    mask = attend[:, None, None, :]
    if attn == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def decode_one_token(model, rows: Rows, tokens: torch.Tensor, cache, attn: str, visible: int | None = None) -> torch.Tensor:
    """One token for every row: (B,) tokens in, (B, V) float32 logits out. Writes the cache in place.
    `visible`: the positions written so far, this token's included (eager steps: the cache's
    empty part is not read); None for the whole cache (one shape, compiled or captured)."""
    position = cache.layers[0].cumulative_length  # where this token goes in every row's cache
    rows.attend.index_fill_(1, position.view(1), True)
    text = model.model.language_model
    embeds = text.embed_tokens(tokens[:, None])
    mrope = (rows.text_position[:, None] + rows.rope_deltas)[None].expand(3, -1, -1)  # text: all three sections equal
    mask = _mask(rows.attend if visible is None else rows.attend[:, :visible], attn, embeds.dtype)
    # A 4D mask is taken as given by every family's text model (Qwen3-VL's takes no per-layer-type dict).
    hidden = text(inputs_embeds=embeds, position_ids=mrope, attention_mask=mask, use_cache=True, **{rows.cache_argument: cache})
    rows.text_position += 1
    return model.lm_head(hidden.last_hidden_state[:, -1, :]).float()


def _restorer(rows: Rows, cache) -> Callable[[], None]:
    """A trial step (compiling, capturing) moves the mask, the positions and the cache lengths on:
    this puts them back. Its keys and values stay in the slot the next real step overwrites."""
    saved = (rows.attend.clone(), rows.text_position.clone(), [layer.cumulative_length.clone() for layer in cache.layers])

    def restore() -> None:
        rows.attend.copy_(saved[0])
        rows.text_position.copy_(saved[1])
        for layer, length in zip(cache.layers, saved[2]):
            layer.cumulative_length.copy_(length)

    return restore


class GraphedStep:
    """The step (eager or compiled) captured once in a CUDA graph and replayed: one launch a step instead of
    one per kernel. The graph reads its tokens from a fixed buffer and leaves the logits in a fixed
    one; the state a step changes (cache, lengths, mask, positions) lives in tensors that never move.

    Before it is used, one replay is checked against the step run directly from the same state:
    logits that differ (a capture that does not replay what it recorded) raise, and the loop runs
    the step directly instead.
    """

    def __init__(self, model, rows: Rows, tokens: torch.Tensor, cache, attn: str, step: Callable | None = None):
        step = step or decode_one_token
        self.tokens = tokens.clone()
        restore = _restorer(rows, cache)  # each warm-up step changes the state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up outside the graph: kernels chosen, workspaces allocated
                for _ in range(2):
                    direct = step(model, rows, self.tokens, cache, attn).clone()
                    restore()
        finally:
            torch.cuda.current_stream().wait_stream(side)  # the warm-up's writes land before the last restore
            restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the state is as before
            self.logits = step(model, rows, self.tokens, cache, attn)
        self.graph.replay()
        replayed = self.logits.clone()
        restore()
        if not agrees(direct, replayed):
            raise RuntimeError("the captured step does not give the direct step's logits")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def agrees(direct: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two runs of a step gave the same logits, within half-precision rounding (kernels
    may differ in the order they add)."""
    if direct.shape != other.shape or not bool(torch.isfinite(other).all()):
        return False
    scale = direct.abs().max().clamp(min=1e-6)
    return bool(((other - direct).abs().max() / scale) <= 2e-2)


def can_join(cache) -> bool:
    """Rows join a running batch where every cache layer is a plain static one (no sliding window)."""
    from transformers.cache_utils import StaticLayer

    return all(isinstance(layer, StaticLayer) and not layer.is_sliding for layer in cache.layers)


def compile_or_eager(model, rows: Rows, tokens: torch.Tensor, cache, attn: str) -> tuple[Callable, bool]:
    """The compiled step, compiled now on a dry run whose changes to the state are undone; the
    eager step where inductor cannot compile it (no C++ compiler for the CPU, an unsupported op)."""
    restore = _restorer(rows, cache)
    step = compiled_step()
    try:
        step(model, rows, tokens.clone(), cache, attn)
        ok = True
    except Exception:  # noqa: BLE001 - whatever stops the compiler, the eager step gives the same tokens
        if debug_enabled():
            import traceback

            traceback.print_exc()
        ok = False
    restore()
    return (step, True) if ok else (decode_one_token, False)


class StepThreads:
    """On a CPU, the threads the decode steps run on, chosen by the clock. A step is many small
    kernels, each a barrier for every thread; where other work takes the cores, a thread waiting at
    one loses its time slice, and one thread can step faster than all of them (bench/RESULTS.md:
    a busy machine). So the first STEPS steps of a read run in turn on the process's threads and on
    one, twice each, and the faster (its best time a step: a time slice lost is noise, not speed)
    is kept for the rest of each read; both are tried again every PROBE reads. A trial is a few
    steps, not a whole read, because the slower count costs its steps: with --quantize int8 a step
    on one thread takes 1.7x as long. Prefills (joins included) keep every thread: they are few
    large kernels. Eager steps only: inductor's code is made for one thread count, and another would
    compile it again."""

    PROBE = 64
    TRIALS = 2  # trials on each count
    STEPS = 2  # steps a trial times

    def __init__(self, cpu: bool):
        self.many = torch.get_num_threads() if cpu else 1
        self.order = [self.many, 1] * self.TRIALS  # what the next trials try, then none
        self.per_step: dict[int, float] = {}  # threads -> the best seconds a step seen in this probe
        self.chosen = self.many
        self.reads = 0

    @contextmanager
    def steps(self):
        if self.many <= 1:
            yield _Steps()
            return
        trial = self.order[0] if self.order else None
        torch.set_num_threads(trial or self.chosen)
        try:
            yield _Steps(trial=trial, start=time.perf_counter(), tried=self._tried)
        finally:
            torch.set_num_threads(self.many)
        self.reads += 1
        if self.reads % self.PROBE == 0:
            self.order, self.per_step = [self.many, 1] * self.TRIALS, {}

    def _tried(self, threads: int, seconds: float) -> None:
        """A trial's time a step; the read goes on with the count chosen so far."""
        self.order.pop(0)
        self.per_step[threads] = min(seconds, self.per_step.get(threads, seconds))
        if not self.order:
            self.chosen = min(self.per_step, key=self.per_step.get)
        torch.set_num_threads(self.chosen)


@dataclass
class _Steps:
    steps: int = 0
    trial: int | None = None  # the thread count this read's first steps try
    start: float = 0.0
    tried: Callable[[int, float], None] | None = None

    def stepped(self) -> None:
        self.steps += 1
        if self.trial is not None and self.steps == StepThreads.STEPS:
            self.tried(self.trial, (time.perf_counter() - self.start) / self.steps)
            self.trial = None


def unsupported(model) -> str | None:
    """Why this loop cannot drive `model` with the installed transformers, or None when it can.
    It relies on static cache layers that count their own length (transformers 5.2x); elsewhere
    the runner falls back to `generate`."""
    from transformers.cache_utils import StaticLayer

    if not hasattr(model, "model") or not hasattr(model.model, "language_model") or not hasattr(model.model, "get_rope_index"):
        return f"{type(model).__name__} is not a Qwen vision-language model qvl knows"
    if cache_argument(model) is None:
        return "this transformers release takes the KV cache under a name qvl does not know"
    if not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):
        return "this transformers release's static cache does not count its own length"
    return None
