"""--segment: the window arithmetic, its spans, and `qvl inspect --segment` planning each window as
`--start a --end b` plans it."""

from __future__ import annotations

import json

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
