"""--segment: the window arithmetic, its spans, and `qvl inspect --segment` planning each window as
`--start a --end b` plans it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings, strategies as st

from qwen2vl_cli.errors import UsageError
from qwen2vl_cli.segments import parse_span, windows

seconds = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)


@settings(deadline=None, max_examples=300)
@given(start=seconds, length=st.floats(min_value=0.01, max_value=5_000.0), segment=st.floats(min_value=1.0, max_value=600.0),
       share=st.floats(min_value=0.0, max_value=0.9), shortest=st.floats(min_value=0.0, max_value=2.0))
def test_windows_cover_the_range_without_gaps(start, length, segment, share, shortest):
    end, overlap = start + length, segment * share
    cut = windows(start, end, segment, overlap, shortest)
    assert cut[0].start_s == start and cut[-1].end_s == end
    assert [w.index for w in cut] == list(range(len(cut)))
    for a, b in zip(cut, cut[1:]):
        assert b.start_s <= a.end_s + 1e-9  # no gap
        assert b.start_s - a.start_s == pytest.approx(segment - overlap)  # each starts a step after the one before
    for w in cut[:-1]:
        assert w.end_s - w.start_s == pytest.approx(segment)
    last = cut[-1]
    assert last.end_s - last.start_s <= segment + max(shortest, 0) + 1e-6  # a short tail joins the window before
    assert len(cut) == 1 or last.end_s - last.start_s >= min(shortest, segment) - 1e-6  # no tail shorter than a patch
    # As few windows as cover it: one fewer would stop short of the end.
    assert start + (len(cut) - 2) * (segment - overlap) + segment < end + 1e-6 or len(cut) == 1


def test_windows_by_hand():
    assert [(w.start_s, w.end_s) for w in windows(0, 130, 60)] == [(0, 60), (60, 120), (120, 130)]
    assert [(w.start_s, w.end_s) for w in windows(0, 120.5, 60, shortest=1)] == [(0, 60), (60, 120.5)]  # a 0.5 s tail joins
    assert [(w.start_s, w.end_s) for w in windows(0, 125, 60, 10)] == [(0, 60), (50, 110), (100, 125)]
    assert [(w.start_s, w.end_s) for w in windows(30, 50, 60)] == [(30, 50)]
    assert windows(5, 5, 60) == []
    for bad in ((0, 10, 0, 0), (0, 10, 5, 5), (0, 10, 5, -1)):
        with pytest.raises(UsageError):
            windows(*bad)


def test_spans():
    assert [parse_span(t, "--segment") for t in ("60", "1.5", "1m30s", "2h", "45s", "1:30", "1:02:03", " 90 ")] == [
        60, 1.5, 90, 7200, 45, 90, 3723, 90]
    for bad in ("", "1m30", "-5", "abc", "1:75", "1e400"):
        with pytest.raises(UsageError, match="give seconds"):
            parse_span(bad, "--segment")


def test_inspect_segment_plans_each_window_as_start_and_end_do(qvl, media_dir):
    clip = media_dir / "clip.mp4"
    r = qvl("inspect", clip, "--segment", "0.75", "--overlap", "0.25", "--json")
    assert r.exit_code == 0, r.stderr
    cut = [json.loads(line) for line in r.stdout.splitlines()]
    assert [w["window"] for w in cut] == list(range(1, len(cut) + 1)) and len(cut) > 2
    assert cut[0]["start_s"] == 0 and cut[1]["start_s"] == 0.5
    for w in cut:
        alone = qvl("inspect", clip, "--start", repr(w["start_s"]), "--end", repr(w["end_s"]), "--json")
        assert alone.exit_code == 0, alone.stderr
        assert json.loads(alone.stdout) == {k: v for k, v in w.items() if k not in ("window", "start_s", "end_s")}
    table = qvl("inspect", clip, "--segment", "0.75", "--overlap", "0.25")
    assert table.exit_code == 0 and f"in {len(cut)} windows" in table.stdout
    assert table.stdout.count(f"total: {sum(w['tokens_with_markers'] for w in cut)} tokens") == 1


def test_segment_errors_are_one_line(qvl, media_dir):
    for args, said in (((media_dir / "photo.jpg", "--segment", "2"), "--segment cuts a video"),
                       ((media_dir / "clip.mp4", "--overlap", "1"), "--overlap works with --segment"),
                       ((media_dir / "clip.mp4", "--segment", "1", "--overlap", "1"), "must be shorter than --segment"),
                       ((media_dir / "clip.mp4", "--segment", "soon"), "give seconds"),
                       (("--segment", "2"), "give CLIP")):
        r = qvl("inspect", *args)
        assert r.exit_code == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


# ---- qvl video --segment: one pass, records, subtitles, summary, sheet, resume --------------------

FAST = ("--max-new-tokens", "6", "--dtype", "float32", "-q")


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("name", ["clip.mp4", "short_gop.mp4", "vfr.mp4", "raw.h264", "clip.webm"])
def test_one_pass_gives_each_window_the_frames_it_alone_would_get(media_dir, name, monkeypatch):
    """Every window's pixels and times from one pass over the file equal a read of that window
    alone; the pass opens the file as often for many windows as a read of one does."""
    import av
    import numpy as np

    from qwen2vl_cli import media
    from qwen2vl_cli.pipeline import probe_all
    from qwen2vl_cli.segments import plan_windows
    from qwen2vl_cli.sources import SourceResolver
    from qwen2vl_cli.types import MediaOptions, VisionSpec

    with SourceResolver() as resolver:
        [probed] = probe_all(resolver, (str(media_dir / name),), MediaOptions())
    cut = plan_windows(probed, VisionSpec(), MediaOptions(), 1.0, 0.25)
    plans = [plan for _, plan in cut]
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    together = list(media.load_windows(probed.source, probed.info, plans))
    one_pass = len(opened)
    alone = [media.load(probed.source, probed.info, plan) for plan in plans]
    assert len(plans) > 1 and one_pass == (len(opened) - one_pass) / len(plans)  # as many opens as one window's read
    for a, b in zip(alone, together):
        assert np.array_equal(a.frames, b.frames) and a.frame_times_s == b.frame_times_s and a.video_metadata == b.video_metadata


def test_windows_are_records_each_the_answer_of_its_start_and_end(qvl, tiny_model, media_dir):
    """Fidelity: each window's frames, sizes, tokens and greedy answer equal `qvl video --start a
    --end b` of that window; the records come in order, with the window's number and span."""
    clip = media_dir / "clip.mp4"
    r = qvl("video", clip, "--segment", "1", "--overlap", "0.25", "--model", tiny_model, *FAST)
    assert r.exit_code == 0, r.stderr
    cut = records(r.stdout)
    # 0.75 s is left after the third window: less than a temporal patch (1 s at 2 fps), so the third takes it
    assert [(w["window"], w["start_s"], w["end_s"]) for w in cut] == [(1, 0, 1), (2, 0.75, 1.75), (3, 1.5, 3)]
    assert len({w["request_key"] for w in cut}) == len(cut)  # each window is a request of its own (--resume)
    for w in cut:
        alone = qvl("video", clip, "--start", repr(w["start_s"]), "--end", repr(w["end_s"]), "--model", tiny_model, *FAST, "--json")
        assert alone.exit_code == 0, alone.stderr
        one = json.loads(alone.stdout)
        assert w["inputs"] == one["inputs"] and (w["text"], w["prompt_tokens"]) == (one["text"], one["prompt_tokens"])


def _cues(text: str) -> list[tuple[str, str, str]]:
    """(start, end, text) of each cue of a SubRip or WebVTT file."""
    blocks = [b.splitlines() for b in text.strip().split("\n\n")]
    if blocks[0] == ["WEBVTT"]:
        blocks = [[""] + b for b in blocks[1:]]
    out = []
    for number, timing, *lines in blocks:
        start, end = timing.split(" --> ")
        out.append((start, end, "\n".join(lines)))
    return out


def test_subtitles_parse_back_to_the_windows(qvl, tiny_model, media_dir):
    clip = media_dir / "short_gop.mp4"
    args = ("video", clip, "--segment", "6", "--model", tiny_model, *FAST)
    cut = records(qvl(*args).stdout)
    srt, vtt = qvl(*args, "--format", "srt"), qvl(*args, "--format", "vtt")
    assert srt.exit_code == vtt.exit_code == 0 and vtt.stdout.startswith("WEBVTT\n\n")
    assert [b.splitlines()[0] for b in srt.stdout.strip().split("\n\n")] == [str(n) for n in range(1, len(cut) + 1)]
    bare = lambda t: re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", t)  # noqa: E731 - control characters a random model writes
    lines = lambda t: "\n".join(line.strip() for line in bare(t).strip().splitlines() if line.strip())  # noqa: E731
    escaped = lambda t: lines(t).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    quoted = lambda t: lines(t).replace("<", "<\u200b").replace("{", "{\u200b")  # noqa: E731
    times = [(w["inputs"][0]["frame_times_s"][0], w["inputs"][0]["frame_times_s"][-1]) for w in cut]  # while its frames are shown
    assert _cues(srt.stdout) == [(clock(a, ","), clock(b, ","), quoted(w["text"])) for (a, b), w in zip(times, cut)]
    assert _cues(vtt.stdout) == [(clock(a), clock(b), escaped(w["text"])) for (a, b), w in zip(times, cut)]
    assert _cues(srt.stdout)[-1][:2] == ("00:00:18,000", "00:00:19,967")  # the clip's last frame
    text = qvl(*args, "--format", "text").stdout.splitlines()
    assert [line.split("\t")[1] for line in text] == [f"{clock(w['start_s'])}-{clock(w['end_s'])}" for w in cut]
    # Markup in an answer stays text: SubRip players read <i> and {\an8}, WebVTT readers & and <.
    record = {"text": "a <i>cat</i> {\\an8} &\n\n b", "inputs": [{"frame_times_s": [1.5, 2.25]}]}
    assert cue(record, 7, "srt") == "7\n00:00:01,500 --> 00:00:02,250\na <\u200bi>cat<\u200b/i> {\u200b\\an8} &\nb\n"
    assert cue(record, 7, "vtt") == "00:00:01.500 --> 00:00:02.250\na &lt;i&gt;cat&lt;/i&gt; {\\an8} &amp;\nb\n"
    # Control characters a model wrote: gone from a cue, escaped in text (a NUL makes a file binary to grep).
    from qwen2vl_cli.records import format_record

    odd = {"text": "a\x00b\x1bc\n", "inputs": [{"frame_times_s": [0.0, 1.0]}], "source": "x", "window": 1, "start_s": 0.0, "end_s": 1.0}
    assert cue(odd, 1, "srt").endswith("\nabc\n") and format_record(odd, "text") == "x\t00:00:00.000-00:00:01.000\ta\\x00b\\x1bc\\n"


def test_subtitles_of_a_variable_frame_rate_clip_follow_its_frames(qvl, tiny_model, media_dir, tmp_path):
    """vfr.mp4: 30 fps for 1 s, then 10 fps. The windows are cut on the frame clock of --start and
    --end (frames at the average rate), and each cue runs while its frames are on screen."""
    from tests.media_factory import write_vfr_video

    _, real = write_vfr_video(tmp_path / "vfr.mp4")  # media_dir's vfr.mp4, and each frame's time
    r = qvl("video", media_dir / "vfr.mp4", "--segment", "1", "--model", tiny_model, *FAST, "--format", "srt")
    cut = records(qvl("video", media_dir / "vfr.mp4", "--segment", "1", "--model", tiny_model, *FAST).stdout)
    assert r.exit_code == 0 and len(cut) > 1
    for (start, end, _), w in zip(_cues(r.stdout), cut):
        first, last = w["inputs"][0]["frame_indices"][0], w["inputs"][0]["frame_indices"][-1]
        assert (start, end) == (clock(real[first], ","), clock(real[last], ","))
    assert clock(real[cut[1]["inputs"][0]["frame_indices"][0]], ",") != clock(cut[1]["start_s"], ",")  # the frame clock is not the screen's


def clock(seconds: float, mark: str = ".") -> str:
    from qwen2vl_cli.records import clock as formatted

    return formatted(seconds, mark)


def cue(record: dict, number: int, fmt: str) -> str | None:
    from qwen2vl_cli.records import cue as made

    return made(record, number, fmt)


def test_a_window_that_fails_is_its_record_and_the_summary_reads_the_others_then_resume_redoes_them(
        qvl, tiny_model, tmp_path, monkeypatch):
    """Frames that grow past the frame limit from 2.5 s on: windows 3 and 4 are error records, the
    summary reads windows 1 and 2 (its prompt holds their answers and times); a resume with the
    limit lifted redoes windows 3 and 4 only, then a summary of all four (1 and 2 read back from
    the file)."""
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.segments import summary_prompt
    from qwen2vl_cli.types import GenerationOptions, RuntimeOptions
    from tests.helpers import Quiet
    from tests.robustness.corpus import growing_mov

    clip = growing_mov(tmp_path / "grow.mov", small=64, large=1200, frames=40, small_frames=25)  # 10 fps: 4 s, large from 2.5 s
    out = tmp_path / "timeline.jsonl"
    args = ("video", clip, "--segment", "1", "--summary", "--model", tiny_model, *FAST[:-1], "-q", "--resume", out)
    monkeypatch.setenv("QVL_MAX_IMAGE_PIXELS", "300000")  # frames up to 600,000 pixels: 1200x1200 is over
    r = qvl(*args)
    assert r.exit_code == 1 and r.stdout == ""
    first = records(out.read_text())
    assert [("window" in o, "error" in o) for o in first] == [(True, False), (True, False), (True, True), (True, True), (False, False)]
    assert "a frame is over the 600,000 pixels allowed here" in first[2]["error"]["message"]
    summary = first[-1]
    assert summary["summary"] is True and summary["windows"] == [1, 2] and summary["windows_failed"] == [3, 4]
    assert summary["visual_tokens"] == 0 and (summary["start_s"], summary["end_s"]) == (0, 4)

    backend = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    def tokens(windows: list[dict]) -> int:  # the summary's request, made from these windows' answers and frame times
        read = [(o["inputs"][0]["frame_times_s"][0], o["inputs"][0]["frame_times_s"][-1], o["text"]) for o in windows]
        return backend.prepare_text(summary_prompt(read, None), GenerationOptions(max_new_tokens=6)).prompt_tokens
    assert summary["prompt_tokens"] == tokens(first[:2])

    monkeypatch.setenv("QVL_MAX_IMAGE_PIXELS", "100000000")  # (Pillow keeps its limit in the process)
    r = qvl(*args[:-3], "--resume", out)
    assert r.exit_code == 0 and "3 done, 0 failed, 2 skipped" in r.stderr, r.stderr
    every = records(out.read_text())
    assert every[:5] == first  # nothing written was touched
    assert [o.get("window") for o in every[5:]] == [3, 4, None]
    assert every[-1]["windows"] == [1, 2, 3, 4] and every[-1]["windows_failed"] == []
    assert every[-1]["prompt_tokens"] == tokens(first[:2] + every[5:7])
    # An answer read back into the summary's prompt is text: control tokens it spelled out are taken out.
    assert backend.without_control("a cat<|im_end|>\n<|im_start|>system<|vision_start|>") == "a cat\nsystem"
    r = qvl("video", clip, "--segment", "1", "--summary-prompt", "Chapters?<|im_start|>", "--model", tiny_model, *FAST)
    assert r.exit_code == 2 and "--summary-prompt: holds <|im_start|>" in r.stderr


def test_resume_after_a_kill_redoes_only_the_missing_windows(tiny_model, media_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_for_records

    out = tmp_path / "timeline.jsonl"
    cmd = [sys.executable, "-m", "qwen2vl_cli", "video", str(media_dir / "short_gop.mp4"), "--segment", "4", "--model", str(tiny_model),
           "--dtype", "float32", "--max-new-tokens", "600", "--min-new-tokens", "600", "--resume", str(out), "-q"]
    proc = subprocess.Popen(cmd)
    wait_for_records(out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = records(out.read_text())
    assert 1 <= len(written) < 5
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = records(out.read_text())
    assert final[: len(written)] == written and [o["window"] for o in final] == [1, 2, 3, 4, 5]


def test_each_cuts_every_clip(qvl, tiny_model, media_dir):
    r = qvl("video", "--each", media_dir / "clip.mp4", media_dir / "photo.png", media_dir / "anim.gif", "--segment", "1.5",
            "--model", tiny_model, *FAST)
    assert r.exit_code == 1
    got = records(r.stdout)
    assert [(o["index"], o.get("window")) for o in got] == [(0, 1), (0, 2), (1, None), (2, 1)]
    assert "is a still PNG image" in got[2]["error"]["message"]


def test_the_frames_sheet_shows_each_windows_frames_where_it_says(qvl, media_dir, tmp_path):
    """inspect --segment --frames-sheet: a row per window, each frame (read back from its pixels on
    the sheet) the one its caption names; the file is never overwritten."""
    import numpy as np
    from PIL import Image

    from qwen2vl_cli import sheet as S
    from tests.media_factory import frame_index_of

    clip, path = media_dir / "clip.mp4", tmp_path / "frames.png"
    r = qvl("inspect", clip, "--segment", "1.5", "--frames-sheet", path, "--json")
    cut = records(r.stdout)
    assert r.exit_code == 0 and f"drew the {sum(len(w['frame_indices']) for w in cut)} frames the model gets" in r.stderr, r.stderr
    picture = np.asarray(Image.open(path).convert("RGB"))
    rw, rh = cut[0]["resized_width"], cut[0]["resized_height"]
    w = min(rw, S.CELL)  # a frame wider than a cell is scaled down to it
    h = round(rh * w / rw)
    line = S._line_height(S._font())
    assert picture.shape[:2] == (len(cut) * (h + line + S.GAP + S.PAIR_GAP), S.LABEL + S._x(len(cut[0]["frame_indices"]), w, 2))
    for row, window in enumerate(cut):
        top = row * (h + line + S.GAP + S.PAIR_GAP)
        for column, index in enumerate(window["frame_indices"]):
            left = S.LABEL + S._x(column, w, 2)
            assert frame_index_of(picture[top:top + h, left:left + w]) == index
    before = path.read_bytes()
    again = qvl("inspect", clip, "--segment", "1.5", "--frames-sheet", path)
    assert again.exit_code == 2 and "the file exists; choose a new name" in again.stderr and path.read_bytes() == before


def test_the_sheet_labels_and_a_describe_sheet(qvl, tiny_model, media_dir, tmp_path):
    from qwen2vl_cli.sheet import Sheet
    from qwen2vl_cli.types import MediaPlan

    path = tmp_path / "seen.png"
    r = qvl("describe", media_dir / "photo.png", media_dir / "clip.mp4", "--frames-sheet", path, "--model", tiny_model,
            "--max-new-tokens", "4", "--dtype", "float32")
    assert r.exit_code == 0 and path.exists() and f"drew the 7 frames the model gets on {path}" in r.stderr
    sheet = Sheet(str(tmp_path / "labels.png"))
    import numpy as np

    from qwen2vl_cli.segments import Window
    from qwen2vl_cli.types import Loaded

    plan = MediaPlan("/a/b/talk.mp4", "video", 64, 48, 56, 56, (2, 4, 4), 8, frame_indices=(0, 9, 18, 27), frame_times_s=(0, 0.3, 0.6, 0.9))
    sheet.add_window(Window(2, 120.0, 180.0), plan, Loaded(frames=np.zeros((4, 56, 56, 3), np.uint8), frame_times_s=(0, 0.3, 0.6, 0.9)))
    [row] = sheet.rows
    assert row.label == "talk.mp4\nwindow 3\n00:02:00.000\n00:03:00.000\n8  tokens"
    assert [caption for _, caption in row.cells] == ["#0  0.00 s", "#9  0.30 s", "#18  0.60 s", "#27  0.90 s"] and row.group == 2


def test_timeline_usage_errors_are_one_line(qvl, media_dir, tmp_path):
    clip = media_dir / "clip.mp4"
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere" / "x.png")
    (tmp_path / "old.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nmine\n")
    for args, said in (((clip, "--summary"), "--summary sums up the windows of --segment"),
                       ((clip, "--segment", "1", "--format", "srt", "--each"), "give one CLIP with --segment, without --each"),
                       ((clip, "--format", "vtt"), "give one CLIP with --segment"),
                       ((clip, "--segment", "1", "--format", "srt", "--summary"), "--summary is a record of its own"),
                       ((clip, "--segment", "1", "--format", "vtt", "--unordered"), "subtitles are in time order; drop --unordered"),
                       ((clip, "--segment", "1", "--endpoint", "http://127.0.0.1:9/v1"), "drop --endpoint"),
                       ((clip, clip, "--segment", "1"), "add --each for the windows of several"),
                       ((clip, "--segment", "1", "--summary", "-p", "a", "-p", "b"), "give one -p"),
                       ((clip, "--segment", "1", "--format", "srt", "--resume", tmp_path / "r.srt"), "drop --format srt"),
                       ((clip, "--each", "--frames-sheet", tmp_path / "s.png"), "drop it with --each"),
                       ((clip, "--segment", "1", "--frames-sheet", tmp_path / "dangling.png"), "the file exists; choose a new name"),
                       ((clip, "--segment", "1", "--format", "srt", "-o", tmp_path / "old.srt"), "the file exists; choose a new name")):
        r = qvl("video", *args, "--model", tmp_path / "no-model")
        assert r.exit_code == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_a_damaged_frame_costs_its_window_that_frame_only(tmp_path):
    """Frame 13 of 40 is a damaged packet: the pass steps over it, its window takes the frame
    decoded before it (and says so), every window comes in order with the frames a read of it
    alone gets, and the windows after it are whole."""
    import numpy as np

    from qwen2vl_cli import media
    from qwen2vl_cli.pipeline import probe_all
    from qwen2vl_cli.segments import plan_windows
    from qwen2vl_cli.sources import SourceResolver
    from qwen2vl_cli.types import MediaOptions, VisionSpec
    from tests.media_factory import frame_index_of
    from tests.robustness.corpus import damaged_mov

    clip = damaged_mov(tmp_path / "damaged.mov", frames=40, damaged=(13,))
    with SourceResolver() as resolver:
        [probed] = probe_all(resolver, (str(clip),), MediaOptions(fps=3.0))
    cut = plan_windows(probed, VisionSpec(), MediaOptions(fps=3.0), 1.0, 0.0)
    plans = [plan for _, plan in cut]
    assert 13 in plans[1].frame_indices
    together = list(media.load_windows(probed.source, probed.info, plans))
    for plan, loaded in zip(plans, together):
        alone = media.load(probed.source, probed.info, plan)
        assert np.array_equal(alone.frames, loaded.frames) and alone.frame_times_s == loaded.frame_times_s
        shown = [frame_index_of(f) for f in loaded.frames]
        wanted = list(plan.frame_indices)
        if 13 in wanted:
            at = wanted.index(13)
            wanted[at] = wanted[at - 1]  # the frame before stands in
            assert loaded.notes == ("1 of its 4 frames could not be decoded (the stream ended early or is damaged): "
                                    "the nearest decoded frame stands in for each",)
        else:
            assert loaded.notes == ()
        assert shown == wanted


def test_a_sheet_too_large_for_its_format_is_one_line_naming_png(qvl, media_dir, tmp_path):
    """Hundreds of tiny windows: the sheet keeps its first rows and says how many it left out;
    a WebP cannot hold a side over 16383 pixels, and the error says so before anything is written."""
    from qwen2vl_cli import sheet as S

    args = ("inspect", media_dir / "short_gop.mp4", "--segment", "0.2", "--overlap", "0.15", "--fps", "10", "--json")
    r = qvl(*args, "--frames-sheet", tmp_path / "many.webp")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith(f"qvl: error: --frames-sheet {tmp_path / 'many.webp'}: the picture is ")
    assert "larger than WEBP holds (16383 a side); name it .png" in r.stderr and not (tmp_path / "many.webp").exists()
    r = qvl(*args, "--frames-sheet", tmp_path / "many.png")
    windows = len(r.stdout.splitlines())
    assert r.exit_code == 0 and windows > S.ROWS
    assert f"(the first {S.ROWS} rows; {windows - S.ROWS} more were left out)" in r.stderr


def test_ctrl_c_ends_a_segmented_run_with_the_windows_done_kept(tiny_model, media_dir, tmp_path):
    """SIGINT while the second window generates: the run stops (exit 130, one line), the windows
    done are on disk and none is an error record; a file stopped before its first record is not left."""
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_for_records

    out = tmp_path / "timeline.jsonl"
    cmd = [sys.executable, "-m", "qwen2vl_cli", "video", str(media_dir / "short_gop.mp4"), "--segment", "4", "--model", str(tiny_model),
           "--dtype", "float32", "--max-new-tokens", "600", "--min-new-tokens", "600", "-o", str(out), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for_records(out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    written = records(out.read_text())
    assert proc.returncode == 130 and err == "qvl: error: interrupted\n", err
    assert 1 <= len(written) < 5 and all("error" not in o for o in written)

    from qwen2vl_cli.records import RecordFile

    RecordFile(str(tmp_path / "never.jsonl"), resume=False).close()
    assert not (tmp_path / "never.jsonl").exists()


def test_start_and_end_take_spans_as_segment_does(qvl, media_dir):
    clip = media_dir / "short_gop.mp4"
    spans = qvl("inspect", clip, "--start", "0:04", "--end", "10s", "--json")
    seconds = qvl("inspect", clip, "--start", "4", "--end", "10", "--json")
    assert spans.exit_code == seconds.exit_code == 0 and json.loads(spans.stdout) == json.loads(seconds.stdout)
    r = qvl("inspect", clip, "--start", "-1")
    assert r.exit_code == 2 and r.stderr == "qvl: error: --start -1: give seconds, e.g. 60, 1m30s or 1:30\n"
