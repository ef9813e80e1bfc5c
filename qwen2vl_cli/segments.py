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
from qwen2vl_cli.types import MediaOptions, MediaPlan, VisionSpec

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
    spans = [(start + i * step, min(start + i * step + segment, end)) for i in range(count - 1)] + [(start + (count - 1) * step, end)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < shortest:
        spans = spans[:-2] + [(spans[-2][0], end)]
    return [Window(i, a, b) for i, (a, b) in enumerate(spans)]


def shortest_window(spec: VisionSpec, opts: MediaOptions) -> float:
    """A temporal patch's seconds at the sampling rate: a window shorter than it gets fewer frames than one patch."""
    return spec.temporal_patch_size / (opts.fps or C.FPS)


def plan_windows(probed, spec: VisionSpec, opts: MediaOptions, segment: float, overlap: float,
                 count=None) -> list[tuple[Window, MediaPlan]]:
    """Every window of a probed clip (a pipeline.Probed) and its plan, each what `--start a --end b`
    plans for it. `count`: the model's tokenizer, for Qwen3-VL's time stamps."""
    from qwen2vl_cli.pipeline import plan_all

    source, info = probed.source.label, probed.info
    if info.kind != "video":
        raise MediaError(source, f"is a still {info.format} image: --segment cuts a video")
    if not info.frames or not info.fps:
        raise MediaError(source, "says no frame count or frame rate: --segment needs them")
    length = info.frames / info.fps  # as --start and --end count seconds: from the first frame, frames at the clip's rate
    first = opts.start or 0.0
    last = length if opts.end is None else min(opts.end, length)
    if last <= first:
        raise MediaError(source, f"--start {first:g} is past the clip's end ({length:.2f} s): nothing to cut")
    out = []
    for w in windows(first, last, segment, overlap, shortest_window(spec, opts)):
        try:
            [plan] = plan_all([probed], spec, replace(opts, start=w.start_s, end=w.end_s), count)
        except (MediaError, UsageError) as e:
            raise MediaError(source, f"window {w.index + 1} ({w.start_s:g}-{w.end_s:g} s): {_reason(e, source)}") from None
        out.append((w, plan))
    return out


def _reason(e: Exception, source: str) -> str:
    text = str(e)
    return text[len(source) + 2:] if text.startswith(f"{source}: ") else text


def inspect(texts: tuple[str, ...], spec: VisionSpec, opts: MediaOptions, segment: float, overlap: float,
            count=None, sheet=None) -> tuple[list[tuple[Window, MediaPlan]], list[MediaError]]:
    """`qvl inspect --segment`: every window of every clip, planned from headers alone; a clip that
    cannot be read or cut is its error, and the others are planned. `sheet` (a sheet.Sheet): the
    windows' frames are decoded too (one pass over each clip), and drawn there."""
    from qwen2vl_cli import media
    from qwen2vl_cli.pipeline import decoded, probe_all
    from qwen2vl_cli.sources import SourceResolver

    out, failed = [], []
    with SourceResolver(max_bytes=opts.max_download) as resolver:
        for text in texts:
            try:
                [p] = probe_all(resolver, (text,), opts)
                cut = plan_windows(p, spec, opts, segment, overlap, count)
            except MediaError as e:
                failed.append(e)
                continue
            if sheet is not None:
                loads = media.load_windows(p.source, p.info, [plan for _, plan in cut], opts.seek == "keyframe")
                for n, ((w, plan), loaded) in enumerate(zip(cut, loads)):
                    if isinstance(loaded, MediaError):
                        failed.append(MediaError(p.source.label, f"window {w.index + 1}: {_reason(loaded, p.source.label)}"))
                        continue
                    cut[n] = (w, decoded(plan, loaded))
                    sheet.add_window(w, cut[n][1], loaded)
            out += cut
    return out, failed


def summary_prompt(answers: list[tuple[float, float, str]], question: str | None) -> str:
    """--summary's request: the windows' answers, each under the span its frames are shown in
    (from, to, text), then the question for the whole clip (by default the windows' own, else
    "Describe this video.")."""
    from qwen2vl_cli.records import clock

    lines = [f"A video, described window by window ({len(answers)} windows, from {clock(answers[0][0])} "
             f"to {clock(answers[-1][1])}):", ""]
    for start, end, text in answers:
        lines.append(f"[{clock(start)} - {clock(end)}] {' '.join(text.split())}")
    lines += ["", f"Answer for the whole video: {question or 'Describe this video.'}"]
    return "\n".join(lines)
