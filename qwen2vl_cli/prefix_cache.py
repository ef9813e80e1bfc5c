"""The keys and values of prompts and answers, kept by content: a request whose prompt starts with
tokens seen before (a conversation's earlier turns, another question about the same picture)
takes their keys and values and prefills only the rest.

An entry is one row's tokens (its prompt, then as much of its answer as its cache holds), the
media in it (where each sits, and vision_cache's key: a hash of its processor pixels, grid and
dtype) and every layer's keys and values at those tokens. A prompt takes the longest prefix it
shares with an entry, cut back to the start of a medium that differs or that the prefix would
split. Keys carry their rotary positions, and the same tokens after the same media sit at the
same M-RoPE positions, so a kept prefix holds what a full prefill would compute. Entries live on
the model's device, least recently used first out, within a bound in bytes.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qwen2vl_cli.vision_cache import media_key


@dataclass(frozen=True)
class Prompt:
    """What a row's keys and values depend on: its tokens and, for each medium, where its tokens
    sit (first, past the last) and what it is."""

    tokens: tuple[int, ...]
    media: tuple[tuple[int, int, bytes], ...]

    def extend(self, tokens: list[int]) -> Prompt:
        return Prompt(self.tokens + tuple(tokens), self.media)

    def starts(self, other: Prompt) -> bool:
        """Whether this prompt is the start of `other` (same tokens, same media)."""
        n = len(self.tokens)
        return other.tokens[:n] == self.tokens and other.media[: len(self.media)] == self.media


def shared(kept: Prompt, new: Prompt) -> int:
    """How many of `new`'s first tokens `kept` holds: their common tokens, short of a medium that
    differs or would be split, and short of `new`'s last token (prefilled for its logits)."""
    n = min(len(os.path.commonprefix([kept.tokens, new.tokens])), len(new.tokens) - 1)
    theirs = {start: (end, key) for start, end, key in kept.media}
    for start, end, key in new.media:
        if start >= n:
            break
        if end > n or theirs.get(start) != (end, key):
            return start
    return n


@dataclass
class Entry:
    prompt: Prompt
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (heads, tokens, dim) keys and values of each layer
    size: int


class PrefixCache:
    """A byte-bounded LRU of rows' keys and values: `find` the longest kept prefix of a prompt,
    `keep` a row's."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self.reused = 0  # prompt tokens not prefilled, all told
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt: Prompt) -> tuple[int, Entry | None]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length (0, None: none)."""
        with self._lock:
            best, found = 0, None
            for key, entry in self._entries.items():
                if (n := shared(entry.prompt, prompt)) > best:
                    best, found = n, key
            if found is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(found)
            self.hits += 1
            self.reused += best
            return best, self._entries[found]

    def keep(self, prompt: Prompt, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a row's keys and values (copied): entries it starts with give way to it; one that
        starts with it already holds it."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes or not prompt.tokens:
            return
        with self._lock:
            for key, entry in list(self._entries.items()):
                if prompt.starts(entry.prompt):
                    self._entries.move_to_end(key)
                    return
                if entry.prompt.starts(prompt):
                    del self._entries[key]
                    self.bytes -= entry.size
        owned = [(k.clone(), v.clone()) for k, v in layers]  # outside the lock: a large copy
        with self._lock:
            self._entries[self._next] = Entry(prompt, owned, size)
            self._next += 1
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.size


def media_spans(config, ids: list[int], image_grid, video_grid) -> list[tuple[int, int, str, int]]:
    """Where each medium's tokens sit in one row's ids: (first, past the last, modality, its index
    among that modality's media in the row), in order. A medium's tokens are its grid's patches
    merged (spatial_merge_size squared to one); a Qwen3-VL video's frames, with their timestamps
    between them, are one span."""
    merge = config.vision_config.spatial_merge_size ** 2
    out = []
    for modality, token, grids in (("image", config.image_token_id, image_grid), ("video", config.video_token_id, video_grid)):
        if grids is None:
            continue
        where = [i for i, t in enumerate(ids) if t == token]
        at = 0
        for index, (t, h, w) in enumerate(grids.tolist()):
            n = t * h * w // merge
            if n == 0 or at + n > len(where):
                break
            out.append((where[at], where[at + n - 1] + 1, modality, index))
            at += n
    return sorted(out)


def signatures(model, inputs: dict) -> list[Prompt]:
    """Each row's Prompt (padding left out): its tokens, and its media placed and hashed."""
    config = model.config
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    pixels = {"image": inputs.get("pixel_values"), "video": inputs.get("pixel_values_videos")}
    grids = {"image": inputs.get("image_grid_thw"), "video": inputs.get("video_grid_thw")}
    parts = {m: list(pixels[m].split((g[:, 0] * g[:, 1] * g[:, 2]).tolist())) if pixels[m] is not None and g is not None else []
             for m, g in grids.items()}
    seconds = inputs.get("second_per_grid_ts")  # Qwen2.5-VL: a video's frames placed in time move its M-RoPE positions
    seconds = seconds.tolist() if isinstance(seconds, torch.Tensor) else seconds
    taken = {"image": 0, "video": 0}  # media are stacked row after row
    out = []
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row]].tolist()
        counts = {m: int((torch.tensor(tokens) == token).sum()) for m, token in (("image", config.image_token_id), ("video", config.video_token_id))}
        own = {m: _row_media(config, counts[m], grids[m], taken[m]) for m in grids}
        media = []
        for start, end, modality, index in media_spans(config, tokens, own["image"], own["video"]):
            at = taken[modality] + index
            key = media_key(modality, parts[modality][at], grids[modality][at].tolist())
            if modality == "video" and seconds is not None:
                key += repr(float(seconds[at])).encode()
            media.append((start, end, key))
        for m in grids:
            taken[m] += 0 if own[m] is None else len(own[m])
        out.append(Prompt(tuple(tokens), tuple(media)))
    return out


def _row_media(config, tokens: int, grids, first: int):
    """The grids of one row's media: those from `first` on whose tokens add up to the row's."""
    if grids is None or tokens == 0:
        return None
    merge = config.vision_config.spatial_merge_size ** 2
    last = first
    while tokens > 0 and last < grids.shape[0]:
        t, h, w = grids[last].tolist()
        tokens -= t * h * w // merge
        last += 1
    return grids[first:last]


def after(model, inputs: dict, start: int) -> dict:
    """A batch of one's inputs for its tokens from `start` on (the rest of a prompt whose prefix
    was kept): its ids from there, the media there, the attention mask whole."""
    config = model.config
    ids = inputs["input_ids"]
    out = dict(inputs)
    out["input_ids"] = ids[:, start:]
    if inputs.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, start:]
    spans = media_spans(config, ids[0].tolist(), inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    for modality, pixels, grid, extra in (("image", "pixel_values", "image_grid_thw", None),
                                          ("video", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")):
        if inputs.get(grid) is None:
            continue
        grids = inputs[grid]
        keep = sorted(index for first, _, m, index in spans if m == modality and first >= start)
        if not keep:
            for name in (pixels, grid, extra):
                out.pop(name, None)
            continue
        rows = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
        out[pixels] = torch.cat([part for i, part in enumerate(inputs[pixels].split(rows)) if i in keep])
        out[grid] = grids[keep]
        if extra and inputs.get(extra) is not None:
            seconds = inputs[extra]
            out[extra] = seconds[keep] if isinstance(seconds, torch.Tensor) else [seconds[i] for i in keep]
    return out


def load(cache, entry: Entry, length: int) -> None:
    """A fresh cache (a batch of one) holding `entry`'s first `length` positions; the prefill goes on from there."""
    for layer, (keys, values) in zip(cache.layers, entry.layers):
        if not layer.is_initialized:
            layer.lazy_initialization(keys[None, :, :1], values[None, :, :1])
        layer.keys[0, :, :length].copy_(keys[:, :length])
        layer.values[0, :, :length].copy_(values[:, :length])
        layer.cumulative_length.fill_(length)


def layers_of(cache, row: int, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values of one row at `positions` (views where they are one run)."""
    if positions.numel() and int(positions[-1] - positions[0]) + 1 == positions.numel():
        first, last = int(positions[0]), int(positions[-1]) + 1
        return [(layer.keys[row, :, first:last], layer.values[row, :, first:last]) for layer in cache.layers]
    return [(layer.keys[row].index_select(1, positions), layer.values[row].index_select(1, positions)) for layer in cache.layers]
