"""Many inputs, one model (`--each`): lazy sources in, one record per input out, resumable.

A worker thread resolves and decodes the next inputs (a bounded queue ahead of the model), the
main thread generates in batches, and records go out in input order (or as they finish) with a
flush after each, so a killed run loses nothing already written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwen2vl_cli.records import format_record, record_for
from qwen2vl_cli.types import GenerationOptions, MediaOptions

if TYPE_CHECKING:
    from qwen2vl_cli.backend import Backend


@dataclass(frozen=True)
class EachOptions:
    from_file: str | None = None  # one source per line; '-' is stdin
    null: bool = False  # NUL-separated, as `find -print0` writes
    format: str = "jsonl"  # or "text": source<TAB>text
    ordered: bool = True
    output: str | None = None  # a new file for the records
    resume: str | None = None  # a records file to continue
    batch_size: int | None = None  # None: chosen from the device


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

    In the text format a failure is no caption: it goes to `on_failure` (stderr), not to the sink.
    """

    def __init__(self, sink: Callable[[str], None], fmt: str, ordered: bool, on_failure: Callable[[dict], None] = lambda record: None):
        self.sink, self.fmt, self.ordered, self.on_failure = sink, fmt, ordered, on_failure
        self.next_index = 0
        self.held: dict[int, dict | None] = {}

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
        if self.fmt == "text" and "error" in record:
            self.on_failure(record)
        else:
            self.sink(format_record(record, self.fmt))


_END = object()


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
) -> None:
    """Prepare ahead on a worker thread; generate in batches on this one. `more`: further
    questions (several -p), each with its own request key, asked of every input's media as
    prepared once; then a record is per input and question, with the question in it, and the
    emitter orders them by input, then question. `refill`: ended rows' slots are taken by the next
    inputs at once (None: on a GPU, with a batch size over one; a CPU pays for every row, and runs
    fixed batches)."""
    questions = [(gen, key), *more]
    asked = len(questions)
    ahead: queue.Queue = queue.Queue(maxsize=max(2, 2 * batch_size))
    stop = threading.Event()

    def prefetch() -> None:
        try:
            for index, source in enumerate(sources):
                if stop.is_set():
                    break
                todo = [q for q, (_, k) in enumerate(questions) if (index, source, k) not in done]  # a record is per input line
                prepared, error = None, None
                if todo:
                    try:
                        prepared = backend.prepare((source,), media, questions[todo[0]][0], require_video)
                    except Exception as e:  # one bad input is an error record for each question
                        error = e
                for q in range(asked):
                    if q not in todo:
                        item = (index * asked + q, index, source, q, None, None)
                    elif error is not None:
                        item = (index * asked + q, index, source, q, None, error)
                    else:
                        try:
                            item = (index * asked + q, index, source, q, prepared if q == todo[0] else backend.ask(prepared, questions[q][0]), None)
                        except Exception as e:
                            item = (index * asked + q, index, source, q, None, e)
                    _put(ahead, item, stop)
        except BaseException as e:  # the source list itself failed (unreadable --from file)
            _put(ahead, (None, None, None, None, None, e), stop)
        _put(ahead, _END, stop)

    def record(index: int, source: str, q: int, result, error) -> dict:
        out = record_for(index, source, questions[q][1], result, error)
        if asked > 1:
            out["question"] = questions[q][0].prompt
        return out

    def take(item):
        """An item from the queue: skipped and failed inputs are said here; one to run is returned."""
        unit, index, source, q, prepared, error = item
        if unit is None:
            raise error
        if prepared is None and error is None:
            tally.skipped += 1
            emitter.emit(unit, None)
        elif error is not None:
            emitter.emit(unit, record(index, source, q, None, error))
            tally.failed += 1
        else:
            on_progress()
            return unit, index, source, q, prepared
        on_progress()
        return None

    def out(item, result, error) -> None:
        unit, index, source, q, _ = item
        emitter.emit(unit, record(index, source, q, result, error))  # counted once it is out
        if error is None:
            tally.done += 1
        else:
            tally.failed += 1
        on_progress()

    worker = threading.Thread(target=prefetch, name="qvl-prefetch", daemon=True)
    worker.start()
    tally.started = time.perf_counter()
    try:
        if refill is None:  # a GPU steps a batch for about the cost of one row: keep its slots full
            refill = backend.device not in ("cpu", "endpoint") and batch_size > 1
        if refill and getattr(backend, "streams_batches", False):
            return _refilled(backend, ahead, batch_size, gen, take, out)
        finished = False
        while not finished:
            batch: list[tuple[int, int, str, int, object]] = []
            while len(batch) < batch_size:
                item = ahead.get()
                if item is _END:
                    finished = True
                    break
                if (ready := take(item)) is not None:
                    batch.append(ready)
            # The questions differ in their prompts only, which their prepared texts hold: one batch.
            for item, result, error in _generate(backend, batch, gen) if batch else ():
                out(item, result, error)
    finally:
        stop.set()
        # Its decoding must not outlive the run: native threads still running at exit abort the process.
        worker.join(timeout=60)


def _refilled(backend, ahead: queue.Queue, batch_size: int, gen: GenerationOptions, take, out) -> None:
    """--each with rows refilled: a batch of `batch_size` rows whose ended rows' slots the next
    inputs take at once (rows.py's join), instead of waiting for the batch's longest answer. An
    input too long for the room left starts the next batch."""
    from qwen2vl_cli.rows import Row

    finished, carried = False, []
    while True:
        batch = carried
        carried = []
        while not finished and len(batch) < batch_size:  # a batch starts full, as a fixed one does
            item = ahead.get()
            if item is _END:
                finished = True
            elif (ready := take(item)) is not None:
                batch.append(ready)
        if not batch:
            return
        running = backend.start([Row(p.text, list(p.loaded), gen) for *_, p in batch], capacity=batch_size)
        rows = dict(enumerate(batch))
        while running.live:
            for number, generation in running.advance():
                result = backend.finish(rows[number][-1], generation, gen)
                out(rows.pop(number), *((None, result) if isinstance(result, Exception) else (result, None)))
            while not finished and not carried and running.open():
                try:
                    item = ahead.get_nowait()
                except queue.Empty:
                    break
                if item is _END:
                    finished = True
                    break
                if (ready := take(item)) is None:
                    continue
                row = Row(ready[-1].text, list(ready[-1].loaded), gen)
                try:
                    fits = running.fits(row)
                except Exception as e:  # noqa: BLE001 - its inputs cannot be built: this input's failure
                    out(ready, None, e)
                    continue
                if not fits:
                    carried.append(ready)
                    break
                number = len(running.rows)
                rows[number] = ready
                try:
                    running.join(row)
                except Exception as e:  # noqa: BLE001 - this input's failure (out of memory in its prefill), not the batch's
                    rows.pop(number)
                    out(ready, None, e)


def _generate(backend: Backend, batch, gen):
    """Results for a batch (a row that could not run has its error); when the batch fails as a
    whole, each input is tried alone."""
    try:
        results = backend.generate([item[-1] for item in batch], gen)
        return [(item, None, r) if isinstance(r, Exception) else (item, r, None) for item, r in zip(batch, results)]
    except Exception as e:
        if len(batch) == 1:
            return [(batch[0], None, e)]
    out = []
    for item in batch:
        try:
            out.append((item, backend.generate([item[-1]], gen)[0], None))
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

