"""Decoded media kept by content: a request that sends a medium seen before (an OpenAI client
re-sends a conversation's images every turn) skips reading and resizing it again.

An entry is a medium's pixels at its planned size, keyed by a hash of the source's bytes and what
decides its pixels (kind, planned size, frames, seek mode): another file under the same name, or
the same file at another size, is another entry. Least recently used first out, within a bound
in bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from qwen2vl_cli.types import Loaded, MediaPlan

READ_CHUNK = 1 << 20


class MediaCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, Loaded] = OrderedDict()
        self._lock = threading.Lock()  # --each and a server decode on worker threads

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, source, plan: MediaPlan, seek: str, decode: Callable[[], Loaded]) -> Loaded:
        """The medium's pixels for `plan`: kept ones where the same bytes were decoded to the same
        plan, else `decode()`'s, then kept."""
        key = _key(source, plan, seek)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        loaded = decode()
        self.misses += 1
        size = _size(loaded)
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = loaded
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self.bytes -= _size(old)
        return loaded


def _key(source, plan: MediaPlan, seek: str) -> bytes:
    from blake3 import blake3

    digest = blake3()
    with source.open() as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    digest.update(repr((plan.kind, plan.resized_width, plan.resized_height, plan.frame_indices, seek)).encode())
    return digest.digest(length=20)


def _size(loaded: Loaded) -> int:
    if loaded.frames is not None:
        return int(loaded.frames.nbytes)
    width, height = loaded.image.size
    return width * height * len(loaded.image.getbands())
