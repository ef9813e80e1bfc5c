"""`--endpoint URL`: the same requests against an OpenAI-compatible engine (qvl serve, vLLM, SGLang).

Media are resolved and checked here as for a local run (a bad file never leaves the machine), then
sent as data: URLs, or passed through as http(s) URLs with --pass-urls. The official openai client
does the HTTP: streaming, timeouts, and bounded retries with backoff on 429, 5xx and lost
connections. Token counts come from the server's `usage`; timings are measured here.

With several endpoints each request goes to the one with the fewest requests in flight; one that
cannot be reached, or answers 5xx after its retries, is left alone for a while and the request goes
to another.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from threading import Event

from qwen2vl_cli.errors import Cancelled, MediaError, ModelError, QvlError, UsageError
from qwen2vl_cli import frames, grounding, media, schemas
from qwen2vl_cli.families import Family, family_for
from qwen2vl_cli.messages import default_prompt
from qwen2vl_cli.modelinfo import read_config, vision_spec
from qwen2vl_cli.pipeline import Hooks, check_boxes, decoded, probe_all, plan_all
from qwen2vl_cli.runner import peak_memory_bytes
from qwen2vl_cli.sources import Source, SourceResolver
from qwen2vl_cli.types import EndpointOptions, GenerationOptions, MediaOptions, MediaPlan, Request, Result, VisionSpec

MAX_RETRIES = 3
DOWN_S = 30.0  # an endpoint that failed is left alone this long, while others are up


@dataclass(eq=False)
class Server:
    """One endpoint: its client, and what the requests spread over it need to know."""

    url: str
    client: object
    in_flight: int = 0
    served: int = 0
    down_until: float = 0.0
    takes_frames: bool = True  # videos as their frames; once refused, as files


class ServerDown(QvlError):
    """An endpoint that cannot be reached or answers 5xx: the request may go to another."""
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}


@dataclass(frozen=True)
class RemoteRequest:
    plans: tuple[MediaPlan, ...]
    messages: list
    opts: MediaOptions  # the sizing options, sent on as mm_processor_kwargs
    # Videos sent as the frames planned here (frames.py): their metadata, in order, and the media
    # parts as files, for a server that does not take frames.
    timings: tuple[dict, ...] = ()
    file_parts: tuple[dict, ...] = ()

    def sent(self, as_files: bool) -> tuple[list, dict]:
        """The messages and mm_processor_kwargs to send: the videos as their frames, or as files."""
        if not self.timings or not as_files:
            return self.messages, _frames_kwargs(self) if self.timings else mm_kwargs(self.opts)
        *before, last = self.messages
        return [*before, {**last, "content": [*self.file_parts, last["content"][-1]]}], mm_kwargs(self.opts)


# Sizing options that choose a video's frames: not sent with frames already chosen (the pixel
# limits are, so the server holds the frames to the limits they were sized by).
SAMPLING = {"fps", "nframes", "min_frames", "max_frames", "start", "end", "seek"}


def _frames_kwargs(request: RemoteRequest) -> dict:
    """mm_processor_kwargs for videos sent as frames: each one's metadata (the frames' indices and the
    clip's rate, which place them in time), its sampling rate (vLLM's name), and no sampling again."""
    kwargs = {k: v for k, v in mm_kwargs(request.opts).items() if k not in SAMPLING}
    rates = [p.sample_fps for p in request.plans if p.kind == "video"]
    return kwargs | {"video_metadata": list(request.timings), "fps": rates[0] if len(set(rates)) == 1 else rates, "do_sample_frames": False}


def media_part(kind: str, url: str) -> dict:
    """A media part of a message, with a hash of its content as its `uuid` (vLLM reuses its work on
    an item by it); none for a URL passed through, whose content is the server's to fetch."""
    if url.startswith(("http://", "https://")):
        return {"type": kind, kind: {"url": url}}
    from blake3 import blake3

    return {"type": kind, kind: {"url": url}, "uuid": blake3(url.encode()).hexdigest(length=16)}


def _data_url(src: Source, info_format: str, kind: str) -> str:
    data = src.data if src.data is not None else src.path.read_bytes()
    mime = _MIME.get(info_format.upper()) or mimetypes.guess_type(src.label)[0] or ("video/mp4" if kind == "video" else "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def mm_kwargs(opts: MediaOptions) -> dict:
    """The sizing options the user gave, for the server (vLLM's mm_processor_kwargs)."""
    default = MediaOptions()
    skip = {"cpu_budget", "max_download", "resize"}
    return {k: v for k, v in asdict(opts).items() if k not in skip and v != getattr(default, k)}


class EndpointBackend:
    """The Backend (backend.py) over HTTP, for single runs and `--each`."""

    device = "endpoint"

    def __init__(self, options: EndpointOptions, model: str):
        try:
            from openai import OpenAI
        except ImportError:
            raise UsageError("--endpoint needs its extra: pip install 'qwen2vl-cli[endpoint]'") from None
        self.options, self.model = options, model
        # With others to turn to, an endpoint that fails is left sooner.
        retries = MAX_RETRIES if len(options.urls) == 1 else 1
        self.servers = [Server(url, OpenAI(base_url=url, api_key=options.api_key or "none", max_retries=retries)) for url in options.urls]
        self.client = self.servers[0].client
        self._lock = threading.Lock()
        self._said: dict | None = None  # what a qvl server says of its model (_served)
        # Sizes are planned with the model's settings when they are on this machine, for the diagnostics.
        # A remote server may serve a model qvl cannot run here: then Qwen2-VL's sizes stand in.
        try:
            self.spec: VisionSpec = vision_spec(model) or VisionSpec()
        except ModelError:
            self.spec = VisionSpec()
        self._family: Family | None = None

    def family(self) -> Family:
        """The served model's family, for --boxes: from its config.json on this machine, else from
        what a qvl server says in /v1/models."""
        if self._family is not None:
            return self._family
        config = read_config(self.model)
        model_type = config.get("model_type") if config else self._served().get("model_type")
        if model_type is None:
            raise UsageError(
                f"--boxes with --endpoint: qvl cannot tell how {self.model} writes boxes; put its config.json on this "
                f"machine (`hf download {self.model}`, or --model DIR), or serve it with qvl serve"
            )
        self._family = family_for(model_type, self.model)
        return self._family

    def _served(self) -> dict:
        """What a qvl server says of its model in /v1/models (its family and device): the first
        endpoint that answers, kept once one has; {} from other servers, or while none answers."""
        if self._said is not None:
            return self._said
        for server in self.servers:
            try:
                listed = list(server.client.with_options(max_retries=0, timeout=10).models.list())
            except Exception:  # noqa: BLE001 - any failure here means the same: ask the next
                continue
            named = [m for m in listed if m.id == self.model] or (listed if len(listed) == 1 else [])
            said = (named[0].model_extra or {}).get("qvl") if named else None
            self._said = said if isinstance(said, dict) else {}
            return self._said
        return {}

    def prepare(self, sources: tuple[str, ...], opts: MediaOptions, gen: GenerationOptions, require_video: bool = False) -> RemoteRequest:
        """Media resolved and checked here (a bad file never leaves the machine), as parts of one
        message. Videos (animations read as video too) go as the frames planned here, at their
        planned size, so the remote engine sees the frames `qvl inspect` shows; the files are kept
        for a server that does not take frames. A video URL passed through (--pass-urls) is the
        server's to sample, and then every video of the request goes as its file."""
        with SourceResolver(max_bytes=opts.max_download) as resolver:
            probed = probe_all(resolver, sources, opts, require_video)
            check_boxes([(p.source.label, p.info.kind) for p in probed], gen)
            plans = plan_all(probed, self.spec, opts)
            files = [media_part("video_url" if plan.kind == "video" else "image_url", self.media_url(text, p.source, p.info.format, plan.kind))
                     for text, p, plan in zip(sources, probed, plans)]
            if not any(plan.kind == "video" for plan in plans) or any(
                    part["video_url"]["url"].startswith(("http://", "https://")) for part in files if part["type"] == "video_url"):
                return self._asked(tuple(plans), files, opts, gen)
            if self._served().get("device") == "cpu":  # a qvl server on a CPU sizes media smaller: plan the frames as it would
                plans = plan_all(probed, self.spec, replace(opts, cpu_budget=True))
            parts, timings, sent = [], [], []
            for p, plan, part in zip(probed, plans, files):
                if plan.kind == "video":
                    loaded = media.load(p.source, p.info, plan, opts.seek == "keyframe")
                    plan = decoded(plan, loaded)
                    part = media_part("video_url", frames.encode(loaded))
                    timings.append(frames.metadata(plan))
                parts.append(part)
                sent.append(plan)
        return self._asked(tuple(sent), parts, opts, gen, tuple(timings), tuple(files))

    def media_url(self, given: str, source: Source, info_format: str, kind: str) -> str:
        """What is sent for a medium: its bytes as a data: URL, or with --pass-urls an http(s) URL as given."""
        if self.options.pass_urls and given.startswith(("http://", "https://")):
            return given
        return _data_url(source, info_format, kind)

    def ask(self, request: RemoteRequest, gen: GenerationOptions) -> RemoteRequest:
        """The same media with another question: nothing read or encoded again."""
        return self._asked(request.plans, request.messages[-1]["content"][:-1], request.opts, gen, request.timings, request.file_parts)

    def _asked(self, plans: tuple, parts: list, opts: MediaOptions, gen: GenerationOptions, timings: tuple = (),
               file_parts: tuple = ()) -> RemoteRequest:
        if gen.boxes is not None:
            text = grounding.prompt(self.family(), gen.boxes)
        else:
            text = gen.prompt if gen.prompt is not None else default_prompt(plans)
        content = [*parts, {"type": "text", "text": text}]
        messages = ([{"role": "system", "content": gen.system}] if gen.system is not None else []) + [{"role": "user", "content": content}]
        return RemoteRequest(plans, messages, opts, timings, file_parts)

    def served(self) -> list[tuple[str, int]]:
        """Each endpoint and the requests it answered."""
        return [(s.url, s.served) for s in self.servers]

    def _pick(self, tried: set) -> Server | None:
        """The endpoint with the fewest requests in flight, of those up and not tried for this request
        (all down: the one back soonest)."""
        with self._lock:
            left = [s for s in self.servers if s not in tried]
            if not left:
                return None
            now = time.monotonic()
            up = [s for s in left if s.down_until <= now]
            server = min(up, key=lambda s: s.in_flight) if up else min(left, key=lambda s: s.down_until)
            server.in_flight += 1
            return server

    def complete(self, request: RemoteRequest, gen: GenerationOptions, on_text=None, cancel: Event | None = None) -> Result:
        """One request, streamed to `on_text`, on the endpoint with the fewest in flight; if it is
        down, on the next (unless text was already streamed from it). Once `cancel` is set, the
        stream is closed (the server stops generating for it) and the answer so far is the result."""
        tried: set = set()
        streamed = []

        def shown(text: str) -> None:
            streamed.append(text)
            on_text(text)

        while True:
            server = self._pick(tried)
            try:
                result = self._complete(server, request, gen, shown if on_text is not None else None, cancel)
            except ServerDown:
                with self._lock:
                    server.down_until = time.monotonic() + DOWN_S
                tried.add(server)
                if streamed or len(tried) == len(self.servers):
                    raise
                continue
            finally:
                with self._lock:
                    server.in_flight -= 1
            with self._lock:
                server.served += 1
            return result

    def _complete(self, server: Server, request: RemoteRequest, gen: GenerationOptions, on_text, cancel: Event | None) -> Result:
        import openai

        url = server.url
        as_files = not server.takes_frames
        messages, kwargs = request.sent(as_files)
        extra = {"mm_processor_kwargs": kwargs} if kwargs else {}
        for name in ("top_k", "repetition_penalty"):
            if getattr(gen, name) is not None:
                extra[name] = getattr(gen, name)
        if gen.min_new_tokens:
            extra["min_tokens"] = gen.min_new_tokens
        asked = schemas.response_format(gen.schema) if gen.schema is not None else openai.NOT_GIVEN
        start = time.perf_counter()
        times, parts, usage, finish, served = [], [], None, "stop", None
        try:
            stream = server.client.chat.completions.create(
                model=self.model,
                messages=messages,
                max_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p if gen.top_p is not None else openai.NOT_GIVEN,
                seed=gen.seed if gen.seed is not None else openai.NOT_GIVEN,
                response_format=asked,
                stop=list(gen.stop) if gen.stop else openai.NOT_GIVEN,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra or None,
            )
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if (chunk.model_extra or {}).get("qvl"):
                    served = chunk.model_extra["qvl"]
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        times.append(time.perf_counter())
                        parts.append(choice.delta.content)
                        if on_text is not None:
                            on_text(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
                if cancel is not None and cancel.is_set():
                    stream.close()
                    break
        except openai.AuthenticationError:
            raise UsageError(f"--endpoint {url} refused the API key: give --api-key (or QVL_API_KEY)") from None
        except openai.BadRequestError as e:
            if request.timings and not as_files and not times and _about_frames(e):  # a server that does not take videos as frames
                server.takes_frames = False
                warnings.warn(f"--endpoint {url} refused the videos as frames ({_server_message(e)[:160]}): sent as files, "
                              "so its own sampling applies", stacklevel=2)
                return self._complete(server, request, gen, on_text, cancel)
            raise MediaError(url, _server_message(e)) from None
        except openai.APIConnectionError:
            tries = server.client.max_retries + 1
            raise ServerDown(f"cannot reach --endpoint {url} (tried {tries} time{'s' if tries > 1 else ''}): is the server up?") from None
        except openai.APIStatusError as e:
            hint = ""
            if e.status_code == 404 and not url.endswith("/v1"):
                hint = f"; OpenAI-compatible servers answer under /v1: try --endpoint {url}/v1"
            failed = ServerDown if e.status_code in (502, 503, 504) else QvlError  # another 5xx is this request's, not the server's state
            raise failed(f"--endpoint {url} answered {e.status_code}: {_server_message(e)}{hint}") from None
        ttft = times[0] - start if times else None
        completion = usage.completion_tokens if usage else len(times)
        # A qvl server says which sizes it used; from other engines, the plan made here stands.
        plans = request.plans
        if served and len(served.get("inputs", ())) == len(plans):
            plans = tuple(replace(MediaPlan.from_dict(d), source=p.source) for d, p in zip(served["inputs"], plans))
        rate = (completion - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        text = "".join(parts)
        found = grounding.read(self.family(), text, plans[0], gen.boxes) if gen.boxes is not None else None
        result = Result(
            text=text,
            model=self.model,
            device="endpoint",
            dtype="-",
            attn="-",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            cached_tokens=_cached(usage),
            visual_tokens=sum(p.visual_tokens for p in plans),
            generated_tokens=completion,
            load_s=0.0,
            ttft_s=ttft,
            decode_tokens_per_s=rate,
            peak_memory_bytes=peak_memory_bytes("cpu"),
            finish_reason=finish if finish in ("stop", "length") else "stop",
            inputs=plans,
            boxes=found.boxes if found else None,
            box_problems=found.problems if found else (),
        )
        if gen.schema is None:
            return result
        checked = schemas.structured(result, gen)
        if isinstance(checked, Exception):
            raise checked
        self._check(checked.data, gen.schema, url)
        return checked

    def _check(self, data, schema: str, url: str) -> None:
        """A server may not follow `response_format` (or may not read it): its JSON is checked here."""
        import jsonschema

        try:
            jsonschema.validate(data, json.loads(schema))
        except jsonschema.ValidationError as e:
            raise QvlError(f"--endpoint {url} answered JSON that does not follow the schema ({' '.join(e.message.split())[:200]}): "
                           "does it take response_format? qvl serve, vLLM and SGLang do") from None

    def generate(self, batch: list[RemoteRequest], gen: GenerationOptions, on_text=None, cancels=None) -> list[Result | Exception]:
        """A batch of requests, all in flight at once (with `--each`, --concurrency for each endpoint);
        `on_text` streams a batch of one. A row whose event in `cancels` is set is not sent (Cancelled
        in its place), or, set while it streams, ends there."""
        cancels = list(cancels or [None] * len(batch))
        if len(batch) == 1 and not (cancels[0] is not None and cancels[0].is_set()):
            return [self.complete(batch[0], gen, on_text, cancels[0])]

        def one(request: RemoteRequest, cancel: Event | None) -> Result | Exception:
            if cancel is not None and cancel.is_set():
                return Cancelled()
            try:
                return self.complete(request, gen, cancel=cancel)
            except Exception as e:  # noqa: BLE001 - that request's failure; the others' answers stand
                return e

        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            return list(pool.map(one, batch, cancels))


def _cached(usage) -> int:
    """The prompt tokens the server did not prefill again, where it says (OpenAI's prompt_tokens_details)."""
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return cached if isinstance(cached, int) else 0


def _about_frames(e) -> bool:
    """Whether a server's 400 is about the video form (a server that does not take frames), not the rest of the request."""
    text = _server_message(e).lower()
    return any(word in text for word in ("video/jpeg", "jpeg", "frame", "video_metadata", "video"))


def _server_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return " ".join(str(error["message"]).split())
    return " ".join(str(e).split())[:300]


def answers(request: Request, gens: list[GenerationOptions], hooks: Hooks) -> Iterator[Result]:
    """`describe` and `video` through the endpoint: one answer about the request's media for each
    of `gens` (several -p), the media read and encoded once. With --draw, the boxes are drawn on
    the picture, read again from its source."""
    if request.draw is not None and request.sources == ("-",):
        raise UsageError("--draw with --endpoint reads the picture again: give a file or URL, not stdin")
    backend = EndpointBackend(request.endpoint, request.runtime.model)
    hooks.stage("Reading media")
    prepared = backend.prepare(request.sources, replace(request.media, cpu_budget=False), gens[0], request.require_video)
    for n, gen in enumerate(gens):
        hooks.stage(f"Waiting for {request.endpoint.url}")
        [result] = backend.generate([prepared if n == 0 else backend.ask(prepared, gen)], gen, on_text=hooks.text)
        if n == 0:
            hooks.inputs(list(result.inputs))  # the sizes the server used, when it says
        if request.draw is not None:
            with SourceResolver(max_bytes=request.media.max_download) as resolver:
                grounding.save_drawing(resolver.resolve(request.sources[0]), result.boxes or (), request.draw)
        yield result
