"""The vision cache: media seen again skip the vision tower, the answer token for token the same."""

from __future__ import annotations

import pytest
import torch

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from qwen2vl_cli.vision_cache import VisionCache
from tests.helpers import Quiet, answers


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_media_seen_again_skip_the_tower_and_the_tokens_stay_the_same(family_models, media_dir, family):
    """Greedy tokens with the cache (first and second time) equal those without it: two images and
    a video in one prompt, then a GIF; the second time the tower does not run."""
    model = str(family_models(family))
    kept = LocalBackend(RuntimeOptions(model, device="cpu", dtype="float32", cache_size=None), Quiet())  # the server's default
    none = LocalBackend(RuntimeOptions(model, device="cpu", dtype="float32"), Quiet())  # one run: nothing is kept
    assert none.runner.vision is None and kept.runner.vision.max_bytes == 256 * 2**20
    kept.runner.prefixes = None  # the prompt's kept keys and values would skip the tower: tests/test_prefix_cache.py
    gen = GenerationOptions(max_new_tokens=12, min_new_tokens=12)

    def run(backend, sources):
        p = backend.prepare(sources, MediaOptions(), gen)
        return answers(backend.runner, [p], gen)[0]

    for names in (["photo.png", "square.png", "clip.mp4"], ["anim.gif"]):
        sources = tuple(str(media_dir / n) for n in names)
        alone, first, again = run(none, sources), run(kept, sources), run(kept, sources)
        assert first.tokens == alone.tokens == again.tokens
        assert first.vision_s is not None and again.vision_s is None  # the tower ran the first time only
    assert kept.runner.vision.hits == 4 and kept.runner.vision.misses == 4
    assert (kept.runner.media.hits, kept.runner.media.misses) == (4, 4)  # nor were they decoded again


def test_the_cache_is_keyed_by_content_and_stays_within_its_bytes(tiny_model, media_dir, tmp_path):
    """Another picture under the same name is not taken for the first; another size of the same
    picture is another entry; past its bound the least recently used entry goes first."""
    from PIL import Image

    backend = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    runner = backend.runner
    gen = GenerationOptions(max_new_tokens=1)

    def encode(cache, path, **sizing):
        p = backend.prepare((str(path),), MediaOptions(**sizing), gen)
        inputs = runner.inputs(p.text, list(p.loaded))
        with torch.inference_mode():
            return cache.encode(runner.model, "image", inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]

    cache = VisionCache(2**30)
    picture = tmp_path / "picture.png"
    Image.open(media_dir / "photo.png").save(picture)
    first = encode(cache, picture)
    Image.open(media_dir / "square.png").resize(Image.open(picture).size).save(picture)  # the same name, other pixels
    other = encode(cache, picture)
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2) and not torch.equal(first, other)
    encode(cache, picture, max_pixels=28 * 28 * 16)  # the same file, smaller
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
    assert torch.equal(encode(cache, picture), other) and cache.hits == 1

    one = first.numel() * first.element_size()
    small = VisionCache(2 * one)  # room for two of these pictures
    encode(small, media_dir / "photo.png")
    encode(small, picture)
    encode(small, media_dir / "photo.png")  # used again: the newest now
    encode(small, media_dir / "square.png", max_pixels=28 * 28 * 4)
    assert small.bytes <= small.max_bytes and len(small) == 2
    encode(small, media_dir / "photo.png")
    assert small.hits == 2  # photo.png stayed; `picture`, the least recently used, went
    encode(small, picture)
    assert small.misses == 4

    twice = VisionCache(2**30)  # one picture twice in one call (several questions in a batch): the tower runs once
    p = backend.prepare((str(media_dir / "photo.png"),), MediaOptions(), gen)
    inputs = runner.inputs(p.text, list(p.loaded))
    with torch.inference_mode():
        out = twice.encode(runner.model, "image", torch.cat([inputs["pixel_values"]] * 2), torch.cat([inputs["image_grid_thw"]] * 2))
    assert (twice.misses, twice.hits, len(twice)) == (1, 1, 1) and torch.equal(out.pooler_output[0], first)


def test_decoded_media_are_kept_by_their_bytes_and_plan_within_their_bound(tiny_model, media_dir, tmp_path):
    """The same bytes at the same plan are not decoded again; other bytes under the same name,
    another size or another seek mode are; past its bound the least recently used goes first."""
    import numpy as np
    from PIL import Image

    from qwen2vl_cli.media_cache import MediaCache

    backend = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    assert backend.runner.media is None  # one run keeps nothing
    cache = backend.runner.media = MediaCache(2**30)
    gen = GenerationOptions(max_new_tokens=1)

    def pixels(path, **opts):
        loaded = backend.prepare((str(path),), MediaOptions(**opts), gen).loaded[0]
        return np.asarray(loaded.image) if loaded.image is not None else loaded.frames

    picture = tmp_path / "picture.png"
    Image.open(media_dir / "photo.png").save(picture)
    first = pixels(picture)
    assert np.array_equal(pixels(picture), first) and (cache.hits, cache.misses) == (1, 1)
    Image.open(media_dir / "square.png").resize(Image.open(picture).size).save(picture)  # the same name, other pixels
    other = pixels(picture)
    assert (cache.hits, cache.misses) == (1, 2) and not np.array_equal(other, first)
    assert pixels(picture, max_pixels=28 * 28 * 16).shape != other.shape and cache.misses == 3
    clip = media_dir / "clip.mp4"
    exact = pixels(clip)
    assert np.array_equal(pixels(clip, seek="keyframe"), exact) is False and cache.misses == 5
    assert np.array_equal(pixels(clip), exact) and cache.hits == 2

    one = first.nbytes
    small = backend.runner.media = MediaCache(2 * one)  # room for two of these pictures
    for path in (media_dir / "photo.png", picture, media_dir / "photo.png", media_dir / "square.png"):
        pixels(path, max_pixels=first.shape[0] * first.shape[1])
    assert small.bytes <= small.max_bytes and len(small) == 2
    pixels(media_dir / "photo.png", max_pixels=first.shape[0] * first.shape[1])
    pixels(picture, max_pixels=first.shape[0] * first.shape[1])
    assert (small.hits, small.misses) == (2, 4)  # photo.png stayed; `picture`, the least recently used, went


def test_a_cache_size_that_is_not_a_size_is_a_usage_error(qvl, tiny_model):
    r = qvl("serve", "--model", tiny_model, "--cache-size", "lots")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == "qvl: error: --cache-size lots: give a size such as 500M or 2G\n"
