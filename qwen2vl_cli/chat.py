"""`qvl chat`: a conversation about pictures and videos, as its turns and its media.

A `Chat` keeps the conversation (system message, turns, media waiting for the next question) and
asks each turn of an engine: `LocalEngine` (a model loaded here) or `RemoteEngine` (an
OpenAI-compatible server, sent the whole history each turn). Each medium is read and decoded
once, when it is added; the local engine's prefix cache then holds the keys and values of every
earlier turn, so a turn prefills only its own tokens and no medium goes through the vision tower
twice. The terminal and piped front ends are chat_ui.py.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from threading import Event

from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.types import GenerationOptions, Loaded, MediaOptions, MediaPlan, Prepared, Result

NO_STDIN = "qvl chat reads its questions from stdin: give media as files or URLs, not -"
# Of the model's context, what a conversation may fill before each turn warns that it is near the end.
NEAR_CONTEXT = 0.8
# Options a medium may take of its own (`/video clip.mp4 --fps 1`), as MediaOptions' fields.
MEDIUM_OPTIONS = {"fps": float, "nframes": int, "start": float, "end": float, "max_frames": int, "min_frames": int,
                  "max_pixels": int, "min_pixels": int, "total_pixels": int, "max_visual_tokens": int}


@dataclass(frozen=True)
class Medium:
    """An image or video in the conversation, read once: as given, as /save writes it, and what
    the engine takes (its pixels here, its URL for a server)."""

    given: str
    saved: str  # an absolute path for a local file; a URL as given
    kind: str
    options: dict  # its own sizing options (`/video PATH --fps 1`), saved with it
    plan: MediaPlan
    loaded: Loaded | None = None  # a local engine's pixels
    url: str | None = None  # a remote engine's: a data: URL, or the http(s) URL with --pass-urls


@dataclass(frozen=True)
class Turn:
    role: str  # user or assistant
    text: str
    media: tuple[Medium, ...] = ()


@dataclass
class Answer:
    """A turn's result with what the conversation holds after it."""

    result: Result
    context_tokens: int  # the conversation's tokens with this answer
    new_tokens: int  # prompt tokens this turn prefilled (the rest were kept)
    first_s: float | None  # from the question to the first text shown
    stopped: bool = False  # Ctrl-C: the answer so far was kept


@dataclass
class Totals:
    turns: int = 0
    prefilled: int = 0
    cached: int = 0
    generated: int = 0


class LocalEngine:
    """A model loaded here (LocalBackend), with its reuse caches on."""

    def __init__(self, backend):
        self.backend = backend
        self.context = backend.runner.context_tokens

    def medium(self, given: str, opts: MediaOptions, video: bool) -> tuple[MediaPlan, Loaded | None, str | None, str]:
        with self.backend.resolver(opts) as resolver:
            probed = _probe(resolver, given, opts, video)
            plans, loaded = self.backend.decode_probed(probed, opts)
        return plans[0], loaded[0], None, _saved(given, probed[0].source)

    def check(self, gen: GenerationOptions) -> None:
        self.backend.check_generation(gen)

    def ready(self) -> None:
        self.backend.ready()  # the weights (loading in the background)

    def check_text(self, text: str, what: str) -> None:
        self.backend.check_text(text, what)

    def prepare(self, messages: list[dict], media: list[Medium]) -> tuple[Prepared, int]:
        """The turn's request and its prompt tokens."""
        prepared = self.backend.conversation(messages, [m.plan for m in media], [m.loaded for m in media])
        return prepared, prepared.prompt_tokens

    def ask(self, prepared: Prepared, gen: GenerationOptions, on_text, cancel: Event) -> Result:
        [result] = self.backend.generate([prepared], gen, on_text=on_text, cancels=[cancel])
        return result

    def keepable(self) -> int | None:
        """The most tokens of one conversation the prefix cache keeps (None: no cache)."""
        r = self.backend.runner
        if r.prefixes is None or r.model is None:
            return None
        c = r.model.config.get_text_config()
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return r.prefixes.max_bytes // (2 * c.num_hidden_layers * c.num_key_value_heads * head * r.model.dtype.itemsize)

    def caches(self) -> dict:
        r = self.backend.runner
        return {name: cache for name, cache in (("prefixes", r.prefixes), ("vision", r.vision), ("media", r.media)) if cache is not None}


class RemoteEngine:
    """An OpenAI-compatible server (EndpointBackend): the whole history goes with each turn,
    media as the data: URLs made when they were added (qvl serve and vLLM reuse what they saw)."""

    def __init__(self, endpoint, model: str, opts: MediaOptions):
        from qwen2vl_cli.endpoint import EndpointBackend
        from qwen2vl_cli.modelinfo import context_of, read_config

        self.backend = EndpointBackend(endpoint, model)
        self.opts = opts
        self.context = context_of(read_config(model) or {})  # the server's model's, where its config is here

    def medium(self, given: str, opts: MediaOptions, video: bool):
        from qwen2vl_cli.pipeline import plan_all
        from qwen2vl_cli.sources import SourceResolver

        if opts != self.opts:
            raise UsageError("a medium's own sizing options with --endpoint: give them on the command line (a server sizes every medium of a request alike)")
        with SourceResolver(max_bytes=opts.max_download) as resolver:
            probed = _probe(resolver, given, opts, video)
            [plan] = plan_all(probed, self.backend.spec, opts)
            url = self.backend.media_url(given, probed[0].source, probed[0].info.format, plan.kind)
        return plan, None, url, _saved(given, probed[0].source)

    def check(self, gen: GenerationOptions) -> None:
        pass

    def ready(self) -> None:
        pass

    def check_text(self, text: str, what: str) -> None:
        pass

    def prepare(self, messages: list[dict], media: list[Medium]):
        """The turn's request (the whole history, media as their URLs) and its prompt tokens, an
        estimate (the server's tokenizer is not here): the media's tokens as planned, a token for
        every three characters of ASCII text and for each other character, and some for each
        message's markers and the template's default system message."""
        from qwen2vl_cli.endpoint import RemoteRequest, media_part

        urls = iter(m.url for m in media)
        sent = [m if isinstance(m["content"], str) else
                {**m, "content": [media_part(f"{p['kind']}_url", next(urls)) if p["type"] == "media" else p for p in m["content"]]}
                for m in messages]
        texts = [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"]) for m in messages]
        ascii_chars = sum(len(t) if t.isascii() else sum(c.isascii() for c in t) for t in texts)
        other = sum(len(t) for t in texts) - ascii_chars
        tokens = sum(m.plan.tokens_with_markers for m in media) + ascii_chars // 3 + other + 8 * len(messages) + 24
        return RemoteRequest(tuple(m.plan for m in media), sent, self.opts), tokens

    def ask(self, request, gen: GenerationOptions, on_text, cancel: Event) -> Result:
        return self.backend.complete(request, gen, on_text, cancel)

    def keepable(self) -> int | None:
        return None  # the server's own

    def caches(self) -> dict:
        return {}


def _probe(resolver, given: str, opts: MediaOptions, video: bool) -> list:
    """A medium probed, with chat's own advice for a still given as a video."""
    from qwen2vl_cli.pipeline import probe_all

    probed = probe_all(resolver, (given,), opts)
    if video and probed[0].info.kind != "video":
        raise MediaError(probed[0].source.label, f"is a still {probed[0].info.format} image, not a video: use /image")
    return probed


def _saved(given: str, source) -> str:
    """How /save writes a medium: a local file by its absolute path, anything else as given."""
    path = getattr(source, "path", None)
    if path is not None and not given.startswith(("http://", "https://", "data:")):
        return str(Path(path).resolve())
    return given


def _messages(system: str | None, turns: list[Turn]) -> list[dict]:
    out = [{"role": "system", "content": system}] if system is not None else []
    for t in turns:
        if t.media:
            out.append({"role": t.role, "content": [{"type": "media", "kind": m.kind} for m in t.media] + [{"type": "text", "text": t.text}]})
        else:
            out.append({"role": t.role, "content": t.text})
    return out


class Chat:
    """One conversation with one engine. `engine` is a callable that gives the engine once it is
    ready (the local one loads in the background while the first question is typed)."""

    def __init__(self, engine, opts: MediaOptions, gen: GenerationOptions, max_context: int | None = None):
        self._engine = engine
        self.opts, self.gen = opts, replace(gen, prompt=None, system=None)
        self.system = gen.system
        self.max_context = max_context
        self.turns: list[Turn] = []
        self.pending: list[Medium] = []
        self.totals = Totals()
        self.context_tokens = 0
        self._outgrown = False  # said that the prefix cache cannot keep the conversation

    @property
    def engine(self):
        return self._engine()

    # What the conversation holds.

    def media(self) -> list[Medium]:
        return [m for t in self.turns for m in t.media] + self.pending

    def budget(self) -> int | None:
        """The tokens the conversation may hold: the model's context or --max-context (None: not
        known here, a server's model without --max-context; the server bounds it)."""
        context = self.engine.context
        if context is None or not self.max_context:
            return self.max_context or context
        return min(context, self.max_context)

    def messages(self, question: str | None = None) -> list[dict]:
        """The model's chat messages (media as `{"type": "media"}` parts), with `question` and the
        media waiting for it as the next user turn."""
        return _messages(self.system, self.turns + ([Turn("user", question, tuple(self.pending))] if question is not None else []))

    def openai(self) -> list[dict]:

        """The conversation as OpenAI-style messages, media as paths or URLs (what /save writes)."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for t in self.turns:
            if not t.media:
                out.append({"role": t.role, "content": t.text})
                continue
            parts = []
            for m in t.media:
                kind = f"{m.kind}_url"
                parts.append({"type": kind, kind: {"url": m.saved}} | ({"options": dict(m.options)} if m.options else {}))
            out.append({"role": t.role, "content": parts + [{"type": "text", "text": t.text}]})
        return out

    # What changes it.

    def add(self, given: str, options: dict | None = None, video: bool = False) -> Medium:
        """A medium read and decoded now, for the next question."""
        options = dict(options or {})
        if given == "-":
            raise UsageError(NO_STDIN)
        medium = self._read(given, options, video, f"/{'video' if video else 'image'} {given}")
        self.pending.append(medium)
        return medium

    def _limit(self) -> str:
        context = self.engine.context
        return "--max-context" if self.max_context and (context is None or self.max_context < context) else "context"

    def clear(self) -> None:
        self.turns, self.pending, self.context_tokens, self._outgrown = [], [], 0, False

    def set_system(self, text: str | None) -> None:
        if text is not None:
            self.engine.check_text(text, "/system")
        self.system = text

    def ask(self, question: str, on_text=None, cancel: Event | None = None, note=None, started=None) -> Answer:
        """One turn: the question (with the media added since the last) and its answer, streamed
        to `on_text`. Where the conversation would pass the context, UsageError, and it stays as
        it was; near it, `note` says so; an answer that would pass it is held to the room left.
        `cancel` set: the answer so far is kept (a prefill stopped before it: Cancelled). `started`
        is called once the weights are in, as the engine takes the turn."""
        engine = self.engine
        engine.check_text(question, "the question")
        if self.system is not None:
            engine.check_text(self.system, "the system message")
        engine.check(self.gen)
        request, tokens = engine.prepare(self.messages(question), self.media())
        budget = self.budget()
        gen = self.gen
        room = budget - tokens if budget is not None else gen.max_new_tokens
        limit = f"the {self._limit()} of {budget:,}" if budget is not None else ""
        if room < 1:
            if not self.turns:
                raise UsageError(f"this question and its media are {tokens:,} tokens, over {limit}: give smaller media "
                                 "(--max-pixels, --fps, --max-visual-tokens; /image PATH --max-pixels N)"
                                 + (" or a larger --max-context" if self._limit() == "--max-context" else ""))
            raise UsageError(f"this turn would make the conversation {tokens:,} tokens, over {limit}: "
                             "/clear starts a new one (/save FILE keeps this one first)")
        if note is not None and budget is not None and tokens >= NEAR_CONTEXT * budget:
            note(f"the conversation is {tokens:,} tokens, near {limit}: /clear starts a new one")
        if gen.max_new_tokens > room:
            gen = replace(gen, max_new_tokens=room, min_new_tokens=min(gen.min_new_tokens, room) if gen.min_new_tokens else gen.min_new_tokens)
            if note is not None:
                note(f"this answer may take {room:,} token{'s' if room != 1 else ''}, the room left under {limit}")
        cancel = cancel or Event()
        engine.ready()
        if started is not None:
            started()
        first: list[float] = []
        start = time.perf_counter()  # the turn's time to first token leaves the loading of the weights out

        def shown(chunk: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text is not None:
                on_text(chunk)

        result = engine.ask(request, gen, shown, cancel)
        stopped = cancel.is_set()
        self.turns += [Turn("user", question, tuple(self.pending)), Turn("assistant", result.text)]
        self.pending = []
        self.context_tokens = result.prompt_tokens + result.generated_tokens
        new = max(0, result.prompt_tokens - result.cached_tokens)
        self.totals.turns += 1
        self.totals.prefilled += new
        self.totals.cached += result.cached_tokens
        self.totals.generated += result.generated_tokens
        kept = engine.keepable()
        if note is not None and kept is not None and self.context_tokens > kept and not self._outgrown:
            self._outgrown = True
            note(f"the conversation ({self.context_tokens:,} tokens) is past what --cache-size keeps of one (about {kept:,}): "
                 "each turn now prefills it all; a larger --cache-size keeps it")
        if first:
            first_s = first[0] - start
        else:  # no text shown (an empty answer, or one held back whole): the engine's count, its inputs and time to first token
            first_s = (result.media_s or 0.0) + result.ttft_s if result.ttft_s is not None else None
        return Answer(result, self.context_tokens, new, first_s, stopped)

    # /save and /load.

    def save(self, path: str) -> Path:
        """The conversation as OpenAI-style messages JSON in a new file (an existing one is left as it is)."""
        target = Path(path).expanduser()
        data = json.dumps(self.openai(), ensure_ascii=False, indent=2) + "\n"
        try:
            with open(target, "x", encoding="utf-8") as f:
                f.write(data)
        except FileExistsError:
            raise UsageError(f"/save {path}: the file exists; give a new name (nothing was overwritten)") from None
        except OSError as e:
            raise UsageError(f"/save {path}: cannot write it ({e.strerror})") from None
        return target

    def load(self, path: str) -> int:
        """A conversation /save wrote (or a chat request's `messages`), in place of this one: its
        media read again. Returns its number of turns. A file that cannot be read leaves this
        conversation as it was."""
        where = Path(path).expanduser()
        try:
            data = json.loads(where.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"/load {path}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"/load {path}: is a directory; give a file /save wrote") from None
        except UnicodeDecodeError:
            raise UsageError(f"/load {path}: not UTF-8 text; give a file /save wrote") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"/load {path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except OSError as e:
            raise UsageError(f"/load {path}: cannot read it ({e.strerror})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise UsageError(f"/load {path}: not a saved conversation (a JSON list of messages, as /save writes)")
        system, turns = self.system, []  # a file without a system message keeps this one's
        for n, m in enumerate(messages, 1):
            what = f"/load {path}: message {n}"
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise UsageError(f"{what}: needs a role of system, user or assistant")
            content = m.get("content")
            if m["role"] == "system":
                if not isinstance(content, str) or n != 1:
                    raise UsageError(f"{what}: a system message is text, and comes first")
                self.engine.check_text(content, what)
                system = content
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise UsageError(f"{what}: is {m['role']}, where {expected} comes (after a system message, user and assistant take turns, user first)")
            if m["role"] == "assistant" and not isinstance(content, str):
                raise UsageError(f"{what}: an assistant message is text")
            text, media = self._content(content, what, path)
            turns.append(Turn(m["role"], text, media))
        if len(turns) % 2:
            raise UsageError(f"/load {path}: its last user message has no answer: end it with the assistant's (or leave the question out)")
        _, tokens = self.engine.prepare(_messages(system, turns), [m for t in turns for m in t.media])
        budget = self.budget()
        if budget is not None and tokens >= budget:
            hint = "a larger --max-context" if self._limit() == "--max-context" else "fewer turns, or smaller media"
            raise UsageError(f"/load {path}: the conversation is {tokens:,} tokens, over the {self._limit()} of {budget:,}: "
                             f"it cannot go on here (this one stays as it was; {hint} would fit it)")
        self.system, self.turns, self.pending, self.context_tokens, self._outgrown = system, turns, [], tokens, False
        return len(turns) // 2

    def _content(self, content, what: str, path: str) -> tuple[str, tuple[Medium, ...]]:
        if isinstance(content, str):
            self.engine.check_text(content, what)
            return content, ()
        if not isinstance(content, list):
            raise UsageError(f"{what}: content is text or a list of parts")
        texts, media = [], []
        base = Path(path).expanduser().resolve().parent
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                self.engine.check_text(part["text"], what)
                texts.append(part["text"])
            elif kind in ("image_url", "video_url") and isinstance(part.get(kind), dict) and isinstance(part[kind].get("url"), str):
                url = part[kind]["url"]
                if not url.startswith(("http://", "https://", "data:", "file:")) and not os.path.isabs(url):
                    url = str(base / url)  # relative to the saved file
                options = part.get("options") or {}
                if not isinstance(options, dict) or any(k not in MEDIUM_OPTIONS for k in options):
                    raise UsageError(f"{what}: a medium's options are some of {', '.join(MEDIUM_OPTIONS)}")
                try:
                    media.append(self._read(url, options, kind == "video_url", what))
                except MediaError as e:
                    raise UsageError(f"{what}: {e}") from None
            else:
                raise UsageError(f"{what}: unsupported content part {str(kind)[:40]!r} (text, image_url, video_url)")
        return "\n".join(texts), tuple(media)

    def _read(self, given: str, options: dict, video: bool, what: str) -> Medium:
        """A medium read with its own options (checked as the sizing options are; `what` names them)."""
        opts = self.opts
        if options:
            from qwen2vl_cli.sizing import check_options

            for name, value in options.items():
                whole = MEDIUM_OPTIONS[name] is int
                if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                    raise UsageError(f"{what}: --{name.replace('_', '-')} takes a {'whole ' if whole else ''}number, not {json.dumps(value)[:40]}")
            try:
                opts = check_options(replace(self.opts, **options))
            except UsageError as e:
                raise UsageError(f"{what}: {e}") from None
        plan, loaded, url, saved = self.engine.medium(given, opts, video)
        return Medium(given, saved, plan.kind, dict(options), plan, loaded, url)


def stats(chat: Chat) -> list[str]:
    """What /stats says: the conversation, what its turns cost, the reuse caches."""
    from qwen2vl_cli.sources import format_size

    media = chat.media()
    t = chat.totals
    budget = chat.budget()
    lines = [
        f"turns {len(chat.turns) // 2} · context {chat.context_tokens:,}{f' of {budget:,}' if budget else ''} tokens · media {len(media)}"
        + (f" ({', '.join(f'{m.kind} {m.plan.tokens_with_markers} tokens' for m in media[:6])}{', …' if len(media) > 6 else ''})" if media else ""),
        f"this session: {t.turns} asked · prompt tokens prefilled {t.prefilled:,}, taken from earlier turns {t.cached:,} · generated {t.generated:,}",
    ]
    caches = chat.engine.caches()
    if caches:
        lines.append("caches: " + " · ".join(f"{name} {format_size(c.bytes)} of {format_size(c.max_bytes)} ({len(c)} kept)" for name, c in caches.items()))
    return lines

