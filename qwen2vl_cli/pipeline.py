"""The stages of a request before and after the model: resolve, probe, plan, decode; the result.

Shared by the commands and the backends; it reports progress through `Hooks` and never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol

from qwen2vl_cli import media
from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.families import stamp_tokens
from qwen2vl_cli.sizing import SizingError, fit_budget, plan
from qwen2vl_cli.sources import Source, SourceResolver
from qwen2vl_cli.types import GenerationOptions, MediaInfo, MediaOptions, MediaPlan, VisionSpec


class Hooks(Protocol):
    def stage(self, text: str) -> None: ...  # what is happening now
    def inputs(self, plans: list[MediaPlan]) -> None: ...  # sizes, frames and tokens decided
    def note(self, text: str) -> None: ...
    def text(self, chunk: str) -> None: ...  # streamed answer


@dataclass(frozen=True)
class Probed:
    source: Source
    info: MediaInfo
    notes: tuple[str, ...]


def probe_all(resolver: SourceResolver, texts: tuple[str, ...], opts: MediaOptions, require_video: bool = False) -> list[Probed]:
    out = []
    for text in texts:
        src = resolver.resolve(text)
        info, notes = media.probe(src, scan=opts.seek == "keyframe", first_frame=opts.first_frame)
        if require_video and info.kind != "video":
            raise MediaError(src.label, f"is a still {info.format} image, not a video: use `qvl describe`")
        if (still := media.effective_info(info, opts)) is not info:
            if require_video:
                raise MediaError(src.label, f"--first-frame reads this animated {info.format} as a still image: drop it, or use `qvl describe`")
            info, notes = still, ()
        out.append(Probed(src, info, notes))
    return out


def plan_all(probed: list[Probed], spec: VisionSpec, opts: MediaOptions, count: Callable[[str], int] | None = None) -> list[MediaPlan]:
    """One plan per input; under --max-visual-tokens the first plan's notes say what was cut.
    `count` (the model's tokenizer) counts the tokens of Qwen3-VL's time stamps exactly."""
    if opts.max_visual_tokens is None:
        plans = [plan(p.source.label, p.info, spec, opts, p.notes) for p in probed]
    else:
        try:
            plans, note = fit_budget([(p.source.label, p.info, p.notes) for p in probed], spec, opts, opts.max_visual_tokens)
        except SizingError as e:
            raise UsageError(str(e)) from None
        plans = [replace(plans[0], notes=plans[0].notes + (note,))] + plans[1:]
    if count is None:
        return plans
    return [replace(p, stamp_tokens=stamp_tokens(p.time_stamps_s, count)) if p.time_stamps_s else p for p in plans]


def cpu_budget_note(probed: list[Probed], plans: list[MediaPlan], spec: VisionSpec, opts: MediaOptions) -> str | None:
    """Say when the CPU budget made an input smaller than the reference would."""
    if not opts.cpu_budget or opts.pixel_limits_given:
        return None
    full = plan_all(probed, spec, replace(opts, cpu_budget=False))
    capped = [(p, f) for p, f in zip(plans, full) if p.visual_tokens < f.visual_tokens]
    if not capped:
        return None
    shown = ", ".join(f"{p.source} {p.visual_tokens} tokens (full: {f.visual_tokens})" for p, f in capped[:3])
    return (
        f"on CPU inputs are kept small: {shown}; "
        "pass --max-pixels (images) or --total-pixels (video) to choose the size"
    )


def inspect(
    texts: tuple[str, ...], spec: VisionSpec, opts: MediaOptions, stdin: BinaryIO | None = None, count: Callable[[str], int] | None = None,
    sheet=None,
) -> tuple[list[MediaPlan], list[MediaError]]:
    """Plans for `qvl inspect`: headers and container metadata only, no torch. An input that
    cannot be read is its error, and the others are planned together (one budget). `sheet` (a
    sheet.Sheet): their pixels are decoded too, and drawn there."""
    probed, failed = [], []
    with SourceResolver(stdin=stdin, max_bytes=opts.max_download) as resolver:
        for text in texts:
            try:
                probed += probe_all(resolver, (text,), opts)
            except MediaError as e:
                failed.append(e)
        plans = plan_all(probed, spec, opts, count) if probed else []
        if sheet is not None and plans:
            plans, loaded = decode_all(probed, plans, opts)
            for p, ld in zip(plans, loaded):
                sheet.add(p, ld)
        return plans, failed


def decode_all(probed: list[Probed], plans: list[MediaPlan], opts: MediaOptions, max_frame_pixels: int | None = None,
               cache=None) -> tuple[list[MediaPlan], list[media.Loaded]]:
    """Pixels for every input, and plans updated with what decoding found (real frame times, notes);
    `cache` (a MediaCache) keeps them for a later request that sends the same bytes."""
    def load(p: Probed, pl: MediaPlan) -> media.Loaded:
        decode = lambda: media.load(p.source, p.info, pl, opts.seek == "keyframe", max_frame_pixels)  # noqa: E731
        return decode() if cache is None else cache.load(p.source, pl, opts.seek, decode)

    loaded = [load(p, pl) for p, pl in zip(probed, plans)]
    return [decoded(pl, ld) for pl, ld in zip(plans, loaded)], loaded


def decoded(plan: MediaPlan, loaded: media.Loaded) -> MediaPlan:
    """A plan with what decoding found: a video's real frame times, and notes."""
    return replace(plan, frame_times_s=loaded.frame_times_s, notes=plan.notes + loaded.notes) if plan.kind == "video" else plan


def check_boxes(inputs: list[tuple[str, str]], gen: GenerationOptions) -> None:
    """--boxes reads the coordinates of one picture: one still image per request. `inputs`: (source, kind)."""
    if gen.boxes is None:
        return
    if len(inputs) != 1:
        raise UsageError(f"--boxes finds things in one image, not {len(inputs)} inputs: give one (--each for one answer each)")
    source, kind = inputs[0]
    if kind != "image":
        raise MediaError(source, "is a video or animation: --boxes finds things in a still image (--first-frame reads an animation's first frame)")


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)
