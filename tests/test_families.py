"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (and its MoE) through the same code: each family's model
inputs and greedy answers against its reference recipe (qwen-vl-utils + the family's processor),
`inspect` against the same numbers, and the family chosen from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from qwen2vl_cli import media, sizing, steps
from qwen2vl_cli.devices import Capabilities
from qwen2vl_cli.errors import ModelError
from qwen2vl_cli.families import family_for, time_stamps
from qwen2vl_cli.messages import build_messages
from qwen2vl_cli.modelinfo import stamp_counter, vision_spec
from qwen2vl_cli.pipeline import Probed, plan_all
from qwen2vl_cli.runner import Runner
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import answer

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
VIDEO_PIXEL_TOLERANCE = 0.5  # mean uint8 difference, PyAV + Pillow against decord + torchvision (test_fidelity.py)
KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
        "video_grid_thw", "second_per_grid_ts")


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, family_models):
    from transformers import AutoProcessor

    path = family_models(request.param)
    runner = Runner(RuntimeOptions(str(path), device="cpu", dtype="float32"), caps=Capabilities())
    runner.load_processor(path)
    runner.load_model(path)
    return SimpleNamespace(name=request.param, path=path, runner=runner, spec=runner.vision_spec(),
                           ref=AutoProcessor.from_pretrained(path))  # the recipe's own processor, untouched by qvl


def ours(fam, paths: list[Path], prompt: str, opts: MediaOptions = MediaOptions()):
    probed = []
    for path in paths:
        src = Source(str(path), path=path)
        info, notes = media.probe(src)
        probed.append(Probed(src, info, notes))
    plans = plan_all(probed, fam.spec, opts, fam.runner.count_tokens)
    loaded = [media.load(p.source, p.info, pl) for p, pl in zip(probed, plans)]
    text = fam.runner.prompt_text(build_messages(plans, GenerationOptions(prompt=prompt)))
    return fam.runner.inputs(text, loaded), plans, loaded


def reference(fam, content: list[dict], prompt: str, videos=None, metadata=None):
    """The family's recipe: qwen-vl-utils with the model's patch size and pixel bounds and the
    videos' metadata, then the processor with resizing off. `videos`/`metadata` stand in for
    qwen-vl-utils' reading (to feed the processor frames qvl decoded, or a GIF it cannot read)."""
    from qwen_vl_utils import process_vision_info

    for part in content:
        if part["type"] == "image":
            part.update(min_pixels=fam.spec.min_pixels, max_pixels=fam.spec.max_pixels)
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    text = fam.ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs: dict = {}
    if videos is None:
        images, read, kwargs = process_vision_info(messages, image_patch_size=fam.spec.patch_size, return_video_kwargs=True,
                                                   return_video_metadata=True)
        if read:
            videos, metadata = (list(x) for x in zip(*read))
    else:
        images = None
        kwargs["do_sample_frames"] = False
    if metadata is not None:
        kwargs["video_metadata"] = metadata
    return fam.ref(text=[text], images=images, videos=videos, do_resize=False, padding=True, return_tensors="pt", **kwargs)


def same_inputs(a, b) -> None:
    assert set(k for k in KEYS if k in a) == set(k for k in KEYS if k in b)
    for key in KEYS:
        if key in b:
            assert torch.equal(a[key], b[key]), key


def greedy(fam, inputs, n: int = 16) -> list[int]:
    with torch.inference_mode():
        out = fam.runner.model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("names", [["photo.png"], ["square.png", "photo.jpg"]])
def test_image_inputs_and_greedy_answer_equal_the_reference(fam, media_dir, names):
    inputs, plans, _ = ours(fam, [media_dir / n for n in names], "Describe these images.")
    ref = reference(fam, [{"type": "image", "image": str(media_dir / n)} for n in names], "Describe these images.")
    same_inputs(inputs, ref)
    # qvl's own decode loop drives every family (where transformers' static cache counts itself; else generate)
    assert fam.runner.engine == ("static" if steps.unsupported(fam.runner.model) is None else "hf")
    gen = answer(fam.runner, inputs, GenerationOptions(max_new_tokens=16))
    assert list(gen.tokens) == greedy(fam, ref)
    assert sum(p.tokens_with_markers for p in plans) == int((ref["input_ids"] == fam.runner.model.config.image_token_id).sum()) + 2 * len(names)


@pytest.mark.parametrize("name,opts,ele", [
    ("clip.mp4", MediaOptions(), {}),
    ("clip.mp4", MediaOptions(nframes=6, start=0.5, end=2.5), {"nframes": 6, "video_start": 0.5, "video_end": 2.5}),
    ("clip.webm", MediaOptions(fps=4.0), {"fps": 4.0}),
])
def test_video_follows_the_reference_and_answers_alike(fam, media_dir, name, opts, ele):
    """Frames and sizes as qwen-vl-utils picks them (pixels within the readers' tolerance); fed the
    frames qvl decoded with the recipe's metadata, the family's processor makes qvl's inputs exactly
    (Qwen2.5-VL's seconds per patch, Qwen3-VL's time stamps) and the model gives the same answer."""
    pytest.importorskip("decord")  # qwen-vl-utils' reader; installed with the test extra
    from qwen_vl_utils import fetch_video

    path = media_dir / name
    inputs, [plan], [loaded] = ours(fam, [path], "Describe this video.", opts)
    ref_video, meta = fetch_video({"video": str(path), **ele}, image_patch_size=fam.spec.patch_size, return_video_metadata=True)
    assert list(plan.frame_indices) == list(meta["frames_indices"])
    assert (plan.resized_height, plan.resized_width) == tuple(ref_video.shape[-2:])
    frames = torch.from_numpy(loaded.frames).permute(0, 3, 1, 2)
    assert (frames.float() - ref_video).abs().mean().item() < VIDEO_PIXEL_TOLERANCE
    ref = reference(fam, [{"type": "video", "video": str(path)}], "Describe this video.", videos=[frames], metadata=[meta])
    same_inputs(inputs, ref)
    assert plan.tokens_with_markers == int((ref["input_ids"] != fam.ref.tokenizer.pad_token_id).sum()) - _prompt_without_media(fam)
    if fam.spec.time_stamps:
        stamps = [f"<{t:.1f} seconds>" for t in time_stamps(tuple(meta["frames_indices"]), meta["fps"], 2)]
        assert "".join(stamps) in fam.ref.tokenizer.decode(ref["input_ids"][0]).replace("<|vision_start|>", "").replace("<|vision_end|>", "").replace("<|video_pad|>", "")
    gen = answer(fam.runner, inputs, GenerationOptions(max_new_tokens=16))
    assert list(gen.tokens) == greedy(fam, ref)


def _prompt_without_media(fam) -> int:
    text = fam.ref.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Describe this video."}]}],
                                       tokenize=False, add_generation_prompt=True)
    return len(fam.ref.tokenizer(text)["input_ids"])


def test_animated_gif_is_a_video_of_the_family(fam, media_dir):
    """qwen-vl-utils cannot read a GIF as a clip; given its frames at the rate the frame durations
    give (10 fps), the reference video rules pick qvl's frames and the processor makes qvl's inputs."""
    from qwen_vl_utils import vision_process as ref_rules

    path = media_dir / "anim.gif"
    inputs, [plan], [loaded] = ours(fam, [path], "Describe this video.")
    total, fps = 12, 10.0
    n = ref_rules.smart_nframes({}, total_frames=total, video_fps=fps)
    idx = torch.linspace(0, total - 1, n).round().long().tolist()
    assert list(plan.frame_indices) == idx
    meta = {"fps": fps, "frames_indices": idx, "total_num_frames": total}
    frames = torch.from_numpy(loaded.frames).permute(0, 3, 1, 2)
    ref = reference(fam, [{"type": "video", "video": str(path)}], "Describe this video.", videos=[frames], metadata=[meta])
    same_inputs(inputs, ref)
    assert plan.tokens_with_markers == int(ref["input_ids"].shape[1]) - _prompt_without_media(fam)
    gen = answer(fam.runner, inputs, GenerationOptions(max_new_tokens=12))
    assert list(gen.tokens) == greedy(fam, ref, 12)


def test_batched_equals_one_by_one(fam, media_dir):
    """Each row's inputs are built apart and stacked as the processor stacks them; a row whose
    inputs cannot be built (an image token with no image) fails alone."""
    from qwen2vl_cli.runner import stack_rows

    gen = GenerationOptions(max_new_tokens=12)
    requests = [ours(fam, [media_dir / "photo.png"], "Describe this image."), ours(fam, [media_dir / "clip.webm"], "Describe this video.")]
    alone = [answer(fam.runner, inputs, gen).tokens for inputs, _, _ in requests]
    texts = [fam.runner.prompt_text(build_messages(plans, GenerationOptions(prompt=p))) for (_, plans, _), p in
             zip(requests, ["Describe this image.", "Describe this video."])]
    media = [loaded for _, _, loaded in requests]
    same_inputs(stack_rows([inputs for inputs, _, _ in requests], fam.runner.processor.tokenizer.pad_token_id), fam.runner.inputs(texts, media[0] + media[1]))
    broken = fam.runner.prompt_text([{"role": "user", "content": "<|image_pad|> with no image"}])
    from qwen2vl_cli.rows import Row, generate

    batched = generate(fam.runner, [Row(texts[0], media[0], gen), Row(broken, [], gen), Row(texts[1], media[1], gen)])
    assert [batched[0].tokens, batched[2].tokens] == alone and isinstance(batched[1], ValueError)


def test_a_video_that_joins_a_running_batch_answers_as_alone(fam, media_dir):
    """Continuous batching for every family: a video (Qwen2.5-VL's absolute time positions,
    Qwen3-VL's time stamps), with an answer length of its own and a prompt wider than the image's,
    joins a batch decoding an image, and both get their answers alone."""
    import threading

    gen, short = GenerationOptions(max_new_tokens=96, min_new_tokens=96), GenerationOptions(max_new_tokens=16, min_new_tokens=16)
    image, plans, image_loaded = ours(fam, [media_dir / "photo.png"], "Describe this image.")
    video, _, _ = ours(fam, [media_dir / "clip.webm"], "Describe this video.")
    alone = [answer(fam.runner, image, gen).tokens, answer(fam.runner, video, short).tokens]
    text = fam.runner.prompt_text(build_messages(plans, GenerationOptions(prompt="Describe this image.")))
    from qwen2vl_cli.rows import Row, Running

    waiting = [Row(None, None, short, threading.Event(), inputs=video)]
    done: dict = {}
    running = Running(fam.runner, [Row(text, image_loaded, gen)], capacity=2)
    while running.live:
        done.update(running.advance())
        if waiting and running.open() and running.fits(waiting[0]):
            running.join(waiting.pop())
    assert not waiting and sorted(done) == [0, 1] and [done[0].tokens, done[1].tokens] == alone


def test_inspect_sizes_equal_the_reference(fam, tmp_path):
    """Images of many shapes: qwen-vl-utils with the model's patch size and pixel bounds gives the grid qvl plans."""
    from qwen_vl_utils import fetch_image

    spec = vision_spec(str(fam.path))
    assert spec == fam.spec  # from files without weights == from the loaded processor
    for w, h in [(1, 150), (10, 10), (223, 225), (300, 1000), (1920, 1080), (2000, 20)]:
        path = tmp_path / f"{w}x{h}.png"
        Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(path)
        plan = sizing.plan(str(path), media.probe(Source(str(path), path=path))[0], spec, MediaOptions())
        image = fetch_image({"image": str(path), "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels},
                            image_patch_size=spec.patch_size)
        assert (plan.resized_width, plan.resized_height) == image.size, path.name
        grid = fam.ref.image_processor(images=[image], do_resize=False, return_tensors="pt")["image_grid_thw"][0]
        assert list(grid) == list(plan.grid_thw), path.name


def test_inspect_json_counts_the_prompt_tokens_of_a_video(fam, qvl, media_dir):
    """`qvl inspect --json` without weights: Qwen3-VL's time stamps and their markers included."""
    pytest.importorskip("decord")
    from qwen_vl_utils import fetch_video

    r = qvl("inspect", str(media_dir / "clip.mp4"), "--model", str(fam.path), "--device", "cuda", "--json")
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)
    ref_video, meta = fetch_video({"video": str(media_dir / "clip.mp4")}, image_patch_size=fam.spec.patch_size, return_video_metadata=True)
    ref = reference(fam, [{"type": "video", "video": "clip"}], "Describe this video.", videos=[ref_video.to(torch.uint8)], metadata=[meta])
    assert row["tokens_with_markers"] == int(ref["input_ids"].shape[1]) - _prompt_without_media(fam)
    assert ("time_stamps_s" in row) == fam.spec.time_stamps


def test_cli_answer_equals_the_reference(fam, qvl, media_dir):
    r = qvl("describe", str(media_dir / "photo.png"), "--model", str(fam.path), "--dtype", "float32", "--max-new-tokens", "12",
            "--max-pixels", str(fam.spec.max_pixels), "--json")
    assert r.exit_code == 0, r.stderr
    ref = reference(fam, [{"type": "image", "image": str(media_dir / "photo.png")}], "Describe this image.")
    assert json.loads(r.stdout)["text"] == fam.ref.tokenizer.decode(greedy(fam, ref, 12), skip_special_tokens=True)
    r = qvl("describe", str(media_dir / "photo.png"), "--model", str(fam.path), "--dtype", "float32", "--max-new-tokens", "12",
            "--max-pixels", str(fam.spec.max_pixels), "--engine", "hf", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["engine"] == "hf"
    assert json.loads(r.stdout)["text"] == fam.ref.tokenizer.decode(greedy(fam, ref, 12), skip_special_tokens=True)


def test_the_family_comes_from_config_not_the_name(family_models, tmp_path, qvl, media_dir):
    """A Qwen3-VL in a directory named like a Qwen2-VL is run as a Qwen3-VL; an unknown model_type
    is one line naming the supported ones, before any weight is read."""
    import shutil

    disguised = tmp_path / "Qwen2-VL-2B-Instruct"
    shutil.copytree(family_models("qwen3_vl"), disguised)
    assert vision_spec(str(disguised)).patch_size == 16
    r = qvl("describe", str(media_dir / "photo.png"), "--model", str(disguised), "--max-new-tokens", "2", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["inputs"][0]["resized_width"] % 32 == 0

    config = json.loads((disguised / "config.json").read_text())
    (disguised / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    (disguised / "model.safetensors").write_bytes(b"not weights")  # never read: the family is checked first
    r = qvl("describe", str(media_dir / "photo.png"), "--model", str(disguised))
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert "'llava'" in r.stderr and "qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe" in r.stderr
    with pytest.raises(ModelError, match="no model_type"):
        family_for(None)


def test_stamp_tokens_are_counted_with_the_model_tokenizer(family_models):
    """The rule qvl falls back to (one token per digit, "<", ".", " seconds", ">") is the real Qwen
    tokenizer's; the tiny tokenizer splits " seconds" differently, so the count follows the file."""
    from qwen2vl_cli.families import stamp_tokens

    from transformers import AutoTokenizer

    path = family_models("qwen3_vl")
    stamps = (0.4, 2.0, 12.5)
    assert stamp_tokens(stamps) == (2 + 4) + (2 + 4) + (3 + 4)
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = sum(len(tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False)["input_ids"]) for t in stamps)
    assert stamp_tokens(stamps, stamp_counter(str(path))) == expected
    assert expected != stamp_tokens(stamps)  # the tiny tokenizer is not Qwen's: the file decides


def test_serve_runs_a_qwen3_vl_video_as_the_cli_does(family_models, qvl, media_dir):
    """`qvl serve` and `--endpoint` with Qwen3-VL: the time-stamped video prompt as the CLI makes it
    (the video goes as its frames: the answer to those, tests/test_scale_out.py)."""
    from tests.test_serve import start_server

    model = str(family_models("qwen3_vl"))
    args = (str(media_dir / "clip.webm"), "--model", model, "--max-new-tokens", "10", "--dtype", "float32", "--json")
    local = qvl("describe", *args)
    assert local.exit_code == 0, local.stderr
    proc, url = start_server(model)
    try:
        remote = qvl("describe", *args, "--endpoint", url)
        assert remote.exit_code == 0, remote.stderr
        here, there = json.loads(local.stdout), json.loads(remote.stdout)
        assert there["prompt_tokens"] == here["prompt_tokens"] and there["inputs"][0]["grid_thw"] == here["inputs"][0]["grid_thw"]
        assert there["inputs"][0]["time_stamps_s"] == here["inputs"][0]["time_stamps_s"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
