"""`qvl serve`: an OpenAI-compatible chat-completions server over the transformers runner.

Requests are prepared as they arrive (media fetched, checked and decoded on a thread pool), so a
bad image is a 400 at once. Prepared requests wait in a bounded queue (full: 503); one worker
thread owns the model and takes what is waiting, up to the batch size, as one batch of requests
with the same sampling settings. A streaming request is generated alone, token by token.
This module needs the `serve` extra (FastAPI, uvicorn); the CLI imports it only for `qvl serve`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from qwen2vl_cli.errors import QvlError, UsageError, describe_exception, error_type
from qwen2vl_cli.pipeline import Hooks, Prepared, Session, is_out_of_memory
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions, check_generation

# The per-request sizing options, under vLLM's name for them.
MM_KWARGS = {f.name for f in fields(MediaOptions)} - {"cpu_budget", "resize", "max_download"}
URL_SCHEMES = ("http://", "https://", "data:")


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": None}}


def to_chat(messages) -> tuple[list[dict], list[str]]:
    """OpenAI messages to Qwen2-VL chat messages; media parts become placeholders, in order."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_request_error", "messages must be a non-empty list")
    chat, urls = [], []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "invalid_request_error", "each message needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            chat.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, "invalid_request_error", "content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "video_url"):
                url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else part.get(kind)
                if not isinstance(url, str) or not url.startswith(URL_SCHEMES):
                    raise ApiError(400, "invalid_request_error", f"{kind}: give an http(s):// or data: URL")
                parts.append({"type": "media"})  # image or video: decided by the bytes
                urls.append(url)
            else:
                raise ApiError(400, "invalid_request_error", f"unsupported content part type {kind!r}")
        chat.append({"role": message["role"], "content": parts})
    return chat, urls


def media_options(kwargs) -> MediaOptions:
    if kwargs is None:
        return MediaOptions()
    from qwen2vl_cli.sizing import check_options

    unknown = set(kwargs) - MM_KWARGS if isinstance(kwargs, dict) else {"?"}
    if unknown:
        raise ApiError(400, "invalid_request_error", f"mm_processor_kwargs: unknown {sorted(unknown)}; known: {sorted(MM_KWARGS)}")
    try:
        return check_options(MediaOptions(**kwargs))
    except UsageError as e:
        raise ApiError(400, "invalid_request_error", f"mm_processor_kwargs: {str(e).lstrip('-')}") from None


def generation_options(body: dict) -> GenerationOptions:
    def number(name, kind=float):
        value = body.get(name)
        if value is not None and not isinstance(value, (int, float)):
            raise ApiError(400, "invalid_request_error", f"{name} must be a number")
        return kind(value) if value is not None else None

    max_tokens = number("max_completion_tokens", int) or number("max_tokens", int) or 512
    temperature = number("temperature")
    gen = GenerationOptions(
        max_new_tokens=max_tokens,
        min_new_tokens=number("min_tokens", int),
        temperature=temperature if temperature is not None else 0.0,  # greedy, as the CLI
        top_p=number("top_p"),
        top_k=number("top_k", int),
        repetition_penalty=number("repetition_penalty"),
        seed=number("seed", int),
    )
    try:
        return check_generation(gen)
    except UsageError as e:
        raise ApiError(400, "invalid_request_error", str(e).lstrip("-")) from None


@dataclass
class Job:
    prepared: Prepared
    gen: GenerationOptions
    stream: bool
    future: Future = field(default_factory=Future)
    on_text: object = None  # streaming: called with each chunk from the worker thread


class Engine:
    """The model's one worker thread and its bounded queue."""

    def __init__(self, session: Session, batch_size: int, queue_size: int):
        self.session, self.batch_size = session, batch_size
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        threading.Thread(target=self._work, name="qvl-engine", daemon=True).start()

    def submit(self, job: Job) -> Future:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "server_overloaded", f"{self.jobs.maxsize} requests are waiting: retry later") from None
        return job.future

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.stream:
                self._run([job])
                continue
            batch, later = [job], []
            while len(batch) < self.batch_size:
                try:
                    other = self.jobs.get_nowait()
                except queue.Empty:
                    break
                (batch if not other.stream and other.gen == job.gen else later).append(other)
            self._run(batch)
            for other in later:  # back in line; they keep their place ahead of new arrivals
                self._run([other])

    def _run(self, batch: list[Job]) -> None:
        runner = self.session.runner
        try:
            if batch[0].stream:
                job = batch[0]
                inputs = runner.inputs(job.prepared.text, list(job.prepared.loaded))
                gens = [runner.generate(inputs, job.gen, on_text=job.on_text)]
            else:
                gens = runner.generate_batch([j.prepared.text for j in batch], [list(j.prepared.loaded) for j in batch], batch[0].gen)
        except Exception as e:  # every request of the batch gets the error
            for job in batch:
                job.future.set_exception(e)
            return
        for job, gen in zip(batch, gens):
            job.future.set_result(gen)


def completion_body(request_id: str, model: str, gen, created: int, prepared: Prepared) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": _finish(gen)}],
        "usage": _usage(gen),
        "qvl": _extension(prepared),
    }


def _extension(prepared: Prepared) -> dict:
    """What qvl clients read back: the sizes the server chose (other clients ignore the field)."""
    return {"inputs": [p.to_dict() for p in prepared.plans]}


def _finish(gen) -> str:
    return "length" if gen.finish_reason == "length" else "stop"  # a stopped loop is a stop to OpenAI clients


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.generated_tokens, "total_tokens": gen.prompt_tokens + gen.generated_tokens}


def create_app(session: Session, model_name: str, api_key: str | None = None, batch_size: int = 8, queue_size: int = 64):
    app = FastAPI(title="qvl", docs_url=None, redoc_url=None)
    engine = Engine(session, batch_size, queue_size)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return JSONResponse(ApiError(400, "invalid_request_error", "the request body is not valid JSON").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, "invalid_request_error", str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(ApiError(401, "authentication_error", "missing or wrong API key (Authorization: Bearer KEY)").body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "qvl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "invalid_request_error", "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request_error", "the request body must be a JSON object")
        chat, urls = to_chat(body.get("messages"))
        gen = generation_options(body)
        try:
            prepared = await run_in_threadpool(session.prepare_chat, chat, urls, media_options(body.get("mm_processor_kwargs")), gen)
        except QvlError as e:
            raise ApiError(400, "invalid_request_error", describe_exception(e)[0]) from None
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = body.get("model") or model_name
        if not body.get("stream"):
            future = engine.submit(Job(prepared, gen, stream=False))
            try:
                result = await asyncio.wrap_future(future)
            except Exception as e:
                raise _runtime_error(e) from None
            return completion_body(request_id, model, result, created, prepared)
        return StreamingResponse(_stream(engine, prepared, gen, request_id, model, created, body), media_type="text/event-stream")

    return app


def _runtime_error(e: BaseException) -> ApiError:
    message, _ = describe_exception(e)
    status = 400 if isinstance(e, UsageError) else 507 if is_out_of_memory(e) else 500
    return ApiError(status, error_type(e), message)


async def _stream(engine: Engine, prepared, gen, request_id, model, created, body):
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()
    job = Job(prepared, gen, stream=True, on_text=lambda text: loop.call_soon_threadsafe(chunks.put_nowait, text))
    future = engine.submit(job)
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(chunks.put_nowait, None))

    def event(delta: dict, finish=None, usage=None) -> str:
        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            chunk["usage"] = usage
        if finish is not None:
            chunk["qvl"] = _extension(prepared)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    while (text := await chunks.get()) is not None:
        yield event({"content": text})
    if future.exception() is not None:
        error = _runtime_error(future.exception())
        yield f"data: {json.dumps(error.body())}\n\n"
    else:
        result = future.result()
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        yield event({}, _finish(result), _usage(result) if include_usage else None)
    yield "data: [DONE]\n\n"


def serve(runtime: RuntimeOptions, host: str, port: int, api_key: str | None, batch_size: int | None, queue_size: int, hooks: Hooks, announce) -> None:
    import socket

    import uvicorn

    from qwen2vl_cli.batch import default_batch_size

    session = Session(runtime, hooks)
    app = create_app(session, runtime.model, api_key, batch_size or default_batch_size(session.runner.device), queue_size)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # before the address is announced: early clients wait instead of being refused
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port") from None
    announce(f"http://{host}:{sock.getsockname()[1]}/v1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
