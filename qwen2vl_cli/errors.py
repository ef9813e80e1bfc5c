"""Error types and the one place that turns exceptions into a one-line message and an exit code."""

from __future__ import annotations

import errno

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class QvlError(Exception):
    """A failure qvl can explain in one line. Runtime failures exit 1."""

    exit_code = EXIT_RUNTIME


class UsageError(QvlError):
    """Bad options or bad input from the user: exit 2."""

    exit_code = EXIT_USAGE


class MediaError(UsageError):
    """A media source that cannot be read, or is not an image or a video."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class ModelError(QvlError):
    """The model cannot be found or loaded."""


class InternalError(QvlError):
    """A failure that is qvl's (or a library's) fault, not the input's: exit 1, with a plea to report it."""


class Cancelled(Exception):
    """Every client of the work went away (before it ran, or during a prefill): nobody is left to answer."""


class OutputClosed(Exception):
    """The reader of stdout went away (`qvl ... | head`): not an OSError, so click does not take it for a failure."""


class GenerationInterrupted(Exception):
    """Ctrl-C during generation; carries the text streamed so far."""

    def __init__(self, text: str):
        super().__init__("interrupted")
        self.text = text


def one_line(exc: BaseException) -> str:
    """An exception's reason on one line; FFmpeg errors without their errno and path."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def error_type(exc: BaseException) -> str:
    """A stable name for the kind of failure, for machine-readable records."""
    if isinstance(exc, MediaError):
        return "bad_input"
    if isinstance(exc, UsageError):
        return "usage"
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return "out_of_memory"
    if isinstance(exc, ModelError):
        return "model"
    return "runtime"


def describe_exception(exc: BaseException) -> tuple[str, int]:
    """Map any exception to (one-line message, exit code)."""
    if isinstance(exc, QvlError):
        return str(exc), exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, GenerationInterrupted)):
        return "interrupted", EXIT_INTERRUPTED
    name = type(exc).__name__
    if name == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return (
            "out of memory: lower --max-pixels (images) or --fps / --total-pixels (video), "
            "or use --dtype bfloat16",
            EXIT_RUNTIME,
        )
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:  # a write outside qvl's own (its help, say)
        return f"cannot write ({exc.strerror}): free some space", EXIT_RUNTIME
    text = " ".join(str(exc).split()) or name
    return f"unexpected {name}: {text} (set QVL_DEBUG=1 for the traceback)", EXIT_RUNTIME


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
