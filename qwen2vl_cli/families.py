"""What differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL, chosen from the model's config.json.

A family names its transformers class, its default sizing, how a video is laid out in the prompt
and how its grounding answers are written. Everything else (sources, decoding, sizing math, the
engine, batching, serve) is shared. No torch here: `inspect` reads this too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Literal

from qwen2vl_cli.errors import ModelError
from qwen2vl_cli.types import VisionSpec

# How a family writes a box: Qwen2-VL in special tokens on a 0..1000 grid, Qwen2.5-VL as JSON in
# pixels of the resized input, Qwen3-VL as JSON on a 0..1000 grid.
Coordinates = Literal["relative1000", "resized_pixels"]


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_types: tuple[str, ...]  # config.json's model_type
    model_class: str  # the transformers class that loads it
    spec: VisionSpec  # defaults when the processor settings are not at hand
    coordinates: Coordinates
    json_boxes: bool  # grounding answers in JSON (else <|box_start|>(x1,y1),(x2,y2)<|box_end|>)
    time_stamps: bool = False  # "<t seconds>" before each pair of frames (Qwen3-VL)
    video_metadata: bool = False  # the processor takes each video's frame indices and rate


QWEN2_VL = Family(
    "Qwen2-VL", ("qwen2_vl",), "Qwen2VLForConditionalGeneration", VisionSpec(), "relative1000", json_boxes=False
)
QWEN2_5_VL = Family(
    "Qwen2.5-VL", ("qwen2_5_vl",), "Qwen2_5_VLForConditionalGeneration", VisionSpec(), "resized_pixels", json_boxes=True,
    video_metadata=True,  # its M-RoPE places frames in absolute time: seconds per temporal patch
)
QWEN3_VL = Family(
    "Qwen3-VL", ("qwen3_vl",), "Qwen3VLForConditionalGeneration",
    VisionSpec(patch_size=16, min_pixels=65536, max_pixels=16777216), "relative1000", json_boxes=True,
    time_stamps=True, video_metadata=True,
)
QWEN3_VL_MOE = replace(QWEN3_VL, name="Qwen3-VL-MoE", model_types=("qwen3_vl_moe",), model_class="Qwen3VLMoeForConditionalGeneration")
FAMILIES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE)


def supported() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None, model: str = "the model") -> Family:
    """The family of a config.json `model_type`; anything else is a one-line error naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    shown = repr(model_type) if model_type else "no model_type"
    raise ModelError(f"--model {model}: config.json has {shown}; qvl runs Qwen2-VL, Qwen2.5-VL and Qwen3-VL ({supported()})")


def family_of_config(config: dict | None, model: str = "the model") -> Family:
    return family_for((config or {}).get("model_type"), model)


def time_stamps(indices: tuple[int, ...], fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Seconds of each temporal patch as Qwen3-VL's processor writes them: frame index over the
    clip's frame rate, averaged over the frames of the patch (the last frame repeats to fill one)."""
    padded = list(indices) + [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / fps for i in padded]
    return tuple((times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size))


def stamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def stamp_tokens(stamps: tuple[float, ...], count=None) -> int:
    """Tokens of the stamps' text: by `count` (the model's tokenizer) when given, else by the Qwen
    tokenizer's rule: one token each for "<", every digit, "." , " seconds" and ">"."""
    texts = [stamp_text(t) for t in stamps]
    if count is not None:
        return sum(count(t) for t in texts)
    return sum(sum(c.isdigit() for c in t) + 4 for t in texts)


@functools.lru_cache(maxsize=1)
def stamped_video_keeps_its_markers() -> bool:
    """Whether the installed transformers keeps the template's <|vision_start|>..<|vision_end|>
    around a time-stamped video: 5.10 through 5.24 expand only the <|video_pad|> inside it; earlier
    releases, and 5.25 and later (as Qwen's own processor does), replace the whole wrapper. Read
    from the package metadata: no import."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = re.match(r"(\d+)\.(\d+)", version("transformers"))
    except PackageNotFoundError:
        return False
    return found is not None and (5, 10) <= (int(found.group(1)), int(found.group(2))) < (5, 25)


def video_marker_tokens(stamps: tuple[float, ...] | None) -> int:
    """Vision markers a video takes in the prompt besides its visual tokens: the template's pair,
    and with time stamps a pair around every temporal patch."""
    if stamps is None:
        return 2
    return 2 * len(stamps) + (2 if stamped_video_keeps_its_markers() else 0)
