"""Many inputs, one model (`--each`): lazy sources in, one record per input out, resumable.

A worker thread resolves and decodes the next inputs (a bounded queue ahead of the model), the
main thread generates in batches, and records go out in input order (or as they finish) with a
flush after each, so a killed run loses nothing already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from qwen2vl_cli.errors import QvlError, UsageError, describe_exception, error_type
from qwen2vl_cli.output import json_line, printable
from qwen2vl_cli.types import GenerationOptions, MediaOptions, Result, RuntimeOptions

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


def iter_sources(args: Iterable[str], from_file: str | None, null: bool, stdin: BinaryIO | None = None) -> Iterator[str]:
    """The command line's sources, then the list file's, read lazily (a list may be huge)."""
    yield from args
    if from_file is None:
        return
    if from_file == "-":
        import sys

        stream = stdin if stdin is not None else sys.stdin.buffer
        yield from _entries(stream, null)
        return
    path = Path(from_file).expanduser()
    if not path.exists():
        raise UsageError(f"--from {from_file}: no such file")
    if path.is_dir():
        raise UsageError(f"--from {from_file}: is a directory; give a file with one source per line")
    try:
        stream = open(path, "rb")  # a pipe (`--from <(find ...)`) is read as it comes
    except OSError as e:
        raise UsageError(f"--from {from_file}: cannot read it ({e.strerror or e})") from None
    with stream:
        yield from _entries(stream, null)


def count_sources(args: tuple[str, ...], from_file: str | None, null: bool) -> int | None:
    """How many inputs there are, when that is cheap to know (not for stdin)."""
    if from_file is None:
        return len(args)
    if from_file == "-":
        return None
    path = Path(from_file).expanduser()
    if not path.is_file():  # a pipe can be read only once: by the run
        return None
    with open(path, "rb") as stream:
        return len(args) + sum(1 for _ in _entries(stream, null))


def _entries(stream: BinaryIO, null: bool) -> Iterator[str]:
    if null:
        pending = b""
        while chunk := stream.read(1 << 16):
            pending += chunk
            *items, pending = pending.split(b"\0")
            yield from (os.fsdecode(i) for i in items if i)
        if pending:
            yield os.fsdecode(pending)
        return
    for raw in stream:
        line = os.fsdecode(raw.rstrip(b"\r\n"))
        if line.strip() and not line.lstrip().startswith("#"):
            yield line.strip()


def request_key(media: MediaOptions, gen: GenerationOptions, runtime: RuntimeOptions) -> str:
    """Identifies "the same prompt and options" for --resume."""
    fields = {"media": asdict(media), "generation": asdict(gen), "model": runtime.model}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Every record qvl writes starts so: a result ("text" first) or an error record ("source" first).
_RECORD_STARTS = (b'{"text": ', b'{"source": ')
MAX_RECORD_BYTES = 64 * 1024**2  # a longer line is not a record qvl wrote


class RecordFile:
    """JSON Lines on disk: append-only, flushed and synced per record, resumable after a kill, one
    writer at a time (an advisory lock). A file qvl did not write is refused and left as it is."""

    def __init__(self, path: str, resume: bool):
        self.option = "--resume" if resume else "--output"
        self.path = Path(path).expanduser()
        self.done: set[tuple[int, str, str]] = set()  # (index, source, request_key) of the successful records
        self._broken = False
        shown = f"{self.option} {path}"
        if self.path.is_dir():
            raise UsageError(f"{shown}: is a directory; give a file name, such as {Path(path) / 'records.jsonl'}")
        existing = self.path.exists()
        if existing and not resume:
            raise UsageError(f"--output {path}: the file exists; continue it with --resume {path}, or choose a new name")
        if existing and not self.path.is_file():
            raise UsageError(f"{shown}: not a regular file; give the JSON Lines file that qvl --each wrote")
        if not existing and self.path.is_symlink():
            raise UsageError(f"{shown}: a symbolic link to nothing (or a loop of them); give the file itself")
        try:
            self._file = open(self.path, "r+b" if existing else "xb")
        except OSError as e:
            raise UsageError(f"{shown}: {_path_problem(e, self.path)}") from None
        try:
            _lock(self._file, shown)
            if existing:
                self._read_and_repair(shown)
            self._file.seek(0, os.SEEK_END)
        except BaseException:
            self._file.close()
            raise

    def _read_and_repair(self, shown: str) -> None:
        """Records already written; a last line cut short by a kill is dropped (when it is plainly
        the start of a record), anything else that is not a record refuses the file."""
        good_end, number = 0, 0
        f = self._file
        while line := f.readline(MAX_RECORD_BYTES + 1):
            number += 1
            if not line.endswith(b"\n"):
                if len(line) > MAX_RECORD_BYTES or not line.startswith(_RECORD_STARTS):
                    raise UsageError(f"{shown}: line {number} is not a record qvl wrote; give a file that qvl --each wrote")
                break  # a record cut short by a kill: it is dropped and redone
            good_end += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("source"), str) and isinstance(record.get("index"), int)
                    and isinstance(record.get("request_key"), str)):
                raise UsageError(f"{shown}: line {number} is not a record qvl wrote; give a file that qvl --each wrote")
            if "error" not in record:
                self.done.add((record["index"], record["source"], record["request_key"]))
        if good_end != os.fstat(f.fileno()).st_size:
            f.truncate(good_end)

    def write(self, line: str) -> None:
        try:
            self._file.write(line.encode("utf-8", "surrogateescape") + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk or a quota: the records before this one are on disk
            self._broken = True
            raise self._error(e) from None

    def _error(self, e: OSError) -> QvlError:
        return QvlError(f"{self.option} {self.path}: cannot write ({e.strerror or e}); the records before this one are kept, "
                        f"and --resume {self.path} carries on once there is room")

    def close(self) -> None:
        try:
            self._file.close()  # closes the file (and lets go of its lock) even when its last flush fails
        except OSError as e:
            if not self._broken:  # else already said, by write()
                raise self._error(e) from None


def _lock(f, shown: str) -> None:
    """An advisory lock held while the file is open: a second qvl on the same file is refused."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{shown}: another qvl is writing to it; let it finish, or choose another file") from None
    except OSError:  # a file system without locks (some network mounts): go on unlocked
        pass


def _path_problem(e: OSError, path: Path) -> str:
    """Why a file cannot be opened, said so the user can fix it."""
    import errno

    if e.errno == errno.ENOENT:
        return f"no such directory {str(path.parent)!r}; create it first"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write there ({e.strerror}); choose a place you can write"
    if e.errno == errno.ELOOP:
        return "a loop of symbolic links"
    return f"cannot open it ({e.strerror or e})"


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


def record_for(index: int, source: str, key: str, result: Result | None, error: BaseException | None) -> dict:
    if error is not None:
        message, _ = describe_exception(error)
        return {"source": source, "index": index, "request_key": key, "error": {"type": error_type(error), "message": message}}
    out = result.to_dict()
    out.update(source=source, index=index, request_key=key)
    return out


def _escaped(text: str) -> str:
    """One field of a tab-separated line: backslashes, tabs and line breaks escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def format_record(record: dict, fmt: str) -> str:
    if fmt == "text":
        question = f"{_escaped(record['question'])}\t" if "question" in record else ""
        return f"{_escaped(record['source'])}\t{question}{_escaped(record['text'])}"
    return json_line(record)


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


def sink_for(output: RecordFile | None, stdout: TextIO) -> Callable[[str], None]:
    if output is not None:
        return output.write

    terminal = stdout.isatty()

    def write(line: str) -> None:
        try:
            # A file name that is not UTF-8 (text format) goes back out as the bytes it was.
            data = ((printable(line) if terminal else line) + "\n").encode("utf-8", "surrogateescape")
            if hasattr(stdout, "buffer"):
                stdout.buffer.write(data)
            else:
                stdout.write(data.decode("utf-8", "replace"))
            stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise QvlError(f"cannot write the records to stdout ({e.strerror or e})") from None

    return write
