"""Many inputs, one model (`--each`): lazy sources in, one record per input out, resumable.

A worker thread resolves and decodes the next inputs (a bounded queue ahead of the model), the
main thread generates in batches, and records go out in input order (or as they finish) with a
flush after each, so a killed run loses nothing already written.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen2vl_cli import records
from qwen2vl_cli.errors import GenerationInterrupted, QvlError
from qwen2vl_cli.records import format_record, record_for
from qwen2vl_cli.types import GenerationOptions, MediaOptions, Timeline

if TYPE_CHECKING:
    from qwen2vl_cli.backend import Backend


@dataclass(frozen=True)
class EachOptions:
    from_file: str | None = None  # one source per line; '-' is stdin
    null: bool = False  # NUL-separated, as `find -print0` writes
    format: str = "jsonl"  # or "text": source<TAB>text; "srt" or "vtt": --segment's windows as subtitles
    ordered: bool = True
    output: str | None = None  # a new file for the records
    resume: str | None = None  # a records file to continue
    batch_size: int | None = None  # None: chosen from the device
    each: bool = False  # --each or --from given (--segment writes records of one clip without them)


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def line(self) -> str:
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        return f"{self.done} done, {self.failed} failed, {self.skipped} skipped in {self.elapsed:.1f} s ({rate:.2f} items/s)"


class Emitter:
    """Writes records in input order (holding early finishers back), or as they come.

    In the text and subtitle formats a failure is no caption: it goes to `on_failure` (stderr), not
    to the sink. Subtitles are numbered as they are written.
    """

    def __init__(self, sink: Callable[[str], None], fmt: str, ordered: bool, on_failure: Callable[[dict], None] = lambda record: None):
        self.sink, self.fmt, self.ordered, self.on_failure = sink, fmt, ordered, on_failure
        self.next_index = 0
        self.held: dict[int, dict | None] = {}
        self.cues = 0
        if fmt == "vtt":
            sink("WEBVTT\n")

    def emit(self, index: int, record: dict | None) -> None:
        """`record` None: the input was skipped (resume); it only advances the order."""
        if not self.ordered:
            if record is not None:
                self._write(record)
            return
        self.held[index] = record
        while self.next_index in self.held:
            ready = self.held.pop(self.next_index)
            if ready is not None:
                self._write(ready)
            self.next_index += 1

    def _write(self, record: dict) -> None:
        if self.fmt != "jsonl" and "error" in record:
            self.on_failure(record)
        elif self.fmt in records.SUBTITLES:
            if (cue := records.cue(record, self.cues + 1, self.fmt)) is not None:
                self.cues += 1
                self.sink(cue)
        else:
            self.sink(format_record(record, self.fmt))


_END = object()


@dataclass
class Unit:
    """A record to come: one input (with --segment, one window of it, or the clip's summary) and one question."""

    serial: int  # its place among the records
    index: int  # the input's line
    source: str
    question: int
    key: str  # its request key (a window's own)
    fields: dict  # what its record says besides the result: a window's number and times
    prepared: object = None  # ready for the model
    error: BaseException | None = None
    summary: list | None = None  # --summary: the (Window, record key) of the windows it reads, once they are in

    @property
    def skipped(self) -> bool:
        return self.prepared is None and self.error is None and self.summary is None


def run_each(
    sources: Iterator[str],
    backend: Backend,
    media: MediaOptions,
    gen: GenerationOptions,
    key: str,
    batch_size: int,
    emitter: Emitter,
    tally: Tally,
    done: set[tuple[int, str, str]] = frozenset(),
    require_video: bool = False,
    on_progress: Callable[[], None] = lambda: None,
    more: list[tuple[GenerationOptions, str]] = (),
    refill: bool | None = None,
    timeline: Timeline | None = None,
    answered: dict[tuple[int, str, str], tuple[str, float, float]] | None = None,
    sheet=None,
) -> None:
    """Prepare ahead on a worker thread; generate in batches on this one. `more`: further
    questions (several -p), each with its own request key, asked of every input's media as
    prepared once; then a record is per input and question, with the question in it, and the
    emitter orders them by input, then question. `refill`: ended rows' slots are taken by the next
    inputs at once (None: on a GPU, with a batch size over one; a CPU pays for every row, and runs
    fixed batches). `timeline` (--segment): a record per window of each clip, its frames decoded in
    one pass and each window handed to the model as soon as they are in; with its summary, one more
    record per clip once its windows' answers are in (`answered`: the windows done before, by
    record: their texts and when their frames are shown). `sheet` (a sheet.Sheet) gets each window's frames as they are decoded."""
    _Run(backend, media, [(gen, key), *more], emitter, tally, done, require_video, on_progress, timeline, answered or {},
         sheet).run(sources, batch_size, refill)


class _Run:
    def __init__(self, backend, media, questions, emitter, tally, done, require_video, on_progress, timeline, answered, sheet):
        self.backend, self.media, self.questions = backend, media, questions
        self.emitter, self.tally, self.done, self.require_video, self.on_progress = emitter, tally, done, require_video, on_progress
        self.timeline, self.sheet = timeline, sheet
        self.answered = dict(answered)  # --summary: windows' (text, shown from, to), by (index, source, request key)
        self.settled: set[tuple[int, str, str]] = set()  # --summary: windows answered, failed or skipped in this run
        self.waiting: list[Unit] = []  # summaries whose windows are not all in
        self.ahead: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.finished = False

    @property
    def gen(self) -> GenerationOptions:
        return self.questions[0][0]  # the questions differ in their prompts only, which their prepared texts hold

    def run(self, sources: Iterator[str], batch_size: int, refill: bool | None) -> None:
        self.ahead = queue.Queue(maxsize=max(2, 2 * batch_size))
        worker = threading.Thread(target=self._prefetch, args=(sources,), name="qvl-prefetch", daemon=True)
        worker.start()
        self.tally.started = time.perf_counter()
        try:
            if refill is None:  # a GPU steps a batch for about the cost of one row: keep its slots full
                refill = self.backend.device not in ("cpu", "endpoint") and batch_size > 1
            if refill and getattr(self.backend, "streams_batches", False):
                return self._refilled(batch_size)
            while batch := self._batch(batch_size, []):
                for unit, result, error in _generate(self.backend, batch, self.gen):
                    self._out(unit, result, error)
        finally:
            self.stop.set()
            # Its decoding must not outlive the run: native threads still running at exit abort the process.
            worker.join(timeout=60)

    # ---- the worker: inputs (and windows) prepared, in order ------------------------------------

    def _prefetch(self, sources: Iterator[str]) -> None:
        try:
            serial = itertools.count()
            for index, source in enumerate(sources):
                if self.stop.is_set():
                    break
                units = self._input(serial, index, source) if self.timeline is None else self._windows(serial, index, source)
                try:
                    for unit in units:
                        _put(self.ahead, unit, self.stop)
                        if self.stop.is_set():
                            break
                finally:
                    units.close()  # a clip's pass over its file ends here, on this thread
        except BaseException as e:  # the source list itself failed (unreadable --from file)
            _put(self.ahead, e, self.stop)
        _put(self.ahead, _END, self.stop)

    def _asked(self, serial, index: int, source: str, keys: list[str], prepare: Callable[[], object], fields: dict) -> Iterator[Unit]:
        """An input's (or a window's) record for each question: `prepare()` makes the first
        question's request, the others ask the same media again; what fails is each one's error."""
        todo = [q for q, k in enumerate(keys) if (index, source, k) not in self.done]  # a record is per input line
        first = _attempt(prepare) if todo else None
        for q, k in enumerate(keys):
            unit = Unit(next(serial), index, source, q, k, fields)
            if q not in todo:
                pass
            elif isinstance(first, BaseException):
                unit.error = first
            else:
                try:
                    unit.prepared = first if q == 0 else self.backend.ask(first, self.questions[q][0])
                except Exception as e:
                    unit.error = e
            yield unit

    def _input(self, serial, index: int, source: str) -> Iterator[Unit]:
        prepare = lambda: self.backend.prepare((source,), self.media, self.gen, self.require_video)  # noqa: E731
        yield from self._asked(serial, index, source, [k for _, k in self.questions], prepare, {})

    def _windows(self, serial, index: int, source: str) -> Iterator[Unit]:
        """A clip's windows in order, each as soon as its frames are decoded, then its summary."""
        keys = lambda w: [records.window_key(k, w) for _, k in self.questions]  # noqa: E731
        wanted = lambda w: any((index, source, k) not in self.done for k in keys(w))  # noqa: E731
        read: list = []  # (Window, record key) of each window
        try:
            for w, prepared in self.backend.windows(source, self.media, self.timeline, self.gen, self.require_video, wanted):
                read.append((w, (index, source, keys(w)[0])))
                if self.sheet is not None and not isinstance(prepared, BaseException) and prepared is not None:
                    self.sheet.add_window(w, prepared.plans[0], prepared.loaded[0])
                yield from self._asked(serial, index, source, keys(w), lambda: _raised(prepared), records.window_fields(w))
        except Exception as e:  # the clip could not be read or cut: its error, once per question (and no summary)
            failure = e
            yield from self._asked(serial, index, source, [k for _, k in self.questions], lambda: _raised(failure), {})
            return
        if self.timeline.summary and read:
            key = records.summary_key(self.questions[0][1], self.timeline)
            unit = Unit(next(serial), index, source, 0, key, records.summary_fields(read))
            if (index, source, key) not in self.done:
                unit.summary = read
            yield unit

    # ---- this thread: units taken in order, summaries asked once their windows are in ------------

    def _batch(self, size: int, batch: list[Unit]) -> list[Unit]:
        """`batch` filled up to `size` rows, waiting for the worker."""
        while len(batch) < size and (unit := self._next(block=True)) is not None:
            batch.append(unit)
        return batch

    def _next(self, block: bool) -> Unit | None:
        """The next unit to generate; None when there is none (now, or `block`ing: any more).
        Skipped and failed units are said on the way, summaries held until their windows are in."""
        while True:
            if (ready := self._summary()) is not None:
                return ready
            if self.finished:
                return None
            try:
                item = self.ahead.get(block=block)
            except queue.Empty:
                return None
            if item is _END:
                self.finished = True
            elif isinstance(item, BaseException):
                raise item
            elif item.summary is not None:
                self.waiting.append(item)
            elif item.skipped:
                self._settle(item, None)
                self.tally.skipped += 1
                self.emitter.emit(item.serial, None)
                self.on_progress()
            elif item.error is not None:
                self._out(item, None, item.error)
            else:
                self.on_progress()
                return item

    def _summary(self) -> Unit | None:
        """The first summary whose windows are all in, its request made (or its error said)."""
        from qwen2vl_cli import segments

        for unit in self.waiting:
            if not all(k in self.settled or k in self.answered for _, k in unit.summary):
                continue
            self.waiting.remove(unit)
            read = [(w, self.answered.pop(k, None)) for w, k in unit.summary]
            self.settled.difference_update(k for _, k in unit.summary)
            answers = [(start, end, self.backend.without_control(text)) for _, (text, start, end) in (r for r in read if r[1])]
            unit.fields = {**unit.fields, "windows": [w.index + 1 for w, a in read if a],
                           "windows_failed": [w.index + 1 for w, a in read if not a]}
            try:
                if not answers:
                    raise QvlError("no window was described, so there is nothing to summarise")
                question = self.timeline.summary_prompt or self.gen.prompt
                unit.prepared = self.backend.prepare_text(segments.summary_prompt(answers, question), self.gen)
            except Exception as e:  # noqa: BLE001 - this summary's error record
                self._out(unit, None, e)
                return self._summary()
            return unit
        return None

    def _settle(self, unit: Unit, record: dict | None) -> None:
        """A window's record is in (None: skipped): with --summary, its answer (the first question's) is what the summary reads."""
        if "window" in unit.fields and unit.question == 0 and self.timeline.summary:
            key = (unit.index, unit.source, unit.key)
            self.settled.add(key)
            if record is not None and "text" in record:
                self.answered[key] = (record["text"], *records.on_screen(record))

    def _out(self, unit: Unit, result, error) -> None:
        record = record_for(unit.index, unit.source, unit.key, result, error) | unit.fields
        if len(self.questions) > 1 and "summary" not in unit.fields:
            record["question"] = self.questions[unit.question][0].prompt
        self._settle(unit, record)
        self.emitter.emit(unit.serial, record)  # counted once it is out
        if error is None:
            self.tally.done += 1
        else:
            self.tally.failed += 1
        self.on_progress()

    def _refilled(self, batch_size: int) -> None:
        """--each with rows refilled: a batch of `batch_size` rows whose ended rows' slots the next
        inputs take at once (rows.py's join), instead of waiting for the batch's longest answer. An
        input too long for the room left starts the next batch."""
        from qwen2vl_cli.rows import Row

        carried: list[Unit] = []
        while batch := self._batch(batch_size, carried):  # a batch starts full, as a fixed one does
            carried = []
            running = self.backend.start([Row(u.prepared.text, list(u.prepared.loaded), self.gen) for u in batch], capacity=batch_size)
            rows = dict(enumerate(batch))
            while running.live:
                for number, generation in running.advance():
                    unit = rows.pop(number)
                    result = self.backend.finish(unit.prepared, generation, self.gen)
                    self._out(unit, *((None, result) if isinstance(result, Exception) else (result, None)))
                while not carried and running.open() and (unit := self._next(block=False)) is not None:
                    row = Row(unit.prepared.text, list(unit.prepared.loaded), self.gen)
                    try:
                        fits = running.fits(row)
                    except Exception as e:  # noqa: BLE001 - its inputs cannot be built: this input's failure
                        self._out(unit, None, e)
                        continue
                    if not fits:
                        carried.append(unit)
                        break
                    number = len(running.rows)
                    rows[number] = unit
                    try:
                        running.join(row)
                    except Exception as e:  # noqa: BLE001 - this input's failure (out of memory in its prefill), not the batch's
                        rows.pop(number)
                        self._out(unit, None, e)


def _attempt(function: Callable[[], object]):
    """`function()`, or the exception it raised."""
    try:
        return function()
    except Exception as e:  # noqa: BLE001 - the unit's error record
        return e


def _raised(value):
    """`value`, raised where it is an exception (a window that could not be read)."""
    if isinstance(value, BaseException):
        raise value
    return value


def _generate(backend: Backend, batch: list[Unit], gen):
    """Results for a batch (a row that could not run has its error); when the batch fails as a
    whole, each input is tried alone."""
    try:
        results = backend.generate([unit.prepared for unit in batch], gen)
        return [(item, None, r) if isinstance(r, Exception) else (item, r, None) for item, r in zip(batch, results)]
    except GenerationInterrupted:  # Ctrl-C ends the run, not the row
        raise
    except Exception as e:
        if len(batch) == 1:
            return [(batch[0], None, e)]
    out = []
    for item in batch:
        try:
            out.append((item, backend.generate([item.prepared], gen)[0], None))
        except GenerationInterrupted:
            raise
        except Exception as e:
            out.append((item, None, e))
    return out


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def default_batch_size(device: str) -> int:
    # Decode on CPU is memory-bound, but prefill is not: one at a time keeps first answers quick.
    return {"cuda": 8, "mps": 4}.get(device, 1)

