"""`qvl serve`: an OpenAI-compatible chat-completions server over the local backend (the model loaded once).

A server is a security boundary. Every request is bounded before work starts: its body size
(from Content-Length, then while reading), its fields (types and ranges; 400 naming the field;
serve_requests.py), its tokens, media count and visual tokens, its URLs (public addresses only,
see urlpolicy.py, with size and time limits). Media are fetched and decoded on a small pool of its own, so slow
sources cannot take the threads others need. Prepared requests wait in a bounded queue (full:
503 with Retry-After, decided before any stream starts); one worker thread owns the model
(scheduler.py) and takes what is waiting, up to the batch size, as one batch of requests with the same sampling
settings, and each answer goes back as soon as its row ends; with continuous batching (the
default on a GPU), requests that arrive while a batch runs join it as its rows end. A client
that goes away stops its row within a few tokens. The HTTP layer under the app is serve_http.py.
This module needs the `serve` extra (FastAPI, uvicorn); the CLI imports it only for `qvl serve`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from concurrent.futures import Future, ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.errors import Cancelled, QvlError, UsageError, describe_exception, error_type
from qwen2vl_cli.pipeline import Hooks, is_out_of_memory
from qwen2vl_cli.scheduler import Engine, Job, log_bug
from qwen2vl_cli.serve_http import ACCEPT_BURST, Edge, OneLine, allowed_hosts, connection_cap, http_protocol, loop_errors
from qwen2vl_cli.serve_requests import (
    CPU_PROMPT_TOKENS,
    ApiError,
    Limits,
    check_length,
    check_request,
    check_texts,
    generation_options,
    invalid,
    media_options,
    to_chat,
)
from qwen2vl_cli.types import Prepared, Result, RuntimeOptions

FETCHES_PER_REQUEST = 4  # media URLs of one request fetched at once


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
            "total_tokens": result.prompt_tokens + result.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


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


def create_app(session: LocalBackend, names: tuple[str, ...], api_key: str | None = None, batch_size: int = 8, queue_size: int = 64,
               limits: Limits = Limits(), hosts: list[str] | None = None, continuous: bool | None = None, given: str | None = None):
    """The server's app. `names`: the served model's names (the first is the default); `given`:
    the model as `qvl serve` was given it, which requests may name too."""
    from qwen2vl_cli.serve_metrics import Metrics

    expected_key = f"Bearer {api_key}".encode() if api_key else None

    def authenticate(request: Request) -> None:
        # A dependency rather than an HTTP middleware: those hide a client's disconnect from the route.
        if request.url.path == "/health":  # for load balancers: says only that the server is up
            return
        sent = request.headers.get("authorization", "").encode()
        if expected_key is not None and not hmac.compare_digest(sent, expected_key):
            raise ApiError(401, "authentication_error", "missing or wrong API key (Authorization: Bearer KEY)")

    app = FastAPI(title="qvl", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authenticate)])
    metrics = None
    engine = Engine(session, batch_size, queue_size, continuous, on_answer=lambda result: metrics.answered(result))
    metrics = Metrics(engine, session.runner)
    media_pool = ThreadPoolExecutor(max_workers=limits.media_workers, thread_name_prefix="qvl-media")
    fetch_pool = ThreadPoolExecutor(max_workers=limits.fetch_workers, thread_name_prefix="qvl-fetch")
    bodies = Bodies(limits.max_buffered_bytes)
    context = session.runner.context_tokens
    most_tokens = limits.max_prompt_tokens or (CPU_PROMPT_TOKENS if session.device == "cpu" else context)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        if request.url.path == "/v1/chat/completions":  # a refused key included: it fails before the route
            metrics.requests.labels(str(exc.status)).inc()
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
        # model_type tells qvl clients the family (its grounding prompt and coordinates), device how it sizes media; others ignore it.
        family = {"model_type": session.runner.family.model_types[0], "device": session.device}  # a CPU's media are sized smaller
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "qvl", "qvl": family}
                                           for name in names]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def scraped():
        from fastapi.responses import Response

        page, kind = metrics.page()
        return Response(page, media_type=kind)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            response = await answer(request)
        except ApiError:  # counted by its handler
            raise
        except ClientDisconnect:
            metrics.requests.labels("499").inc()
            raise
        except Exception:
            metrics.requests.labels("500").inc()
            raise
        if not isinstance(response, StreamingResponse):  # a stream is counted when it ends, as it ended
            metrics.requests.labels("200").inc()
        return response

    async def answer(request: Request):
        async with bodies.read(request, limits.max_body_bytes, limits.read_timeout_s) as body:
            stream, include_usage = check_request(body, names, given)
            model_name = body.get("model") or names[0]
            chat, urls = to_chat(body.get("messages"), limits.max_media)
            gen = generation_options(body, limits)
            opts, timings, rates = media_options(body.get("mm_processor_kwargs"), limits)
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
                prepared = await asyncio.wrap_future(media_pool.submit(session.prepare_chat, chat, urls, opts, gen, resolver, room, timings,
                                                                        rates))
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
        events = _stream(job, chunks, request_id, model_name, created, prepared, include_usage,
                         ended=lambda status: metrics.requests.labels(status).inc())
        return StreamingResponse(events, media_type="text/event-stream")

    return app


def served_names(model: str) -> tuple[str, ...]:
    """The name a served model goes by unless --served-model-name says: a hub id as it is, a local
    directory by its own name (not its path on the server)."""
    from pathlib import Path

    path = Path(model).expanduser()
    return (path.resolve().name,) if path.is_dir() else (model,)


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
    log_bug("generation", e)
    return ApiError(500, "server_error", "internal error in qvl serve (its log has the details)")


async def _stream(job: Job, chunks: asyncio.Queue, request_id, model, created, prepared, include_usage: bool, ended=lambda status: None):
    """Server-sent events as OpenAI streams them; with include_usage, every chunk has a usage of
    null and a last chunk with no choices carries it. `ended(status)`: how it ended (200; the
    status of the error it sent; 499 when the client went away)."""

    def event(choices: list, usage=None, extension: bool = False) -> str:
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        if extension:
            chunk["qvl"] = _extension(prepared)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta(content: dict, finish=None) -> list:
        return [{"index": 0, "delta": content, "finish_reason": finish}]

    status = "499"
    try:
        yield event(delta({"role": "assistant", "content": ""}))
        while (text := await chunks.get()) is not None:
            yield event(delta({"content": text}))
        if job.future.exception() is not None:
            error = _runtime_error(job.future.exception())
            status = str(error.status)
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            result = job.future.result()
            yield event(delta({}, _finish(result)), extension=True)
            if include_usage:
                yield event([], _usage(result))
            status = "200"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed) or the answer is complete
        job.cancel.set()
        ended(status)


def serve(runtime: RuntimeOptions, host: str, port: int, api_key: str | None, batch_size: int | None, queue_size: int,
          hooks: Hooks, announce, limits: Limits = Limits(), extra_hosts: tuple[str, ...] = (), continuous: bool | None = None,
          names: tuple[str, ...] = ()) -> None:
    """`names`: the served model's names (default: served_names of the model)."""
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
    fetch = {"policy": policy, "deadline_s": deadline, "timeout": (min(10.0, deadline), min(10.0, deadline / 4)), "max_frames": limits.max_frames}
    session = LocalBackend(runtime, hooks, fetch=fetch, max_source_pixels=limits.max_source_pixels, max_visual_tokens=limits.max_visual_tokens)
    batch_size = batch_size or default_batch_size(session.runner.device)
    if continuous and not session.streams_batches:
        hooks.note("--batching continuous: transformers' generate (--engine hf) runs fixed batches")
    elif continuous and batch_size == 1:
        hooks.note("--batching continuous: with --batch-size 1 no request can join another; give --batch-size 4 or more")
    connections = limits.max_connections or connection_cap(limits.fetch_workers)
    app = create_app(session, names or served_names(runtime.model), api_key, batch_size, queue_size, limits,
                     allowed_hosts(host, extra_hosts), continuous, given=runtime.model)
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
        logging.getLogger("uvicorn.error").addFilter(OneLine())
    server = uvicorn.Server(config)

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(loop_errors)
        await server.serve(sockets=[sock])

    asyncio.run(run())
