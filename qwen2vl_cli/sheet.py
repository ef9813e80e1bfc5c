"""--frames-sheet: one picture of the frames the model saw, as it saw them (at their planned size,
scaled down only to fit the sheet), each labelled with its frame index and time; a row per medium,
or per window with --segment. A temporal patch's frames (the pairs the model reads as one) sit
closer together than the next pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen2vl_cli.types import Loaded, MediaPlan

ROWS = 100  # a sheet's rows at most (a hundred minutes of one-minute windows); later ones are counted, not drawn
CELL = 256  # the widest a frame is drawn
SMALLEST = 64  # a row of many frames shrinks them to this, then wraps
WIDEST = 8192  # the widest sheet
LABEL = 168  # the column of row labels
GAP, PAIR_GAP = 2, 8  # between the frames of a temporal patch; between patches
BACKGROUND, INK, DIM = (24, 24, 24), (235, 235, 235), (160, 160, 160)


@dataclass
class _Row:
    label: str
    cells: list  # (thumbnail, caption)
    group: int  # frames per temporal patch


class Sheet:
    """Rows of frames, kept as thumbnails while a run goes on, drawn and written by `save`."""

    def __init__(self, path: str):
        from qwen2vl_cli.pictures import picture_format

        picture_format(path, "--frames-sheet", "frames.png")  # a name Pillow cannot write, or a file there, fails first
        self.path = path
        self.rows: list[_Row] = []
        self.left_out = 0  # rows past ROWS

    def __len__(self) -> int:
        return len(self.rows)

    def frames(self) -> str:
        """How many frames it holds, in words."""
        n = sum(len(row.cells) for row in self.rows)
        return f"{n} frame{'' if n == 1 else 's'}"

    def add(self, plan: MediaPlan, loaded: Loaded, label: str | None = None) -> None:
        """A medium's frames as the model gets them (an image is one), under `label` (by default its name)."""
        from PIL import Image

        if len(self.rows) >= ROWS:
            self.left_out += 1
            return
        if label is None:
            label = f"{_name(plan)}\n{plan.kind}\n{plan.visual_tokens}  tokens"

        if loaded.image is not None:
            frames, captions = [loaded.image], [f"{plan.resized_width}x{plan.resized_height}"]
        else:
            times = loaded.frame_times_s or plan.frame_times_s or ()
            frames = [Image.fromarray(f) for f in loaded.frames]
            captions = [f"#{i}  {t:.2f} s" for i, t in zip(plan.frame_indices or (), times)]
        width = min(plan.resized_width, CELL, max(SMALLEST, (WIDEST - LABEL) // len(frames)))
        height = max(1, round(plan.resized_height * width / plan.resized_width))
        thumbs = [f if f.size == (width, height) else f.resize((width, height), Image.Resampling.BICUBIC) for f in frames]
        group = max(1, len(frames) // plan.grid_thw[0]) if plan.kind == "video" else 1
        self.rows.append(_Row(label, list(zip(thumbs, captions)), group))

    def add_window(self, window, plan: MediaPlan, loaded: Loaded) -> None:
        from qwen2vl_cli.records import clock

        span = f"{clock(window.start_s)}\n{clock(window.end_s)}"
        self.add(plan, loaded, f"{_name(plan)}\nwindow {window.index + 1}\n{span}\n{plan.visual_tokens}  tokens")

    def picture(self):
        """The sheet as a PIL image."""
        from PIL import Image, ImageDraw

        font = _font()
        line = _line_height(font)
        placed = []  # (row, columns per line, cell width, cell height)
        width, height = LABEL, 0
        for row in self.rows:
            w, h = row.cells[0][0].size
            columns = row.group  # whole temporal patches to a line, as many as fit
            while columns < len(row.cells) and _x(columns + row.group, w, row.group) <= WIDEST - LABEL:
                columns += row.group
            lines = math.ceil(len(row.cells) / columns)
            placed.append((row, columns, w, h))
            width = max(width, LABEL + _x(min(columns, len(row.cells)), w, row.group))
            height += lines * (h + line + GAP) + PAIR_GAP
        sheet = Image.new("RGB", (width, max(height, 1)), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        y = 0
        for row, columns, w, h in placed:
            draw.multiline_text((GAP, y + GAP), _fit(row.label, font, LABEL - 2 * GAP), fill=INK, font=font, spacing=2)
            for n, (thumb, caption) in enumerate(row.cells):
                x = LABEL + _x(n % columns, w, row.group)
                top = y + (n // columns) * (h + line + GAP)
                sheet.paste(thumb, (x, top))
                draw.text((x, top + h), _fit(caption, font, w), fill=DIM, font=font)
            y += math.ceil(len(row.cells) / columns) * (h + line + GAP) + PAIR_GAP
        return sheet

    def save(self) -> None:
        from qwen2vl_cli.pictures import save_new

        if self.rows:
            save_new(self.picture(), self.path, "--frames-sheet")

    def said(self, verb: str = "gets") -> str:
        """What was drawn, for the note after it is saved."""
        rows = f" (the first {ROWS} rows; {self.left_out} more were left out)" if self.left_out else ""
        return f"drew the {self.frames()} the model {verb} on {self.path}{rows}"


def _name(plan: MediaPlan) -> str:
    """A medium's file name, without its folders, on one line."""
    name = plan.source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or plan.source
    return "".join(c if c.isprintable() else "?" for c in name)


def _x(column: int, width: int, group: int) -> int:
    """Where a column starts: frames of a temporal patch close together, patches further apart."""
    return column * (width + GAP) + (column // group) * PAIR_GAP


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)  # Pillow 10.1 and newer, with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("#0123456789 s")
    return bottom + 3


def _fit(text: str, font, width: int) -> str:
    """Each line of `text` cut to `width` pixels, with dots where it was cut (a font without
    FreeType draws Latin-1 only: other characters become ?)."""
    from PIL import ImageFont

    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    text = "".join(c if c.isprintable() or c == "\n" else "?" for c in text)
    out = []
    for line in text.splitlines() or [""]:
        if font.getlength(line) > width:  # cut from the middle: a name's end (its number, its extension) tells files apart
            head, tail = line[: len(line) // 2], line[len(line) // 2:]
            while (head or tail) and font.getlength(head + "..." + tail) > width:
                head, tail = (head[:-1], tail) if len(head) >= len(tail) else (head, tail[1:])
            line = head + "..." + tail
        out.append(line)
    return "\n".join(out)
