"""Media the tests make themselves: stills in many formats, animations and videos with known frames.

Video frames carry their index in two flat grey blocks (index % 32 and index // 32, times 8), so
a test can tell which frames a sampler picked, up to frame 1023.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image


def coded_frame(index: int, width: int, height: int) -> np.ndarray:
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[:, :] = (30, 90, 160)
    frame[height // 4 : 3 * height // 4, width // 8 : width // 2] = (index % 32) * 8
    frame[height // 4 : 3 * height // 4, width // 2 : 7 * width // 8] = (index // 32) % 32 * 8
    return frame


def frame_index_of(pixels: np.ndarray) -> int:
    """Read back the index a coded frame carries."""
    h, w = pixels.shape[:2]
    rows = slice(3 * h // 8, 5 * h // 8)
    low = pixels[rows, 3 * w // 16 : 7 * w // 16].astype(np.float64).mean()
    high = pixels[rows, 9 * w // 16 : 13 * w // 16].astype(np.float64).mean()
    return int(round(low / 8)) + 32 * int(round(high / 8))


def write_video(
    path: Path,
    frames: int = 90,
    fps: int = 30,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    options: dict | None = None,
) -> Path:
    import av

    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options if options is not None else ({"crf": "10", "preset": "veryfast"} if codec == "libx264" else {})
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(coded_frame(i, w, h), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_vfr_video(path: Path, size: tuple[int, int] = (320, 240)) -> tuple[Path, list[float]]:
    """60 frames: the first 30 at 30 fps, the rest at 10 fps. Returns the path and each frame's time."""
    import av

    w, h = size
    times = [i * 0.033 if i < 30 else 30 * 0.033 + (i - 30) * 0.1 for i in range(60)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(coded_frame(i, w, h), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path, times


def write_raw_h264(path: Path, frames: int = 50, size: tuple[int, int] = (160, 120)) -> Path:
    """An elementary H.264 stream: no container, no timestamps, no frame count."""
    import av

    w, h = size
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10", "preset": "veryfast"}
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded_frame(i, w, h), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        t = np.arange(samples, dtype=np.float32) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def animation(frames: int = 12, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    return [Image.fromarray(coded_frame(i, *size)) for i in range(frames)]


def make_all(root: Path) -> Path:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    photo.save(root / "photo.png")
    photo.save(root / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(root / "square.png")
    rgba = np.concatenate([rng.integers(0, 256, (60, 80, 3)), np.zeros((60, 80, 1))], axis=2).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "transparent.png")

    # EXIF orientation 6: stored 80x40 landscape, shown 40x80 portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)

    anim = animation()
    anim[0].save(root / "anim.gif", save_all=True, append_images=anim[1:], duration=100, loop=0)
    anim[0].save(root / "anim.webp", save_all=True, append_images=anim[1:], duration=50, lossless=True)
    anim[0].save(root / "anim.png", save_all=True, append_images=anim[1:], duration=100)
    anim[0].save(root / "still.gif")

    write_video(root / "clip.mp4")  # 3 s, 30 fps, 90 frames
    # 20 s with a keyframe every 12 frames and B-frames: sparse sampling seeks.
    write_video(root / "short_gop.mp4", frames=600, size=(128, 96), options={"crf": "10", "preset": "veryfast", "g": "12", "bf": "3"})
    write_vfr_video(root / "vfr.mp4")
    write_raw_h264(root / "raw.h264")
    write_video(root / "clip.webm", frames=40, fps=20, codec="libvpx-vp9", options={"crf": "10", "b": "0"})
    write_audio_only(root / "audio.m4a")

    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    data = io.BytesIO()
    photo.save(data, format="JPEG")
    (root / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 3])
    (root / "folder").mkdir()
    return root
