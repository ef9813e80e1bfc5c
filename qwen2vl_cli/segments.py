"""Long video as a timeline: a clip (or its --start/--end range) cut into windows, each sampled by
the usual video rules as if it were asked for with --start and --end.

`windows` does the arithmetic; `plan_windows` plans every window of a probed clip (no pixels).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from qwen2vl_cli import config as C
from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.types import MediaInfo, MediaOptions, MediaPlan, VisionSpec

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_span(text: str, option: str) -> float:
    """Seconds from '90', '1.5', '1m30s', '2h', '45s' or '1:30' / '1:02:03'."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"\d+(:[0-5]?\d){1,2}(\.\d+)?", value):
        seconds = 0.0
        for part in value.split(":"):
            seconds = seconds * 60 + float(part)
    elif value and re.fullmatch(r"(\d+(\.\d+)?[hms])+", value):
        seconds = sum(float(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", value))
    else:
        raise UsageError(f"{option} {text}: give seconds, e.g. 60, 1m30s or 1:30")
    if not math.isfinite(seconds) or seconds > 1e7:
        raise UsageError(f"{option} {text}: too long; give at most 10,000,000 seconds")
    return seconds


@dataclass(frozen=True)
class Window:
    index: int
    start_s: float
    end_s: float


def windows(start: float, end: float, segment: float, overlap: float = 0.0, shortest: float = 0.0) -> list[Window]:
    """[start, end] cut into windows `segment` long, each starting `segment - overlap` after the
    one before; the last may be shorter, and one shorter than `shortest` (a temporal patch) is
    merged into the one before it."""
    if segment <= 0:
        raise UsageError("--segment: give a length above 0 seconds")
    if not 0 <= overlap < segment:
        raise UsageError(f"--overlap {overlap:g}: must be at least 0 and below --segment {segment:g}")
    if end <= start:
        return []
    step = segment - overlap
    count = max(1, math.ceil((end - start - overlap) / step - 1e-9))  # the last one reaches `end`
    spans = [(start + i * step, min(start + i * step + segment, end)) for i in range(count)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < shortest:
        spans = spans[:-2] + [(spans[-2][0], end)]
    return [Window(i, a, b) for i, (a, b) in enumerate(spans)]


def shortest_window(spec: VisionSpec, opts: MediaOptions) -> float:
    """A temporal patch's seconds at the sampling rate: a window shorter than it gets fewer frames than one patch."""
    return spec.temporal_patch_size / (opts.fps or C.FPS)


def plan_windows(source: str, info: MediaInfo, spec: VisionSpec, opts: MediaOptions, segment: float, overlap: float,
                 notes: tuple[str, ...] = ()) -> list[tuple[Window, MediaPlan]]:
    """Every window of a probed clip and its plan, each what `--start a --end b` plans for it."""
    from qwen2vl_cli.sizing import SizingError, plan

    if info.kind != "video":
        raise MediaError(source, f"is a still {info.format} image: --segment cuts a video")
    if not info.frames or not info.fps:
        raise MediaError(source, "says no frame count or frame rate: --segment needs them")
    length = info.frames / info.fps  # as --start and --end count seconds: from the first frame, frames at the clip's rate
    first = opts.start or 0.0
    last = length if opts.end is None else min(opts.end, length)
    out = []
    for w in windows(first, last, segment, overlap, shortest_window(spec, opts)):
        try:
            out.append((w, plan(source, info, spec, replace(opts, start=w.start_s, end=w.end_s), notes)))
        except SizingError as e:
            raise MediaError(source, f"window {w.index + 1} ({w.start_s:g}-{w.end_s:g} s): {e}") from None
    return out


def inspect(texts: tuple[str, ...], spec: VisionSpec, opts: MediaOptions, segment: float, overlap: float,
            count=None) -> tuple[list[tuple[Window, MediaPlan]], list[MediaError]]:
    """`qvl inspect --segment`: every window of every clip, planned from headers alone; a clip that
    cannot be read or cut is its error, and the others are planned."""
    from qwen2vl_cli.families import stamp_tokens
    from qwen2vl_cli.pipeline import probe_all
    from qwen2vl_cli.sources import SourceResolver

    out, failed = [], []
    with SourceResolver(max_bytes=opts.max_download) as resolver:
        for text in texts:
            try:
                [p] = probe_all(resolver, (text,), opts)
                out += plan_windows(p.source.label, p.info, spec, opts, segment, overlap, p.notes)
            except MediaError as e:
                failed.append(e)
    if count is not None:
        out = [(w, replace(p, stamp_tokens=stamp_tokens(p.time_stamps_s, count)) if p.time_stamps_s else p) for w, p in out]
    return out, failed
