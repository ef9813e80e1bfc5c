"""Runner pieces: the chunked video processor, the sampling arguments, and loads that overlap."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoProcessor

from qwen2vl_cli.reference import sampling_kwargs
from qwen2vl_cli.runner import Runner
from qwen2vl_cli.types import GenerationOptions, RuntimeOptions
from qwen2vl_cli.video_processor import ChunkedVideoProcessor


@pytest.fixture(scope="module")
def video_processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model).video_processor


@pytest.mark.parametrize("frames", [2, 16, 17, 40])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_video_processor_equals_the_processor(video_processor, frames, dtype):
    gen = torch.Generator().manual_seed(frames)
    videos = [torch.randint(0, 256, (frames, 3, 56, 84), dtype=torch.uint8, generator=gen),
              torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=gen)]
    expected = video_processor(videos=videos, do_resize=False, return_tensors="pt")
    ours = ChunkedVideoProcessor(video_processor, dtype)(videos, do_resize=False, return_tensors="pt")
    assert torch.equal(ours["video_grid_thw"], expected["video_grid_thw"])
    assert ours["pixel_values_videos"].dtype == getattr(torch, dtype)
    assert torch.equal(ours["pixel_values_videos"], expected["pixel_values_videos"].to(getattr(torch, dtype)))


def _devices() -> list[str]:
    return ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_the_chunked_video_processor_works_on_the_models_device(video_processor, device):
    """On a GPU the frames are normalised and patched there, to the same values; `meta` (shapes
    without data) shows the work happens on the device asked for, whatever the machine."""
    gen = torch.Generator().manual_seed(3)
    videos = [torch.randint(0, 256, (17, 3, 56, 84), dtype=torch.uint8, generator=gen)]
    here = ChunkedVideoProcessor(video_processor, "bfloat16")(videos, do_resize=False)
    there = ChunkedVideoProcessor(video_processor, "bfloat16", device)(videos, do_resize=False)
    assert there["pixel_values_videos"].device.type == device and there["pixel_values_videos"].shape == here["pixel_values_videos"].shape
    assert torch.equal(there["video_grid_thw"], here["video_grid_thw"])
    if device != "meta":
        assert torch.allclose(there["pixel_values_videos"].cpu().float(), here["pixel_values_videos"].float(), atol=1e-2)


def test_greedy_unless_temperature():
    assert sampling_kwargs(GenerationOptions())["do_sample"] is False
    sampled = sampling_kwargs(GenerationOptions(temperature=0.7))
    # Qwen's generation_config sets top_k=1; sampling must not inherit it silently.
    assert sampled == {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0}
    assert sampling_kwargs(GenerationOptions(temperature=0.7, top_k=5, min_new_tokens=9, max_new_tokens=4))["top_k"] == 5
    assert sampling_kwargs(GenerationOptions(min_new_tokens=9, max_new_tokens=4))["min_new_tokens"] == 4


def _guard_hits(tail: list[int], prompt: int = 5) -> bool:
    from qwen2vl_cli.reference import RepetitionGuard

    ids = torch.tensor([[7] * prompt + tail])
    return bool(RepetitionGuard(prompt)(ids, None)[0])


def test_repetition_guard_catches_short_loops_only():
    assert _guard_hits([3] * 48)  # one token over and over
    assert _guard_hits(list(range(10)) + [1, 2, 3, 4, 5, 6] * 8)  # a 6-gram 8 times
    assert _guard_hits([9] * 10 + list(range(40, 52)) * 4)  # a 12-gram 4 times
    assert not _guard_hits([3] * 47)  # too short to call
    assert not _guard_hits(list(range(100, 148)))  # no period
    assert not _guard_hits([1, 2, 3] * 15 + [4, 5, 6])  # the loop ended
    assert not _guard_hits([7] * 3 + [1] * 40)  # the prompt does not count


def test_weights_loading_on_two_threads_at_once_both_load_whole(tiny_model):
    """transformers patches its own classes while it builds a model (tie_weights among them): a
    load left running beside another in one process (a run that failed before its first token,
    then the next) must leave both models tied and the classes as they were."""
    from transformers.modeling_utils import PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights
    runners = [Runner(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32")) for _ in range(2)]
    start = threading.Barrier(len(runners))

    def load(runner):
        runner.load_processor(tiny_model)
        start.wait()
        runner.load_model(tiny_model)

    threads = [threading.Thread(target=load, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in runners:
        model = r.model
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
        assert not any(p.is_meta for p in model.parameters())
    assert PreTrainedModel.tie_weights is tie_weights
