"""transformers' `generate` (--engine hf): the reference the decode engine's greedy tokens are
checked against, for one prompt (streamed) or a left-padded batch."""

from __future__ import annotations

import threading
import time

from qwen2vl_cli.errors import GenerationInterrupted
from qwen2vl_cli.streams import StopText
from qwen2vl_cli.types import GenerationOptions, Result


class RepetitionGuard:
    """Stops a row whose last tokens are one short n-gram over and over (QwenLM/Qwen2-VL#1611).

    A row is caught when its tail of max(MIN_SPAN, REPEATS x n) tokens has period n for some
    n <= MAX_PERIOD: the same n-gram at least REPEATS times in a row, covering MIN_SPAN tokens.
    """

    MAX_PERIOD = 32
    REPEATS = 4
    MIN_SPAN = 48

    def __init__(self, prompt_width: int):
        self.prompt_width = prompt_width
        self.stopped_at: dict[int, int] = {}  # row -> generated length when caught

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        rows = input_ids.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_width
        if generated < self.MIN_SPAN:
            return done
        for n in range(1, self.MAX_PERIOD + 1):
            span = max(self.MIN_SPAN, self.REPEATS * n)
            if span > generated:
                break
            tail = input_ids[:, -span:]
            done |= (tail[:, n:] == tail[:, :-n]).all(dim=1)
        for row in done.nonzero().flatten().tolist():
            self.stopped_at.setdefault(row, generated)
        return done


def generate_one(runner, inputs, gen: GenerationOptions, on_text, cancel, matchers: list | None = None) -> Result:
    """One prompt through transformers' `generate`, streamed from a worker thread; `matchers`:
    its grammar's (grammar.py), where its answer must follow one."""
    import torch

    from qwen2vl_cli.prefill import stop_when
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    tokenizer = runner.processor.tokenizer
    inputs = inputs.to(runner.model.device)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    config = runner.model.config
    ids = inputs["input_ids"]
    visual_tokens = int(((ids == config.image_token_id) | (ids == config.video_token_id)).sum())

    stop = cancel if cancel is not None else threading.Event()
    token_times: list[float] = []

    class _Streamer(TextIteratorStreamer):
        def put(self, value):
            if not self.next_tokens_are_prompt:
                token_times.append(time.perf_counter())
            super().put(value)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    guard = RepetitionGuard(prompt_tokens)
    kwargs = dict(
        **inputs,
        max_new_tokens=gen.max_new_tokens,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stop()] + ([guard] if gen.repeat_guard else [])),
        **sampling_kwargs(gen),
        **grammar_kwargs(matchers, prompt_tokens),
        **stop_kwargs(gen, tokenizer),
    )
    outcome: dict = {}

    def work():
        try:
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            with torch.inference_mode(), stop_when(runner.model, [stop]):
                outcome["sequences"] = runner.model.generate(**kwargs)
        except BaseException as e:  # surfaces in the main thread
            outcome["error"] = e
            streamer.end()

    parts: list[str] = []
    start = time.perf_counter()
    thread = threading.Thread(target=work, name="qvl-generate", daemon=True)
    thread.start()
    shown = StopText(on_text, gen.stop)
    try:
        for chunk in streamer:
            parts.append(chunk)
            if chunk:
                shown.feed("".join(parts))
        shown.feed("".join(parts), final=True)
    except BaseException as e:  # Ctrl-C, or the reader of stdout went away: stop generating first
        stop.set()
        thread.join(timeout=30)
        if isinstance(e, KeyboardInterrupt):
            raise GenerationInterrupted(shown.sent) from None
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if runner.device == "cuda":
        torch.cuda.synchronize()
    ttft, rate = _timings(start, token_times)
    new = outcome["sequences"][0, prompt_tokens:]
    return runner.result(new, prompt_tokens, visual_tokens, ttft, rate, guard.stopped_at.get(0))

def generate_rows(runner, inputs, rows: int, gen: GenerationOptions, cancels: list[threading.Event] | None,
                  matchers: list | None = None) -> list[Result]:
    """A left-padded batch through transformers' `generate` (its streamer takes one row: this one only times)."""
    import torch

    from qwen2vl_cli.prefill import stop_when
    from transformers import StoppingCriteria
    from transformers.generation.streamers import BaseStreamer

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([c.is_set() for c in cancels], dtype=torch.bool, device=input_ids.device)

    token_times: list[float] = []

    class _Clock(BaseStreamer):  # the text streamer takes batch size 1 only; this one just times
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                token_times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    inputs = inputs.to(runner.model.device)
    width = int(inputs["input_ids"].shape[1])
    guard = RepetitionGuard(width)
    start = time.perf_counter()
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    with torch.inference_mode(), stop_when(runner.model, cancels):
        sequences = runner.model.generate(
            **inputs,
            max_new_tokens=gen.max_new_tokens,
            streamer=_Clock(),
            stopping_criteria=([guard] if gen.repeat_guard else []) + ([_Cancelled()] if cancels else []) or None,
            **sampling_kwargs(gen),
            **grammar_kwargs(matchers, width),
            **stop_kwargs(gen, runner.processor.tokenizer),
        )
    if runner.device == "cuda":
        torch.cuda.synchronize()
    ttft, rate = _timings(start, token_times)
    config = runner.model.config
    out = []
    for row in range(rows):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        visual = int(((ids == config.image_token_id) | (ids == config.video_token_id)).sum())
        out.append(runner.result(sequences[row, width:], int(ids.shape[0]), visual, ttft, rate, guard.stopped_at.get(row)))
    return out


def _timings(start: float, token_times: list[float]) -> tuple[float | None, float | None]:
    """Time to first token and decode tokens/s (per sequence) from the times new tokens arrived."""
    ttft = token_times[0] - start if token_times else None
    rate = None
    if len(token_times) > 1 and token_times[-1] > token_times[0]:
        rate = (len(token_times) - 1) / (token_times[-1] - token_times[0])
    return ttft, rate


def sampling_kwargs(gen: GenerationOptions) -> dict:
    """generate() arguments: greedy unless a temperature above 0 is given."""
    if gen.temperature <= 0:
        out: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        # Only the filters the user gave: Qwen's generation_config sets top_k=1, which would undo sampling.
        out = {
            "do_sample": True,
            "temperature": gen.temperature,
            "top_p": gen.top_p if gen.top_p is not None else 1.0,
            "top_k": gen.top_k if gen.top_k is not None else 0,
        }
    if gen.repetition_penalty is not None:
        out["repetition_penalty"] = gen.repetition_penalty
    if gen.min_new_tokens:
        out["min_new_tokens"] = min(gen.min_new_tokens, gen.max_new_tokens)
    return out


def grammar_kwargs(matchers: list | None, prompt_width: int) -> dict:
    """generate() arguments for rows whose answers follow a grammar: its logits processor."""
    if not matchers or all(m is None for m in matchers):
        return {}
    from transformers import LogitsProcessorList

    from qwen2vl_cli.grammar import Logits

    return {"logits_processor": LogitsProcessorList([Logits(matchers, prompt_width)])}


def stop_kwargs(gen: GenerationOptions, tokenizer) -> dict:
    """generate() arguments that end a row at a stop string (its text is trimmed after: trimmed())."""
    return {"stop_strings": list(gen.stop), "tokenizer": tokenizer} if gen.stop else {}


def trimmed(result: Result, gen: GenerationOptions, tokenizer) -> Result:
    """A row's result ending before the first stop string in it, as OpenAI trims it."""
    from dataclasses import replace

    from qwen2vl_cli.streams import TextStream

    stream = TextStream(tokenizer, None, gen.stop)
    stream.update(list(result.tokens), final=True)
    if not stream.stopped:
        return result
    kept = stream.tokens_to_stop(list(result.tokens))
    return replace(result, text=stream.sent, tokens=tuple(kept), generated_tokens=len(kept), finish_reason="stop")
