"""What a chat-completions request may ask of `qvl serve`, checked before any work: its fields
(types and ranges, a 400 naming the field), its messages and media URLs, its sizing options
under vLLM's names, and its prompt against the server's bounds."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.errors import UsageError
from qwen2vl_cli.types import GenerationOptions, MediaOptions, check_generation


# The per-request sizing options, under vLLM's name for them.
MM_KWARGS = {f.name for f in fields(MediaOptions)} - {"cpu_budget", "resize", "max_download"}


URL_SCHEMES = ("http://", "https://", "data:")


DEFAULT_MAX_TOKENS = 512  # when a request gives none


MAX_SCHEMA_CHARS = 65536  # a response_format schema, written compactly


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
    max_frames: int = 768  # frames of one video sent as frames (data:video/jpeg)

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

    def response(self):
        from fastapi.responses import JSONResponse

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


def media_options(kwargs, limits: Limits) -> tuple[MediaOptions, list | None, list | float | None]:
    """The request's sizing options, held to the server's visual-token budget and download limit,
    and what places its videos sent as frames in time: their metadata (`video_metadata`, one entry
    each, in order) and rates (`fps`: one for all, or a list, one each; vLLM's form)."""
    from qwen2vl_cli.sizing import check_options

    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise invalid("mm_processor_kwargs must be an object, such as {\"max_pixels\": 401408}", "mm_processor_kwargs")
    kwargs = dict(kwargs)
    timings = kwargs.pop("video_metadata", None)
    if timings is not None and not (isinstance(timings, list) and len(timings) <= limits.max_media):
        raise invalid(f"mm_processor_kwargs: video_metadata must be a list of at most {limits.max_media} objects, one for each video "
                      "sent as frames", "mm_processor_kwargs")
    if kwargs.pop("do_sample_frames", False) is not False:
        raise invalid("mm_processor_kwargs: do_sample_frames must be false: videos sent as frames are taken as they are, and "
                      "video files are sampled by the options here", "mm_processor_kwargs")
    rates = kwargs.get("fps")
    if isinstance(rates, list):  # vLLM's form: a rate for each video sent as frames
        kwargs.pop("fps")
        if len(rates) > limits.max_media or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)
                                                   and 1e-3 <= r <= 1e6 for r in rates):
            raise invalid("mm_processor_kwargs: fps must be a number from 0.001 to 1000000, or a list of them", "mm_processor_kwargs")
    unknown = set(kwargs) - MM_KWARGS
    if unknown:
        known = sorted(MM_KWARGS | {"video_metadata", "do_sample_frames"})
        raise invalid(f"mm_processor_kwargs: unknown {sorted(map(str, unknown))[:8]}; known: {known}", "mm_processor_kwargs")
    try:
        opts = check_options(MediaOptions(**kwargs))
    except (UsageError, TypeError) as e:
        raise invalid(f"mm_processor_kwargs: {str(e).lstrip('-')}", "mm_processor_kwargs") from None
    budget = opts.max_visual_tokens
    if budget is not None and budget > limits.max_visual_tokens:
        raise invalid(f"mm_processor_kwargs: max_visual_tokens {budget} is over this server's {limits.max_visual_tokens}", "mm_processor_kwargs")
    return replace(opts, max_download=limits.max_download), timings, rates  # the session holds every request to max_visual_tokens


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
        schema=response_schema(body.get("response_format")),
        stop=stops(body.get("stop")),
    )
    # The CLI's names in check_generation's messages, as this request names them.
    names = {"max-new-tokens": length, "min-new-tokens": "min_tokens", "stop": "stop", "schema or --json-object": "response_format"}
    try:
        return check_generation(gen)
    except UsageError as e:
        message = str(e).lstrip("-")
        for cli, api in names.items():
            message = message.replace(f"--{cli}", api).replace(cli, api)
        name = message.split(" ", 1)[0]
        raise invalid(message, names.get(name, name).replace("-", "_")) from None


def stops(value) -> tuple[str, ...]:
    """`stop`: a string or a list of up to 4, none empty (OpenAI's rule)."""
    from qwen2vl_cli.types import MAX_STOPS

    if value is None or value == []:
        return ()
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_STOPS or not all(isinstance(s, str) and s for s in listed):
        raise invalid(f"stop must be a string or a list of 1 to {MAX_STOPS} strings, none of them empty", "stop")
    if any(len(s) > 256 for s in listed):
        raise invalid("stop: each string at most 256 characters", "stop")
    return tuple(listed)


def response_schema(value) -> str | None:
    """`response_format` as the schema the answer follows: none for text, any object for
    json_object, the given JSON Schema for json_schema (OpenAI's shapes)."""
    from qwen2vl_cli import schemas

    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return schemas.canonical(schemas.JSON_OBJECT)
    if kind != "json_schema":
        raise invalid("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                      "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}", "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
        raise invalid("response_format.json_schema must be an object with a name and a schema object", "response_format")
    if len(json.dumps(spec["schema"], separators=(",", ":"), ensure_ascii=False)) > MAX_SCHEMA_CHARS:  # checked, compiled and kept: bounded first
        raise invalid(f"response_format.json_schema.schema: at most {MAX_SCHEMA_CHARS:,} characters on this server", "response_format")
    try:
        return schemas.canonical(spec["schema"])
    except UsageError as e:
        raise invalid(f"response_format.json_schema.schema: {str(e).removeprefix('--schema: ')}", "response_format") from None


# Fields that change what comes back, which this server does not do: given with a value other than
# these (OpenAI's defaults), the request is refused naming the field, never answered as if absent.
NOT_DONE = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
    "verbosity": (None,), "moderation": (None,),
}
# Fields this server acts on (vLLM's extras among them), and those that do not change the answer.
HONOURED = {"messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
            "response_format", "stop", "top_k", "repetition_penalty", "min_tokens", "mm_processor_kwargs"}
HARMLESS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
            "prompt_cache_options"}


def check_request(body: dict, names: tuple[str, ...], also: str | None = None) -> tuple[bool, bool]:
    """The fields qvl does not act on beyond a check; returns (stream, include_usage). `names`:
    the served model's names (any one may be asked for); `also`: the model as the server was
    given it, taken too (a client that names the same directory or hub id)."""
    for name, fine in NOT_DONE.items():
        if name in body and not any(body[name] == f and type(body[name]) is type(f) for f in fine):
            raise invalid(f"{name}: this server does not do it; leave it out", name)
    model = body.get("model")
    if model is not None and model not in names and model != also:
        served = ", ".join(repr(n) for n in names)
        raise ApiError(404, "invalid_request_error", f"the model {str(model)[:200]!r} does not exist; this server serves {served}",
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
