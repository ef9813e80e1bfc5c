"""The files of `--each`: the list of inputs (arguments, or `--from FILE` read lazily), the JSON
Lines file its records go to (locked, resumed, never a record qvl did not write touched), and a
record's shape and format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from qwen2vl_cli.errors import QvlError, UsageError, describe_exception, error_type
from qwen2vl_cli.output import json_line, printable
from qwen2vl_cli.types import GenerationOptions, MediaOptions, Result, RuntimeOptions, Timeline

if TYPE_CHECKING:
    from qwen2vl_cli.segments import Window


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
    return _digest(fields)


def window_key(key: str, window: Window) -> str:
    """A window's own request key: the clip's request and the window's span (--segment, --overlap)."""
    return _digest({"request": key, "window": [window.start_s, window.end_s]})


def summary_key(key: str, timeline: Timeline) -> str:
    """A clip's summary's request key: the clip's request, how it was cut, the summary's question."""
    return _digest({"request": key, "summary": [timeline.segment, timeline.overlap, timeline.summary_prompt]})


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def window_fields(window: Window) -> dict:
    """What a window's record says of it: its number (from 1) and its span in the clip."""
    return {"window": window.index + 1, "start_s": round(window.start_s, 4), "end_s": round(window.end_s, 4)}


def summary_fields(read: list) -> dict:
    """What a summary's record says of it, before it knows which windows it read: the clip's span."""
    return {"summary": True, "start_s": round(read[0][0].start_s, 4), "end_s": round(read[-1][0].end_s, 4)}


# Every record qvl writes starts so: a result ("text" first) or an error record ("source" first).
_RECORD_STARTS = (b'{"text": ', b'{"source": ')
MAX_RECORD_BYTES = 64 * 1024**2  # a longer line is not a record qvl wrote


class RecordFile:
    """JSON Lines on disk: append-only, flushed and synced per record, resumable after a kill, one
    writer at a time (an advisory lock). A file qvl did not write is refused and left as it is."""

    def __init__(self, path: str, resume: bool, resumable: bool = True):
        """`resumable`: JSON Lines (subtitles cannot be continued)."""
        self.option = "--resume" if resume else "--output"
        self.path = Path(path).expanduser()
        self.done: set[tuple[int, str, str]] = set()  # (index, source, request_key) of the successful records
        self.answered: dict[tuple[int, str, str], tuple[str, float, float]] = {}  # --segment's windows among them: text, `shown` span
        self._broken = False
        shown = f"{self.option} {path}"
        if self.path.is_dir():
            raise UsageError(f"{shown}: is a directory; give a file name, such as {Path(path) / 'records.jsonl'}")
        existing = self.path.exists()
        if existing and not resume:
            hint = f"continue it with --resume {path}, or choose a new name" if resumable else "choose a new name"
            raise UsageError(f"--output {path}: the file exists; {hint}")
        if existing and not self.path.is_file():
            raise UsageError(f"{shown}: not a regular file; give the JSON Lines file that qvl --each wrote")
        if not existing and self.path.is_symlink():
            raise UsageError(f"{shown}: a symbolic link to nothing (or a loop of them); give the file itself")
        try:
            self._file = open(self.path, "r+b" if existing else "xb")
        except OSError as e:
            raise UsageError(f"{shown}: {_path_problem(e, self.path)}") from None
        self._made = not existing  # a file this run made and wrote nothing to is not left behind
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
            if "error" not in record and not record.get("windows_failed"):  # a summary that missed windows is done again
                self.done.add((record["index"], record["source"], record["request_key"]))
                if "window" in record and isinstance(record.get("text"), str):
                    try:
                        self.answered[(record["index"], record["source"], record["request_key"])] = (record["text"], *on_screen(record))
                    except (KeyError, IndexError, TypeError):  # a window record without its frames' times: a summary redoes it
                        pass
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
            empty = self._made and self._file.tell() == 0
            self._file.close()  # closes the file (and lets go of its lock) even when its last flush fails
        except OSError as e:
            if not self._broken:  # else already said, by write()
                raise self._error(e) from None
            return
        if empty:  # stopped before its first record (Ctrl-C while the model loaded): the name stays free
            self.path.unlink(missing_ok=True)


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


def record_for(index: int, source: str, key: str, result: Result | None, error: BaseException | None) -> dict:
    if error is not None:
        message, _ = describe_exception(error)
        return {"source": source, "index": index, "request_key": key, "error": {"type": error_type(error), "message": message}}
    out = result.to_dict()
    out.update(source=source, index=index, request_key=key)
    return out


def _escaped(text: str) -> str:
    """One field of a tab-separated line: backslashes, tabs and line breaks escaped, other control
    characters as \\xNN (a NUL would make the file binary to grep)."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 and DEL, but tab and line breaks


def format_record(record: dict, fmt: str) -> str:
    """A record as a line: JSON, or text (source, question, a window's span or "summary", then
    the answer, tab-separated)."""
    if fmt == "text":
        question = f"{_escaped(record['question'])}\t" if "question" in record else ""
        span = "summary\t" if "summary" in record else f"{clock(record['start_s'])}-{clock(record['end_s'])}\t" if "window" in record else ""
        return f"{_escaped(record['source'])}\t{question}{span}{_escaped(record['text'])}"
    return json_line(record)


SUBTITLES = ("srt", "vtt")


def cue(record: dict, number: int, fmt: str) -> str | None:
    """A window's answer as a subtitle cue (SubRip or WebVTT), shown while its frames are (`on_screen`);
    None for an empty answer. A blank line would end the cue early, so the text has none."""
    text = "\n".join(line.strip() for line in _CONTROL.sub("", record["text"]).strip().splitlines() if line.strip())
    if not text:
        return None
    start, end = on_screen(record)
    if fmt == "vtt":  # WebVTT reads & and < as markup and --> as a timing line
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f"{clock(start, '.')} --> {clock(end, '.')}\n{text}\n"
    # SubRip has no escapes, and players read <i>, <font ...> and {\an8} in it: a zero-width space keeps them text.
    text = text.replace("<", "<\u200b").replace("{", "{\u200b")
    return f"{number}\n{clock(start, ',')} --> {clock(end, ',')}\n{text}\n"


def on_screen(record: dict) -> tuple[float, float]:
    """When a window's frames are on screen: its first sampled frame's time to its last's, by the
    frames' own timestamps. (`start_s`-`end_s` is the span asked for, which counts frames at the
    clip's average rate as --start and --end do; a variable frame rate moves the frames in it.)"""
    times = record["inputs"][0]["frame_times_s"]
    return times[0], times[-1]


def clock(seconds: float, mark: str = ".") -> str:
    """Seconds as HH:MM:SS.mmm (subtitles' clock; SubRip marks the milliseconds with a comma)."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    return f"{hours:02d}:{minutes:02d}:{ms // 1000:02d}{mark}{ms % 1000:03d}"


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
