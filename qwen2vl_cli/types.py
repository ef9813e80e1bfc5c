"""Frozen request and result types shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

Kind = Literal["image", "video"]

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class VisionSpec:
    """The model's processor settings that decide sizes and token counts."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    time_stamps: bool = False  # Qwen3-VL: "<t seconds>" and its own markers before each temporal patch

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merged visual token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class MediaOptions:
    """What the user asked for about sizes and frames; None means the reference default."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    resize: tuple[int, int] | None = None  # (width, height)
    fps: float | None = None
    nframes: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    first_frame: bool = False
    seek: Literal["exact", "keyframe"] = "exact"  # keyframe: nearest keyframes only (fast preview)
    max_visual_tokens: int | None = None  # one budget over all images and frames of a request
    max_download: int = 2 * 1024**3  # bytes read from a URL or stdin
    cpu_budget: bool = False  # smaller defaults when running on CPU and no pixel limit was given

    @property
    def pixel_limits_given(self) -> bool:
        limits = (self.min_pixels, self.max_pixels, self.total_pixels, self.resize, self.max_visual_tokens)
        return any(v is not None for v in limits)


@dataclass(frozen=True)
class MediaInfo:
    """What a file's headers say, before any pixel is decoded."""

    kind: Kind
    width: int
    height: int
    format: str
    animated: bool = False  # an image file holding motion (GIF, WebP, APNG)
    frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    start_s: float = 0.0
    frame_times_s: tuple[float, ...] | None = None  # animated images: when each frame is shown
    keyframes: tuple[int, ...] | None = None  # videos whose packets were scanned


@dataclass(frozen=True)
class MediaPlan:
    """Sizes, frames and token counts for one input: what `inspect` prints and what the runner feeds."""

    source: str
    kind: Kind
    width: int
    height: int
    resized_width: int
    resized_height: int
    grid_thw: tuple[int, int, int]
    visual_tokens: int
    duration_s: float | None = None
    native_fps: float | None = None
    frames: int | None = None
    frame_indices: tuple[int, ...] | None = None
    frame_times_s: tuple[float, ...] | None = None
    sample_fps: float | None = None
    span_frames: int | None = None  # frames from the first to the last one the sampling could pick
    time_stamps_s: tuple[float, ...] | None = None  # Qwen3-VL: the seconds written before each temporal patch
    stamp_tokens: int = 0  # the tokens those time stamps take
    marker_tokens: int = 2  # <|vision_start|>/<|vision_end|> tokens (with time stamps: a pair per temporal patch)
    notes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> MediaPlan:
        """The inverse of to_dict (for plans that come back from a qvl server)."""
        tuples = {"grid_thw", "frame_indices", "frame_times_s", "time_stamps_s"}
        names = {f for f in cls.__dataclass_fields__} - {"notes"}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items() if k in names})

    @property
    def tokens_with_markers(self) -> int:
        """The input's tokens in the prompt: its visual tokens, the vision markers, and with time
        stamps (Qwen3-VL video) the stamps' tokens."""
        return self.visual_tokens + self.marker_tokens + self.stamp_tokens

    def to_dict(self) -> dict:
        out = {
            "source": self.source,
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "resized_width": self.resized_width,
            "resized_height": self.resized_height,
            "grid_thw": list(self.grid_thw),
            "visual_tokens": self.visual_tokens,
            "tokens_with_markers": self.tokens_with_markers,
        }
        if self.kind == "video":
            out.update(
                duration_s=_round(self.duration_s),
                native_fps=_round(self.native_fps),
                frames=self.frames,
                frame_indices=list(self.frame_indices or ()),
                frame_times_s=[_round(t) for t in self.frame_times_s or ()],
                sample_fps=_round(self.sample_fps),
            )
            if self.time_stamps_s is not None:
                out["time_stamps_s"] = [_round(t) for t in self.time_stamps_s]
                out["stamp_tokens"] = self.stamp_tokens
                out["marker_tokens"] = self.marker_tokens
        if self.notes:  # what sizing and decoding had to say of it (frames cut by a budget, frames a damaged stream lost)
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class GenerationOptions:
    prompt: str | None = None
    system: str | None = None
    max_new_tokens: int = 512
    min_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    repeat_guard: bool = True  # stop a generation caught in a loop
    boxes: str | None = None  # grounding: what to find; the family's own prompt asks for it
    schema: str | None = None  # a JSON Schema (schemas.canonical's text) the answer follows
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (OpenAI's `stop`)


def check_generation(gen: GenerationOptions) -> GenerationOptions:
    """The generation settings' own ranges, before any model loads (the CLI and the server both pass here)."""
    from qwen2vl_cli.errors import UsageError

    def number(value, integer: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
            return False
        return isinstance(value, int) or math.isfinite(value)  # an int of any size is finite (and too big for a float)

    checks = [
        ("max-new-tokens", gen.max_new_tokens, True, lambda v: v >= 1, "must be 1 or more"),
        ("min-new-tokens", gen.min_new_tokens, True, lambda v: v >= 0, "must be 0 or more"),
        ("temperature", gen.temperature, False, lambda v: v >= 0, "must be 0 (greedy) or more"),
        ("top-p", gen.top_p, False, lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
        ("top-k", gen.top_k, True, lambda v: v >= 0, "must be 0 (off) or more"),
        ("repetition-penalty", gen.repetition_penalty, False, lambda v: v > 0, "must be above 0 (1 is no penalty)"),
        ("seed", gen.seed, True, lambda v: 0 <= v < 2**63, "must be a whole number from 0 to 2^63-1"),
    ]
    for name, value, integer, ok, rule in checks:
        if value is not None and not (number(value, integer) and ok(value)):
            raise UsageError(f"--{name} {f'{value:g}' if isinstance(value, float) else value}: {rule}")
    if len(gen.stop) > MAX_STOPS or any(not s for s in gen.stop):
        raise UsageError(f"--stop: give 1 to {MAX_STOPS} strings, none of them empty")
    if gen.schema is not None and gen.stop:
        raise UsageError("--stop with --schema or --json-object: a JSON answer ends where it is complete; drop --stop")
    if gen.schema is not None and gen.min_new_tokens:
        raise UsageError("--min-new-tokens with --schema or --json-object: a JSON answer ends where it is complete; drop --min-new-tokens")
    if gen.stop and gen.min_new_tokens:
        raise UsageError("--min-new-tokens with --stop: an answer ends at its stop string; drop one of them")
    if gen.min_new_tokens is not None and gen.min_new_tokens > gen.max_new_tokens:
        raise UsageError(f"--min-new-tokens {gen.min_new_tokens} is above --max-new-tokens {gen.max_new_tokens}: raise --max-new-tokens")
    if 0 < gen.temperature < GREEDY_BELOW:  # dividing by it would overflow the logits; the limit of sampling is greedy
        return replace(gen, temperature=0.0)
    return gen


MAX_STOPS = 4  # stop strings of one answer, as OpenAI takes them
GREEDY_BELOW = 1e-5  # temperatures under this sample as greedy, as vLLM's do


@dataclass(frozen=True)
class RuntimeOptions:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    engine: str = "auto"  # the decode loop: decode.py's over a static cache, or transformers' generate
    quantize: str = "none"  # the language model's weights: none, int8 (int8.py on an x86 CPU, else torchao), int4 (torchao, CUDA)
    cache_size: int | None = 0  # bytes kept for reuse: prefixes, vision outputs, decoded media (0: none, as one run needs; None: the device's default)


@dataclass(frozen=True)
class Result:
    text: str
    model: str
    device: str
    dtype: str
    attn: str
    prompt_tokens: int
    visual_tokens: int
    generated_tokens: int
    load_s: float
    ttft_s: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    finish_reason: Literal["stop", "length", "repetition"]
    inputs: tuple[MediaPlan, ...] = field(default_factory=tuple)
    engine: str = "-"  # the decode loop that ran: static, graph or hf ("-" for a remote engine)
    # Before the first token: media (reading, decoding, processor inputs), then within ttft_s the
    # vision tower and the prefill of the prompt. None where not measured (a remote engine).
    media_s: float | None = None
    vision_s: float | None = None
    prefill_s: float | None = None
    compile_s: float | None = None  # the compiled and graph engines: making the step, before decoding
    boxes: tuple[dict, ...] | None = None  # --boxes: found in the answer, in the original image's pixels
    box_problems: tuple[str, ...] = ()  # --boxes: what the answer held that could not be read as a box
    tokens: tuple[int, ...] = ()  # the answer's token ids (a local model's; not in the record)
    cached_tokens: int = 0  # prompt tokens not prefilled: their keys and values were kept (a conversation's earlier turns)
    structured: bool = False  # --schema, --json-object: the answer is JSON, parsed into `data`
    data: object = None
    weights: str = "-"  # the language model's weights: its dtype, or int8/int4 (--quantize); "-" for a remote engine
    weights_bytes: int = 0  # the loaded model's weights (the vision tower's included), each shared one once

    def timed(self, vision_s: float | None) -> Result:
        """With the vision tower's part of the time to first token; the rest of it is prefill."""
        prefill = max(0.0, self.ttft_s - (vision_s or 0.0)) if self.ttft_s is not None else None
        return replace(self, vision_s=vision_s, prefill_s=prefill)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "attn": self.attn,
            "engine": self.engine,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "visual_tokens": self.visual_tokens,
            "generated_tokens": self.generated_tokens,
            "load_s": _round(self.load_s),
            "ttft_s": _round(self.ttft_s),
            "media_s": _round(self.media_s),
            "vision_s": _round(self.vision_s),
            "prefill_s": _round(self.prefill_s),
            "compile_s": _round(self.compile_s),
            "decode_tokens_per_s": _round(self.decode_tokens_per_s),
            "peak_memory_bytes": self.peak_memory_bytes,
            "weights": self.weights,
            "weights_bytes": self.weights_bytes,
            "finish_reason": self.finish_reason,
            "inputs": [p.to_dict() for p in self.inputs],
        } | ({"boxes": list(self.boxes), "box_problems": list(self.box_problems)} if self.boxes is not None else {}) | (
            {"data": self.data} if self.structured else {})


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


@dataclass(frozen=True)
class Loaded:
    """Pixels ready for the processor: one RGB image, or uint8 frames (T, H, W, 3) with their times."""

    image: object | None = None  # PIL.Image.Image
    frames: np.ndarray | None = None
    frame_times_s: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()
    # Videos: what the processor's VideoMetadata holds (frame indices, the clip's frame rate, the
    # frames the sampling spanned), which places frames in time for Qwen2.5-VL and Qwen3-VL.
    video_metadata: dict | None = None


@dataclass(frozen=True)
class Prepared:
    """A request ready for a local model: its plans, its pixels and the prompt text."""

    plans: tuple[MediaPlan, ...]
    loaded: tuple[Loaded, ...]
    text: str
    media_s: float = 0.0  # reading and decoding its media
    prompt_tokens: int | None = None  # its tokens in the model, where counted before the model (a server's requests)


@dataclass(frozen=True)
class Request:
    """What `describe` and `video` were asked: sources in one prompt, and every option."""

    sources: tuple[str, ...]
    media: MediaOptions
    generation: GenerationOptions
    runtime: RuntimeOptions
    require_video: bool = False
    draw: str | None = None  # --draw: write the picture with the boxes found here
    endpoint: EndpointOptions | None = None  # --endpoint: answered there
    sheet: str | None = None  # --frames-sheet: write the picture of the frames the model gets here


@dataclass(frozen=True)
class Timeline:
    """--segment: a clip cut into windows `segment` seconds long, each starting `overlap` before the
    one before ends, a record each; with `summary`, one more over their answers."""

    segment: float
    overlap: float = 0.0
    summary: bool = False
    summary_prompt: str | None = None  # None: the windows' own question


@dataclass(frozen=True)
class EndpointOptions:
    urls: tuple[str, ...]  # one or more: requests go to the one with the fewest in flight
    api_key: str | None = None
    pass_urls: bool = False
    concurrency: int = 4  # requests in flight at each endpoint (--each)

    @property
    def url(self) -> str:
        """The endpoints, as one text for messages."""
        return ", ".join(self.urls)
