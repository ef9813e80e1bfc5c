"""The prefix cache: a prompt that starts with a kept row's tokens prefills only the rest, and its
greedy tokens are the ones a whole prefill gives."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen2vl_cli import decode
from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.prefix_cache import PrefixCache, Prompt, shared
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import Quiet

GEN = GenerationOptions(max_new_tokens=12, min_new_tokens=12)  # no early end: every answer is 12 tokens


def backend(model) -> LocalBackend:
    b = LocalBackend(RuntimeOptions(str(model), device="cpu", dtype="float32"), Quiet())
    b.ready()
    return b


def inputs(b, sources, prompt="Describe this.", **sizing):
    p = b.prepare(tuple(str(s) for s in sources), MediaOptions(**sizing), GenerationOptions(prompt=prompt))
    return b.runner.inputs(p.text, list(p.loaded))


def answer(b, row_inputs, prefixes, **kwargs) -> list[int]:
    r = b.runner
    batch = decode.Batch(r.model, dict(row_inputs), GEN.max_new_tokens, r.sampling(GEN), r.eos_ids(), r.pad_id(), r.attn,
                         prefixes=prefixes, **kwargs)
    while batch.live:
        batch.advance()
    return batch.outcomes[0].tokens


def followed(b, row_inputs, tokens: list[int], text: str) -> dict:
    """The next turn's inputs: the prompt, the answer as it was generated, then the user's next words."""
    more = b.runner.processor.tokenizer(f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    extra = torch.cat([torch.tensor([tokens]), more["input_ids"]], dim=1)
    out = dict(row_inputs)
    out["input_ids"] = torch.cat([row_inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if row_inputs.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = torch.cat([row_inputs["mm_token_type_ids"], torch.zeros_like(extra, dtype=row_inputs["mm_token_type_ids"].dtype)], dim=1)
    return out


class TowerRuns:
    def __init__(self, model):
        self.count = 0
        self.handle = model.model.visual.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize("family,names", [("qwen2_vl", ["photo.png", "clip.mp4"]), ("qwen2_5_vl", ["anim.gif", "square.png"]),
                                          ("qwen3_vl", ["clip.mp4", "photo.png"])])
def test_reused_prefixes_give_the_tokens_of_a_whole_prefill(family_models, media_dir, family, names):
    """A conversation's next turn takes the first turn's prompt and answer from the cache, another
    question about the same media their prompt up to the question; each answer, token for token,
    is the one without the cache, and the vision tower runs for the first turn only."""
    b = backend(family_models(family))
    kept = PrefixCache(2**30)
    tower = TowerRuns(b.runner.model)
    first = inputs(b, [media_dir / n for n in names])
    tokens = answer(b, first, kept)
    assert tower.count == len(names) and kept.reused == 0  # one call per medium
    assert tokens == answer(b, first, None)

    turn = followed(b, first, tokens, "And what else?")
    reused = answer(b, turn, kept)
    assert kept.reused == first["input_ids"].shape[1] + 11  # the answer's last token was never fed: it is prefilled
    other = inputs(b, [media_dir / n for n in names], prompt="What colours are there?")
    again = answer(b, other, kept)
    assert tower.count == 2 * len(names)  # the first turn's run, and the first run without the cache
    assert reused == answer(b, turn, None) and again == answer(b, other, None)
    assert kept.bytes <= kept.max_bytes and len(kept) == 2  # the first turn's entry gave way to the second's, which starts with it


def test_a_row_that_joins_a_running_batch_takes_a_kept_prefix(tiny_model, media_dir):
    """A second question about a picture joins while the first is decoding: it takes the prompt the
    first kept at its prefill, and both answers are the ones they get alone."""
    b = backend(tiny_model)
    photo = [media_dir / "photo.png"]
    q1, q2 = inputs(b, photo), inputs(b, photo, prompt="Is it day or night?")
    alone = answer(b, q1, None), answer(b, q2, None)
    r = b.runner
    kept = PrefixCache(2**30)
    tower = TowerRuns(r.model)
    batch = decode.Batch(r.model, dict(q1), GEN.max_new_tokens, r.sampling(GEN), r.eos_ids(), r.pad_id(), r.attn, capacity=2, prefixes=kept)
    batch.advance()
    assert batch.fits(q2["input_ids"].shape[1], GEN.max_new_tokens)
    row, _ = batch.join(decode.Joining(dict(q2), threading.Event(), GEN.max_new_tokens, GEN.min_new_tokens))
    while batch.live:
        batch.advance()
    assert (batch.outcomes[0].tokens, batch.outcomes[row].tokens) == alone
    assert tower.count == 1 and kept.hits == 1 and kept.reused > 0


def test_rows_of_a_padded_batch_are_kept_without_their_padding(tiny_model, media_dir):
    """Two prompts of different widths start one batch (the shorter left-padded): each row's prompt
    and answer are kept, and the shorter one's next turn takes them all."""
    from qwen2vl_cli.runner import stack_rows

    b = backend(tiny_model)
    r = b.runner
    wide, narrow = inputs(b, [media_dir / "photo.png"]), inputs(b, [media_dir / "square.png"])
    assert wide["input_ids"].shape[1] > narrow["input_ids"].shape[1]
    kept = PrefixCache(2**30)
    batch = decode.Batch(r.model, stack_rows([wide, narrow], r.pad_id()), GEN.max_new_tokens, r.sampling(GEN), r.eos_ids(), r.pad_id(),
                         r.attn, prefixes=kept)
    while batch.live:
        batch.advance()
    assert len(kept) == 2 and kept.hits == 0
    turn = followed(b, narrow, batch.outcomes[1].tokens, "And then?")
    assert answer(b, turn, kept) == answer(b, turn, None)
    assert kept.reused == narrow["input_ids"].shape[1] + 11


def test_other_pixels_under_the_same_name_or_another_size_are_not_reused(tiny_model, media_dir, tmp_path):
    """The prefix stops where the media differ: another picture saved under the same name, the same
    picture at another size. Only the tokens before the picture are taken, and the answers are the
    ones without the cache."""
    from PIL import Image

    b = backend(tiny_model)
    picture = tmp_path / "picture.png"
    Image.open(media_dir / "photo.png").save(picture)
    kept = PrefixCache(2**30)
    first = inputs(b, [picture])
    answer(b, first, kept)
    before_media = first["input_ids"][0].tolist().index(b.runner.model.config.vision_start_token_id) + 1
    Image.open(media_dir / "square.png").resize(Image.open(picture).size).save(picture)
    changed = inputs(b, [picture])
    assert torch.equal(changed["input_ids"], first["input_ids"])  # the same tokens: only the pixels tell them apart
    assert answer(b, changed, kept) == answer(b, changed, None)
    assert kept.reused == before_media
    smaller = inputs(b, [picture], max_pixels=28 * 28 * 16)
    assert answer(b, smaller, kept) == answer(b, smaller, None)
    assert kept.reused == 2 * before_media


def test_the_cache_stays_within_its_bytes_least_recently_used_first_out():
    def layers(n):
        return [(torch.zeros(2, n, 4), torch.zeros(2, n, 4))]

    one = 2 * 2 * 10 * 4 * 4  # bytes of a 10-token entry
    cache = PrefixCache(2 * one)
    a, b_, c = (Prompt(tuple(range(s, s + 10)), ()) for s in (0, 100, 200))
    cache.keep(a, layers(10))
    cache.keep(b_, layers(10))
    assert cache.find(Prompt(a.tokens + (7,), ()))[0] == 10  # a is the newest now
    cache.keep(c, layers(10))
    assert cache.bytes <= cache.max_bytes and len(cache) == 2
    assert cache.find(Prompt(b_.tokens + (7,), ()))[0] == 0 and cache.find(Prompt(a.tokens + (7,), ()))[0] == 10
    cache.keep(Prompt(tuple(range(1000, 1030)), ()), layers(30))  # larger than the whole bound: not kept
    assert cache.bytes <= cache.max_bytes and len(cache) == 2


def test_a_shared_prefix_stops_short_of_media_that_differ_or_would_be_split():
    kept = Prompt((1, 2, 9, 9, 9, 3, 4, 5), ((2, 5, b"cat"),))
    assert shared(kept, Prompt((1, 2, 9, 9, 9, 3, 4, 6, 7), ((2, 5, b"cat"),))) == 7
    assert shared(kept, Prompt((1, 2, 9, 9, 9, 3, 4, 6), ((2, 5, b"dog"),))) == 2  # other pixels: up to the medium
    assert shared(kept, Prompt((1, 2, 9, 9, 9, 9, 9), ((2, 7, b"cat"),))) == 2  # a larger one: it would be split
    assert shared(kept, Prompt((1, 2, 9, 9, 9, 3, 4, 5), ((2, 5, b"cat"),))) == 7  # the last token is prefilled for its logits
