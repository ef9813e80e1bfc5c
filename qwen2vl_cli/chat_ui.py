"""`qvl chat` at a terminal (prompt_toolkit: a line editor with history) and with stdin piped (one
turn per line, or per block of lines), both over one `Chat` (chat.py) and one set of commands.

The model loads on a worker thread while the first question is typed: the prompt comes at once.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

from qwen2vl_cli import config as C, options as O
from qwen2vl_cli.chat import MEDIUM_OPTIONS, NO_STDIN, Chat, stats
from qwen2vl_cli.errors import (
    EXIT_INTERRUPTED, Cancelled, GenerationInterrupted, MediaError, QvlError, UsageError, describe_exception, error_type,
)

HELP = """\
/image PATH|URL [--max-pixels N]       an image for the next question (a path or URL alone on a line does the same)
/video PATH|URL [--fps N] [--nframes N] [--start S] [--end S] [--max-frames N]   a video for the next question
                                       (also --min-frames, --min-pixels, --total-pixels, --max-visual-tokens)
/clear                                 start a new conversation (the system message stays)
/system [TEXT]                         the system message (none given: the chat template's)
/save FILE                             the conversation as OpenAI-style messages JSON (a new file)
/load FILE                             a saved conversation in place of this one
/stats                                 what the conversation holds and what its turns cost
/help                                  this list
/exit                                  leave (or Ctrl-D); Ctrl-C stops an answer and keeps the conversation
Alt-Enter (or Esc, Enter) starts a new line; Enter sends."""

COMMANDS = ("/image", "/video", "/clear", "/system", "/save", "/load", "/stats", "/help", "/exit", "/quit")
LINE_COMMANDS = tuple(c for c in COMMANDS if c != "/system")  # a line each; /system takes the lines after it too
FAILED = "failed"  # what `Front.line` says of a line that failed


class Relay:
    """A LocalBackend's stages, shown by the turn's reporter; only the main thread's (the loading
    thread's are not shown: the reporter is the main thread's)."""

    def __init__(self):
        self.target = None

    def stage(self, text: str) -> None:
        target = self.target
        if target is not None and threading.current_thread() is threading.main_thread():
            target.stage(text)


class Loader:
    """The engine, made on a worker thread (torch, the processor; then the weights on the
    backend's own thread): `__call__` waits for it. Registered in config.LOADS so an early exit
    does not wait for it."""

    def __init__(self, make):
        self.future: Future = Future()
        self._make = make
        self._started = False

    def start(self) -> None:
        """Begin loading (once): at a terminal, when the prompt is on the screen (the loading
        thread's imports would otherwise hold up its first drawing)."""
        if not self._started:
            self._started = True
            C.LOADS.add(self.future)
            self.future.add_done_callback(C.LOADS.discard)
            threading.Thread(target=self._run, args=(self._make,), name="qvl-chat-load").start()

    def _run(self, make) -> None:
        try:
            self.future.set_result(make())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            self.future.set_exception(e)

    def done(self) -> bool:
        return self.future.done()

    def check(self) -> None:
        """The engine's failure (the model cannot be found or loaded), once it is known: it ends the session."""
        if self.future.done() and self.future.exception() is not None:
            raise self.future.exception()

    def __call__(self):
        self.start()
        return self.future.result()


def run(media: list[str] | None, options: dict) -> None:
    """The body of `qvl chat`."""
    json_out, quiet, max_context, blocks, cache_size = O.take(O.chat_options, options)
    endpoint = O.take(O.chat_endpoint_options, options)
    questions = list(options.get("prompt") or ())
    gen = O.take(O.chat_generation_options, options)
    sizing = O.take(O.sizing_options, options)
    runtime = replace(O.take(O.runtime_options, options), cache_size=cache_size)  # None: the device's default, on
    if endpoint is not None and sizing.resize is not None:
        raise UsageError("--resize is not sent to an endpoint: give --min-pixels and --max-pixels (the same number) instead")
    for given in media or ():  # what is plainly not there fails before anything starts
        if given == "-":
            raise UsageError(NO_STDIN)
        if not given.startswith(("http://", "https://", "file:", "data:")) and not os.path.exists(os.path.expanduser(given)):
            raise MediaError(given, "no such file")
    relay = Relay()

    def make():
        if endpoint is not None:
            from qwen2vl_cli.chat import RemoteEngine

            return RemoteEngine(endpoint, runtime.model, sizing)
        from qwen2vl_cli.backend import LocalBackend
        from qwen2vl_cli.chat import LocalEngine

        return LocalEngine(LocalBackend(runtime, relay, background=True))

    loader = Loader(make)
    front = Front(Chat(loader, sizing, gen, max_context), loader, relay, quiet, json_out,
                  runtime.model if endpoint is None else endpoint.url, remote=endpoint is not None)
    front.pending_sources = list(media or ())  # decoded when the engine is in, before the first question
    code = front.terminal(questions) if sys.stdin.isatty() else front.piped(questions, sys.stdin, blocks)
    if code:
        import typer

        raise typer.Exit(code)


class Front:
    """What a line does: a command, media, or a question; and how a turn is shown."""

    def __init__(self, chat: Chat, loader: Loader, relay: Relay, quiet: bool, json_out: bool, serving: str, remote: bool = False):
        self.chat, self.loader, self.relay, self.quiet, self.json_out, self.serving = chat, loader, relay, quiet, json_out, serving
        self.remote = remote  # a server answers: nothing is stopped in flight but the stream
        self.pending_sources: list[str] = []
        self.interactive = False
        self.failed = 0  # the exit code of the first line that failed (piped)
        self.number = 0

    # The two front ends.

    def terminal(self, questions: list[str]) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output import create_output

        from qwen2vl_cli.render import stderr_console

        self.interactive = True
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        # The line editor draws on the terminal, stdout where it is one, else stderr: never into a redirected stdout.
        session = PromptSession(history=_history(), key_bindings=bindings, prompt_continuation="... ", enable_history_search=True,
                                output=create_output(always_prefer_tty=True))
        if not self.quiet:
            stderr_console().print(f"qvl chat with {self.serving}: /help for commands, Ctrl-D to leave", style="dim", markup=False, highlight=False)
        for q in questions:
            if self.line(q) == "exit":
                return 0
        while True:
            try:
                line = session.prompt(">>> ", pre_run=self.loader.start)
            except KeyboardInterrupt:  # at the prompt: the line is dropped, the conversation stays
                continue
            except EOFError:
                return 0
            if self.line(line) == "exit":
                return 0

    def piped(self, questions: list[str], stream, blocks: bool) -> int:
        """Each line (or block) answered as it comes: a script may read an answer before it writes the next question."""
        self.loader.start()
        for text in itertools.chain(questions, turns(stream, blocks)):
            if self.line(text) == "exit":
                break
        return self.failed

    # One line.

    def line(self, text: str) -> str | None:
        """Do what a line says; "exit" to leave, FAILED where it failed (said, and recorded with --json)."""
        text = text.strip()
        if not text:
            return None
        self.loader.check()
        head, _, after = text.partition("\n")
        first = re.match(r"(/\w+)", head)
        if after and (first and first.group(1) in LINE_COMMANDS or media_line(head) is not None):
            done = self.line(head)  # a block that starts with a command or media: that line, then the rest
            if done == FAILED:
                self._say("the lines under it were not asked")
            return done if done is not None else self.line(after)
        try:
            command = re.match(r"(/\w+)(?:\s+(.*))?$", text, re.S)
            if command and command.group(1) in COMMANDS:
                return self.command(command.group(1), (command.group(2) or "").strip())
            if (found := media_line(text)) is not None:
                self._sources()
                for given in found:
                    self._add(given, {}, video=False)
                return None
            if command:
                raise UsageError(f"{command.group(1)}: not a command (/help lists them) nor a file")
            self.ask(text)
            return None
        except (QvlError, Cancelled) as e:
            self.loader.check()
            self._failed(e, text)
        except (KeyboardInterrupt, GenerationInterrupted):  # reading a medium, waiting for the weights or a server
            if not self.interactive:  # piped: Ctrl-C ends the run (130)
                raise
            self._failed(Cancelled(), text)
        except Exception as e:  # noqa: BLE001 - at a terminal a turn that failed leaves the conversation as it was
            self.loader.check()
            if not self.interactive:
                raise
            if C.debug_enabled():
                import traceback

                traceback.print_exc()
            self._failed(e, text)
        return FAILED

    def _failed(self, e: BaseException, text: str) -> None:
        from qwen2vl_cli.render import print_error, print_json

        asked = not text.startswith("/") and media_line(text) is None
        if isinstance(e, Cancelled):
            message, code = "stopped: " + ("the question was not added" if asked else "nothing was added"), EXIT_INTERRUPTED
        else:
            message, code = describe_exception(e)
        print_error(message)
        if not self.interactive:
            self.failed = self.failed or code
        if self.json_out:  # a script reading the records sees every line that failed
            print_json({"question" if asked else "command": text, "error": {"type": error_type(e), "message": message}})

    def _sources(self) -> None:
        """The media given on the command line, read once the engine is in (before what needs them).
        One that fails is said and left out; the others stay for the question."""
        from qwen2vl_cli.render import print_error

        given, self.pending_sources = self.pending_sources, []
        failed = []
        for text in given:
            try:
                self._add(text, {}, video=False)
            except QvlError as e:
                failed.append(e)
        for e in failed[:-1]:
            print_error(str(e))
        if failed:
            raise failed[-1]

    def command(self, word: str, rest: str) -> str | None:
        from qwen2vl_cli.render import stderr_console

        console = stderr_console()
        chat = self.chat
        if word in ("/exit", "/quit"):
            if left := len(chat.pending) + len(self.pending_sources):
                self._say(f"left with {left} medi{'a' if left != 1 else 'um'} not asked about")
            return "exit"
        if word == "/help":
            console.print(HELP, markup=False, highlight=False)
        elif word in ("/image", "/video"):
            given, options = medium_arguments(word, rest)
            self.add(given, options, video=word == "/video")
        elif word == "/clear":
            chat.clear()
            self.pending_sources.clear()
            self._say("a new conversation")
        elif word == "/system":
            chat.set_system(rest or None)
            again = "; the next turn reads the conversation again" if chat.turns else ""
            self._say(("system message set" if rest else "system message: the chat template's") + again)
        elif word == "/save":
            if not rest:
                raise UsageError("/save FILE: give a file name")
            where = chat.save(_one_argument(word, rest))
            self._say(f"saved {_turns(len(chat.turns) // 2)} to {where}")
        elif word == "/load":
            if not rest:
                raise UsageError("/load FILE: give a file name")
            turns = chat.load(_one_argument(word, rest))
            self.pending_sources.clear()
            self._say(f"loaded {_turns(turns)}; the next question continues them")
        elif word == "/stats":
            self._sources()
            for line in stats(chat):
                console.print(line, markup=False, highlight=False)
        return None

    def _say(self, text: str) -> None:
        from qwen2vl_cli.render import printable, stderr_console

        if not self.quiet:
            stderr_console().print(f"qvl: {printable(text, lines=False)}", markup=False, highlight=False)

    def add(self, given: str, options: dict, video: bool) -> None:
        self._sources()
        self._add(given, options, video)

    def _add(self, given: str, options: dict, video: bool) -> None:
        from qwen2vl_cli.render import Reporter

        reporter = Reporter(quiet=self.quiet, stream=False)
        self.relay.target = reporter
        try:
            reporter.stage(f"Reading {given}" if self.loader.done() else "Loading the model's processor")
            medium = self.chat.add(given, options, video)
        finally:
            reporter.stop()
            self.relay.target = None
        reporter.inputs([medium.plan])

    def ask(self, question: str) -> None:
        from qwen2vl_cli.render import Reporter, print_json

        self._sources()
        chat = self.chat
        reporter = Reporter(quiet=self.quiet, stream=not self.json_out)
        self.relay.target = reporter
        cancel = threading.Event()
        waiting = [True]  # until the model works on it (a local one) or its first text comes (a server)

        def shown(chunk: str) -> None:
            waiting[0] = False
            reporter.text(chunk)

        def started() -> None:
            waiting[0] = waiting[0] and self.remote

        try:
            with answering(cancel, lambda: waiting[0], self.remote) if self.interactive else nullcontext():
                if not self.loader.done():
                    reporter.stage("Loading the model")
                answer = chat.ask(question, on_text=shown, cancel=cancel, note=reporter.note, started=started)
        except BaseException:
            reporter.close_text()  # what streamed of it ends its line; nothing is written for a turn that did not start
            raise
        finally:
            self.relay.target = None
        if self.json_out:
            reporter.stop()
        else:
            reporter.end_text()
        self.number += 1
        if self.json_out:
            print_json({"turn": self.number, "question": question, **answer.result.to_dict(),
                        "context_tokens": answer.context_tokens, "new_prompt_tokens": answer.new_tokens})
        if not self.quiet:
            reporter.console.print(status_line(answer, chat.budget()), markup=False, highlight=False, style="dim")


@contextmanager
def answering(cancel: threading.Event, waiting, remote: bool):
    """While an answer comes at a terminal. Ctrl-C stops it: it sets `cancel` (the engine ends
    the answer at its next read and the text so far is kept; a prefill stops at its next layer),
    unless `waiting()` (the weights still loading, a server not yet answering): then
    KeyboardInterrupt at once, as for a second Ctrl-C to a server that went quiet mid-answer. A
    local engine is never interrupted mid-step: it stops itself within a few tokens. What is
    typed meanwhile is neither echoed into the answer nor cut at the terminal's line limit: it
    waits for the next prompt, a paste with its lines kept (bracketed paste)."""
    def interrupt(signum, frame) -> None:
        if waiting() or (remote and cancel.is_set()):
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.getsignal(signal.SIGINT)
    held = None
    try:
        signal.signal(signal.SIGINT, interrupt)
        held = _hold_typing()
        yield
    finally:
        # Ctrl-C held off while the terminal and the handler are put back; it reaches the old handler after.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            _release_typing(held)
            signal.signal(signal.SIGINT, previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _hold_typing():
    """The terminal without echo or line editing (Ctrl-C still signals, and keeps what was typed),
    with bracketed paste on; its settings before, to restore (None where stdin is not a terminal)."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        return None
    try:
        fd = sys.stdin.fileno()
        before = termios.tcgetattr(fd)
        quiet = termios.tcgetattr(fd)
        quiet[3] &= ~(termios.ECHO | termios.ICANON)
        quiet[3] |= termios.NOFLSH  # Ctrl-C stops the answer, not what was typed meanwhile
        quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (termios.error, OSError, ValueError):
        return None
    _to_terminal("\x1b[?2004h")
    return before


def _release_typing(before) -> None:
    if before is None:
        return
    import termios

    _to_terminal("\x1b[?2004l")
    termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, before)  # what was typed stays for the next prompt


def _to_terminal(code: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream.isatty():
            stream.write(code)
            stream.flush()
            return


def status_line(answer, budget: int | None) -> str:
    r = answer.result
    parts = [
        f"context {answer.context_tokens:,}{f' of {budget:,}' if budget else ''} tokens",
        f"prompt {answer.new_tokens:,} new" + (f" ({r.cached_tokens:,} kept)" if r.cached_tokens else ""),
        f"first token {answer.first_s:.2f} s" if answer.first_s is not None else None,
        f"{r.decode_tokens_per_s:.1f} tok/s" if r.decode_tokens_per_s else None,
        f"generated {r.generated_tokens} ({'stopped: Ctrl-C, the answer so far kept' if answer.stopped else r.finish_reason})",
    ]
    return " · ".join(p for p in parts if p is not None)


def turns(stream, blocks: bool) -> Iterator[str]:
    """Piped input as turns: each line, or with `blocks` each run of lines up to a blank one."""
    if not blocks:
        for line in stream:
            yield line.rstrip("\n")
        return
    block: list[str] = []
    for line in stream:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def media_line(text: str) -> list[str] | None:
    """A line that is only media: paths (quoted, with escaped spaces or, for one file, as they are,
    as terminals write a dropped file) or URLs; None for anything else. A word that looks like a
    path (a directory in it, or a media file's extension) is taken for one even when it names
    nothing, so that a mistyped path is said to be one rather than asked of the model."""
    if "\n" in text:
        return None
    whole = os.path.expanduser(text.strip())
    if os.path.isfile(whole):
        return [whole]
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    if not words:
        return None
    found = []
    for word in words:
        if word.startswith(("http://", "https://", "file://", "data:image/", "data:video/")):
            found.append(word)
        elif os.path.exists(os.path.expanduser(word)) or _path_like(word):
            found.append(os.path.expanduser(word))
        else:
            return None
    return found


MEDIA_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".apng", ".avif", ".heic",
                  ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")


def _path_like(word: str) -> bool:
    return (word.startswith(("/", "./", "../", "~/")) and word.count("/") > 1) or word.lower().endswith(MEDIA_SUFFIXES)


def medium_arguments(word: str, rest: str) -> tuple[str, dict]:
    """`/video PATH --fps 1 --nframes 8` as the path and its own options."""
    head = re.split(r"\s+--(?=[a-z])", rest, maxsplit=1)[0].strip()  # the path as typed: spaces, brackets, quotes in it
    try:
        words = shlex.split(rest)
    except ValueError as e:
        if not os.path.isfile(os.path.expanduser(head)):
            raise UsageError(f"{word} {rest}: {e}") from None
        words = [head, *shlex.split(rest[len(head):].strip())]
    if not words or words[0].startswith("--"):
        raise UsageError(f"{word}: give a path or URL, e.g. {word} {'clip.mp4 --fps 1' if word == '/video' else 'photo.jpg'}")
    given, options = os.path.expanduser(words[0]), {}
    flags = words[1:]
    if not os.path.exists(given) and head != words[0] and os.path.isfile(os.path.expanduser(head)):
        given, flags = os.path.expanduser(head), shlex.split(rest[len(head):].strip())
    while flags:
        flag = flags.pop(0)
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name not in MEDIUM_OPTIONS:
            raise UsageError(f"{word} {flag}: not one of its options ({', '.join('--' + n.replace('_', '-') for n in MEDIUM_OPTIONS)})")
        if not flags:
            raise UsageError(f"{word} {flag}: give a value")
        value = flags.pop(0)
        try:
            options[name] = MEDIUM_OPTIONS[name](value)
        except ValueError:
            raise UsageError(f"{word} {flag} {value}: give a {'whole ' if MEDIUM_OPTIONS[name] is int else ''}number") from None
    return given, options


def _turns(n: int) -> str:
    return f"{n} turn{'s' if n != 1 else ''}"


def _one_argument(word: str, rest: str) -> str:
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise UsageError(f"{word} {rest}: {e}") from None
    if len(words) != 1:
        raise UsageError(f"{word}: give one file name (quote one with spaces)")
    return words[0]


def _history():
    """The line editor's history, kept under the user's data directory (in memory where it cannot be)."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "qvl"
    try:
        base.mkdir(parents=True, exist_ok=True)
        path = base / "chat_history"
        path.touch(mode=0o600, exist_ok=True)  # what was asked: the user's alone
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()
