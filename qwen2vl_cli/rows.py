"""A batch of rows as its callers drive it, in the runner's terms: each row's prompt text and
media in, its Result out as soon as it ends, its text streamed as it comes.

serve's scheduler, `--each` and `describe` all drive one: `Running(runner, rows, capacity)`, then
`advance()` until `live` is false; between two advances a row may `join` where `fits` says it has
room (continuous batching: serve keeps its own first-come-first-served rule). decode.py's Batch
does the work. transformers' `generate` (--engine hf, the reference) runs every row at the first
advance, streams a batch of one only, and takes no row that joins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from qwen2vl_cli import reference
from qwen2vl_cli.errors import GenerationInterrupted
from qwen2vl_cli.runner import LoopFinder, VisionClock, stack_rows
from qwen2vl_cli.streams import TextStream
from qwen2vl_cli.types import GenerationOptions, Result


@dataclass
class Row:
    """One prompt for the model: its text and media, its options (lengths its own, sampling the
    batch's), the event that stops it (its client went away) and where its text streams (None: not)."""

    text: str | None
    media: list | None
    gen: GenerationOptions
    cancel: threading.Event | None = None
    on_text: Callable[[str], None] | None = None
    inputs: object = None  # its processor inputs, once built (by `Running.fits`, or by a caller that made them)

    def built(self, runner):
        if self.inputs is None:
            self.inputs = runner.inputs(self.text, self.media)
        return self.inputs


class Running:
    """The rows given, then those that join, numbered in that order; `advance` hands back
    (row number, Result or the exception that kept it from running) of every row that ended.
    A row whose inputs cannot be built is handed back at the first advance; the others run."""

    def __init__(self, runner, rows: list[Row], capacity: int = 0):
        self.runner = runner
        self.rows = list(rows)
        self.gen = rows[0].gen  # the sampling every row shares
        start = time.perf_counter()
        built = [_attempt(r.built, runner) for r in rows]
        self.inputs_s = time.perf_counter() - start
        self._ended: list[tuple[int, Result | Exception]] = [(i, b) for i, b in enumerate(built) if isinstance(b, Exception)]
        self._order = [i for i, b in enumerate(built) if not isinstance(b, Exception)]  # the engine's rows: row numbers
        self._prompts = {i: prompt_counts(runner.model.config, built[i], 0) for i in self._order}
        self._streams: dict[int, TextStream] = {}
        self._vision: dict[int, float | None] = {}
        self._inputs_s: dict[int, float] = {i: self.inputs_s for i in self._order}
        self.batch = self._hf = None
        if not self._order:
            return
        inputs = stack_rows([built[i] for i in self._order], runner.processor.tokenizer.pad_token_id)
        if runner.engine == "hf":
            if len(self._order) > 1 and any(rows[i].on_text for i in self._order):
                raise ValueError("transformers' generate streams one row at a time: stream a batch of one")
            self._hf = inputs
            return
        from qwen2vl_cli import decode

        self._streams = {i: self._stream(rows[i]) for i in self._order if rows[i].on_text is not None or rows[i].gen.stop}
        lengths = [(rows[i].gen.max_new_tokens, min(rows[i].gen.min_new_tokens or 0, rows[i].gen.max_new_tokens)) for i in self._order]
        with VisionClock(runner.model) as clock:
            self.batch = decode.Batch(
                runner.model, dict(inputs.to(runner.model.device)), [most for most, _ in lengths], runner.sampling(self.gen),
                runner.eos_ids(), runner.pad_id(), runner.attn,
                guard=LoopFinder() if self.gen.repeat_guard else None,
                cancels=[rows[i].cancel or threading.Event() for i in self._order],
                graph=runner.engine == "graph" or (runner.engine == "compiled" and runner.device == "cuda"),
                compiled=runner.engine == "compiled", capacity=capacity, min_new_tokens=[least for _, least in lengths],
                vision=runner.vision, prefixes=runner.prefixes, matchers=[runner.matcher(rows[i].gen) for i in self._order],
            )
        self._vision.update(dict.fromkeys(self._order, clock.seconds()))
        # A step that could not be made ran eagerly, with the same tokens.
        self.engine = "compiled" if self.batch.compiled else "graph" if self.batch.graphed else "static"

    @property
    def live(self) -> bool:
        return bool(self._ended) or self._hf is not None or (self.batch is not None and bool(self.batch.live))

    def advance(self) -> list[tuple[int, Result | Exception]]:
        """The steps up to the next read: the rows that ended since the last advance."""
        ended, self._ended = self._ended, []
        if self._hf is not None:
            return ended + self._reference()
        if self.batch is None or not self.batch.live:
            return ended
        update = self.batch.advance()
        self._show(update.moved)
        for engine_row, outcome in update.ended:
            ended.append((self._order[engine_row], self._result(self._order[engine_row], outcome)))
        if not self.batch.live and self.runner.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return ended

    def open(self) -> bool:
        """Whether a row could join now (the engine's batch takes rows and has a free slot)."""
        return self.batch is not None and self.batch.open()

    def fits(self, row: Row) -> bool:
        """Whether `row` can join now: its inputs are built here (what fails to build is raised)
        and its prompt and answer must fit beside every running row's."""
        return self.batch.fits(int(row.built(self.runner)["input_ids"].shape[1]), row.gen.max_new_tokens)

    def join(self, row: Row) -> int:
        """`row` into the running batch, at once (its prefill and first token): its row number.
        What keeps it out (out of memory in its prefill, its client gone) is raised."""
        from qwen2vl_cli import decode

        start = time.perf_counter()
        inputs = row.built(self.runner)
        inputs_s = time.perf_counter() - start
        number = len(self.rows)
        self.rows.append(row)
        self._order.append(number)  # the engine numbers it next, failed or not
        self._prompts[number] = prompt_counts(self.runner.model.config, inputs, 0)
        self._inputs_s[number] = inputs_s
        if row.on_text is not None or row.gen.stop:
            self._streams[number] = self._stream(row)
        least = min(row.gen.min_new_tokens or 0, row.gen.max_new_tokens)
        with VisionClock(self.runner.model) as clock:
            _, tokens = self.batch.join(decode.Joining(dict(inputs.to(self.runner.model.device)), row.cancel or threading.Event(),
                                                       row.gen.max_new_tokens, least, self.runner.matcher(row.gen)))
        self._vision[number] = clock.seconds()
        self._show([(len(self._order) - 1, tokens, None)])
        return number

    def sent(self, row: int) -> str:
        """The text streamed of a row so far (what an interrupted answer had)."""
        stream = self._streams.get(row)
        return stream.sent if stream is not None else ""

    def _stream(self, row: Row) -> TextStream:
        return TextStream(self.runner.processor.tokenizer, row.on_text, row.gen.stop)

    def _show(self, moved) -> None:
        for engine_row, tokens, looped in moved:
            stream = self._streams.get(self._order[engine_row])
            if stream is not None:
                stream.update(tokens[: self._end(tokens, looped)])
                if stream.stopped:  # a stop string: the row ends at the next read
                    self.batch.cancel(engine_row)

    def _end(self, tokens: list[int], looped: int | None) -> int:
        """How much of a row is answer so far: up to its end-of-sequence token or where it looped."""
        eos = set(self.runner.eos_ids())
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        return min(end, looped) if looped is not None else end

    def _result(self, row: int, outcome) -> Result | Exception:
        if isinstance(outcome, Exception):
            return outcome
        tokens = outcome.tokens[: outcome.cancelled_at]  # a row whose client left ends where it was stopped
        r = self.runner.result(tokens, *self._prompts[row], outcome.ttft_s, outcome.decode_tokens_per_s, outcome.looped_at, self.engine)
        stream = self._streams.get(row)
        if stream is not None:
            stream.update(list(r.tokens), final=True)
            if stream.stopped:
                kept = stream.tokens_to_stop(list(r.tokens))
                r = replace(r, text=stream.sent, tokens=tuple(kept), generated_tokens=len(kept), finish_reason="stop")
        compile_s = self.batch.setup_s if self.runner.engine in ("compiled", "graph") else None
        return replace(r, compile_s=compile_s, media_s=self._inputs_s[row], cached_tokens=outcome.cached_tokens).timed(self._vision.get(row))

    def _reference(self) -> list[tuple[int, Result]]:
        inputs, self._hf = self._hf, None
        runner, order = self.runner, self._order
        with VisionClock(runner.model) as clock:
            matchers = [runner.matcher(self.rows[i].gen) for i in order]
            if len(order) == 1:
                row = self.rows[order[0]]
                out = [reference.generate_one(runner, inputs, self.gen, row.on_text, row.cancel, matchers)]
            else:
                cancels = [self.rows[i].cancel or threading.Event() for i in order]
                out = reference.generate_rows(runner, inputs, len(order), self.gen, cancels, matchers)
        if self.gen.stop:
            out = [reference.trimmed(r, self.gen, runner.processor.tokenizer) for r in out]
        return [(i, replace(r, media_s=self.inputs_s).timed(clock.seconds())) for i, r in zip(order, out)]


def generate(runner, rows: list[Row], capacity: int = 0) -> list[Result | Exception]:
    """Rows through one Running, to the end: each row's Result, or the exception that kept it
    from running, in order. Ctrl-C while a batch of one streams: GenerationInterrupted with its text so far."""
    running = None
    out: list[Result | Exception | None] = [None] * len(rows)
    try:
        running = Running(runner, rows, capacity)
        while running.live:
            for row, result in running.advance():
                out[row] = result
    except KeyboardInterrupt:
        raise GenerationInterrupted(running.sent(0) if running is not None else "") from None
    return out


def prompt_counts(config, inputs, row: int) -> tuple[int, int]:
    """A row's prompt tokens (padding left out) and how many of them are visual."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    return int(ids.shape[0]), int(((ids == config.image_token_id) | (ids == config.video_token_id)).sum())


def _attempt(function, *args):
    """`function(*args)`, or the exception it raised."""
    try:
        return function(*args)
    except Exception as e:  # noqa: BLE001 - handed to the caller as that row's outcome
        return e
