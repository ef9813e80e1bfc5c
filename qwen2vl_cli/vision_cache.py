"""The vision tower's output for each medium, kept by content: a request whose media were seen
(a conversation's earlier image, the same picture asked about again) skips the vision tower.

An entry is keyed by the medium's processor pixels (a hash of their bytes), its grid and the
pixels' dtype: the same file at another size, or another file under the same name, is another
entry. Entries live on the model's device, least recently used first out, within a bound in bytes.
Only the engine's prefill uses it; transformers' `generate` (the reference) computes every time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


def default_bytes(device: str) -> int:
    """What the prefix, vision and media caches keep together unless --cache-size says: room beside the
    weights on each device."""
    return 2**31 if device == "cuda" else 2**30


class VisionCache:
    """A byte-bounded LRU of per-medium vision outputs (the merged embeddings, and Qwen3-VL's
    deepstack features): `encode` gives the model's `mm_encoder_outputs` entry for a modality."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._lock = threading.Lock()  # a server's engine thread uses it, and nothing stops another thread from sharing it

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, model, modality: str, pixels, grids):
        """The model's vision output for these media (rows of `pixels` in grid order), from the
        cache where each medium was seen and from the tower for the rest, in one call."""
        import torch

        rows = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
        parts = list(pixels.split(rows))
        keys = [media_key(modality, part, grid) for part, grid in zip(parts, grids.tolist())]
        with self._lock:
            found = {i: self._entries[k] for i, k in enumerate(keys) if k in self._entries}
            for i in found:
                self._entries.move_to_end(keys[i])
        first = {}  # a medium twice in one call (one picture, several questions in a batch) goes through the tower once
        for i in range(len(keys)):
            if i not in found:
                first.setdefault(keys[i], i)
        missing = list(first.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        made = {}
        kind = next(iter(found.values()))[0] if found else None
        if missing:
            get = model.model.get_image_features if modality == "image" else model.model.get_video_features
            out = get(torch.cat([parts[i] for i in missing]), grids[missing], return_dict=True)
            kind = type(out)
            deep = getattr(out, "deepstack_features", None)
            own = (lambda t: t.clone()) if len(missing) > 1 else (lambda t: t)  # a view would keep its neighbours' bytes alive
            for n, i in enumerate(missing):
                layers = tuple(own(layer[n]) for layer in deep) if deep is not None else None
                made[keys[i]] = (kind, own(out.pooler_output[n]), layers)
            self._keep(made)
        entries = [found.get(i) or made[keys[i]] for i in range(len(keys))]
        out = kind(pooler_output=tuple(e[1] for e in entries))
        if entries[0][2] is not None:
            out.deepstack_features = [tuple(e[2][layer] for e in entries) for layer in range(len(entries[0][2]))]
        return out

    def _keep(self, new: dict) -> None:
        with self._lock:
            for key, entry in new.items():
                size = _size(entry)
                if size > self.max_bytes or key in self._entries:
                    continue
                self._entries[key] = entry
                self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= _size(old)


def media_key(modality: str, part, grid: list[int]) -> bytes:
    """A medium's identity: a hash of its processor pixels' bytes, with its modality, grid, dtype and shape."""
    import torch
    from blake3 import blake3  # a cryptographic hash at several GB/s: a full-budget photo's pixels in a few ms

    data = part.detach().contiguous().cpu()
    digest = blake3(data.view(-1).view(torch.uint8).numpy())
    digest.update(f"{modality}:{grid}:{data.dtype}:{tuple(data.shape)}".encode())
    return digest.digest(length=20)


def _size(entry: tuple) -> int:
    _, pooled, layers = entry
    return pooled.numel() * pooled.element_size() + sum(t.numel() * t.element_size() for t in layers or ())


def encoded(model, inputs: dict, cache: VisionCache | None) -> dict:
    """`inputs` with their media's vision outputs in place of their pixels (the model's
    `mm_encoder_outputs`), through `cache`; unchanged without one, or where the installed
    transformers takes no precomputed outputs."""
    if cache is None or cache.max_bytes <= 0 or not takes_encoder_outputs(model):
        return inputs
    out, outputs = dict(inputs), {}
    for modality, pixels, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        if out.get(pixels) is not None:
            outputs[modality] = cache.encode(model, modality, out.pop(pixels), out[grids])
    if outputs:
        out["mm_encoder_outputs"] = outputs
    return out


def takes_encoder_outputs(model) -> bool:
    import inspect

    return "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters
