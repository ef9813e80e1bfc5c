"""`qvl serve`: an OpenAI-compatible chat-completions server over the local backend (the model loaded once).

A server is a security boundary. Every request is bounded before work starts: its body size
(from Content-Length, then while reading), its fields (types and ranges; 400 naming the field),
its tokens, media count and visual tokens, its URLs (public addresses only, see urlpolicy.py,
with size and time limits). Media are fetched and decoded on a small pool of its own, so slow
sources cannot take the threads others need. Prepared requests wait in a bounded queue (full:
503 with Retry-After, decided before any stream starts); one worker thread owns the model and
takes what is waiting, up to the batch size, as one batch of requests with the same sampling
settings, and each answer goes back as soon as its row ends; with continuous batching (the
default on a GPU), requests that arrive while a batch runs join it as its rows end. A client
that goes away stops its row within a few tokens. This module needs the `serve` extra (FastAPI,
uvicorn); the CLI imports it only for `qvl serve`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.errors import Cancelled, QvlError, UsageError, describe_exception, error_type
from qwen2vl_cli.output import printable
from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.pipeline import Hooks, is_out_of_memory
from qwen2vl_cli.types import GenerationOptions, MediaOptions, Prepared, Result, RuntimeOptions, check_generation

# The per-request sizing options, under vLLM's name for them.
MM_KWARGS = {f.name for f in fields(MediaOptions)} - {"cpu_budget", "resize", "max_download"}
URL_SCHEMES = ("http://", "https://", "data:")
DEFAULT_MAX_TOKENS = 512  # when a request gives none
FETCHES_PER_REQUEST = 4  # media URLs of one request fetched at once
ACCEPT_BURST = 128  # connections asyncio accepts in one go (uvicorn's backlog)
CPU_PROMPT_TOKENS = 8192  # --max-prompt-tokens on a CPU, where a prefill's time grows with the square of its length


@dataclass(frozen=True)
class Limits:
    """What one request may cost; each is a `qvl serve` option."""

    max_tokens: int = 4096  # per request; more is a 400
    max_body_bytes: int = 64 * 1024**2
    max_media: int = 16  # image and video parts per request
    max_visual_tokens: int = 16384  # all media of a request together (qvl picks the sizes under it)
    max_source_pixels: int = 50_000_000  # width x height of an image or video as stored
    max_download: int = 256 * 1024**2  # per URL
    fetch_deadline_s: float = 60.0  # per URL, from connecting to the last byte
    media_workers: int = max(2, min(8, os.cpu_count() or 2))  # decoding at once: bounds the pixels in memory
    fetch_workers: int = 32  # downloads at once (each bounded by max_download and fetch_deadline_s)
    allowed_networks: tuple[str, ...] = ()  # CIDRs that URLs may reach besides public addresses
    allow_private_urls: bool = False
    max_prompt_tokens: int | None = None  # text and media of one request; None: CPU_PROMPT_TOKENS on a CPU, else the model's context
    read_timeout_s: float = 30.0  # for a request's headers, and then for its body
    max_connections: int | None = None  # open at once; None: from the process's file limit (see connection_cap)

    @property
    def max_buffered_bytes(self) -> int:
        """Request bodies held at once, all requests together."""
        return 4 * self.max_body_bytes


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code, self.headers = status, kind, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param)


def to_chat(messages, max_media: int) -> tuple[list[dict], list[str]]:
    """OpenAI messages to the model's chat messages; media parts become placeholders, in order."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    chat, urls = [], []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise invalid("each message needs a role of system, user or assistant", "messages")
        content = message.get("content")
        if isinstance(content, str):
            chat.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise invalid("content must be a string or a list of parts", "messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text", ""), str):
                    raise invalid("a text part's text must be a string", "messages")
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in ("image_url", "video_url"):
                url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else part.get(kind)
                if not isinstance(url, str) or not url[:8].lower().startswith(URL_SCHEMES):
                    raise invalid(f"{kind}: give an http(s):// or data: URL", "messages")
                parts.append({"type": "media"})  # image or video: decided by the bytes
                urls.append(url)
            else:
                raise invalid(f"unsupported content part type {str(kind)[:40]!r}", "messages")
        chat.append({"role": message["role"], "content": parts})
    if len(urls) > max_media:
        raise invalid(f"{len(urls)} images and videos in one request; this server takes at most {max_media}", "messages")
    return chat, urls


def check_texts(chat: list[dict], session: LocalBackend, most_tokens: int) -> None:
    """Every text is text (valid Unicode, none of the chat template's control tokens), and the
    conversation cannot be over `most_tokens` by a bound that needs no tokenizing: each turn is at
    least two tokens, and a text at least its length over the vocabulary's longest token."""
    least = 0
    too_long = invalid(f"messages: more than {most_tokens:,} tokens, this server's bound on a prompt (--max-prompt-tokens)", "messages")
    for message in chat:
        content = message["content"]
        least += 2  # <|im_start|> and <|im_end|>
        for text in [content] if isinstance(content, str) else [part["text"] for part in content if part["type"] == "text"]:
            least += -(-len(text) // session.runner.longest_token)
            if least > most_tokens:  # before the text is read through
                raise too_long
            try:
                session.check_text(text, "messages")
            except UsageError as e:
                raise invalid(str(e), "messages") from None
        if least > most_tokens:
            raise too_long


def check_length(tokens: int, gen: GenerationOptions, most_tokens: int, context: int, what: str = "the prompt") -> None:
    """`tokens` of a prompt (or of its text alone) within the server's bound, and with its answer
    within the model's context."""
    if tokens > most_tokens:
        raise invalid(f"messages: {what} is {tokens:,} tokens, over this server's {most_tokens:,} (--max-prompt-tokens): "
                      "shorten it, or send smaller media (mm_processor_kwargs max_pixels)", "messages")
    if tokens + gen.max_new_tokens > context:
        raise invalid(f"max_tokens {gen.max_new_tokens}: with {what}'s {tokens:,} tokens it is over the model's context of "
                      f"{context:,}; ask for at most {max(0, context - tokens)}", "max_tokens")


def media_options(kwargs, limits: Limits) -> MediaOptions:
    """The request's sizing options, held to the server's visual-token budget and download limit."""
    from qwen2vl_cli.sizing import check_options

    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise invalid("mm_processor_kwargs must be an object, such as {\"max_pixels\": 401408}", "mm_processor_kwargs")
    unknown = set(kwargs) - MM_KWARGS
    if unknown:
        raise invalid(f"mm_processor_kwargs: unknown {sorted(map(str, unknown))[:8]}; known: {sorted(MM_KWARGS)}", "mm_processor_kwargs")
    try:
        opts = check_options(MediaOptions(**kwargs))
    except (UsageError, TypeError) as e:
        raise invalid(f"mm_processor_kwargs: {str(e).lstrip('-')}", "mm_processor_kwargs") from None
    budget = opts.max_visual_tokens
    if budget is not None and budget > limits.max_visual_tokens:
        raise invalid(f"mm_processor_kwargs: max_visual_tokens {budget} is over this server's {limits.max_visual_tokens}", "mm_processor_kwargs")
    return replace(opts, max_download=limits.max_download)  # the session holds every request to max_visual_tokens


def _whole(value, name: str) -> int | None:
    """An integer field: JSON integers (and floats with no fraction); not booleans, not NaN or infinity."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise invalid(f"{name} must be a whole number", name)
    return int(value)


def _real(value, name: str) -> float | None:
    """A number field: JSON numbers a float can hold (10**400 cannot), not booleans, NaN or infinity."""
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise invalid(f"{name} must be a finite number", name)
    return number


def generation_options(body: dict, limits: Limits) -> GenerationOptions:
    given = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    length = given[0] if given else "max_tokens"
    max_tokens = _whole(body.get(length), length) if given else min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise invalid(f"{length} {max_tokens}: must be from 1 to {limits.max_tokens} on this server", length)
    temperature = _real(body.get("temperature"), "temperature")
    top_k = _whole(body.get("top_k"), "top_k")
    gen = GenerationOptions(
        max_new_tokens=max_tokens,
        min_new_tokens=_whole(body.get("min_tokens"), "min_tokens"),
        temperature=temperature if temperature is not None else 0.0,  # greedy, as the CLI
        top_p=_real(body.get("top_p"), "top_p"),
        top_k=None if top_k == -1 else top_k,  # -1: off, as vLLM takes it
        repetition_penalty=_real(body.get("repetition_penalty"), "repetition_penalty"),
        seed=_whole(body.get("seed"), "seed"),
    )
    names = {"max-new-tokens": length, "min-new-tokens": "min_tokens"}  # the CLI's names in check_generation's messages
    try:
        return check_generation(gen)
    except UsageError as e:
        message = str(e).lstrip("-")
        for cli, api in names.items():
            message = message.replace(f"--{cli}", api).replace(cli, api)
        name = message.split(" ", 1)[0]
        raise invalid(message, names.get(name, name).replace("-", "_")) from None


def check_request(body: dict, model_name: str) -> tuple[bool, bool]:
    """The fields qvl does not act on beyond a check; returns (stream, include_usage)."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, "invalid_request_error", f"the model {str(model)[:200]!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    if body.get("n") not in (None, 1):
        raise invalid("n: this server gives one choice per request (n 1)", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise invalid("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    if options is not None and not stream:
        raise invalid("stream_options needs stream true", "stream_options")
    return stream, bool((options or {}).get("include_usage"))


@dataclass
class Job:
    prepared: Prepared
    gen: GenerationOptions
    stream: bool
    future: Future = field(default_factory=Future)
    on_text: object = None  # streaming: called with each chunk from the worker thread
    cancel: threading.Event = field(default_factory=threading.Event)  # the client went away


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Hand a result over; a future that is already settled or cancelled is left as it is."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Engine:
    """The model's one worker thread and its bounded line of waiting jobs.

    Jobs whose client went away leave the line at once: they hold no place against new arrivals.
    """

    def __init__(self, session: LocalBackend, batch_size: int, queue_size: int, continuous: bool | None = None):
        """`continuous`: requests join running batches (None: on a GPU, where a decode step costs
        about the same for one row or many; on a CPU every row costs its share, and fixed batches
        of equal settings measured faster, bench/RESULTS.md)."""
        self.session, self.batch_size, self.queue_size = session, batch_size, queue_size
        wanted = session.device != "cpu" if continuous is None else continuous
        self.continuous = wanted and batch_size > 1 and session.streams_batches
        self._line: deque[Job] = deque()
        self._changed = threading.Condition()
        threading.Thread(target=self._work, name="qvl-engine", daemon=True).start()

    def _drop_cancelled(self) -> None:  # holding self._changed
        for job in [j for j in self._line if j.cancel.is_set()]:
            self._line.remove(job)
            _settle(job.future, error=Cancelled())

    def submit(self, job: Job) -> Future:
        with self._changed:
            self._drop_cancelled()
            if len(self._line) >= self.queue_size:
                raise ApiError(503, "server_overloaded", f"{self.queue_size} requests are waiting: retry later", headers={"Retry-After": "1"})
            self._line.append(job)
            self._changed.notify()
        return job.future

    def _next(self, block: bool) -> Job | None:
        """The next job whose client is still there."""
        with self._changed:
            while True:
                self._drop_cancelled()
                if self._line:
                    return self._line.popleft()
                if not block:
                    return None
                self._changed.wait()

    def _work(self) -> None:
        while True:  # nothing a request does may end this thread
            try:
                job = self._next(block=True)
                if job.stream and not self.session.streams_batches:  # transformers' generate streams one row
                    self._run([job])
                    continue
                batch, later = [job], []
                while len(batch) < self.batch_size and (other := self._next(block=False)) is not None:
                    (batch if self._joins(other, job.gen) else later).append(other)
                if later:  # back at the head of the line, ahead of new arrivals: the next batch takes them
                    with self._changed:
                        self._line.extendleft(reversed(later))
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - log and serve the next request
                _log_bug("the engine loop", e)

    def _joins(self, job: Job, gen: GenerationOptions) -> bool:
        """Whether `job` may run in a batch of `gen`'s: the same options (a stream only where the
        engine streams batches), or with continuous batching, the same sampling (rows keep their own lengths)."""
        if not self.session.streams_batches:
            return job.gen == gen and not job.stream
        if not self.continuous:
            return job.gen == gen
        return replace(job.gen, max_new_tokens=1, min_new_tokens=None) == replace(gen, max_new_tokens=1, min_new_tokens=None)

    def _run(self, batch: list[Job]) -> None:
        """A batch through the model; each answer is handed over as soon as its row ends. With
        continuous batching, waiting requests with the same sampling join it as its rows end, in
        the order they came: once the next in line cannot join, no one else does, so nobody waits
        behind later arrivals."""
        from qwen2vl_cli.rows import Row

        jobs = list(batch)  # by row number: the batch's, then those that joined it
        gen = batch[0].gen

        def row(job: Job) -> Row:
            return Row(job.prepared.text, list(job.prepared.loaded), job.gen, job.cancel, job.on_text if job.stream else None)

        try:
            running = self.session.start([row(j) for j in batch], self.batch_size if self.continuous else 0)
            closed = not self.continuous  # once the head of the line cannot join, the batch takes no one else
            while running.live:
                for number, outcome in running.advance():
                    self._hand_over(jobs[number], outcome)
                while not closed and running.open():
                    with self._changed:
                        self._drop_cancelled()
                        if not self._line:
                            break
                        if not self._joins(self._line[0], gen):
                            closed = True
                            break
                        job = self._line.popleft()
                    joining = row(job)
                    try:
                        fits = running.fits(joining)  # its processor inputs are made here, outside the lock
                    except Exception as e:  # noqa: BLE001 - that request's failure alone
                        _settle(job.future, error=e)
                        continue
                    if not fits:  # too long for the room left: it heads the line for the next batch
                        with self._changed:
                            self._line.appendleft(job)
                        closed = True
                        break
                    jobs.append(job)
                    try:
                        running.join(joining)
                    except Exception as e:  # noqa: BLE001 - its failure (out of memory in its prefill), not the batch's
                        _settle(job.future, error=e)
        except Exception as e:  # every request of the batch, and every one that joined it, gets the error
            for job in jobs:
                _settle(job.future, error=e)

    def _hand_over(self, job: Job, outcome) -> None:
        result = self.session.finish(job.prepared, outcome, job.gen)
        if isinstance(result, Exception):
            _settle(job.future, error=result)
        else:
            _settle(job.future, result)


async def fetch_all(pool: ThreadPoolExecutor, fetch, urls: list[str], at_once: int = FETCHES_PER_REQUEST) -> None:
    """`fetch(url)` for every URL on `pool`, at most `at_once` of one request at a time, so one
    request cannot take every fetch thread. The first failure stops the rest from starting and
    is raised once the running ones have ended (each is bounded by its deadline)."""
    gate = asyncio.Semaphore(at_once)
    failed: list[BaseException] = []

    async def one(url: str) -> None:
        async with gate:
            if failed:
                return
            try:
                await asyncio.wrap_future(pool.submit(fetch, url))
            except Exception as e:  # noqa: BLE001 - answered below, once
                failed.append(e)

    await asyncio.gather(*(one(u) for u in urls))
    if failed:
        raise failed[0]


def _log_bug(where: str, e: BaseException) -> None:
    """A 500 is a bug: one line on the server's stderr, the traceback with QVL_DEBUG=1."""
    if debug_enabled():
        import traceback

        traceback.print_exception(e)
    message = " ".join(str(e).split())[:300]
    print(printable(f"qvl serve: error in {where}: {type(e).__name__}: {message}", lines=False), file=sys.stderr, flush=True)


def completion_body(request_id: str, model: str, result: Result, created: int, prepared: Prepared) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": _finish(result)}],
        "usage": _usage(result),
        "qvl": _extension(prepared),
    }


def _extension(prepared: Prepared) -> dict:
    """What qvl clients read back: the sizes the server chose (other clients ignore the field)."""
    return {"inputs": [p.to_dict() for p in prepared.plans]}


def _finish(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"  # a stopped loop is a stop to OpenAI clients


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens}


class Bodies:
    """Bytes of request bodies held at once, all requests together: past `limit`, a 503 (no
    body is waited for). Used from the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @asynccontextmanager
    async def read(self, request: Request, limit: int, timeout_s: float):
        """The body as a JSON object, held against the budget until the block ends."""
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.held + size > self.limit:
                raise ApiError(503, "server_overloaded", "too many request bodies are being read: retry later", headers={"Retry-After": "1"})
            self.held += size
            taken += size

        try:
            yield await read_json(request, limit, take, timeout_s)
        finally:
            self.held -= taken


async def read_json(request: Request, limit: int, take, timeout_s: float) -> dict:
    """The body as a JSON object: application/json only, at most `limit` bytes (413 before reading
    more), within `timeout_s` (408); `take(size)` is told of the bytes as they arrive, before they are held."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        # Also what keeps web pages out: a cross-site form or text/plain post cannot set this type without a preflight.
        raise ApiError(415, "invalid_request_error", "send the body as JSON with Content-Type: application/json")
    declared = request.headers.get("content-length")
    too_large = ApiError(413, "invalid_request_error", f"the request body is over this server's {limit:,} bytes (--max-body)")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            take(len(chunk))  # as they arrive: a Content-Length alone holds nothing
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        data = await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "invalid_request_error", f"the request body did not arrive within {timeout_s:g} s (--read-timeout)") from None
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}  # what a page elsewhere cannot make a browser send


def allowed_hosts(host: str, extra: tuple[str, ...]) -> list[str]:
    """Host headers the server answers: its own address and names for it (a DNS-rebinding guard)."""
    if host in ("0.0.0.0", "::", ""):  # every address: the names given (and the loopback's), else any name the network gives it
        return sorted(set(extra) | LOOPBACK_NAMES) if extra else ["*"]
    names = {host, f"[{host}]"} if ":" in host else {host}
    if host.startswith("127.") or host in ("::1", "localhost"):
        names |= LOOPBACK_NAMES
    return sorted(names | set(extra))


def create_app(session: LocalBackend, model_name: str, api_key: str | None = None, batch_size: int = 8, queue_size: int = 64,
               limits: Limits = Limits(), hosts: list[str] | None = None, continuous: bool | None = None):
    expected_key = f"Bearer {api_key}".encode() if api_key else None

    def authenticate(request: Request) -> None:
        # A dependency rather than an HTTP middleware: those hide a client's disconnect from the route.
        given = request.headers.get("authorization", "").encode()
        if expected_key is not None and not hmac.compare_digest(given, expected_key):
            raise ApiError(401, "authentication_error", "missing or wrong API key (Authorization: Bearer KEY)")

    app = FastAPI(title="qvl", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authenticate)])
    engine = Engine(session, batch_size, queue_size, continuous)
    media_pool = ThreadPoolExecutor(max_workers=limits.media_workers, thread_name_prefix="qvl-media")
    fetch_pool = ThreadPoolExecutor(max_workers=limits.fetch_workers, thread_name_prefix="qvl-fetch")
    bodies = Bodies(limits.max_buffered_bytes)
    context = session.runner.context_tokens
    most_tokens = limits.max_prompt_tokens or (CPU_PROMPT_TOKENS if session.device == "cpu" else context)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, "invalid_request_error", str(exc.detail)).response()

    @app.exception_handler(ClientDisconnect)
    async def gone(request, exc):  # the client hung up while sending: nobody to answer
        return JSONResponse({}, status_code=400)

    app.add_middleware(Edge, hosts=None if hosts is None or hosts == ["*"] else hosts)

    @app.get("/v1/models")
    async def models():
        # model_type tells qvl clients the family (its grounding prompt and coordinates); others ignore it.
        family = {"model_type": session.runner.family.model_types[0]}
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "qvl", "qvl": family}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        async with bodies.read(request, limits.max_body_bytes, limits.read_timeout_s) as body:
            stream, include_usage = check_request(body, model_name)
            chat, urls = to_chat(body.get("messages"), limits.max_media)
            gen = generation_options(body, limits)
            opts = media_options(body.get("mm_processor_kwargs"), limits)
            del body
            check_texts(chat, session, most_tokens)
            # Counted before any media is fetched; the media are then sized to the room the text leaves.
            text_tokens = await asyncio.wrap_future(media_pool.submit(session.text_tokens, chat))
            check_length(text_tokens, gen, most_tokens, context, "the text alone")
            room = min(most_tokens, context - gen.max_new_tokens) - text_tokens  # what the media may take
            resolver = session.resolver(opts)
            try:
                # Downloads wait on the network on threads of their own; decoding (data: URLs included) takes the small pool.
                await fetch_all(fetch_pool, resolver.fetch, [u for u in dict.fromkeys(urls) if not u[:5].lower() == "data:"])
                prepared = await asyncio.wrap_future(media_pool.submit(session.prepare_chat, chat, urls, opts, gen, resolver, room))
            except QvlError as e:
                raise invalid(describe_exception(e)[0], "messages") from None
            finally:
                resolver.close()
        check_length(prepared.prompt_tokens, gen, most_tokens, context)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not stream:
            job = Job(prepared, gen, stream=False)
            result = await _answer(request, job, engine.submit(job))
            return completion_body(request_id, model_name, result, created, prepared)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        job = Job(prepared, gen, stream=True, on_text=lambda text: loop.call_soon_threadsafe(chunks.put_nowait, text))
        future = engine.submit(job)  # a full queue is a 503 here, before any header of the stream
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(chunks.put_nowait, None))
        events = _stream(job, chunks, request_id, model_name, created, prepared, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    return app


class Edge:
    """The app's outer edge, as plain ASGI (an HTTP middleware would hide a client's disconnect):
    the Host check (a DNS-rebinding guard), and the one place a bug becomes a 500 and one log
    line (Starlette's own handler re-raises, and uvicorn logs the whole traceback)."""

    def __init__(self, app, hosts: list[str] | None):
        self.app, self.hosts = app, None if hosts is None else {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.hosts is not None and _host(scope) not in self.hosts:
            return await _send_json(send, ApiError(400, "invalid_request_error", "this server does not answer that Host header (--allowed-hosts)"))
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - the one place a bug is answered
            _log_bug(scope.get("path", "?"), e)
            if not started:  # else the stream just ends
                await _send_json(send, ApiError(500, "server_error", "internal error in qvl serve (its log has the details)"))


def _host(scope) -> str:
    """The Host header's name without its port ("[::1]:8000" -> "[::1]")."""
    value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").strip().lower()
    return value[: value.index("]") + 1] if value.startswith("[") and "]" in value else value.split(":", 1)[0]


async def _send_json(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _answer(request: Request, job: Job, future: Future):
    """Wait for a job; a client that disconnects meanwhile cancels it."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        if done:
            break
        if await request.is_disconnected():
            job.cancel.set()
            waiting.cancel()
            raise ClientDisconnect()
    try:
        return waiting.result()
    except Exception as e:
        raise _runtime_error(e) from None


def _runtime_error(e: BaseException) -> ApiError:
    message, _ = describe_exception(e)
    if isinstance(e, UsageError):
        return invalid(message)
    if isinstance(e, Cancelled):  # its client went away: nobody reads this
        return ApiError(499, "cancelled", "the client went away")
    if is_out_of_memory(e):
        return ApiError(507, error_type(e), message)
    _log_bug("generation", e)
    return ApiError(500, "server_error", "internal error in qvl serve (its log has the details)")


async def _stream(job: Job, chunks: asyncio.Queue, request_id, model, created, prepared, include_usage: bool):
    """Server-sent events as OpenAI streams them; with include_usage, every chunk has a usage of
    null and a last chunk with no choices carries it."""

    def event(choices: list, usage=None, extension: bool = False) -> str:
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        if extension:
            chunk["qvl"] = _extension(prepared)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(content: dict, finish=None) -> list:
        return [{"index": 0, "delta": content, "finish_reason": finish}]

    try:
        yield event(delta({"role": "assistant", "content": ""}))
        while (text := await chunks.get()) is not None:
            yield event(delta({"content": text}))
        if job.future.exception() is not None:
            yield f"data: {json.dumps(_runtime_error(job.future.exception()).body())}\n\n"
        else:
            result = job.future.result()
            yield event(delta({}, _finish(result)), extension=True)
            if include_usage:
                yield event([], _usage(result))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed) or the answer is complete
        job.cancel.set()


def connection_cap(fetch_workers: int) -> int:
    """Connections the server keeps open at once (at most 4096): raises this process's soft limit
    on open files to its hard limit, and leaves what is open now, two bursts of accepts, and room
    for media fetches and temporary files, so accepting never runs out of file descriptors
    (asyncio's accept loop retries a failed accept once per pending connection, a storm)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(8, min(soft - open_now - 2 * ACCEPT_BURST - 2 * fetch_workers - 64, 4096))


def http_protocol(read_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol with the limits it lacks: a request's headers must arrive within
    `read_timeout_s` of the connection (or of the previous answer), whatever trickles in meanwhile
    (a keep-alive timeout ends at the first byte), a connection beyond `max_connections` is
    closed at once, and malformed HTTP gets OpenAI's JSON error instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _waiting = None  # the timer for the next request's headers
        _since = 0.0  # when it started waiting for them

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                # Make room by closing the connection that has waited longest without sending a
                # request (a client sending its headers a byte at a time); with none, refuse this one.
                idle = [c for c in self.connections if c is not self and getattr(c, "_waiting", None) is not None]
                if not idle:
                    flood.note("connections over --max-connections were refused: every one is in a request")
                    transport.close()
                    return
                flood.note("idle connections were closed to make room (--max-connections)")
                min(idle, key=lambda c: c._since)._late()
            self._await_headers()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._stop_waiting()

        def on_response_complete(self) -> None:
            self._await_headers()  # before: a pipelined request handled in there stops it again
            super().on_response_complete()

        def _await_headers(self) -> None:
            if self._waiting is None and not self.transport.is_closing():
                self._since = self.loop.time()
                self._waiting = self.loop.call_later(read_timeout_s, self._late)

        def _stop_waiting(self) -> None:
            if self._waiting is not None:
                self._waiting.cancel()
                self._waiting = None

        def _late(self) -> None:
            """No request came in time (or room is needed): close, unless one is in progress."""
            self._stop_waiting()
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(invalid("malformed HTTP request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


class _Flood:
    """Log lines that a flood repeats (refused connections, failed accepts), at most one a second."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def note(self, text: str) -> None:
        now = time.monotonic()
        if text not in self._counts and len(self._counts) >= 256:  # texts a client could vary without end: one key for the rest
            text = "other events"
        self._counts[text] = self._counts.get(text, 0) + 1
        if now - self._last.get(text, -1.0) >= 1.0:
            self._last[text] = now
            count, self._counts[text] = self._counts[text], 0
            line = printable(f"qvl serve: {text}" + (f" ({count} times)" if count > 1 else ""), lines=False)
            print(line, file=sys.stderr, flush=True)


flood = _Flood()


class _OneLine(logging.Filter):
    """A log record as one line through the flood guard, instead of uvicorn's own handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        flood.note(" ".join(record.getMessage().split()))
        return False


def _loop_errors(loop, context: dict) -> None:
    """asyncio's errors (an accept that fails when file descriptors run out, ...) as one line a second at most."""
    if debug_enabled():
        return loop.default_exception_handler(context)
    error = context.get("exception")
    flood.note(context.get("message", "event loop error") + (f": {type(error).__name__}: {error}" if error else ""))


def serve(runtime: RuntimeOptions, host: str, port: int, api_key: str | None, batch_size: int | None, queue_size: int,
          hooks: Hooks, announce, limits: Limits = Limits(), extra_hosts: tuple[str, ...] = (), continuous: bool | None = None) -> None:
    import socket

    import uvicorn

    from qwen2vl_cli.batch import default_batch_size
    from qwen2vl_cli.urlpolicy import UrlPolicy

    try:
        policy = UrlPolicy.parse(limits.allowed_networks, limits.allow_private_urls)
    except ValueError as e:
        raise UsageError(f"--allow-urls-to: {e}; give networks such as 10.0.0.0/8 or 192.168.1.20") from None
    deadline = limits.fetch_deadline_s
    # Reads time out well inside the deadline, so a server that drips bytes is cut off near it.
    fetch = {"policy": policy, "deadline_s": deadline, "timeout": (min(10.0, deadline), min(10.0, deadline / 4))}
    session = LocalBackend(runtime, hooks, fetch=fetch, max_source_pixels=limits.max_source_pixels, max_visual_tokens=limits.max_visual_tokens)
    batch_size = batch_size or default_batch_size(session.runner.device)
    if continuous and not session.streams_batches:
        hooks.note("--batching continuous: transformers' generate (--engine hf) runs fixed batches")
    elif continuous and batch_size == 1:
        hooks.note("--batching continuous: with --batch-size 1 no request can join another; give --batch-size 4 or more")
    connections = limits.max_connections or connection_cap(limits.fetch_workers)
    app = create_app(session, runtime.model, api_key, batch_size, queue_size, limits,
                     allowed_hosts(host, extra_hosts), continuous)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(ACCEPT_BURST)  # before the address is announced: early clients wait instead of being refused
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from None
    announce(f"http://{host}:{sock.getsockname()[1]}/v1")
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=http_protocol(limits.read_timeout_s, connections),
                            backlog=ACCEPT_BURST, timeout_keep_alive=5)
    if not debug_enabled():  # uvicorn's own lines (malformed requests, upgrades it cannot take) come in floods too
        logging.getLogger("uvicorn.error").addFilter(_OneLine())
    server = uvicorn.Server(config)

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(_loop_errors)
        await server.serve(sockets=[sock])

    asyncio.run(run())
