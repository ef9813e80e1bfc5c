"""qvl's model inputs and answers against the reference recipe (qwen-vl-utils + the processor)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import fetch_video, process_vision_info

from qwen2vl_cli import media, sizing
from qwen2vl_cli.devices import Capabilities
from qwen2vl_cli.messages import build_messages
from qwen2vl_cli.modelinfo import vision_spec
from qwen2vl_cli.pipeline import Probed, plan_all
from qwen2vl_cli.runner import Runner
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import answer
from tests.media_factory import write_video

PROMPT = "Describe this image."
# Mean absolute difference (uint8 units) between qvl's frames (PyAV + Pillow bicubic) and the
# reference's (decord + torchvision bicubic): measured 0.002-0.05 (max 6) on these clips.
VIDEO_PIXEL_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def ref_processor(tiny_model):
    """The reference recipe's own processor, untouched by qvl."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def runner(tiny_model) -> Runner:
    r = Runner(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), caps=Capabilities())
    r.load_processor(tiny_model)
    r.load_model(tiny_model)
    return r


def qvl_inputs(runner: Runner, paths: list[Path], opts: MediaOptions = MediaOptions(), prompt: str = PROMPT):
    probed = []
    for path in paths:
        src = Source(str(path), path=path)
        info, notes = media.probe(src)
        probed.append(Probed(src, info, notes))
    plans = plan_all(probed, runner.vision_spec(), opts)
    loaded = [media.load(p.source, p.info, pl) for p, pl in zip(probed, plans)]
    text = runner.prompt_text(build_messages(plans, GenerationOptions(prompt=prompt)))
    return runner.inputs(text, loaded), plans, loaded


def reference_inputs(processor, content: list[dict], prompt: str = PROMPT):
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    return processor(text=[text], images=images, videos=videos, padding=True, return_tensors="pt")


@pytest.mark.parametrize("names", [["photo.png"], ["square.png"], ["photo.jpg"], ["transparent.png"], ["square.png", "photo.png"]])
def test_image_inputs_are_identical(runner, ref_processor, media_dir, names):
    ours, _, _ = qvl_inputs(runner, [media_dir / n for n in names])
    ref = reference_inputs(ref_processor, [{"type": "image", "image": str(media_dir / n)} for n in names])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours[key], ref[key]), key


def test_greedy_answer_is_token_identical(runner, ref_processor, media_dir):
    ours, _, _ = qvl_inputs(runner, [media_dir / "photo.png"])
    gen = answer(runner, ours, GenerationOptions(max_new_tokens=24))
    ref = reference_inputs(ref_processor, [{"type": "image", "image": str(media_dir / "photo.png")}])
    with torch.inference_mode():
        out = runner.model.generate(**ref, max_new_tokens=24, do_sample=False)
    expected = out[0, ref["input_ids"].shape[1] :].tolist()
    assert list(gen.tokens) == expected
    assert gen.text == runner.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_cli_answer_equals_the_reference_recipe(qvl, runner, ref_processor, tiny_model, media_dir):
    r = qvl("describe", media_dir / "photo.png", "--model", tiny_model, "--dtype", "float32",
            "--max-new-tokens", "16", "--max-pixels", "12845056", "--json")
    assert r.exit_code == 0, r.stderr
    ref = reference_inputs(ref_processor, [{"type": "image", "image": str(media_dir / "photo.png")}])
    with torch.inference_mode():
        out = runner.model.generate(**ref, max_new_tokens=16, do_sample=False)
    text = runner.processor.tokenizer.decode(out[0, ref["input_ids"].shape[1] :], skip_special_tokens=True)
    assert json.loads(r.stdout)["text"] == text


VIDEO_CASES = [
    {},
    {"nframes": 40},  # more than one processing chunk
    {"fps": 4.0},
    {"nframes": 8},
    {"video_start": 0.5, "video_end": 2.5},
    {"max_pixels": 120000},
    {"fps": 1.0, "min_pixels": 64 * 784},
]


def _opts(ele: dict) -> MediaOptions:
    return MediaOptions(
        fps=ele.get("fps"), nframes=ele.get("nframes"), start=ele.get("video_start"), end=ele.get("video_end"),
        max_pixels=ele.get("max_pixels"), min_pixels=ele.get("min_pixels"),
    )


@pytest.mark.parametrize(
    "name,ele",
    [("clip.mp4", ele) for ele in VIDEO_CASES] + [(name, {}) for name in ("clip.webm", "vfr.mp4", "short_gop.mp4")],
)
def test_video_matches_qwen_vl_utils(runner, ref_processor, media_dir, name, ele):
    """MP4 (H.264) under the options, WebM (VP9), variable frame rate, and a short GOP with B-frames."""
    pytest.importorskip("decord")  # qwen-vl-utils' own reader; installed with the test extra
    path = media_dir / name
    ref_video, meta = fetch_video({"video": str(path), **ele}, return_video_metadata=True)
    ours, [plan], [loaded] = qvl_inputs(runner, [path], _opts(ele), prompt="Describe this video.")
    assert list(plan.frame_indices) == list(meta["frames_indices"])
    assert (plan.resized_height, plan.resized_width) == tuple(ref_video.shape[-2:])
    ours_frames = torch.from_numpy(loaded.frames).permute(0, 3, 1, 2).float()
    assert (ours_frames - ref_video).abs().mean().item() < VIDEO_PIXEL_TOLERANCE
    ref = ref_processor.video_processor(videos=[ref_video], return_tensors="pt")
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert plan.visual_tokens == int((ours["input_ids"] == runner.model.config.video_token_id).sum())
    assert plan.visual_tokens == int(ref["video_grid_thw"].prod()) // 4
    # Chunked processing gives the same values the processor gives on the whole clip at once.
    whole = ref_processor.video_processor(videos=[torch.from_numpy(loaded.frames).permute(0, 3, 1, 2)], do_resize=False, return_tensors="pt")
    assert torch.equal(ours["pixel_values_videos"], whole["pixel_values_videos"])


@pytest.fixture(scope="module")
def size_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    sizes = [(1, 1), (1, 150), (150, 1), (10, 10), (28, 28), (223, 225), (300, 1000), (1000, 300),
             (1080, 1920), (1920, 1080), (2000, 20), (6000, 4000)]
    paths = []
    for w, h in sizes:
        path = root / f"{w}x{h}.png"
        Image.new("RGB", (w, h), (w % 256, h % 256, 128)).save(path)
        paths.append(path)
    return paths


def test_inspect_numbers_equal_the_processor_over_sizes(runner, ref_processor, size_table):
    spec = vision_spec(str(runner.runtime.model))
    for path in size_table:
        info, _ = media.probe(Source(str(path), path=path))
        plan = sizing.plan(str(path), info, spec, MediaOptions())
        ref = reference_inputs(ref_processor, [{"type": "image", "image": str(path)}])
        assert list(ref["image_grid_thw"][0]) == list(plan.grid_thw), path.name
        assert int((ref["input_ids"] == runner.model.config.image_token_id).sum()) == plan.visual_tokens, path.name


@pytest.mark.parametrize("frames,fps,size", [(4, 2, (64, 48)), (5, 25, (96, 64)), (600, 30, (64, 48)), (1800, 60, (64, 36))])
def test_inspect_numbers_equal_the_reference_for_videos(runner, ref_processor, tmp_path, frames, fps, size):
    pytest.importorskip("decord")
    path = write_video(tmp_path / "v.mp4", frames=frames, fps=fps, size=size)
    spec = vision_spec(str(runner.runtime.model))
    info, _ = media.probe(Source(str(path), path=path))
    plan = sizing.plan(str(path), info, spec, MediaOptions())
    ref_video, meta = fetch_video({"video": str(path)}, return_video_metadata=True)
    ref = ref_processor.video_processor(videos=[ref_video], return_tensors="pt")
    assert list(plan.frame_indices) == list(meta["frames_indices"])
    assert list(ref["video_grid_thw"][0]) == list(plan.grid_thw)
    assert plan.visual_tokens == int(ref["video_grid_thw"].prod()) // 4


def test_animated_gif_follows_the_reference_video_rules(runner, ref_processor, media_dir):
    """qwen-vl-utils reads a GIF as its first frame (decord cannot open GIFs). Given the GIF's
    frames as a clip at the rate its frame durations give, its video rules pick the frames and the
    size that qvl picks."""
    from PIL import ImageSequence
    from qwen_vl_utils import vision_process as ref
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    path = media_dir / "anim.gif"
    with Image.open(path) as img:
        frames = np.stack([np.asarray(media.to_rgb(f)) for f in ImageSequence.Iterator(img)])
    total, fps = len(frames), 10.0  # 100 ms per frame
    n = ref.smart_nframes({}, total_frames=total, video_fps=fps)
    idx = torch.linspace(0, total - 1, n).round().long()
    clip = torch.from_numpy(frames)[idx].permute(0, 3, 1, 2)
    max_pixels = max(min(ref.VIDEO_MAX_TOKEN_NUM * 784, ref.MODEL_SEQ_LEN * 784 * 0.9 / n * 2), int(ref.VIDEO_MIN_TOKEN_NUM * 784 * 1.05))
    rh, rw = ref.smart_resize(clip.shape[2], clip.shape[3], 28, ref.VIDEO_MIN_TOKEN_NUM * 784, max_pixels)
    ref_video = F.resize(clip, [rh, rw], interpolation=InterpolationMode.BICUBIC, antialias=True).float()

    ours, [plan], [loaded] = qvl_inputs(runner, [path], MediaOptions(), prompt="Describe this video.")
    assert list(plan.frame_indices) == idx.tolist()
    assert (plan.resized_height, plan.resized_width) == (rh, rw)
    ours_frames = torch.from_numpy(loaded.frames).permute(0, 3, 1, 2).float()
    assert (ours_frames - ref_video).abs().mean().item() < VIDEO_PIXEL_TOLERANCE
    ref = ref_processor.video_processor(videos=[ref_video], return_tensors="pt")
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
