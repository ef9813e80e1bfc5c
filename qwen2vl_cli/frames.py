"""A video as the frames a client sampled: `data:video/jpeg;base64,<frame>,<frame>,...` (the form
vLLM takes), with each video's sampling metadata (HF's VideoMetadata fields: the clip's frame rate,
the frame indices, the frames the sampling spanned) in `mm_processor_kwargs.video_metadata`.

qvl sends its planned frames this way (`--endpoint`), so a remote engine sees the frames, sizes and
times qvl chose instead of sampling the file again; `qvl serve` takes the same form, bounded: the
frame count (--max-frames), each frame's size and all frames' pixels (--max-source-pixels), read
from the JPEG headers before any frame is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass

from qwen2vl_cli import config as C
from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.types import Loaded, MediaOptions, MediaPlan, VisionSpec

MIME = "video/jpeg"
# JPEG at this quality, without chroma subsampling: a mean difference of 0.4-0.6 (uint8 units) from
# the frames decoded here on the test and sample clips (under 1 checked by tests/test_scale_out.py).
QUALITY = 95
DEFAULT_FPS = 2.0  # a client that says nothing of its frames' times: Qwen's sampling rate
MAX_FRAMES = C.FPS_MAX_FRAMES  # frames of one sent video unless a server says otherwise


def encode(loaded: Loaded) -> str:
    """A decoded video's frames as one `data:video/jpeg` URL."""
    from PIL import Image

    parts = []
    for frame in loaded.frames:
        out = io.BytesIO()
        Image.fromarray(frame).save(out, "JPEG", quality=QUALITY, subsampling=0)
        parts.append(base64.b64encode(out.getvalue()).decode())
    return f"data:{MIME};base64," + ",".join(parts)


def metadata(plan: MediaPlan) -> dict:
    """What places a planned video's frames in time, as the family's processor reads it."""
    return {"fps": plan.native_fps, "frames_indices": list(plan.frame_indices or ()), "total_num_frames": plan.span_frames,
            "width": plan.width, "height": plan.height}


def split(payload: str, label: str, max_frames: int) -> tuple[bytes, ...]:
    """The frames of a `video/jpeg` data URL's payload, counted before any is decoded."""
    count = payload.count(",") + 1
    if count > max_frames:
        raise MediaError(label, f"{count} frames: more than the {max_frames} this server takes (--max-frames)")
    try:
        frames = tuple(base64.b64decode("".join(part.split()), validate=True) for part in payload.split(","))
    except (binascii.Error, ValueError) as e:
        raise MediaError(label, f"invalid base64 in a frame of the video ({e})") from None
    if not all(frames):
        raise MediaError(label, "an empty frame in the video")
    return frames


LONGEST_S = 10**7  # seconds a sent video may place its frames in (about four months)


def timing(given, count: int, label: str, rate: float | None = None) -> dict:
    """A video's metadata from a request, checked (`given` None: frames `rate` a second, by default
    Qwen's 2)."""
    if given is None:
        if rate is not None and not _rate(rate):
            raise UsageError(f"mm_processor_kwargs.fps of {label}: give a number from 0.001 to 1000000")
        return {"fps": float(rate or DEFAULT_FPS), "frames_indices": list(range(count)), "total_num_frames": count}
    if not isinstance(given, dict):
        raise UsageError("mm_processor_kwargs.video_metadata: each entry must be an object such as "
                         "{\"fps\": 30, \"frames_indices\": [0, 15], \"total_num_frames\": 16}")
    fps, indices, total = given.get("fps"), given.get("frames_indices"), given.get("total_num_frames")
    if not _rate(fps):
        raise UsageError(f"mm_processor_kwargs.video_metadata: fps of {label} must be a number from 0.001 to 1000000")
    if (not isinstance(indices, list) or len(indices) != count
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 10**9 for i in indices) or indices != sorted(indices)):
        raise UsageError(f"mm_processor_kwargs.video_metadata: frames_indices of {label} must be {count} whole numbers, in order, "
                         "one for each frame sent")
    if total is None:
        total = indices[-1] - indices[0] + 1
    if isinstance(total, bool) or not isinstance(total, int) or not 1 <= total <= 10**9:
        raise UsageError(f"mm_processor_kwargs.video_metadata: total_num_frames of {label} must be a whole number above 0")
    if max(total, indices[-1]) / fps > LONGEST_S:
        raise UsageError(f"mm_processor_kwargs.video_metadata: {label}'s frames_indices and fps place it past {LONGEST_S:,} seconds")
    out = {"fps": float(fps), "frames_indices": indices, "total_num_frames": total}
    for side in ("width", "height"):
        value = given.get(side)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 10**6:
            out[side] = value
    return out


def _rate(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 1e-3 <= value <= 1e6


@dataclass(frozen=True)
class Sent:
    """A video sent as frames, planned from its JPEG headers alone (nothing decoded yet)."""

    label: str
    frames: tuple[bytes, ...]
    plan: MediaPlan


def plan(label: str, frames: tuple[bytes, ...], meta: dict, spec: VisionSpec, opts: MediaOptions, max_pixels: int,
         most_tokens: int | None = None, count=None) -> Sent:
    """A sent video's plan, from its frames' headers: their own size where the model takes it (a
    client that planned them, as qvl does), else the size a video of that many frames gets, and
    never more than `most_tokens` visual tokens (smaller frames, then). `max_pixels`: all frames'
    pixels as sent. Nothing is decoded here: the plan is checked against a request's room first."""
    from PIL import Image

    from qwen2vl_cli import families, sizing

    sizes = set()
    for n, data in enumerate(frames):
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG":
                    raise MediaError(label, f"frame {n + 1} is {img.format or 'not an image'}, not a JPEG")
                if img.info.get("progressive") or img.info.get("progression"):  # its scans cost decoding time nothing bounds
                    raise MediaError(label, f"frame {n + 1} is a progressive JPEG: send baseline JPEG frames")
                sizes.add(img.size)
        except MediaError:
            raise
        except Exception as e:  # Pillow's error types on a bad header vary
            raise MediaError(label, f"frame {n + 1} is not a JPEG that can be read ({' '.join(str(e).split())[:120]})") from None
    if len(sizes) != 1:
        raise MediaError(label, f"its frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes)[:3])}): send them at one size")
    [(width, height)] = sizes
    if width * height * len(frames) > max_pixels:
        raise MediaError(label, f"{len(frames)} frames of {width}x{height}: {width * height * len(frames):,} pixels, over the "
                                f"{max_pixels:,} allowed here; send fewer or smaller frames")
    f, patches = spec.factor, -(-len(frames) // spec.temporal_patch_size)
    min_p, max_p = sizing.video_pixel_limits(len(frames) + len(frames) % 2, spec, opts)
    most = max(max_p, 1.5 * min_p)  # a planned size: smart_resize's, its rounding up to the minimum included
    if most_tokens is not None:
        if most_tokens < patches:
            raise MediaError(label, f"{len(frames)} frames: more than the {most_tokens:,} visual tokens this request has room for "
                                    "can hold; send fewer frames")
        most = min(most, most_tokens // patches * f * f)  # each temporal patch its share of the room
    if width % f == 0 and height % f == 0 and width * height <= most:
        rh, rw = height, width
    else:
        rh, rw = sizing.smart_resize(height, width, f, min(min_p, most), most)
    fps, indices, total = meta["fps"], tuple(meta["frames_indices"]), meta["total_num_frames"]
    grid, tokens = sizing.grid_tokens(spec, rh, rw, frames=len(frames))
    stamps = families.time_stamps(indices, fps, spec.temporal_patch_size) if spec.time_stamps else None
    shown = (meta.get("width", width), meta.get("height", height))
    result = MediaPlan(
        label, "video", shown[0], shown[1], rw, rh, grid, tokens, duration_s=total / fps, native_fps=fps, frames=total,
        frame_indices=indices, frame_times_s=tuple(i / fps for i in indices), sample_fps=len(frames) / total * fps, span_frames=total,
        time_stamps_s=stamps, stamp_tokens=families.stamp_tokens(stamps, count) if stamps else 0,
        marker_tokens=families.video_marker_tokens(stamps),
        notes=() if (rw, rh) == (width, height) else (f"frames sent at {width}x{height}: resized to {rw}x{rh}",),
    )
    return Sent(label, frames, result)


def load(sent: Sent) -> Loaded:
    """A planned sent video's pixels: each frame decoded and, where its plan says, resized, one at a time."""
    import numpy as np
    from PIL import Image

    plan = sent.plan
    pixels = np.empty((len(sent.frames), plan.resized_height, plan.resized_width, 3), dtype=np.uint8)
    for n, data in enumerate(sent.frames):
        try:
            with Image.open(io.BytesIO(data)) as img:
                frame = img.convert("RGB")
        except Exception as e:  # a cut or corrupt frame
            raise MediaError(sent.label, f"frame {n + 1} cannot be decoded ({' '.join(str(e).split())[:120]})") from None
        size = (plan.resized_width, plan.resized_height)
        pixels[n] = np.asarray(frame if frame.size == size else frame.resize(size, Image.Resampling.BICUBIC))
    return Loaded(frames=pixels, frame_times_s=plan.frame_times_s,
                  video_metadata={"fps": plan.native_fps, "frames_indices": list(plan.frame_indices), "total_num_frames": plan.span_frames})


def probe_size(frames: tuple[bytes, ...]) -> tuple[int, int]:
    """The first frame's width and height (for a probe), 0x0 where it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(frames[0])) as img:
            return img.size
    except Exception:  # noqa: BLE001 - planning says what is wrong with it
        return 0, 0

