"""--quantize int8 on a CPU, and the vision tower's weights kept at the checkpoint's bfloat16.

A step of batch-1 decoding reads every weight once, so its speed is the weights' bytes over the
memory's bandwidth. The language model's linear layers are held as int8 (a scale a row), packed
for fbgemm, PyTorch's x86 int8 matrix library: `quantized::linear_dynamic` quantizes the
activations on the fly (per call, as llama.cpp's Q8_0 does per block) and multiplies int8 by int8,
at the memory's speed (torch's int8 weight-only kernels dequantize first and run at a quarter of
float32's on x86). Several rows (a prefill, a batch) go in groups of like magnitude, so no
row's activations are quantized much coarser than alone (_by_magnitude).

The vision tower's matrix work is what its time is: it computes in float32, but a bfloat16
checkpoint's weights are kept as they are stored and widened a layer at a time (exact: widening
bfloat16 loses nothing), which halves the tower's memory and leaves its answers unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _vnni() -> bool:
    """Whether the CPU multiplies int8 into 32-bit sums (AVX-512 VNNI, AVX-VNNI). Without it
    fbgemm's AVX2 kernel adds pairs of products in 16 bits, which saturate unless activations
    take 7 bits (reduce_range, PyTorch's default), at twice the rounding error (1.6% against 0.9%
    of a 1536-wide layer's output; the int8 weights alone 0.4%)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


REDUCE = not _vnni()  # quantized::linear_dynamic's reduce_range


def available() -> bool:
    """Whether this torch has fbgemm's dynamic int8 linear (x86 builds do)."""
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


def _int8_rows(weight: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale a row (an output channel, or an embedding's token), a chunk
    of rows at a time (a float32 copy of a whole head would be a gigabyte)."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk):
        w = weight[start : start + chunk].to(torch.float32, copy=True)
        s = (w.abs().amax(dim=1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
        q[start : start + chunk] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[start : start + chunk] = s
    return q, scale


def _by_magnitude(rows: torch.Tensor, packed, out_features: int) -> torch.Tensor:
    """fbgemm quantizes a call's input with one scale, so rows are multiplied in groups whose
    largest magnitudes are within a factor of two: a row's scale is at most twice its own (a bit
    of its eight), and a token with outliers (Qwen's first tokens carry activations thousands of
    times the others') does not flatten the rest to zero."""
    group = torch.frexp(rows.abs().amax(dim=1)).exponent
    out = rows.new_empty(rows.shape[0], out_features)
    for g in torch.unique(group).tolist():
        index = (group == g).nonzero().squeeze(1)
        out[index] = torch.ops.quantized.linear_dynamic(rows.index_select(0, index), packed, REDUCE)
    return out


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 packed for fbgemm; float32 in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _int8_rows(linear.weight)
        with warnings.catch_warnings():  # torch's note that quantized tensors are deprecated: fbgemm's packing takes one
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(quantized, bias)
        self.bias = bias
        self.held_bytes = q.numel() + scale.numel() * 4 + (0 if bias is None else bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] == 1:
            out = torch.ops.quantized.linear_dynamic(flat, self._packed, REDUCE)
        else:
            out = _by_magnitude(flat, self._packed, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm)"


class Int8Embedding(nn.Module):
    """Token embeddings as int8 rows with a scale each, looked up and widened."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        q, scale = _int8_rows(embedding.weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_int8[ids].to(self.dtype) * self.scale[ids, None].to(self.dtype))


class WidenedLinear(nn.Module):
    """A linear layer whose weight is stored at a narrower dtype and widened for each call."""

    def __init__(self, linear: nn.Linear, stored: torch.dtype, compute: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(stored, copy=True), persistent=False)  # a copy: not a view into the mapped file
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute), persistent=False)
        self.compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(self.compute), self.bias)


class _MappedFiles:
    """The weights files transformers mapped into memory (safetensors loads lazily): the pages a
    conversion has read are handed back to the kernel as it goes, so the load's peak is the
    converted model, not the file beside it. Dropping a clean page of a file mapping loses
    nothing (a later read faults it in again); Linux only, elsewhere nothing is dropped."""

    EVERY = 64 << 20  # bytes converted between two releases

    def __init__(self, folder: Path | None):
        self.ranges: list[tuple[int, int]] = []
        self.pending = 0
        if folder is None or not sys.platform.startswith("linux"):
            return
        try:
            files = {os.path.realpath(f) for f in folder.glob("*.safetensors")}  # a hub snapshot's are links to its blobs
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() in files:
                        start, end = (int(v, 16) for v in fields[0].split("-"))
                        self.ranges.append((start, end - start))
            self.libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            self.ranges = []

    def converted(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.EVERY:
            self.release()

    def release(self) -> None:
        """Drop the mappings' pages, where none was written to (the mapping is private: a written
        page is an anonymous copy that would be lost, so a mapping with one is left alone from
        then on)."""
        self.pending = 0
        if self.ranges:
            written = self._written()
            self.ranges = [(start, length) for start, length in self.ranges if written.get(start) == 0]
        for start, length in self.ranges:
            self.libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4)  # MADV_DONTNEED

    def _written(self) -> dict[int, int]:
        """Each mapping's anonymous kB (pages written to, copied), from /proc/self/smaps."""
        ours, found, current = {start for start, _ in self.ranges}, {}, None
        try:
            with open("/proc/self/smaps") as smaps:
                for line in smaps:
                    if "-" in line.split(" ", 1)[0] and line[0] in "0123456789abcdef":
                        start = int(line.split("-", 1)[0], 16)
                        current = start if start in ours else None
                    elif current is not None and line.startswith("Anonymous:"):
                        found[current] = int(line.split()[1])
        except OSError:
            return {}
        return found


def _replace(root: nn.Module, kind: type, make, files: _MappedFiles) -> None:
    """Every `kind` module under root replaced by make(module), two converted at a time (packing
    for fbgemm runs on one core) and put in place in order."""
    found = [(name, m) for name, m in root.named_modules() if isinstance(m, kind) and name]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for (name, module), made in zip(found, pool.map(lambda item: make(item[1]), found)):
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, made)
            files.converted(module.weight.numel() * module.weight.element_size())


def quantize_cpu(model: nn.Module, compute: torch.dtype, stored: torch.dtype, folder: Path | None = None) -> None:
    """In place: the language model's linear layers and the head int8 (fbgemm), the token
    embeddings int8 rows, the vision tower's linear layers kept at the stored dtype (widened per
    call), everything else at the compute dtype. `folder`: where the weights files are (their
    mapped pages are dropped as they are converted)."""
    files = _MappedFiles(folder)
    text = model.model.language_model
    if isinstance(text.embed_tokens, nn.Embedding):
        text.embed_tokens = Int8Embedding(text.embed_tokens, compute)
    model.lm_head = Int8Linear(model.lm_head)
    files.release()
    _replace(text, nn.Linear, Int8Linear, files)
    narrow = stored if stored.is_floating_point and torch.finfo(stored).bits < torch.finfo(compute).bits else compute
    _replace(model.model.visual, nn.Linear, lambda m: WidenedLinear(m, narrow, compute), files)
    for p in model.parameters():  # what is left: norms, the patch embedding (small)
        p.data = p.data.to(compute, copy=True)
    files.release()
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head is its own int8 copy now
