"""Everything the user sees: streamed text and JSON on stdout; diagnostics, notes and errors on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from qwen2vl_cli.errors import OutputClosed, QvlError
from qwen2vl_cli.output import json_line, printable
from qwen2vl_cli.sources import format_size
from qwen2vl_cli.types import MediaPlan, Result


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (`qvl inspect ... | head`): Rich would exit 1; the edge ends it quietly."""
        import os

        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())
        raise OutputClosed()


class _Stream:
    """A console's file. Data that cannot be written (stdout on a full disk) is an error naming
    stdout; diagnostics that cannot be (stderr on a full disk) are let go, so the answer still goes out."""

    def __init__(self, stream, name: str, required: bool):
        self._stream, self._name, self._required = stream, name, required

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            return self._failed(e)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> int:
        if self._required:
            raise QvlError(f"cannot write to {self._name} ({e.strerror or e})") from None
        return 0

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _console(**kwargs) -> Console:
    # markup, emoji and highlighting off: file names, model output and exception text are data,
    # and `cat[red].jpg` or `:smile:` must print as given. Styles come from Text objects.
    # soft_wrap: a diagnostic stays one line in logs, whatever the terminal width.
    return _Console(markup=False, emoji=False, highlight=False, soft_wrap=True, **kwargs)


def stderr_console() -> Console:
    return _console(file=_Stream(sys.stderr, "stderr", required=False) if sys.stderr is not None else None, stderr=True)


def stdout_console() -> Console:
    if sys.stdout is None:
        raise QvlError("cannot write to stdout (it is closed): redirect it, as in > out.txt")
    console = _console(file=_Stream(sys.stdout, "stdout", required=True))
    if not console.is_terminal:
        console.width = 1000  # piped tables keep whole names; rows take their natural width
    return console


def styled(label: str, style: str, text: str) -> Text:
    """`label` in `style`, then plain `text`: the one way diagnostics are coloured."""
    return Text.assemble((label, style), " ", printable(text, lines=False))


def print_error(message: str) -> None:
    stderr_console().print(styled("qvl: error:", "bold red", message))


def write_stdout(text: str) -> None:
    """Data on stdout, made printable where it is a terminal. A full disk is one line naming it;
    a reader that went away (BrokenPipeError) ends the run quietly, at the edge."""
    if sys.stdout is None:
        raise QvlError("cannot write to stdout (it is closed): redirect it, as in > out.txt")
    if sys.stdout.isatty():
        text = printable(text)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise QvlError(f"cannot write to stdout ({e.strerror or e})") from None


def print_json(obj: dict) -> None:
    write_stdout(json_line(obj) + "\n")


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def frame_times(times: Sequence[float], limit: int = 8, digits: int = 2) -> str:
    shown = [f"{t:.{digits}f}" for t in times]
    if len(shown) > limit:
        shown = shown[: limit - 2] + ["…", shown[-1]]
    return ", ".join(shown) + " s"


def plan_line(p: MediaPlan) -> Text:
    grid = "×".join(str(g) for g in p.grid_thw)
    size = f"{p.width}x{p.height} → {p.resized_width}x{p.resized_height}, grid {grid}, {p.visual_tokens} visual tokens"
    if p.kind == "image":
        return Text.assemble((printable(p.source, lines=False), "bold"), f": image {size}")
    n = len(p.frame_indices or ())
    return Text.assemble(
        (printable(p.source, lines=False), "bold"),
        f": video {_fmt_s(p.duration_s)} at {p.native_fps:.3g} fps, {p.frames} frames; "
        f"sampled {n} at {p.sample_fps:.3g} fps ({frame_times(p.frame_times_s or ())}); {size}",
    )


def summary_line(r: Result) -> Text:
    parts = [
        f"prompt {r.prompt_tokens} tokens ({r.visual_tokens} visual)",
        f"generated {r.generated_tokens} ({r.finish_reason})",
        f"load {_fmt_s(r.load_s)}",
        f"media {_fmt_s(r.media_s)}" if r.media_s is not None else None,
        f"first token {_fmt_s(r.ttft_s)}" + (f" (vision {_fmt_s(r.vision_s)}, prefill {_fmt_s(r.prefill_s)})" if r.vision_s is not None else ""),
        f"compile {_fmt_s(r.compile_s)}" if r.compile_s is not None else None,
        f"{r.decode_tokens_per_s:.1f} tok/s" if r.decode_tokens_per_s else "- tok/s",
        f"peak {format_size(r.peak_memory_bytes)}",
        (f"{r.device} {r.dtype}" + (f" {r.weights} weights" if r.weights not in (r.dtype, "-") else "") + f" {r.attn} {r.engine}")
        if r.engine != "-" else f"{r.device}",
    ]
    return Text(" · ".join(p for p in parts if p is not None), style="dim")


def _live(console: Console, renderable):
    """A live display on stderr that leaves sys.stdout and sys.stderr alone: what the user
    redirected stays redirected (Rich's default swaps them for proxies onto this console)."""
    from rich.live import Live

    return Live(renderable, console=console, transient=True, refresh_per_second=12.5, redirect_stdout=False, redirect_stderr=False)


def _spinner(text: str):
    from rich.spinner import Spinner

    return Spinner("dots", Text(text))


class Reporter:
    """The pipeline's hooks for a terminal: a spinner while waiting, the answer as it streams."""

    def __init__(self, quiet: bool = False, stream: bool = True):
        self.console = stderr_console()
        self.quiet = quiet
        self.stream = stream
        self._status = None
        self._wrote = False
        self._heading: str | None = None  # several -p: the next answer's question, written with its first text
        self._ends_with_newline = True

    def stage(self, text: str) -> None:
        if self.quiet or not self.console.is_terminal:
            return
        if self._status is None:
            self._status = _live(self.console, _spinner(text))
            self._status.start()
        else:
            self._status.update(_spinner(text))

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def inputs(self, plans: list[MediaPlan], lines: bool = True) -> None:
        if self.quiet:
            return
        if self._wrote and not self._ends_with_newline:  # after a streamed answer (a remote server says its sizes at the end)
            self.end_text()
        for p in plans:
            if lines:
                self.console.print(plan_line(p))
            for note in p.notes:
                self.note(note)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(styled("note:", "yellow", text))

    def question(self, text: str, first: bool) -> None:
        """Several -p: each answer comes under its question, quoted (on stdout, where answers
        stream), written with the answer's first text: after what is said of the media."""
        if self.stream:
            self._heading = ("" if first else "\n") + "".join(f"> {line}\n" for line in text.splitlines() or [""])

    def _write_heading(self) -> None:
        if self._heading is not None:
            write_stdout(self._heading)
            self._heading = None
            self._wrote = self._ends_with_newline = True

    def text(self, chunk: str) -> None:
        self.stop()
        if not self.stream:
            return
        self._write_heading()
        write_stdout(chunk)
        self._wrote = True
        self._ends_with_newline = chunk.endswith("\n")

    def end_text(self) -> None:
        self.stop()
        self._write_heading()  # an answer with no text still comes under its question
        if self.stream and (not self._wrote or not self._ends_with_newline):
            write_stdout("\n")
            self._wrote = self._ends_with_newline = True

    def close_text(self) -> None:
        """After an answer that failed: the text it streamed, if any, ends its line."""
        self.stop()
        if self.stream and self._wrote and not self._ends_with_newline:
            write_stdout("\n")
            self._ends_with_newline = True

    def boxes(self, result: Result, drawn: str | None, listed: bool = True) -> None:
        """--boxes: one line per box on stdout (label, then x1 y1 x2 y2 in the image's pixels, tab
        separated; a point is x y), what could not be read on stderr."""
        self.stop()
        if listed:  # plain lines for scripts (Rich would turn the tabs into spaces)
            lines = []
            for b in result.boxes or ():
                numbers = b["box"] if "box" in b else b["point"]
                lines.append("\t".join([" ".join(b["label"].split())] + [f"{v:g}" for v in numbers]) + "\n")
            write_stdout("".join(lines))
        for problem in result.box_problems:
            self.note(f"left out of the boxes: {problem}")
        if not result.boxes and not result.box_problems:
            answer = " ".join(result.text.split())
            self.note(f"no boxes in the answer: {answer[:200] + ('…' if len(answer) > 200 else '')}")
        if drawn is not None and not self.quiet:
            self.console.print(f"qvl: drew {len(result.boxes or ())} box{'es' if len(result.boxes or ()) != 1 else ''} on {printable(drawn, lines=False)}", markup=False)

    def summary(self, result: Result) -> None:
        self.stop()
        if self.quiet:
            return
        if result.finish_reason == "repetition":
            self.note(f"stopped a repetition loop after {result.generated_tokens} tokens (--no-repeat-guard lets it run)")
        self.console.print(summary_line(result))


class BatchProgress:
    """Progress of an `--each` run on stderr: a live bar on a terminal, a line every 10 s otherwise."""

    INTERVAL_S = 10.0

    def __init__(self, quiet: bool, total: int | None):
        self.console = stderr_console()
        self.quiet = quiet
        self._progress = None
        self._last = time.monotonic()
        if quiet or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [SpinnerColumn(), MofNCompleteColumn() if total else TextColumn("{task.completed} done"), BarColumn(),
                   TextColumn("{task.fields[rate]:.2f} items/s · {task.fields[failed]} failed"), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        # Rich's Progress swaps sys.stdout for its own proxy by default: records would land on the terminal.
        self._progress = Progress(*columns, console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False)
        self._task = self._progress.add_task("qvl", total=total, rate=0.0, failed=0)
        self._progress.start()

    def update(self, tally) -> None:
        if self.quiet:
            return
        handled = tally.done + tally.failed + tally.skipped
        rate = tally.done / tally.elapsed if tally.elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(self._task, completed=handled, rate=rate, failed=tally.failed)
        elif time.monotonic() - self._last >= self.INTERVAL_S:
            self._last = time.monotonic()
            self.console.print(f"qvl: {tally.line()}")

    def failure(self, text: str) -> None:
        """One input's error, above the live bar."""
        self.console.print(styled("qvl: error:", "bold red", text))

    def above(self, write) -> None:
        """`write()` of a record to stdout where stdout is this terminal too: the bar is taken down
        first and drawn again after, so the record starts on a line of its own."""
        if self._progress is None or not sys.stdout.isatty():
            return write()
        self._progress.stop()
        try:
            write()
        finally:
            self._progress.start()

    def close(self, tally) -> None:
        if self._progress is not None:
            self._progress.stop()
        if not self.quiet:
            self.console.print(f"qvl: {tally.line()}")


def windows_table(cut) -> None:
    """`qvl inspect --segment`: a row per window (Window, MediaPlan), and the total."""
    from rich.table import Table

    out = stdout_console()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("source", "window", "from", "to", "frames", "grid (t,h,w)", "visual tokens", "with markers"):
        table.add_column(name, justify="left" if name == "source" else "right")
    name = (lambda text: printable(text, lines=False)) if out.is_terminal else str
    for w, p in cut:
        table.add_row(Text(name(p.source)), str(w.index + 1), _fmt_s(w.start_s), _fmt_s(w.end_s), str(len(p.frame_indices or ())),
                      f"({p.grid_thw[0]}, {p.grid_thw[1]}, {p.grid_thw[2]})", str(p.visual_tokens), str(p.tokens_with_markers))
    out.print(table)
    clips = len({p.source for _, p in cut})
    out.print(f"total: {sum(p.tokens_with_markers for _, p in cut)} tokens with markers in {len(cut)} window{'s' if len(cut) != 1 else ''}"
              + (f" of {clips} clips" if clips > 1 else ""))


def inspect_table(plans: Sequence[MediaPlan]) -> None:
    from rich.table import Table

    out = stdout_console()
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("source", "kind", "size", "resized", "grid (t,h,w)", "visual tokens", "with markers"):
        table.add_column(name, justify="right" if "tokens" in name or "markers" in name else "left")
    name = (lambda text: printable(text, lines=False)) if out.is_terminal else str
    for p in plans:
        table.add_row(
            Text(name(p.source)),
            p.kind,
            f"{p.width}x{p.height}",
            f"{p.resized_width}x{p.resized_height}",
            f"({p.grid_thw[0]}, {p.grid_thw[1]}, {p.grid_thw[2]})",
            str(p.visual_tokens),
            str(p.tokens_with_markers),
        )
    out.print(table)
    for p in plans:
        if p.kind == "video":
            indices = list(p.frame_indices or ())
            shown = ", ".join(map(str, indices)) if len(indices) <= 12 else ", ".join(map(str, indices[:10])) + f", … {indices[-1]}"
            out.print(
                f"{name(p.source)}: {_fmt_s(p.duration_s)}, {p.native_fps:.3g} fps, {p.frames} frames → "
                f"{len(indices)} frames at {p.sample_fps:.3g} fps; indices {shown}; times {frame_times(p.frame_times_s or ())}"
                + (f"; time stamps in the prompt {frame_times(p.time_stamps_s, digits=1)} ({p.stamp_tokens} tokens)" if p.time_stamps_s else "")
            )
    if len(plans) > 1:
        total = sum(p.tokens_with_markers for p in plans)
        out.print(f"total: {total} tokens with markers for {len(plans)} inputs")


def model_summary(info: dict) -> None:
    from rich.table import Table

    out = stdout_console()
    for title, rows in info.items():
        table = Table(title=title, title_justify="left", title_style="bold", box=None, show_header=False, pad_edge=False)
        table.add_column(style="dim")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
        out.print(table)
        out.print()
