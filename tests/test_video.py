"""The PyAV sampler: exact frames under seeks and skipping, keyframe mode, VFR times, no-index streams."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest

from qwen2vl_cli import media, sizing
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import MediaOptions, VisionSpec
from qwen2vl_cli.video import _fraction, probe_video
from tests.media_factory import frame_index_of

SPEC = VisionSpec()


def sample(path, opts: MediaOptions):
    src = Source(str(path), path=path)
    info, _ = media.probe(src, scan=opts.seek == "keyframe")
    plan = sizing.plan(str(path), info, SPEC, opts)
    return info, plan, media.load(src, info, plan, keyframes_only=opts.seek == "keyframe")


@pytest.mark.parametrize(
    "opts",
    [
        MediaOptions(),  # every 15th frame: decode forward, skipping non-reference frames
        MediaOptions(fps=0.2),  # every 150th: seeks over the gaps
        MediaOptions(nframes=4),
        MediaOptions(start=7.3, end=15.0, fps=1.0),  # seek to the start
        MediaOptions(nframes=600),  # every frame
    ],
)
def test_short_gop_clip_gives_exactly_the_planned_frames(media_dir, opts):
    info, plan, loaded = sample(media_dir / "short_gop.mp4", opts)
    assert info.frames == 600
    assert [frame_index_of(f) for f in loaded.frames] == [i % 1024 for i in plan.frame_indices]
    assert loaded.frame_times_s == pytest.approx([i / 30 for i in plan.frame_indices], abs=1e-3)


@pytest.mark.parametrize("name,gop", [("short_gop.mp4", 12), ("clip.webm", None)])
def test_keyframe_mode_uses_and_names_keyframes(media_dir, name, gop):
    path = media_dir / name
    info = probe_video(Source(str(path), path=path), scan=True)
    assert info.keyframes and info.keyframes[0] == 0
    if gop:
        assert max(b - a for a, b in zip(info.keyframes, info.keyframes[1:])) <= gop
    _, plan, loaded = sample(path, MediaOptions(seek="keyframe", fps=1.0))
    assert set(plan.frame_indices) <= set(info.keyframes)
    assert any("--seek keyframe" in n for n in plan.notes)
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)


def test_vfr_times_come_from_the_frames_timestamps(media_dir):
    _, plan, loaded = sample(media_dir / "vfr.mp4", MediaOptions(nframes=8))
    expected = [i * 0.033 if i < 30 else 30 * 0.033 + (i - 30) * 0.1 for i in plan.frame_indices]
    assert loaded.frame_times_s == pytest.approx(expected, abs=2e-3)
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)
    # index / fps (what a header-only estimate can say) is far off in the middle of the clip
    assert max(abs(a - b) for a, b in zip(plan.frame_times_s, expected)) > 0.3


def test_stream_without_timestamps_or_frame_count(media_dir):
    info, plan, loaded = sample(media_dir / "raw.h264", MediaOptions(nframes=6))
    assert info.frames == 50
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)


def test_webm_exact_frames(media_dir):
    _, plan, loaded = sample(media_dir / "clip.webm", MediaOptions(fps=4.0))
    assert [frame_index_of(f) for f in loaded.frames] == list(plan.frame_indices)


@pytest.mark.parametrize(
    "value,expected",
    [
        (Fraction(1, 15360), Fraction(1, 15360)),  # PyAV before 19
        (None, None),
        (Fraction(0, 1), None),
        (SimpleNamespace(numerator=30000, denominator=1001), Fraction(30000, 1001)),  # PyAV 19's AVRational
        (SimpleNamespace(numerator=0, denominator=1), None),  # AVRational for "unknown"
        (SimpleNamespace(numerator=0, denominator=0), None),
    ],
)
def test_rationals_read_the_same_from_every_pyav(value, expected):
    assert _fraction(value) == expected


def test_a_failure_inside_the_video_reader_is_a_bug_report_not_a_corrupt_file(qvl, media_dir, monkeypatch):
    import av

    def broken_open(*args, **kwargs):  # what PyAV 19 did to a keyword it no longer takes
        raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")

    monkeypatch.setattr(av, "open", broken_open)
    r = qvl("inspect", media_dir / "clip.mp4")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"qvl: error: {media_dir / 'clip.mp4'}: the video reader failed (TypeError: ")
    assert "corrupt" not in r.stderr and "report it" in r.stderr and r.stderr.count("\n") == 1


def test_video_metadata_reads_on_the_installed_pyav(media_dir):
    info = probe_video(Source("clip.mp4", path=media_dir / "clip.mp4"))
    assert (info.width, info.height, info.frames, info.fps) == (320, 240, 90, 30.0) and info.duration_s == pytest.approx(3.0)


def test_frames_larger_than_the_header_says_end_the_read(tmp_path):
    """A MOV whose header and first frames are 64x64 and whose later frames are 3000x3000: each frame is held to the limit."""
    from qwen2vl_cli.errors import MediaError
    from tests.robustness.corpus import growing_mov

    path = growing_mov(tmp_path / "grow.mov")
    src = Source(str(path), path=path)
    info, _ = media.probe(src)
    assert (info.width, info.height) == (64, 64)
    plan = sizing.plan(str(path), info, SPEC, MediaOptions())
    with pytest.raises(MediaError, match="a frame is over the 1,000,000 pixels allowed here"):
        media.load(src, info, plan, max_frame_pixels=1_000_000)
    assert media.load(src, info, plan).frames.shape[0] == len(plan.frame_indices)  # within the default limit


def test_playlists_that_name_other_files_are_not_opened(media_dir, tmp_path):
    """An HLS playlist (a server would fetch it as any URL) makes FFmpeg open the files it lists,
    the server's own among them: only single-file containers are read."""
    import av

    from qwen2vl_cli.errors import MediaError

    segment = tmp_path / "private.ts"
    with av.open(str(media_dir / "clip.mp4")) as src, av.open(str(segment), "w", format="mpegts") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    assert probe_video(Source(str(segment), path=segment)).frames > 0  # the segment itself is a video
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:5\n#EXTINF:4.0,\n{segment}\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaError, match="not an image or a video that qvl can read"):
        media.probe(Source("https://example.com/list.m3u8", path=playlist))
