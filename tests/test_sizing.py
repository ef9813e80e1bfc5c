"""The pure sizing rules against qwen-vl-utils 0.0.14 itself, over tables of sizes and clips."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qwen_vl_utils import vision_process as ref

from qwen2vl_cli import families, sizing
from qwen2vl_cli.errors import MediaError
from qwen2vl_cli.types import MediaInfo, MediaOptions, VisionSpec

SPEC = VisionSpec()
SIZES = [
    (224, 224), (1280, 720), (720, 1280), (1920, 1080), (4000, 3000), (3000, 4000), (28, 28), (1, 1),
    (1, 150), (150, 1), (10, 2000), (8000, 40), (640, 360), (333, 777), (56, 56), (12000, 9000),
]


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("limits", [(3136, 12845056), (3136, 200704), (200704, 1003520), (100000, 100000)])
def test_smart_resize_matches_reference(w, h, limits):
    lo, hi = limits
    expected = ref.smart_resize(h, w, 28, lo, hi)
    # Where the reference rounds a side down to 0 (and then fails in the processor), qvl keeps 28.
    expected = tuple(max(28, side) for side in expected)
    assert sizing.smart_resize(h, w, 28, lo, hi) == expected


def test_aspect_ratio_above_200_is_a_clear_error():
    with pytest.raises(ValueError):
        ref.smart_resize(10, 2010, 28, 3136, 12845056)
    with pytest.raises(sizing.SizingError, match="aspect ratio 201:1"):
        sizing.smart_resize(10, 2010, 28, 3136, 12845056)


def test_224_image_costs_64_tokens_66_with_markers():
    plan = sizing.plan_image("x", MediaInfo("image", 224, 224, "PNG"), SPEC, MediaOptions())
    assert (plan.resized_width, plan.resized_height, plan.grid_thw) == (224, 224, (1, 16, 16))
    assert plan.visual_tokens == 64 and plan.tokens_with_markers == 66


def test_cpu_budget_caps_images_unless_limits_given():
    info = MediaInfo("image", 1280, 720, "JPEG")
    full = sizing.plan_image("x", info, SPEC, MediaOptions())
    cpu = sizing.plan_image("x", info, SPEC, MediaOptions(cpu_budget=True))
    given_ = sizing.plan_image("x", info, SPEC, MediaOptions(cpu_budget=True, max_pixels=12845056))
    assert full.visual_tokens == 1196  # QWEN2VL.md: 1280x720 at the default budget
    assert cpu.visual_tokens <= 256 < full.visual_tokens
    assert given_.visual_tokens == full.visual_tokens


@pytest.mark.parametrize(
    "first,last,n",
    [(0, 17999, 600), (0, 89, 6), (0, 119, 8), (5, 1000, 768), (0, 1, 2), (3, 3, 2), (0, 299, 300), (17, 18001, 37)]
    + [(0, t - 1, n) for t in (101, 997, 5000, 36000) for n in (2, 4, 10, 64, 100)],
)
def test_indices_equal_torch_linspace(first, last, n):
    expected = torch.linspace(first, last, n).round().long().tolist()
    assert list(sizing.linspace_indices(first, last, n)) == expected


@settings(max_examples=300, deadline=None)
@given(first=st.integers(0, 5000), length=st.integers(1, 100000), n=st.integers(2, 768))
def test_indices_equal_torch_linspace_property(first, length, n):
    last = first + length
    assert list(sizing.linspace_indices(first, last, n)) == torch.linspace(first, last, n).round().long().tolist()


CLIPS = [(90, 30.0), (120, 30.0), (18000, 30.0), (25, 25.0), (4, 2.0), (7, 24.0), (3000, 29.97), (60000, 60.0)]
VIDEO_OPTS = [{}, {"fps": 1.0}, {"fps": 0.1}, {"fps": 4.0, "max_frames": 30}, {"nframes": 8}, {"min_frames": 10, "fps": 0.5}]


@pytest.mark.parametrize("total,fps", CLIPS)
@pytest.mark.parametrize("opts", VIDEO_OPTS)
def test_frame_count_matches_smart_nframes(total, fps, opts):
    n, notes = sizing.frame_count(MediaOptions(**opts), total, fps)
    try:
        expected = ref.smart_nframes(opts, total_frames=total, video_fps=fps)
    except ValueError:  # the reference raises (#2012); qvl clamps to an even count it can sample
        assert 2 <= n <= max(2, total) and n % 2 == 0 and notes
        return
    assert n == expected and notes == []


def test_nframes_beyond_clip_is_clamped_with_a_note():
    with pytest.raises(ValueError):
        ref.smart_nframes({"nframes": 100}, total_frames=30, video_fps=30)  # #2012
    n, notes = sizing.frame_count(MediaOptions(nframes=100), 30, 30.0)
    assert n == 30 and "using 30" in notes[0]
    n, notes = sizing.frame_count(MediaOptions(nframes=100), 7, 30.0)
    assert n == 6 and n % 2 == 0


def test_one_frame_clip_repeats_the_frame():
    n, notes = sizing.frame_count(MediaOptions(), 1, 25.0)
    assert n == 2 and notes
    assert sizing.linspace_indices(0, 0, 2) == (0, 0)


@pytest.mark.parametrize("total,fps", [(90, 30.0), (300, 25.0), (18000, 30.0)])
@pytest.mark.parametrize("start,end", [(None, 1.0), (0.5, None), (1.0, 2.5), (0.0, 100.0), (2.2, 2.9)])
def test_frame_range_matches_reference(total, fps, start, end):
    ele = {k: v for k, v in (("video_start", start), ("video_end", end)) if v is not None}
    first, last, _ = ref.calculate_video_frame_range(ele, total, fps)
    assert sizing.frame_range(total, fps, start, end) == (first, last)


def test_empty_time_range_is_a_media_error():
    info = MediaInfo("video", 320, 240, "mp4", frames=90, fps=30.0, duration_s=3.0)
    with pytest.raises(MediaError, match="select no frames"):
        sizing.plan_video("clip.mp4", info, SPEC, MediaOptions(start=5.0, end=6.0))


def _reference_video_size(h, w, nframes, ele):
    """fetch_video's sizing lines, verbatim in effect, on a frame count and size."""
    f = 28
    min_pixels = ele.get("min_pixels", ref.VIDEO_MIN_TOKEN_NUM * f * f)
    total_pixels = ele.get("total_pixels", ref.MODEL_SEQ_LEN * f * f * 0.9)
    max_pixels = max(min(ref.VIDEO_MAX_TOKEN_NUM * f * f, total_pixels / nframes * ref.FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in ele:
        return ref.smart_resize(ele["resized_height"], ele["resized_width"], factor=f)
    return ref.smart_resize(h, w, factor=f, min_pixels=min_pixels, max_pixels=max_pixels)


@pytest.mark.parametrize("w,h", [(1280, 720), (320, 240), (1920, 1080), (640, 360), (100, 1000)])
@pytest.mark.parametrize("total,fps", [(1800, 30.0), (18000, 30.0), (90, 30.0)])
@pytest.mark.parametrize(
    "ele",
    [{}, {"max_pixels": 151200}, {"total_pixels": 20480 * 784}, {"min_pixels": 64 * 784}, {"resized_height": 300, "resized_width": 500}],
)
def test_video_plan_matches_reference(w, h, total, fps, ele):
    opts = MediaOptions(
        min_pixels=ele.get("min_pixels"),
        max_pixels=ele.get("max_pixels"),
        total_pixels=ele.get("total_pixels"),
        resize=(ele["resized_width"], ele["resized_height"]) if "resized_height" in ele else None,
    )
    info = MediaInfo("video", w, h, "mp4", frames=total, fps=fps, duration_s=total / fps)
    plan = sizing.plan_video("v", info, SPEC, opts)
    n = ref.smart_nframes({}, total, fps)
    rh, rw = _reference_video_size(h, w, n, ele)
    assert (plan.resized_height, plan.resized_width) == (rh, rw)
    assert list(plan.frame_indices) == torch.linspace(0, total - 1, n).round().long().tolist()
    assert plan.grid_thw == (n // 2, rh // 14, rw // 14)
    assert plan.visual_tokens == n // 2 * rh * rw // (28 * 28)


def test_ten_minute_720p_default_matches_the_measured_reference():
    info = MediaInfo("video", 1280, 720, "mp4", frames=18000, fps=30.0, duration_s=600.0)
    plan = sizing.plan_video("v", info, SPEC, MediaOptions())
    assert len(plan.frame_indices) == 768
    assert (plan.resized_width, plan.resized_height) == (644, 336)  # issue 3's table


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 20000),
    h=st.integers(1, 20000),
    max_tokens=st.integers(4, 16384),
)
def test_resize_properties(w, h, max_tokens):
    if max(w, h) / min(w, h) > 200:
        with pytest.raises(sizing.SizingError):
            sizing.smart_resize(h, w, 28, 3136, max_tokens * 784)
        return
    max_p = max_tokens * 784
    rh, rw = sizing.smart_resize(h, w, 28, 3136, max_p)
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
    rounded = max(28, round(h / 28) * 28) * max(28, round(w / 28) * 28)
    if rounded > max_p and 28 not in (rh, rw):
        assert rh * rw <= max_p  # scaled down into the budget
    elif rounded < 3136:
        assert rh * rw >= 3136  # scaled up to the minimum
    elif rounded <= max_p:
        assert (rh, rw) == (max(28, round(h / 28) * 28), max(28, round(w / 28) * 28))
    grid, tokens = sizing.grid_tokens(SPEC, rh, rw)
    assert tokens == (rh // 28) * (rw // 28)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 200000), fps=st.floats(1.0, 120.0), target=st.floats(0.05, 30.0))
def test_frame_counts_are_even_and_in_range(total, fps, target):
    n, _ = sizing.frame_count(MediaOptions(fps=target), total, fps)
    assert n % 2 == 0 and 2 <= n <= max(2, min(total, 768))


def test_max_pixels_below_the_default_minimum_lowers_the_minimum():
    info = MediaInfo("video", 320, 240, "mp4", frames=90, fps=30.0, duration_s=3.0)
    plan = sizing.plan_video("v", info, SPEC, MediaOptions(max_pixels=20000))  # the reference asserts here
    assert plan.resized_width * plan.resized_height <= 20000
    image = sizing.plan_image("i", MediaInfo("image", 640, 480, "PNG"), SPEC, MediaOptions(max_pixels=2000))
    assert (image.resized_width, image.resized_height) == (28, 28)
    with pytest.raises(MediaError, match="below the minimum"):
        sizing.plan_video("v", info, SPEC, MediaOptions(max_pixels=20000, min_pixels=50000))


BUDGET_ITEMS = [
    ("a.jpg", MediaInfo("image", 1280, 720, "JPEG"), ()),
    ("v.mp4", MediaInfo("video", 1920, 1080, "mp4", frames=18000, fps=30.0, duration_s=600.0), ()),
    ("b.png", MediaInfo("image", 224, 224, "PNG"), ()),
]


@pytest.mark.parametrize("budget", [100000, 20000, 3000, 500, 60])
def test_visual_token_budget_holds_and_says_what_it_chose(budget):
    plans, note = sizing.fit_budget(BUDGET_ITEMS, SPEC, MediaOptions(), budget)
    assert sum(p.visual_tokens for p in plans) <= budget
    assert note.startswith(f"--max-visual-tokens {budget}: 107244 tokens cut to ")
    video = plans[1]
    assert video.visual_tokens == len(video.frame_indices) // 2 * video.grid_thw[1] * video.grid_thw[2] // 4
    if budget < 5000:  # frames stay readable; there are fewer of them
        assert video.resized_width * video.resized_height >= 24 * 784 and len(video.frame_indices) < 768


def test_visual_token_budget_that_cannot_fit():
    plans, note = sizing.fit_budget(BUDGET_ITEMS[:1], SPEC, MediaOptions(), 2000)
    assert "no change" in note and plans[0].visual_tokens == 1196
    with pytest.raises(sizing.SizingError, match="raise it"):
        sizing.fit_budget(BUDGET_ITEMS, SPEC, MediaOptions(), 2)


@settings(max_examples=300, deadline=None)
@given(w=st.integers(28, 8000), h=st.integers(28, 8000), max_tokens=st.integers(64, 16384))
def test_resize_keeps_the_aspect_ratio_within_rounding(w, h, max_tokens):
    if max(w, h) / min(w, h) > 200:
        return
    rh, rw = sizing.smart_resize(h, w, 28, 3136, max_tokens * 784)
    # Each side moves by at most half a 28-pixel step of rounding (plus the scale): the ratio of
    # the result stays within that error of the original.
    assert abs(rw / rh - w / h) <= (w / h) * (28 / rh + 28 / rw)


@pytest.mark.parametrize(
    "info",
    [
        MediaInfo("video", 1280, 720, "mp4", frames=18000, fps=30.0, duration_s=600.0),  # a 10 min clip
        MediaInfo("video", 160, 120, "GIF", animated=True, frames=10000, fps=50.0, duration_s=200.0,
                  frame_times_s=tuple(i * 0.02 for i in range(10000))),  # a 270 KB GIF of 10000 frames
    ],
)
def test_the_cpu_video_cap_holds_for_long_clips_and_gifs(info):
    capped = sizing.plan("v", info, SPEC, MediaOptions(cpu_budget=True))
    assert capped.visual_tokens <= 2048 and any("within 2048 tokens" in n for n in capped.notes)
    lifted = sizing.plan("v", info, SPEC, MediaOptions(cpu_budget=True, total_pixels=20_000_000))
    assert lifted.visual_tokens > 2048 and not any("within 2048 tokens" in n for n in lifted.notes)


QWEN3 = VisionSpec(patch_size=16, min_pixels=65536, max_pixels=16777216, time_stamps=True)


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 8000), h=st.integers(1, 8000), frames=st.integers(1, 40000), fps=st.floats(0.5, 240.0),
    target=st.one_of(st.none(), st.floats(0.1, 8.0)), cpu=st.booleans(),
)
def test_qwen3_video_plans_carry_one_time_stamp_per_temporal_patch(w, h, frames, fps, target, cpu):
    info = MediaInfo("video", w, h, "mp4", frames=frames, fps=fps, duration_s=frames / fps)
    try:
        plan = sizing.plan_video("v", info, QWEN3, MediaOptions(fps=target, cpu_budget=cpu))
    except MediaError:
        assert max(w, h) / min(w, h) > 200  # the only way a well-formed clip is refused
        return
    assert plan.resized_width % 32 == 0 and plan.resized_height % 32 == 0
    stamps = plan.time_stamps_s
    assert len(stamps) == plan.grid_thw[0] == -(-len(plan.frame_indices) // 2)
    assert list(stamps) == sorted(stamps) and 0 <= stamps[0] and stamps[-1] <= frames / fps
    assert plan.stamp_tokens == sum(len(f"{t:.1f}".replace(".", "")) + 4 for t in stamps)
    outer = 2 if families.stamped_video_keeps_its_markers() else 0  # the template's pair (transformers 5.10 through 5.24)
    assert plan.tokens_with_markers == plan.visual_tokens + outer + 2 * len(stamps) + plan.stamp_tokens
    if cpu:
        assert plan.visual_tokens <= 2048


@pytest.mark.parametrize("budget", [100000, 3000, 500])
def test_the_visual_token_budget_holds_for_qwen3_sizes(budget):
    plans, _ = sizing.fit_budget(BUDGET_ITEMS, QWEN3, MediaOptions(), budget)
    assert sum(p.visual_tokens for p in plans) <= budget
    assert all(p.resized_width % 32 == 0 and p.resized_height % 32 == 0 for p in plans)
