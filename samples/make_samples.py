"""Make the sample media in this folder: a photo-like JPEG, an animated GIF, a short MP4, and the
README's grounding picture (the photo with boxes qvl read from an answer in Qwen3-VL's format).

Usage: python samples/make_samples.py [OUT_DIR]   (default: the folder of this script)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def landscape(width: int = 1280, height: int = 720, seed: int = 7) -> Image.Image:
    """Sky, sun, two ranges of hills, a lake and a little grain."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 200]) + y * np.array([250, 200, 150])
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    sx, sy = width / 1280, height / 720
    draw.ellipse((900 * sx, 120 * sy, 1020 * sx, 240 * sy), fill=(255, 230, 120))
    xs = np.arange(width + 1)
    for base, amp, colour in ((430, 60, (90, 110, 140)), (500, 45, (50, 100, 60))):
        ridge = sy * (base - amp * np.sin(xs / (140.0 * sx) + base) - 0.5 * amp * np.sin(xs / (53.0 * sx)))
        draw.polygon([(0, height)] + list(zip(xs.tolist(), ridge.tolist())) + [(width, height)], fill=colour)
    draw.rectangle((0, 600 * sy, width, height), fill=(60, 110, 170))
    boat = [(300, 560), (420, 560), (400, 600), (320, 600)]
    draw.polygon([(x * sx, y * sy) for x, y in boat], fill=(120, 70, 40))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1))).astype(np.int16)
    arr += rng.integers(-6, 7, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def bouncing_ball(size: tuple[int, int] = (160, 120), frames: int = 20) -> list[Image.Image]:
    w, h = size
    out = []
    for i in range(frames):
        img = Image.new("RGB", size, (235, 235, 220))
        draw = ImageDraw.Draw(img)
        x = int(10 + (w - 40) * i / (frames - 1))
        yy = int(h - 35 - (h - 50) * abs(np.sin(np.pi * i / (frames / 2))))
        draw.rectangle((0, h - 12, w, h), fill=(90, 160, 90))
        draw.ellipse((x, yy, x + 24, yy + 24), fill=(220, 40, 40))
        out.append(img)
    return out


def write_clip(path: Path, seconds: float = 4.0, fps: int = 30, size: tuple[int, int] = (640, 360)) -> None:
    import av

    w, h = size
    background = landscape(w, h, seed=1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "28", "preset": "veryfast"}
        for i in range(int(seconds * fps)):
            img = background.copy()
            draw = ImageDraw.Draw(img)
            x = int((w - 80) * i / (seconds * fps))
            draw.rectangle((x, 250, x + 80, 290), fill=(200, 30, 30))  # a red car driving right
            draw.text((10, 10), f"frame {i}", fill=(255, 255, 255))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# An answer in Qwen3-VL's grounding format (JSON, 0..1000 grid) for the boat and the sun of the photo.
GROUNDING_ANSWER = '```json\n[{"bbox_2d": [234, 778, 328, 833], "label": "boat"}, {"bbox_2d": [703, 167, 797, 333], "label": "sun"}]\n```'


def grounding_picture(photo: Image.Image) -> Image.Image:
    """What `qvl describe photo.jpg --boxes ... --draw` writes for GROUNDING_ANSWER."""
    from qwen2vl_cli import grounding
    from qwen2vl_cli.families import QWEN3_VL
    from qwen2vl_cli.types import MediaPlan

    plan = MediaPlan("photo.jpg", "image", photo.width, photo.height, 1280, 704, (1, 44, 80), 880)
    return grounding.draw(photo, grounding.read(QWEN3_VL, GROUNDING_ANSWER, plan, "boat").boxes)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    landscape().save(out / "photo.jpg", quality=85)
    with Image.open(out / "photo.jpg") as photo:
        grounding_picture(photo).save(out / "grounding.jpg", quality=85)
    frames = bouncing_ball()
    frames[0].save(out / "bounce.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    write_clip(out / "clip.mp4")
    for name in ("photo.jpg", "grounding.jpg", "bounce.gif", "clip.mp4"):
        print(out / name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
