"""A prompt into the KV cache: the whole model over it once (vision tower, M-RoPE positions over
the whole prompt), from a kept prefix where the prefix cache has one, into a cache of its own
that a batch then takes rows of (`seat`, decode.py's joins)."""

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
    prefilled), its own then kept. Returns the last logits, the M-RoPE offsets and the cache."""
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
    return logits, deltas, own


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
