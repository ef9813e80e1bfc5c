"""Grounding: ask a family for boxes in its own words, read them back in the original image's pixels.

Qwen2-VL writes `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
on a 0..1000 grid (the markers are special tokens, so a decoded answer often lacks them);
Qwen2.5-VL writes JSON `bbox_2d` in pixels of the resized input; Qwen3-VL the same JSON on a
0..1000 grid, with `point_2d` for points. What cannot be read, or lies outside the grid, is
reported and left out, never guessed. Hand-written: no library reads these formats.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from qwen2vl_cli.families import Family
from qwen2vl_cli.types import MediaPlan

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_QWEN2_BOX = re.compile(rf"\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)\s*,\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)")
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_MARKERS = re.compile(r"<\|(?:box_start|box_end|quad_start|quad_end)\|>")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)


@dataclass(frozen=True)
class Found:
    boxes: tuple[dict, ...]  # {"label", "box": [x1, y1, x2, y2]} and/or "point": [x, y], original pixels
    problems: tuple[str, ...]  # what was left out, and why


def prompt(family: Family, target: str) -> str:
    """The family's own grounding request (the wording its cookbook and training data use)."""
    if not family.json_boxes:
        return f"Find <|object_ref_start|>{target}<|object_ref_end|>"
    return f'Locate every instance that belongs to the following categories: "{target}". Report bbox coordinates in JSON format.'


def schema(family: Family) -> dict | None:
    """What a JSON family's box answer must be, for the grammar: a list of labelled boxes, whole
    numbers on the family's grid (Qwen3-VL: 0..1000); None for Qwen2-VL, whose boxes are not JSON."""
    if not family.json_boxes:
        return None
    number = {"type": "integer", "minimum": 0} | ({"maximum": 1000} if family.coordinates == "relative1000" else {})
    box = {"type": "object", "properties": {"bbox_2d": {"type": "array", "items": number, "minItems": 4, "maxItems": 4},
                                            "label": {"type": "string", "maxLength": 80}},
           "required": ["bbox_2d", "label"], "additionalProperties": False}
    return {"type": "array", "items": box, "maxItems": 32}


def read(family: Family, answer: str, plan: MediaPlan, target: str) -> Found:
    """Boxes of `answer` in the original pixels of the image `plan` describes."""
    raw, problems = (_read_json(answer) if family.json_boxes else _read_qwen2(answer))
    if family.json_boxes and not raw and not problems:
        qwen2_style, _ = _read_qwen2(answer)  # a JSON family that answered in the older style
        raw = qwen2_style
    boxes: list[dict] = []
    for n, item in enumerate(raw, 1):
        label = item.get("label") if isinstance(item.get("label"), str) and item.get("label").strip() else target
        entry: dict = {"label": label.strip()}
        try:
            if "box" in item:
                entry["box"] = _to_original(item["box"], family, plan, n, label)
            if "point" in item:
                entry["point"] = _to_original(item["point"], family, plan, n, label)
        except ValueError as e:
            problems.append(str(e))
            continue
        if "box" not in entry and "point" not in entry:
            problems.append(f"item {n} ({_short(label)}) has neither bbox_2d nor point_2d")
            continue
        boxes.append(entry)
    return Found(tuple(boxes), tuple(problems))


def _read_json(answer: str) -> tuple[list[dict], list[str]]:
    """JSON objects with bbox_2d/point_2d, from a fenced or bare array, or from as much of a
    truncated one as is complete."""
    fenced = _FENCE.search(answer)
    text = fenced.group(1) if fenced else answer
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        return [], []
    problems: list[str] = []
    try:
        data = json.loads(text[start:].strip().rstrip("`").strip())
        objects = data if isinstance(data, list) else [data]
    except ValueError:
        objects = []
        matches = list(re.finditer(r"\{[^{}]*\}", text[start:]))
        for match in matches:
            try:
                objects.append(json.loads(match.group(0)))
            except ValueError:
                problems.append(f"unreadable item {_short(match.group(0))}")
        tail = text[start:][matches[-1].end() if matches else 0 :]
        if re.search(r"[{\[]\s*\"", tail) or "bbox_2d" in tail or "point_2d" in tail:
            problems.append(f"the answer ends mid-item ({_short(tail.strip())}): raise --max-new-tokens")
    out = []
    for n, obj in enumerate(objects, 1):
        if not isinstance(obj, dict):
            problems.append(f"item {n} is not an object: {_short(json.dumps(obj))}")
            continue
        item: dict = {"label": obj.get("label")}
        if "bbox_2d" in obj:
            item["box"] = obj["bbox_2d"]
        if "point_2d" in obj:
            item["point"] = obj["point_2d"]
        out.append(item)
    return out, problems


def _read_qwen2(answer: str) -> tuple[list[dict], list[str]]:
    """`(x1,y1),(x2,y2)` pairs, each labelled by the nearest object reference before it (with or
    without the special-token markers, which decoding usually drops)."""
    out: list[dict] = []
    label: str | None = None
    position = 0
    for match in _QWEN2_BOX.finditer(answer):
        before = answer[position : match.start()]
        refs = _REF.findall(before)
        plain = _MARKERS.sub("", _REF.sub("", before)).strip(" \n\t,;:.")
        if refs:
            label = refs[-1].strip()
        elif plain:
            label = plain.splitlines()[-1].strip()
        values = [float(v) for v in match.groups()]
        out.append({"label": label, "box": values})
        position = match.end()
    problems = []
    rest = answer[position:]
    if re.search(r"\(\s*-?\d[\d.,\s()-]*$", rest):  # numbers in brackets that stop before the box is whole
        problems.append(f"the answer ends mid-box ({_short(rest.strip())}): raise --max-new-tokens")
    return out, problems


def _to_original(values, family: Family, plan: MediaPlan, n: int, label: str) -> list[float]:
    """Model coordinates -> original pixels; a value off the family's grid is an error."""
    if not isinstance(values, list) or len(values) not in (2, 4) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"item {n} ({_short(label)}): {_short(json.dumps(values))} is not 2 or 4 numbers")
    what = "box" if len(values) == 4 else "point"
    if family.coordinates == "relative1000":
        grid_w, grid_h, grid = 1000.0, 1000.0, "the 0..1000 grid"
    else:
        grid_w, grid_h = float(plan.resized_width), float(plan.resized_height)
        grid = f"the {plan.resized_width}x{plan.resized_height} input the model saw"
    xs, ys = values[0::2], values[1::2]
    if any(not 0 <= x <= grid_w for x in xs) or any(not 0 <= y <= grid_h for y in ys):
        raise ValueError(f"item {n} ({_short(label)}): {what} {values} lies outside {grid}")
    if what == "box" and (values[0] > values[2] or values[1] > values[3]):
        raise ValueError(f"item {n} ({_short(label)}): box {values} has its corners the wrong way round")
    sx, sy = plan.width / grid_w, plan.height / grid_h
    return [round(v * (sx if i % 2 == 0 else sy), 1) for i, v in enumerate(values)]


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw(image, boxes: tuple[dict, ...]):
    """A copy of `image` (PIL, original size and orientation) with each box and point drawn and labelled."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB")
    pen = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(out.size) / 50)))
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    labels = sorted({b["label"] for b in boxes})
    for b in boxes:
        colour = colours[labels.index(b["label"]) % len(colours)]
        if "box" in b:
            x1, y1, x2, y2 = b["box"]
            pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            anchor = (x1, y1)
        else:
            x, y = b["point"]
            r = width * 3
            pen.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
            anchor = (x + r, y - r)
        place = "ld"  # the label sits on the box's top edge, or inside the box where there is no room above
        left, top, right, bottom = pen.textbbox(anchor, b["label"], font=font, anchor=place)
        if top - 3 < 0:
            place = "la"
            left, top, right, bottom = pen.textbbox(anchor, b["label"], font=font, anchor=place)
        pen.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=colour)
        pen.text(anchor, b["label"], fill="white", font=font, anchor=place)
    return out


def drawing_format(path: str) -> str:
    """Pillow's format for --draw's file name; a name it cannot write is a usage error."""
    from qwen2vl_cli.pictures import picture_format

    return picture_format(path, "--draw", "boxes.png")


def save_drawing(source, boxes: tuple[dict, ...], path: str) -> None:
    """The original picture (as shown: EXIF orientation applied) with `boxes`, written to a new file."""
    from PIL import Image, ImageOps

    from qwen2vl_cli.media import to_rgb
    from qwen2vl_cli.pictures import save_new

    with source.open() as f, Image.open(f) as img:
        img.seek(0)
        picture = draw(to_rgb(ImageOps.exif_transpose(img)), boxes)
    save_new(picture, path, "--draw")
