"""A prompt into the KV cache: the whole model over it once (vision tower, M-RoPE positions over
the whole prompt), from a kept prefix where the prefix cache has one, into a cache of its own
that a batch then takes rows of (`seat` for its first rows, `into_slot` for one that joins it), and
the filler rows that pad a batch to its bucket (`pad_rows`)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from qwen2vl_cli.errors import Cancelled
from qwen2vl_cli.prefix_cache import PrefixCache, Prompt, after, load
from qwen2vl_cli.steps import cache_argument, static_cache
from qwen2vl_cli.vision_cache import encoded


def prefill(model, inputs: dict, cache, vision=None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model over the prompt (from `start` on, where the cache holds the tokens before
    it); the cache holds it afterwards. `vision`: a VisionCache for the media's tower outputs.

    Returns the last logits (B, V) and each row's M-RoPE offset for the text that follows. The
    positions are transformers' `generate`'s: text positions skip the left padding, and media
    get their 3D positions from the model's own `get_rope_index`, over the whole prompt.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
    if grids and inputs.get("mm_token_type_ids") is not None:
        if inputs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL: frames placed in absolute time
            grids["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        spatial, deltas = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=mask, **grids)
    else:
        spatial, deltas = text[None].expand(3, -1, -1), torch.zeros((ids.shape[0], 1), dtype=torch.long, device=ids.device)
    positions = torch.cat([text[None], spatial.to(text.device)], dim=0)  # the text row first, as `generate` passes them
    if start:
        inputs, positions = after(model, inputs, start), positions[:, :, start:]
    out = model(**encoded(model, inputs, vision), position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return out.logits[:, -1, :].float(), deltas.to(ids.device)


@contextmanager
def stop_when(model, events: list[threading.Event] | None):
    """While inside: once every event is set (every row's client went away), the next vision
    block or decoder layer raises Cancelled, so a long prompt's prefill does not run on for nobody.
    Eager code only (a compiled step would break its graph on the check)."""
    if not events or any(e is None for e in events):
        yield
        return

    def check(module, args) -> None:
        if all(e.is_set() for e in events):
            raise Cancelled()

    inner = model.model
    layers = list(getattr(inner.language_model, "layers", ())) + list(getattr(getattr(inner, "visual", None), "blocks", ()))
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefill_alone(model, inputs: dict, vision, prefixes: PrefixCache | None, prompt: Prompt | None):
    """Prompts prefilled into a cache of their own, as wide as they are: for a batch of one with
    `prefixes`, from the longest prefix kept there (its keys and values copied in, the rest
    prefilled), its own then kept. Returns the last logits, the M-RoPE offsets, the cache and how
    many of the prompt's first tokens came from the prefix cache."""
    width = inputs["input_ids"].shape[1]
    own = static_cache(model, width)
    start = 0
    if prompt is not None:
        start, entry = prefixes.find(prompt)
        if entry is not None:
            load(own, entry, start)
    logits, deltas = prefill(model, inputs, own, vision, start)
    if prompt is not None:
        prefixes.keep(prompt, [(layer.keys[0, :, :width], layer.values[0, :, :width]) for layer in own.layers])
    return logits, deltas, own, start


def seat(cache, own, slots: int) -> None:
    """Prompts prefilled alone (`own`, as wide as they are) into the first rows of a batch's cache
    of `slots` rows, which then writes next past them."""
    for layer, alone in zip(cache.layers, own.layers):
        if not layer.is_initialized:
            layer.lazy_initialization(alone.keys[:1, :, :1].expand(slots, -1, -1, -1), alone.values[:1, :, :1].expand(slots, -1, -1, -1))
        rows, width = alone.keys.shape[0], alone.keys.shape[2]
        layer.keys[:rows, :, :width].copy_(alone.keys)
        layer.values[:rows, :, :width].copy_(alone.values)
        layer.cumulative_length.fill_(width)


def pad_rows(inputs: dict, rows: int, pad_id: int) -> dict:
    """`inputs` with filler rows up to `rows`: padding that attends only to its last position (a
    fully masked row would give NaN), text only, so the vision tower never sees them."""
    ids = inputs["input_ids"]
    extra = rows - ids.shape[0]
    if extra <= 0:
        return inputs
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids, ids.new_full((extra, ids.shape[1]), pad_id)])
    mask = inputs["attention_mask"].new_zeros((extra, ids.shape[1]))
    mask[:, -1] = 1
    out["attention_mask"] = torch.cat([inputs["attention_mask"], mask])
    if inputs.get("mm_token_type_ids") is not None:
        types = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros((extra, types.shape[1]))])
    return out


def into_slot(model, rows, cache, slot: int, inputs: dict, vision=None, prefixes: PrefixCache | None = None,
              prompt: Prompt | None = None) -> torch.Tensor:
    """One prompt prefilled alone (from a kept prefix where `prefixes` has one), then moved into
    `slot` of the running batch: its keys and values at the slot's first positions (the others'
    next write is past them), its positions, its mask. Every change is in place, so a captured or
    compiled step goes on as it was. Returns its last logits and its tokens taken from a kept prefix."""
    ids = inputs["input_ids"]
    width = ids.shape[1]
    logits, deltas, own, kept = prefill_alone(model, inputs, vision, prefixes, prompt)
    for layer, alone in zip(cache.layers, own.layers):
        layer.keys[slot, :, :width].copy_(alone.keys[0])
        layer.values[slot, :, :width].copy_(alone.values[0])
    rows.attend[slot].fill_(False)
    rows.attend[slot, :width].fill_(True)
    rows.text_position[slot] = width
    rows.rope_deltas[slot] = deltas[0]
    if rows.seen is not None:
        rows.seen[slot].fill_(False)
        rows.seen[slot].scatter_(0, ids[0].clamp(max=rows.seen.shape[1] - 1), True)
    rows.ended[slot] = False
    rows.start[slot] = rows.step - 1  # its first token takes the last column written (padding in an ended slot)
    return logits, kept
