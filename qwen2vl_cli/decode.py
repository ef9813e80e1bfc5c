"""The decode engine: prefill through the transformers model, then one loop over a static KV cache.

Read top to bottom, as gpt-fast's generate.py: `prefill` runs the whole model once (vision
tower, M-RoPE positions, the prompt into the cache) and gives the first logits; `decode_one_token`
is one step for every row (embed, the language model over the cache, the head); `choose` picks
the next tokens on the device (repetition penalty, minimum length, then greedy or sampled);
`generate` loops, and the host reads the new tokens only every `chunk` steps: to stream them, to
see which rows ended, and to run the repetition guard, never once a token.

Rows are independent: a row that ended keeps stepping on padding until the batch ends, as in
transformers' `generate`, whose greedy tokens this loop reproduces (tests/test_decode.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import torch

from qwen2vl_cli.config import debug_enabled


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the same fields and order as transformers' processors."""

    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int = 0
    seed: int | None = None


@dataclass
class Decoded:
    """The raw outcome of one batch: every row's new tokens, and where each row's end was seen."""

    tokens: list[list[int]]
    ended_at: list[int | None]  # tokens up to and including the end-of-sequence token
    looped_at: list[int | None]  # where the repetition guard stopped the row
    cancelled_at: list[int | None]  # tokens the row had when its client went away
    ttft_s: float | None
    decode_tokens_per_s: float | None
    steps: int = 0
    graph: bool = False  # the steps were replayed from a CUDA graph
    compiled: bool = False  # the steps ran inductor's code
    setup_s: float = 0.0  # compiling and capturing the step (not counted in ttft_s)


@dataclass
class _Rows:
    """What the loop keeps on the device for every row."""

    attend: torch.Tensor  # (B, L) bool: the cache positions each row may attend to
    text_position: torch.Tensor  # (B,) the next token's text position (padding not counted)
    rope_deltas: torch.Tensor  # (B, 1) M-RoPE offset of text after the media
    seen: torch.Tensor | None  # (B, V + 1) bool: tokens in the row so far, for the repetition penalty
    ended: torch.Tensor  # (B,) bool
    step: torch.Tensor  # () long: tokens generated so far
    out: torch.Tensor  # (B, max_new_tokens) long
    cache_argument: str = "cache"  # the language model's name for its KV cache, read once (not every step)


def unsupported(model) -> str | None:
    """Why this loop cannot drive `model` with the installed transformers, or None when it can.
    It relies on static cache layers that count their own length (transformers 5.2x); elsewhere
    the runner falls back to `generate`."""
    from transformers.cache_utils import StaticLayer

    if not hasattr(model, "model") or not hasattr(model.model, "language_model") or not hasattr(model.model, "get_rope_index"):
        return f"{type(model).__name__} is not a Qwen vision-language model qvl knows"
    if _cache_argument(model) is None:
        return "this transformers release takes the KV cache under a name qvl does not know"
    if not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):
        return "this transformers release's static cache does not count its own length"
    return None


def _cache_argument(model) -> str | None:
    """What the language model calls its KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    names = inspect.signature(model.model.language_model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def batch_bucket(rows: int) -> int:
    """The batch a compiled or captured step runs: the next of 1, 2, 4, 8, 16, 32 (then multiples
    of 16), so a server's or --each's changing batch sizes reuse a few steps."""
    return next((b for b in BATCH_BUCKETS if b >= rows), -(-rows // 16) * 16)


def _pad_rows(inputs: dict, rows: int, pad_id: int) -> dict:
    """`inputs` with filler rows up to `rows`: padding that attends only to its last position (a
    fully masked row would give NaN), text only, so the vision tower never sees them."""
    ids = inputs["input_ids"]
    extra = rows - ids.shape[0]
    if extra <= 0:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids, ids.new_full((extra, ids.shape[1]), pad_id)])
    mask = inputs["attention_mask"].new_zeros((extra, ids.shape[1]))
    mask[:, -1] = 1
    out["attention_mask"] = torch.cat([inputs["attention_mask"], mask])
    if inputs.get("mm_token_type_ids") is not None:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros((extra, types.shape[1]))])
    return out


def cache_bucket(length: int) -> int:
    """A compiled or captured step is specialised to its cache's length: lengths are rounded up
    (to 1024, 2048, then multiples of 2048) so a few shapes serve every prompt. The rows attend
    only to the positions they filled."""
    return 1024 if length <= 1024 else -(-length // 2048) * 2048


def use_compile_cache() -> str:
    """Inductor's on-disk cache under the user's cache directory (unless TORCHINDUCTOR_CACHE_DIR
    names one): the second run of a shape compiles from it in seconds instead of tens of seconds."""
    import os
    from pathlib import Path

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base / "qvl" / "inductor"))


@cache
def compiled_step() -> Callable:
    """`decode_one_token` compiled by inductor, one per process: its code is specialised per shape
    (batch bucket x cache length) and kept in inductor's on-disk cache, so a later run starts warm."""
    import torch._dynamo.config as dynamo

    if not debug_enabled():  # the compiler's own warnings (no CUDA toolkit, recompiles) are not the user's business
        import logging

        for name in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Past dynamo's default of 8 shapes a step would quietly run eagerly; the buckets make a few dozen at most.
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    return torch.compile(decode_one_token, dynamic=False, fullgraph=True)


def prefill(model, inputs: dict, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model over the prompt; the cache holds it afterwards.

    Returns the last logits (B, V) and each row's M-RoPE offset for the text that follows. The
    positions are transformers' `generate`'s: text positions skip the left padding, and media
    get their 3D positions from the model's own `get_rope_index`.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
    if grids and inputs.get("mm_token_type_ids") is not None:
        if inputs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL: frames placed in absolute time
            grids["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        spatial, deltas = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=mask, **grids)
    else:
        spatial, deltas = text[None].expand(3, -1, -1), torch.zeros((ids.shape[0], 1), dtype=torch.long, device=ids.device)
    positions = torch.cat([text[None], spatial.to(text.device)], dim=0)  # the text row first, as `generate` passes them
    out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1, **{_cache_argument(model): cache})
    return out.logits[:, -1, :].float(), deltas.to(ids.device)


def _mask(attend: torch.Tensor, attn: str, dtype: torch.dtype) -> torch.Tensor:
    """The step's attention mask in the form the attention implementation takes."""
    mask = attend[:, None, None, :]
    if attn == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def decode_one_token(model, rows: _Rows, tokens: torch.Tensor, cache, attn: str) -> torch.Tensor:
    """One token for every row: (B,) tokens in, (B, V) float32 logits out. Writes the cache in place."""
    position = cache.layers[0].cumulative_length  # where this token goes in every row's cache
    rows.attend.index_fill_(1, position.view(1), True)
    text = model.model.language_model
    embeds = text.embed_tokens(tokens[:, None])
    mrope = (rows.text_position[:, None] + rows.rope_deltas)[None].expand(3, -1, -1)  # text: all three sections equal
    mask = _mask(rows.attend, attn, embeds.dtype)
    # A 4D mask is taken as given by every family's text model (Qwen3-VL's takes no per-layer-type dict).
    hidden = text(inputs_embeds=embeds, position_ids=mrope, attention_mask=mask, use_cache=True, **{rows.cache_argument: cache})
    rows.text_position += 1
    return model.lm_head(hidden.last_hidden_state[:, -1, :]).float()


def _restorer(rows: _Rows, cache) -> Callable[[], None]:
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
    """

    def __init__(self, model, rows: _Rows, tokens: torch.Tensor, cache, attn: str, step: Callable | None = None):
        step = step or decode_one_token
        self.tokens = tokens.clone()
        restore = _restorer(rows, cache)  # each warm-up step changes the state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):  # warm-up outside the graph: kernels chosen, workspaces allocated
                for _ in range(2):
                    step(model, rows, self.tokens, cache, attn)
                    restore()
        finally:
            torch.cuda.current_stream().wait_stream(side)  # the warm-up's writes land before the last restore
            restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the state is as before
            self.logits = step(model, rows, self.tokens, cache, attn)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def choose(logits: torch.Tensor, rows: _Rows, sampling: Sampling, eos: torch.Tensor, generator, index: int) -> torch.Tensor:
    """Token `index` (0-based) of every row, on the device."""
    if rows.seen is not None:  # transformers' RepetitionPenaltyLogitsProcessor, as a mask
        p = sampling.repetition_penalty
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(rows.seen[:, : logits.shape[-1]], penalized, logits)
    if index < sampling.min_new_tokens:  # no end before the minimum
        logits = logits.index_fill(1, eos, float("-inf"))
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - sampling.top_p)
        drop[:, -1] = False  # keep at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _advance(rows: _Rows, chosen: torch.Tensor, eos: torch.Tensor, pad: int) -> torch.Tensor:
    """Record the chosen tokens; a row that ended gets padding from then on."""
    chosen = torch.where(rows.ended, torch.full_like(chosen, pad), chosen)
    rows.out.index_copy_(1, rows.step.view(1), chosen[:, None])
    rows.ended |= torch.isin(chosen, eos)
    if rows.seen is not None:
        rows.seen.scatter_(1, chosen[:, None], True)
    rows.step += 1
    return chosen


def generate(
    model,
    inputs: dict,
    max_new_tokens: int,
    sampling: Sampling,
    eos_ids: list[int],
    pad_id: int,
    attn: str,
    chunk: int = 8,
    on_tokens: Callable[[list[list[int]], list[int | None]], None] | None = None,
    guard: Callable[[int, list[int]], int | None] | None = None,
    cancels: list[threading.Event] | None = None,
    graph: bool = False,
    compiled: bool = False,
) -> Decoded:
    """Generate for a left-padded batch. Every `chunk` steps the host reads the new tokens:
    `guard(row, tokens)` says where a row loops (it is stopped there), `on_tokens(rows, looped)`
    sees every row's tokens so far, and a row whose event in `cancels` is set is stopped.
    `graph`: on CUDA, replay the step as a CUDA graph (Decoded.graph says whether it was).
    `compiled`: the step is inductor's (Decoded.compiled says whether it could be)."""
    batch = inputs["input_ids"].shape[0]  # the caller's rows; a compiled or captured step may run more
    if graph or compiled:
        inputs = _pad_rows(inputs, batch_bucket(batch), pad_id)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    width = ids.shape[1]
    device = ids.device
    length = width + max_new_tokens
    length = cache_bucket(length) if graph or compiled else length
    cache = static_cache(model, length)
    eos = torch.tensor(eos_ids, device=device)
    generator = None
    if sampling.temperature > 0 and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    elif sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    seen = None
    if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0:
        vocab = model.lm_head.out_features
        seen = torch.zeros((ids.shape[0], vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, ids.clamp(max=vocab), True)

    start = time.perf_counter()
    with torch.inference_mode():
        logits, deltas = prefill(model, inputs, cache)
        padded = ids.shape[0]
        rows = _Rows(
            attend=torch.cat([mask.bool(), torch.zeros((padded, length - width), dtype=torch.bool, device=device)], dim=1),
            text_position=mask.long().sum(dim=1),
            rope_deltas=deltas,
            seen=seen,
            ended=torch.arange(padded, device=device) >= batch,  # filler rows are over from the start
            step=torch.zeros((), dtype=torch.long, device=device),
            out=torch.full((padded, max_new_tokens), pad_id, dtype=torch.long, device=device),
            cache_argument=_cache_argument(model),
        )
        tokens = _advance(rows, choose(logits, rows, sampling, eos, generator, 0), eos, pad_id)
        graphed = graph and device.type == "cuda" and max_new_tokens > 1
        making = graphed or (compiled and max_new_tokens > 1)  # a step to make before decoding (timed apart)
        setup_start = time.perf_counter()
        one_token = decode_one_token
        if compiled and making:
            one_token, compiled = _compile_or_eager(model, rows, tokens, cache, attn)
        step: Callable[[torch.Tensor], torch.Tensor] = partial(one_token, model, rows, cache=cache, attn=attn)
        if graphed:
            try:
                step = GraphedStep(model, rows, tokens, cache, attn, one_token)
            except Exception:  # something in the step cannot be captured: run it eagerly
                graphed = False
        setup = time.perf_counter() - setup_start if making else 0.0  # spent making the step, even when it failed
        host: list[list[int]] = [[] for _ in range(batch)]
        looped: list[int | None] = [None] * batch
        cancelled: list[int | None] = [None] * batch
        ttft = first_at = last_at = None
        done = 1
        while True:
            if done % chunk == 0 or done == max_new_tokens or done == 1:
                new = rows.out[:batch, len(host[0]) : done].tolist()  # the one read from the device per chunk
                now = time.perf_counter()
                if ttft is None:
                    ttft, first_at = now - start - setup, now
                last_at = now
                for row, extra in zip(host, new):
                    row.extend(extra)
                stop_rows = []
                for r in range(batch):
                    if cancels is not None and cancelled[r] is None and cancels[r].is_set():
                        cancelled[r] = len(host[r])
                        stop_rows.append(r)
                if guard is not None:
                    for r in range(batch):
                        if looped[r] is None and (at := guard(r, host[r])) is not None:
                            looped[r] = at
                            stop_rows.append(r)
                if stop_rows:
                    rows.ended[stop_rows] = True
                if on_tokens is not None:
                    on_tokens(host, looped)
                if done == max_new_tokens or bool(rows.ended.all()):
                    break
            logits = step(tokens)
            tokens = _advance(rows, choose(logits, rows, sampling, eos, generator, done), eos, pad_id)
            done += 1
    ended_at = [next((i + 1 for i, t in enumerate(row) if t in eos_ids), None) for row in host]
    rate = (done - 1) / (last_at - first_at) if done > 1 and last_at > first_at else None
    return Decoded(host, ended_at, looped, cancelled, ttft, rate, done, graphed, compiled, setup)


def _compile_or_eager(model, rows: _Rows, tokens: torch.Tensor, cache, attn: str) -> tuple[Callable, bool]:
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
