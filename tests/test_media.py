"""Probing and loading media: formats, orientation, alpha, animations, videos and broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwen2vl_cli import media, sizing
from qwen2vl_cli.errors import MediaError
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import MediaOptions, VisionSpec
from tests.media_factory import frame_index_of

SPEC = VisionSpec()


def src(path) -> Source:
    return Source(str(path), path=path)


def probe(path):
    return media.probe(src(path))


@pytest.mark.parametrize("name,fmt", [("photo.png", "PNG"), ("photo.jpg", "JPEG"), ("still.gif", "GIF")])
def test_stills_probe_as_images(media_dir, name, fmt):
    info, notes = probe(media_dir / name)
    assert info.kind == "image" and info.format == fmt and not info.animated and notes == ()


def test_exif_orientation_swaps_the_probed_size_and_the_pixels(media_dir):
    info, _ = probe(media_dir / "rotated.jpg")
    assert (info.width, info.height) == (40, 80)
    plan = sizing.plan(str(media_dir / "rotated.jpg"), info, SPEC, MediaOptions(resize=(56, 112)))
    loaded = media.load(src(media_dir / "rotated.jpg"), info, plan)
    assert loaded.image.size == (56, 112)


def test_alpha_is_composited_on_white(media_dir):
    path = media_dir / "transparent.png"
    info, _ = probe(path)
    plan = sizing.plan(str(path), info, SPEC, MediaOptions(resize=(84, 56)))
    pixels = np.asarray(media.load(src(path), info, plan).image)
    assert pixels.min() == 255  # fully transparent: white, not black


def test_sixteen_bit_greyscale_keeps_its_range():
    img = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    rgb = np.asarray(media.to_rgb(img))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255


@pytest.mark.parametrize("name,fps", [("anim.gif", 10.0), ("anim.webp", 20.0), ("anim.png", 10.0)])
def test_animated_images_are_read_as_video(media_dir, name, fps):
    info, notes = probe(media_dir / name)
    assert info.kind == "video" and info.animated and info.frames == 12
    assert info.fps == pytest.approx(fps)
    assert "read as a video" in notes[0]
    plan = sizing.plan(name, info, SPEC, MediaOptions(nframes=4))
    loaded = media.load(src(media_dir / name), info, plan)
    assert loaded.frames.shape == (4, plan.resized_height, plan.resized_width, 3)
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)
    assert loaded.frame_times_s == pytest.approx([i / fps for i in plan.frame_indices])


def test_first_frame_option_makes_an_animation_a_still(media_dir):
    info, _ = probe(media_dir / "anim.gif")
    still = media.effective_info(info, MediaOptions(first_frame=True))
    assert still.kind == "image" and not still.animated
    plan = sizing.plan("anim.gif", still, SPEC, MediaOptions(first_frame=True))
    image = media.load(src(media_dir / "anim.gif"), still, plan).image
    assert frame_index_of(np.asarray(image)) == 0


def test_mp4_probe_reads_container_metadata(media_dir):
    info, notes = probe(media_dir / "clip.mp4")
    assert (info.kind, info.width, info.height, info.frames) == ("video", 320, 240, 90)
    assert info.fps == pytest.approx(30.0) and info.duration_s == pytest.approx(3.0, abs=0.05)


def test_webm_frame_count_comes_from_demuxing(media_dir):
    info, _ = probe(media_dir / "clip.webm")
    assert info.frames == 40 and info.fps == pytest.approx(20.0)


@pytest.mark.parametrize("opts", [MediaOptions(), MediaOptions(fps=4.0), MediaOptions(nframes=6), MediaOptions(start=1.0, end=2.0)])
def test_video_frames_are_the_planned_ones(media_dir, opts):
    path = media_dir / "clip.mp4"
    info, _ = probe(path)
    plan = sizing.plan("clip.mp4", info, SPEC, opts)
    loaded = media.load(src(path), info, plan)
    assert loaded.frames.dtype == np.uint8
    assert loaded.frames.shape == (len(plan.frame_indices), plan.resized_height, plan.resized_width, 3)
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)
    assert loaded.frame_times_s == pytest.approx([i / 30 for i in plan.frame_indices], abs=1e-3)


@pytest.mark.parametrize(
    "name,problem",
    [
        ("empty.jpg", "empty"),
        ("notes.txt", "not an image or a video"),
        ("audio.m4a", "no video stream"),
    ],
)
def test_unreadable_inputs_are_media_errors(media_dir, name, problem):
    with pytest.raises(MediaError, match=problem):
        probe(media_dir / name)


def test_truncated_image_fails_at_decode_with_a_clear_message(media_dir):
    path = media_dir / "truncated.jpg"
    info, _ = probe(path)
    plan = sizing.plan("truncated.jpg", info, SPEC, MediaOptions())
    with pytest.raises(MediaError, match="truncated or corrupt"):
        media.load(src(path), info, plan)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(MediaError, match="decompression-bomb"):
        probe(tmp_path / "big.png")


def test_an_animation_on_a_huge_canvas_is_refused_before_it_is_composited(tmp_path, qvl):
    """2 kB: 100 frames of 1x1 on a 7000x7000 canvas would take Pillow tens of seconds and hundreds of MB."""
    from tests.robustness.corpus import canvas_gif

    path = tmp_path / "canvas.gif"
    path.write_bytes(canvas_gif(7000, 7000, 100))
    with pytest.raises(MediaError, match="100 frames on a 7000x7000 canvas: 4,900,000,000 pixels to composite"):
        probe(path)
    r = qvl("inspect", path)
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "--first-frame" in r.stderr
    assert qvl("inspect", path, "--first-frame").exit_code == 0  # the first frame alone is one canvas
    path.write_bytes(canvas_gif(700, 700, 100))  # the same file on a small canvas reads as a video
    assert probe(path)[0].frames == 100
