"""Pure resolution, frame and token math: the reference rules of qwen-vl-utils 0.0.14.

`inspect` and the runner both plan with these functions, so their numbers cannot disagree.
No torch and no numpy here: `inspect` starts fast.
"""

from __future__ import annotations

import bisect
import math
import struct
from dataclasses import replace

from qwen2vl_cli import config as C
from qwen2vl_cli import families
from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.types import MediaInfo, MediaOptions, MediaPlan, VisionSpec


class SizingError(UsageError):
    pass


# Far beyond any real pixel count, frame count or time, and small enough for float arithmetic.
MAX_OPTION = 10**15


def check_options(opts: MediaOptions) -> MediaOptions:
    """The options' own consistency (the CLI and the server's mm_processor_kwargs both pass here)."""
    if opts.fps is not None:
        number = isinstance(opts.fps, (int, float)) and not isinstance(opts.fps, bool)
        if not (number and 0 < opts.fps <= MAX_OPTION):
            raise UsageError(f"--fps {_shown(opts.fps)}: must be a finite number above 0 (frames sampled per second)")
    numbers = ("min_pixels", "max_pixels", "total_pixels", "nframes", "min_frames", "max_frames", "start", "end", "max_visual_tokens")
    for name in numbers:
        value = getattr(opts, name)
        least = 1 if name in ("max_pixels", "total_pixels") else 0  # a pixel limit of 0 leaves nothing to scale to
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value <= MAX_OPTION):
            raise UsageError(f"--{name.replace('_', '-')} {_shown(value)}: must be a number from {least} to {MAX_OPTION:.0e}")
    if not isinstance(opts.first_frame, bool):
        raise UsageError(f"--first-frame {_shown(opts.first_frame)}: must be true or false")
    if opts.seek not in ("exact", "keyframe"):
        raise UsageError(f"--seek {opts.seek}: choose one of exact, keyframe")
    if opts.fps is not None and opts.nframes is not None:
        raise UsageError("--fps and --nframes both given: choose one")
    if opts.start is not None and opts.end is not None and opts.start >= opts.end:
        raise UsageError(f"--start {opts.start:g} is not before --end {opts.end:g}")
    if opts.min_pixels is not None and opts.max_pixels is not None and opts.max_pixels < opts.min_pixels:
        raise UsageError(f"--max-pixels {opts.max_pixels} is below --min-pixels {opts.min_pixels}")
    if opts.min_frames is not None and opts.max_frames is not None and opts.max_frames < opts.min_frames:
        raise UsageError(f"--max-frames {opts.max_frames} is below --min-frames {opts.min_frames}")
    if opts.max_visual_tokens is not None and opts.max_visual_tokens < 1:
        raise UsageError(f"--max-visual-tokens {opts.max_visual_tokens}: must be 1 or more")
    return opts


def _shown(value) -> str:
    """A value as a message shows it: short, and never formatted as a float it cannot be (10**400)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 20 else text[:17] + "..."


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the area in [min_pixels, max_pixels]."""
    if max_pixels < min_pixels:
        raise SizingError(f"the pixel limit {int(max_pixels)} is below the minimum {int(min_pixels)}: raise --max-pixels")
    if min(height, width) <= 0:
        raise SizingError(f"cannot resize an image of {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > C.MAX_ASPECT_RATIO:
        raise SizingError(
            f"aspect ratio {ratio:.0f}:1 ({width}x{height}) is above the {C.MAX_ASPECT_RATIO}:1 "
            "that Qwen VL models accept: crop it or split it into parts"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        # max(factor, ...): the reference can reach 0 here and then fails; one row of tokens is the floor.
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def grid_tokens(spec: VisionSpec, rh: int, rw: int, frames: int = 1) -> tuple[tuple[int, int, int], int]:
    t = 1 if frames <= 1 else math.ceil(frames / spec.temporal_patch_size)
    grid = (t, rh // spec.patch_size, rw // spec.patch_size)
    return grid, grid[0] * grid[1] * grid[2] // (spec.merge_size**2)


def _min_pixels(opts: MediaOptions, default: int) -> int:
    """The user's --min-pixels, else the default lowered to a smaller --max-pixels (the reference fails there)."""
    if opts.min_pixels is not None:
        return opts.min_pixels
    return min(default, opts.max_pixels) if opts.max_pixels is not None else default


def _lowered(opts: MediaOptions, default: int) -> list[str]:
    """The note when a --max-pixels below the default minimum lowers the minimum."""
    if opts.min_pixels is None and opts.max_pixels is not None and opts.max_pixels < default and opts.resize is None:
        return [f"--max-pixels {opts.max_pixels} is below the minimum of {default} pixels: the minimum is lowered to it"]
    return []


def image_size(info: MediaInfo, spec: VisionSpec, opts: MediaOptions) -> tuple[int, int]:
    f = spec.factor
    if opts.resize is not None:
        w, h = opts.resize
        return smart_resize(h, w, f, C.IMAGE_MIN_TOKENS * f * f, C.IMAGE_MAX_TOKENS * f * f)
    min_p = _min_pixels(opts, spec.min_pixels)
    if opts.max_pixels is not None:
        max_p = opts.max_pixels
    elif opts.cpu_budget and not opts.pixel_limits_given:
        max_p = max(min_p, C.CPU_IMAGE_MAX_TOKENS * f * f)
    else:
        max_p = spec.max_pixels
    return smart_resize(info.height, info.width, f, min_p, max_p)


def plan_image(source: str, info: MediaInfo, spec: VisionSpec, opts: MediaOptions, notes: tuple[str, ...] = ()) -> MediaPlan:
    try:
        rh, rw = image_size(info, spec, opts)
    except SizingError as e:
        raise MediaError(source, str(e)) from None
    grid, tokens = grid_tokens(spec, rh, rw)
    return MediaPlan(source, "image", info.width, info.height, rw, rh, grid, tokens, notes=tuple(notes) + tuple(_lowered(opts, spec.min_pixels)))


def frame_range(total: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last frame index inside [start, end] seconds (calculate_video_frame_range)."""
    if start is None and end is None:
        return 0, total - 1
    duration = total / fps
    first = math.ceil(max(0.0, min(start, duration)) * fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * fps), total - 1) if end is not None else total - 1
    if first >= last:
        raise SizingError(
            f"--start/--end select no frames: the clip is {duration:.2f} s long ({total} frames at {fps:g} fps)"
        )
    return first, last


def frame_count(opts: MediaOptions, total: int, fps: float) -> tuple[int, list[str]]:
    """How many frames to sample from `total` (smart_nframes), clamped where the reference raises (#2012)."""
    notes: list[str] = []
    if opts.nframes is not None:
        n = round_by_factor(opts.nframes, C.FRAME_FACTOR)
        if n > total:
            n = max(C.FRAME_FACTOR, floor_by_factor(total, C.FRAME_FACTOR))
            notes.append(f"--nframes {opts.nframes} is more than the {total} frames available: using {n}")
        elif n < C.FRAME_FACTOR:
            n = C.FRAME_FACTOR
            notes.append(f"--nframes {opts.nframes} is below {C.FRAME_FACTOR}: using {n}")
        return n, notes
    target_fps = opts.fps if opts.fps is not None else C.FPS
    min_frames = ceil_by_factor(opts.min_frames if opts.min_frames is not None else C.FPS_MIN_FRAMES, C.FRAME_FACTOR)
    max_frames = floor_by_factor(
        opts.max_frames if opts.max_frames is not None else min(C.FPS_MAX_FRAMES, total), C.FRAME_FACTOR
    )
    n = total / fps * target_fps
    n = floor_by_factor(min(min(max(n, min_frames), max_frames), total), C.FRAME_FACTOR)
    if n < C.FRAME_FACTOR:
        n = C.FRAME_FACTOR
        notes.append(f"only {total} frame{'s' if total != 1 else ''} available: repeating to make {n}")
    return n, notes


def _f32(x: float) -> float:
    """Round to the nearest float32 (ties to even), as a float32 operation would."""
    return struct.unpack("f", struct.pack("f", x))[0]


def linspace_indices(first: int, last: int, n: int) -> tuple[int, ...]:
    """`torch.linspace(first, last, n).round()` bit for bit: float32, two halves, fused multiply-add."""
    if n == 1:
        return (first,)
    start, end = _f32(first), _f32(last)
    step = _f32(_f32(end - start) / (n - 1))
    half = n // 2
    # A float64 holds these float32 products exactly, so one rounding to float32 matches the fused op.
    values = [_f32(start + step * i) if i < half else _f32(end - step * (n - i - 1)) for i in range(n)]
    return tuple(round(v) for v in values)


def nearest_keyframes(indices: tuple[int, ...], keyframes: tuple[int, ...]) -> tuple[int, ...]:
    """Each index moved to its nearest keyframe (the earlier one on a tie)."""
    out = []
    for i in indices:
        pos = bisect.bisect_right(keyframes, i)
        before = keyframes[pos - 1] if pos > 0 else keyframes[0]
        after = keyframes[pos] if pos < len(keyframes) else before
        out.append(after if after - i < i - before else before)
    return tuple(out)


def video_pixel_limits(nframes: int, spec: VisionSpec, opts: MediaOptions) -> tuple[float, float]:
    f2 = spec.factor**2
    cpu = opts.cpu_budget and not opts.pixel_limits_given
    min_p = _min_pixels(opts, (C.CPU_VIDEO_MIN_TOKENS if cpu else C.VIDEO_MIN_TOKENS) * f2)
    total = opts.total_pixels if opts.total_pixels is not None else (C.CPU_VIDEO_TOTAL_TOKENS if cpu else C.VIDEO_TOTAL_TOKENS) * f2
    max_p = max(min(C.VIDEO_MAX_TOKENS * f2, total / nframes * C.FRAME_FACTOR), int(min_p * 1.05))
    if opts.max_pixels is not None:
        max_p = min(opts.max_pixels, max_p)  # a per-item max_pixels can only lower the budget
    return min_p, max_p


def _frames_within(budget: int, n: int, info: MediaInfo, spec: VisionSpec, opts: MediaOptions) -> int:
    """The most frames, up to `n`, whose tokens fit `budget`: every frame keeps its minimum size
    (rounded up to whole patches), so a long clip fits only by taking fewer frames."""
    f = spec.factor
    while n > C.FRAME_FACTOR:
        min_p, max_p = video_pixel_limits(n, spec, opts)
        rh, rw = smart_resize(info.height, info.width, f, min_p, max_p)
        tokens = grid_tokens(spec, rh, rw, frames=n)[1]
        if tokens <= budget:
            break
        n = max(C.FRAME_FACTOR, min(n - C.FRAME_FACTOR, floor_by_factor(n * budget // tokens, C.FRAME_FACTOR)))
    return n


def plan_video(source: str, info: MediaInfo, spec: VisionSpec, opts: MediaOptions, notes: tuple[str, ...] = ()) -> MediaPlan:
    total, fps = info.frames or 0, info.fps or 0.0
    if total <= 0:
        raise MediaError(source, "the video has no frames")
    try:
        first, last = frame_range(total, fps, opts.start, opts.end)
        n, count_notes = frame_count(opts, last - first + 1, fps)
        if opts.cpu_budget and not opts.pixel_limits_given and opts.resize is None:
            wanted, n = n, _frames_within(C.CPU_VIDEO_TOTAL_TOKENS, n, info, spec, opts)
            if n < wanted:
                count_notes.append(f"on CPU a video is kept within {C.CPU_VIDEO_TOTAL_TOKENS} tokens: {n} of {wanted} frames "
                                   "(--total-pixels or --max-pixels lifts it)")
        indices = linspace_indices(first, last, n)
        if opts.seek == "keyframe" and not info.animated:
            if info.keyframes:
                wanted, indices = indices, nearest_keyframes(indices, info.keyframes)
                count_notes.append(
                    f"--seek keyframe: using keyframes {_short_list(indices)} for frames {_short_list(wanted)}"
                )
            else:
                count_notes.append("--seek keyframe: the stream has no keyframe index, so the exact frames are used")
        f = spec.factor
        if opts.resize is not None:
            w, h = opts.resize
            rh, rw = smart_resize(h, w, f, C.IMAGE_MIN_TOKENS * f * f, C.IMAGE_MAX_TOKENS * f * f)
        else:
            min_p, max_p = video_pixel_limits(n, spec, opts)
            rh, rw = smart_resize(info.height, info.width, f, min_p, max_p)
            cpu = opts.cpu_budget and not opts.pixel_limits_given
            count_notes += _lowered(opts, (C.CPU_VIDEO_MIN_TOKENS if cpu else C.VIDEO_MIN_TOKENS) * f * f)
    except SizingError as e:
        raise MediaError(source, str(e)) from None
    if info.frame_times_s is not None:
        times = tuple(info.frame_times_s[i] for i in indices)
    else:
        times = tuple(info.start_s + i / fps for i in indices)
    grid, tokens = grid_tokens(spec, rh, rw, frames=n)
    stamps = families.time_stamps(indices, fps, spec.temporal_patch_size) if spec.time_stamps else None
    return MediaPlan(
        source,
        "video",
        info.width,
        info.height,
        rw,
        rh,
        grid,
        tokens,
        duration_s=info.duration_s,
        native_fps=fps,
        frames=total,
        frame_indices=indices,
        frame_times_s=times,
        sample_fps=n / max(last - first + 1, 1e-6) * fps,
        span_frames=last - first + 1,
        time_stamps_s=stamps,
        stamp_tokens=families.stamp_tokens(stamps) if stamps else 0,
        marker_tokens=families.video_marker_tokens(stamps),
        notes=tuple(notes) + tuple(count_notes),
    )


def _short_list(values: tuple[int, ...], limit: int = 10) -> str:
    shown = [str(v) for v in values]
    return ", ".join(shown if len(shown) <= limit else shown[: limit - 1] + ["…", shown[-1]])


def plan(source: str, info: MediaInfo, spec: VisionSpec, opts: MediaOptions, notes: tuple[str, ...] = ()) -> MediaPlan:
    if info.kind == "video":
        return plan_video(source, info, spec, opts, notes)
    return plan_image(source, info, spec, opts, notes)


# Under a token budget a video keeps frames of at least this many tokens (about 224x112) and
# drops frames below that.
BUDGET_MIN_FRAME_TOKENS = 32


def _capped(info: MediaInfo, spec: VisionSpec, opts: MediaOptions, cap: float) -> MediaOptions:
    """Options that keep one input near `cap` visual tokens: smaller pixels, then fewer frames."""
    f2 = spec.factor**2
    if info.kind == "image":
        limit = max(C.IMAGE_MIN_TOKENS, cap) * f2
        return replace(opts, resize=None, max_pixels=int(min(opts.max_pixels or limit, limit)), min_pixels=int(min(opts.min_pixels or spec.min_pixels, limit)))
    first, last = frame_range(info.frames or 0, info.fps or 1.0, opts.start, opts.end)
    n, _ = frame_count(opts, last - first + 1, info.fps or 1.0)
    pairs = n / C.FRAME_FACTOR
    if cap / pairs < BUDGET_MIN_FRAME_TOKENS:  # frames too small to read: take fewer frames instead
        pairs = max(1, math.floor(cap / BUDGET_MIN_FRAME_TOKENS))
        opts = replace(opts, nframes=int(pairs * C.FRAME_FACTOR), fps=None)
    per_frame = max(1.0, cap / pairs) * f2
    return replace(opts, resize=None, total_pixels=None, max_pixels=int(min(opts.max_pixels or per_frame, per_frame)),
                   min_pixels=int(min(opts.min_pixels or per_frame, per_frame)))


def fit_budget(items: list[tuple[str, MediaInfo, tuple[str, ...]]], spec: VisionSpec, opts: MediaOptions, budget: int) -> tuple[list[MediaPlan], str]:
    """Plans whose visual tokens add up to at most `budget` (--max-visual-tokens), and what was done.

    Every input is scaled by the same factor of its tokens at the given options, the largest factor
    that fits (found by bisection: the token count grows with the factor).
    """
    full = [plan(src, info, spec, opts, notes) for src, info, notes in items]
    total = sum(p.visual_tokens for p in full)
    if total <= budget:
        return full, f"--max-visual-tokens {budget}: the inputs need {total}, no change"

    def at(scale: float) -> list[MediaPlan]:
        return [plan(src, info, spec, _capped(info, spec, opts, scale * p.visual_tokens), notes) for (src, info, notes), p in zip(items, full)]

    lo, hi, best = 0.0, 1.0, None
    for _ in range(30):
        mid = (lo + hi) / 2
        plans = at(mid)
        if sum(p.visual_tokens for p in plans) <= budget:
            lo, best = mid, plans
        else:
            hi = mid
    if best is None:
        smallest = sum(p.visual_tokens for p in at(0.0))
        raise SizingError(f"--max-visual-tokens {budget} is below the {smallest} tokens these inputs need at their smallest: raise it")
    shown = ", ".join(f"{p.source} {p.resized_width}x{p.resized_height}" + (f" x {len(p.frame_indices)} frames" if p.kind == "video" else "") for p in best[:4])
    used = sum(p.visual_tokens for p in best)
    return best, f"--max-visual-tokens {budget}: {total} tokens cut to {used} ({shown})"
