"""Malformed and unusual media, made by the tests (nothing downloaded).

Each entry: (name, path, expect) with expect "ok" (exit 0), "error" (exit 2, one line) or "either".
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image



def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def canvas_gif(width: int, height: int, frames: int) -> bytes:
    """An animated GIF of `frames` 1x1 frames on a width x height canvas: a few kB that Pillow
    composites onto the whole canvas at every frame."""
    out = bytearray(b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff")
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop for ever
    for i in range(frames):
        out += b"\x21\xf9\x04\x04\x0a\x00\x00\x00"  # 100 ms, keep the frame
        out += b"\x2c" + struct.pack("<HHHH", i % width, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"  # one pixel
    return bytes(out + b"\x3b")


def growing_mov(path: Path, small: int = 64, large: int = 3000, frames: int = 10, small_frames: int = 2) -> Path:
    """A PNG-in-MOV whose header and first `small_frames` frames are small x small, and whose later frames are large x large."""
    tiles = {small: _png(small, small), large: _png(large, large)}
    return png_mov(path, [tiles[small if i < small_frames else large] for i in range(frames)], small)


def damaged_mov(path: Path, frames: int = 40, damaged: tuple[int, ...] = (13,), side: int = 64) -> Path:
    """A PNG-in-MOV at 10 fps whose frames carry their index (media_factory.coded_frame), with the
    packets of `damaged` frames cut to a PNG signature and nothing else."""
    from tests.media_factory import coded_frame

    def frame(i: int) -> bytes:
        if i in damaged:
            return b"\x89PNG\r\n\x1a\n" + b"\0" * 64
        buf = io.BytesIO()
        Image.fromarray(coded_frame(i, side, side)).save(buf, "PNG")
        return buf.getvalue()

    return png_mov(path, [frame(i) for i in range(frames)], side)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def png_mov(path: Path, packets: list[bytes], side: int) -> Path:
    """Each of `packets` as a keyframe of a PNG stream at 10 fps whose header says side x side."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = side, side, "rgb24"
        stream.time_base = Fraction(1, 10)
        container.start_encoding()  # the muxer picks its time base now: packets in tenths are rescaled to it
        for i, data in enumerate(packets):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.duration, packet.time_base = stream, i, i, 1, Fraction(1, 10)
            packet.is_keyframe = True
            container.mux(packet)
    return path


def _video_without_frames(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_corpus(root: Path, seeds: Path) -> list[tuple[str, Path, str]]:
    rng = np.random.default_rng(1234)
    items: list[tuple[str, Path, str]] = []

    def add(name: str, data: bytes | None, expect: str, path: Path | None = None) -> None:
        target = path or root / name
        if data is not None:
            target.write_bytes(data)
        items.append((name, target, expect))

    for seed in ("photo.jpg", "photo.png", "anim.gif", "anim.webp", "clip.mp4", "clip.webm"):
        data = (seeds / seed).read_bytes()
        for frac in (0.02, 0.3, 0.6, 0.95):
            cut = max(8, int(len(data) * frac))
            add(f"truncated-{int(frac * 100)}-{seed}", data[:cut], "either")
    for ext in (".jpg", ".png", ".mp4", ".webm", ".gif"):
        add(f"empty{ext}", b"", "error")
        add(f"random{ext}", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "error")
    add("image-named.mp4", (seeds / "photo.png").read_bytes(), "ok")
    add("video-named.jpg", (seeds / "clip.mp4").read_bytes(), "ok")
    add("huge-header.png", png_claiming(100000, 100000), "error")
    add("huge-canvas.gif", canvas_gif(7000, 7000, 100), "error")
    for size, expect in (((1, 1), "ok"), ((1, 150), "ok"), ((150, 1), "ok"), ((1, 300), "error"), ((4000, 10), "error")):
        path = root / f"size-{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        add(path.name, None, expect, path)
    odd = {
        "16bit.png": Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (64, 48), (0, 128, 255, 10)),
        "grey.png": Image.new("L", (64, 48), 90),
        "palette-transparent.gif": None,
        "la.png": Image.new("LA", (64, 48), (90, 120)),
    }
    for name, img in odd.items():
        if img is not None:
            img.save(root / name)
    pal = Image.new("P", (64, 48), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(root / "palette-transparent.gif", transparency=0)
    for name in odd:
        add(name, None, "ok", root / name)
    pages = [Image.new("RGB", (64, 48), (i * 40, 0, 0)) for i in range(3)]
    pages[0].save(root / "pages.tif", save_all=True, append_images=pages[1:])
    add("pages.tif", None, "ok", root / "pages.tif")
    add("rotated.jpg", (seeds / "rotated.jpg").read_bytes(), "ok")
    add("audio-only.m4a", (seeds / "audio.m4a").read_bytes(), "error")
    add("no-frames.mp4", None, "error", _video_without_frames(root / "no-frames.mp4"))
    clip = bytearray((seeds / "clip.mp4").read_bytes())
    middle = len(clip) // 2
    clip[middle : middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    add("corrupt-middle.mp4", bytes(clip), "either")
    add("vfr.mp4", (seeds / "vfr.mp4").read_bytes(), "ok")
    add("raw.h264", (seeds / "raw.h264").read_bytes(), "ok")
    return items


MUTATION_SEEDS = ("photo.jpg", "photo.png", "anim.gif", "anim.webp", "clip.mp4", "clip.webm", "rotated.jpg", "transparent.png")


def mutants(root: Path, seeds: Path, count: int, seed: int = 7) -> list[Path]:
    """Bit flips, truncations, splices, zeroed and repeated runs of the seed files."""
    rng = np.random.default_rng(seed)
    sources = [(name, (seeds / name).read_bytes()) for name in MUTATION_SEEDS]
    out = []
    for i in range(count):
        name, data = sources[i % len(sources)]
        buf = bytearray(data)
        kind = i // len(sources) % 5
        if kind == 0:  # bit flips
            for pos in rng.integers(0, len(buf), int(rng.integers(1, 20))):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncation
            buf = buf[: int(rng.integers(1, len(buf)))]
        elif kind == 2:  # splice another file into this one
            other = sources[int(rng.integers(0, len(sources)))][1]
            a, b = sorted(rng.integers(0, len(other), 2))
            at = int(rng.integers(0, len(buf)))
            buf = buf[:at] + other[a:b] + buf[at:]
        elif kind == 3:  # a run of zeros
            at = int(rng.integers(0, len(buf)))
            buf[at : at + int(rng.integers(1, 4096))] = b"\x00" * len(buf[at : at + 4096])
        else:  # a repeated run
            a, b = sorted(rng.integers(0, len(buf), 2))
            buf = buf[:b] + buf[a:b] * int(rng.integers(2, 5)) + buf[b:]
        path = root / f"mutant-{i:05d}{Path(name).suffix}"
        path.write_bytes(bytes(buf))
        out.append(path)
    return out
