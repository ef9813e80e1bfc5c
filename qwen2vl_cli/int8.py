"""--quantize int8 on a CPU, and the vision tower's weights kept at the checkpoint's bfloat16.

A step of batch-1 decoding reads every weight once, so its speed is the weights' bytes over the
memory's bandwidth. The language model's linear layers and the head are held as int8 (a scale a
row) and multiplied by q8.c, built with the machine's C compiler at first use and kept under the
user's cache directory: activations quantized per block of 32 (llama.cpp's Q8_0), the weights read
as one sequential stream per thread, near the memory's bandwidth. Written here because no library
torch installs does that for one row: fbgemm's int8 linear streams at about three quarters of it
and packs each weight at load (a sixth of a second each, 17 s for the 2B), torch's int8
weight-only kernels dequantize first.
Where q8.c cannot be built (no compiler, no AVX2), fbgemm's `quantized::linear_dynamic` runs
instead (Int8Linear), its rows grouped by magnitude (_by_magnitude).

The vision tower's matrix work is what its time is: it computes in float32, but a bfloat16
checkpoint's weights are kept as they are stored and widened a layer at a time (exact: widening
bfloat16 loses nothing), which halves the tower's memory and leaves its answers unchanged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl_cli import devices


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


SOURCE = Path(__file__).with_name("q8.c")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qvl" / "kernels"


def _tidy(kept: Path) -> None:
    """Builds of other sources or compilers, and scratch folders an interrupted build left over an
    hour ago, removed (a process still running one keeps its mapping)."""
    import shutil
    import time

    for old in kept.parent.iterdir():
        try:
            if old.name.startswith("q8-") and old.suffix == ".so" and old != kept:
                old.unlink()
            elif old.name.startswith("tmp") and old.is_dir() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """q8.c built for this machine (once; kept under the cache directory, named by the source's and
    the compiler's hash; older builds removed), or None where it cannot run: not Linux on x86-64,
    no AVX2, no C compiler ($CC, else cc, else gcc), or QVL_INT8_KERNEL=fbgemm. Built with OpenMP
    (with gcc, torch's own libgomp); every call passes torch's thread count."""
    if not devices.q8_wanted():
        return None
    compiler = devices.c_compiler()
    if compiler is None:
        named = os.environ.get("CC") or "cc"
        warnings.warn(f"--quantize int8: no C compiler ({named}) to build qvl's int8 kernel; fbgemm's runs instead (slower to load and to decode); install gcc")
        return None
    flags = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
        digest = hashlib.sha256(SOURCE.read_bytes() + version + " ".join(flags).encode()).hexdigest()[:16]
        built = _cache_dir() / f"q8-{digest}.so"
        if built.exists():
            lib = ctypes.CDLL(str(built))
        else:
            try:
                built.parent.mkdir(parents=True, exist_ok=True)
                scratch = tempfile.TemporaryDirectory(dir=built.parent)
            except OSError:  # a cache directory that cannot be written: built for this process alone
                built, scratch = None, tempfile.TemporaryDirectory()
            with scratch as folder:
                out = Path(folder) / "q8.so"
                done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise OSError(" ".join(done.stderr.split())[:200] or f"{compiler} exited with status {done.returncode}")
                if built is None:
                    lib = ctypes.CDLL(str(out))  # stays mapped once its file is gone
                else:
                    os.replace(out, built)  # whole or not at all: another process may be building it too
                    lib = ctypes.CDLL(str(built))
                    _tidy(built)
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"--quantize int8: qvl's int8 kernel did not build ({e}); fbgemm's runs instead (slower to load and to decode)")
        return None
    lib.q8_isa.restype = ctypes.c_int
    if lib.q8_isa() == 0:
        return None  # neither AVX-512 VNNI nor AVX2
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    lib.q8_pack.argtypes = [ctypes.c_int, P, ctypes.c_int, I64, I64, P, P, P]
    lib.q8_pack.restype = ctypes.c_int
    lib.q8_linear.argtypes = [ctypes.c_int, ctypes.c_int, P, I64, I64, P, P, P, P, P, I64]
    lib.q8_linear.restype = ctypes.c_int
    return lib


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


class Q8Linear(nn.Module):
    """A linear layer whose weight is int8 as q8.c lays it out; float32 in and out. `isa`: 2 for
    AVX-512 VNNI, 1 for AVX2 (the machine's best unless a test asks for the other)."""

    def __init__(self, linear: nn.Linear, lib: ctypes.CDLL, isa: int | None = None):
        super().__init__()
        if not self.fits(linear):
            raise ValueError(f"q8.c multiplies layers 64 to 65536 wide in multiples of 64, not {linear.in_features}")
        self.lib, self.isa = lib, isa or lib.q8_isa()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            weight = weight.float()
        weight = weight.contiguous()
        n, k = weight.shape
        self.packed = torch.empty(-(-n // 4) * 4, k, dtype=torch.int8)
        self.scale = torch.empty(n, dtype=torch.float32)
        self.sums = torch.empty(n, dtype=torch.int32)
        if lib.q8_pack(torch.get_num_threads(), weight.data_ptr(), int(weight.dtype == torch.bfloat16), n, k, self.packed.data_ptr(), self.scale.data_ptr(), self.sums.data_ptr()):
            raise MemoryError(f"int8 linear layer: no memory to pack a {n}x{k} weight")
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.held_bytes = self.packed.numel() + self.scale.numel() * 8 + (0 if self.bias is None else self.bias.numel() * 4)

    @staticmethod
    def fits(linear: nn.Module) -> bool:
        return isinstance(linear, nn.Linear) and linear.in_features % 64 == 0 and 0 < linear.in_features <= 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32)
        if flat.shape[0] == 0:
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        bias = None if self.bias is None else self.bias.data_ptr()
        if self.lib.q8_linear(torch.get_num_threads(), self.isa, flat.data_ptr(), flat.shape[0], self.in_features, self.packed.data_ptr(), self.scale.data_ptr(), self.sums.data_ptr(), bias, out.data_ptr(), self.out_features):
            raise MemoryError(f"int8 linear layer: no memory for {flat.shape[0]} rows' activations")
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the int8 weight with their scales (a tied embedding's lookup)."""
        chunks = self.packed.view(-1, self.in_features // 64, 4, 64)
        return chunks[ids // 4, :, ids % 4, :].reshape(*ids.shape, self.in_features), self.scale[ids]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (q8.c, {'AVX-512 VNNI' if self.isa == 2 else 'AVX2'})"


class SharedEmbedding(nn.Module):
    """Token embeddings read from the head's int8 rows (a model whose head is its embeddings)."""

    def __init__(self, head: Q8Linear, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.head = [head]  # not a submodule: the head is the model's, counted there
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, scale = self.head[0].rows(ids)
        return rows.to(self.dtype) * scale[..., None].to(self.dtype)


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
        self.register_buffer("weight", linear.weight.detach().to(stored), persistent=False)  # a view into the mapped file where it is stored so
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute), persistent=False)
        self.compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(self.compute), self.bias)


class _MappedFiles:
    """The weights files transformers mapped into memory (safetensors loads lazily): the pages a
    conversion has read are handed back to the kernel as it goes, so the load's peak is the
    converted model, not the file beside it. Dropping a clean page of a file mapping loses
    nothing (a later read faults it in again); a mapping with a written page (private: the page is
    an anonymous copy that would be lost) is left alone, as found when the conversion starts
    (nothing writes to the weights while they convert; /proc/self/smaps is read once, not at each
    release: it took 40 ms a read, half of a 2B's load). Linux only, elsewhere nothing is dropped."""

    EVERY = 128 << 20  # bytes converted between two releases

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
        if self.ranges:
            written = self._written()
            self.ranges = [(start, length) for start, length in self.ranges if written.get(start) == 0]

    def converted(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.EVERY:
            self.release()

    def release(self) -> None:
        """Drop the mappings' pages."""
        self.pending = 0
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


def _replace(root: nn.Module, kind: type, make, files: _MappedFiles | None, workers: int = 1) -> None:
    """Every `kind` module under root replaced by make(module), `workers` converted at a time, put
    in place in order."""
    found = [(name, m) for name, m in root.named_modules() if isinstance(m, kind) and name]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (name, module), made in zip(found, pool.map(lambda item: make(item[1]), found)):
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, made)
            if files is not None:
                files.converted(module.weight.numel() * module.weight.element_size())


def _int8_layer(lib: ctypes.CDLL | None):
    """The int8 layer this machine runs: q8.c's where it is built and the shape fits, else fbgemm's."""
    if lib is None:
        return Int8Linear
    return lambda linear: Q8Linear(linear, lib) if Q8Linear.fits(linear) else Int8Linear(linear)


def quantize_cpu(model: nn.Module, compute: torch.dtype, stored: torch.dtype, folder: Path | None = None) -> None:
    """In place: the language model's linear layers and the head int8, the token embeddings int8
    rows (the head's own where the model ties them), the vision tower's linear layers kept at the
    stored dtype (widened per call), everything else at the compute dtype. `folder`: where the
    weights files are (their mapped pages are dropped as they are converted)."""
    files = _MappedFiles(folder)
    lib = kernel()
    layer = _int8_layer(lib)
    text = model.model.language_model
    embedding = text.embed_tokens
    tied = isinstance(embedding, nn.Embedding) and embedding.weight.data_ptr() == model.lm_head.weight.data_ptr()
    model.lm_head = layer(model.lm_head)
    if tied and isinstance(model.lm_head, Q8Linear):
        text.embed_tokens = SharedEmbedding(model.lm_head, embedding, compute)
    elif isinstance(embedding, nn.Embedding):
        text.embed_tokens = Int8Embedding(embedding, compute)
    del embedding
    files.release()
    _replace(text, nn.Linear, layer, files, workers=1 if lib is not None else 2)  # q8.c packs on every core; fbgemm on one
    narrow = stored if stored.is_floating_point and torch.finfo(stored).bits < torch.finfo(compute).bits else compute
    _replace(model.model.visual, nn.Linear, lambda m: WidenedLinear(m, narrow, compute), files if narrow != stored else None, workers=2)
    for p in model.parameters():  # what is left: norms, the patch embedding (small)
        p.data = p.data.to(compute, copy=True)
    files.release()
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head holds the weights; the embeddings read them
