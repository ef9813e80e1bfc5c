"""Device, dtype and attention choice: pure rules over detected capabilities."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from qwen2vl_cli.errors import UsageError

DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTNS = ("auto", "flash_attention_2", "sdpa", "eager")
ENGINES = ("auto", "static", "compiled", "graph", "hf")
QUANTIZE = ("none", "int8", "int4")
QUANTIZE_HINT = "pip install 'qwen2vl-cli[quantize]'"
FLASH_HINT = "pip install 'qwen2vl-cli[flash]'"


@dataclass(frozen=True)
class Capabilities:
    cuda: bool = False
    cuda_name: str | None = None
    cuda_capability: tuple[int, int] | None = None
    cuda_bf16: bool = False
    mps: bool = False
    cpu_bf16: bool = False
    flash_attn: bool = False


def detect() -> Capabilities:
    import torch

    cuda = torch.cuda.is_available()
    name = capability = None
    bf16 = False
    if cuda:
        name = torch.cuda.get_device_name(0)
        capability = tuple(torch.cuda.get_device_capability(0))
        bf16 = torch.cuda.is_bf16_supported()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Capabilities(cuda, name, capability, bf16, mps, _cpu_has_fast_bf16(), flash_attn_importable())


def _cpu_has_fast_bf16() -> bool:
    """bfloat16 matmuls in oneDNN (AVX-512 BF16, AMX, ...). Without them bf16 is emulated: on an
    AVX2 CPU the 2B's vision tower and prefill ran 5x slower than in float32 (decode 1.7x faster)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except Exception:
        return False


def choose_device(requested: str, caps: Capabilities) -> str:
    if requested == "auto":
        return "cuda" if caps.cuda else "mps" if caps.mps else "cpu"
    if requested == "cuda" and not caps.cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if requested == "mps" and not caps.mps:
        raise UsageError("--device mps: Apple's Metal backend is not available here; use --device cpu (or auto)")
    return requested


def choose_dtype(requested: str, device: str, caps: Capabilities) -> str:
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bfloat16" if caps.cuda_bf16 else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16" if caps.cpu_bf16 else "float32"


def flash_problem(device: str, dtype: str, caps: Capabilities) -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if device != "cuda":
        return f"flash_attention_2 needs a CUDA GPU (the device is {device})"
    major, minor = caps.cuda_capability or (0, 0)
    if major < 8:
        return f"flash_attention_2 needs an Ampere or newer GPU ({caps.cuda_name} is sm_{major}{minor})"
    if not caps.flash_attn:
        return f"flash-attn is not installed ({FLASH_HINT})"
    if dtype == "float32":
        return "flash_attention_2 runs in bfloat16 or float16, not float32"
    return None


def choose_attn(requested: str, device: str, dtype: str, caps: Capabilities) -> str:
    if requested == "auto":
        return "flash_attention_2" if flash_problem(device, dtype, caps) is None else "sdpa"
    if requested == "flash_attention_2":
        problem = flash_problem(device, dtype, caps)
        if problem:
            raise UsageError(f"--attn flash_attention_2: {problem}; use --attn sdpa")
    return requested


def usable_attn(device: str, dtype: str, caps: Capabilities) -> list[str]:
    names = ["sdpa", "eager"]
    if flash_problem(device, dtype, caps) is None:
        names.insert(0, "flash_attention_2")
    return names


def choose_engine(requested: str, attn: str, device: str = "cpu") -> str:
    """static: qvl's loop over a static cache (decode.py); compiled: the same, its step compiled by
    inductor (and on CUDA replayed as a CUDA graph); graph: the eager step replayed as a CUDA graph;
    hf: transformers' generate, the reference. The loop builds its own attention masks, which
    flash_attention_2 does not take. auto: graph on CUDA (capturing costs milliseconds, and a
    capture whose replay does not match the step runs as static), static elsewhere."""
    if requested == "auto":
        return "hf" if attn == "flash_attention_2" else "graph" if device == "cuda" else "static"
    if requested in ("static", "compiled", "graph") and attn == "flash_attention_2":
        raise UsageError(f"--engine {requested} runs with --attn sdpa or eager; with flash_attention_2 use --engine hf")
    if requested == "graph" and device != "cuda":
        raise UsageError(f"--engine graph replays CUDA graphs: it needs --device cuda (the device is {device}); use --engine static")
    if requested == "compiled" and device not in ("cuda", "cpu"):
        raise UsageError(f"--engine compiled runs on cuda or cpu (the device is {device}); use --engine static")
    return requested


def q8_wanted() -> bool:
    """Whether int8.py's own kernel (q8.c) is for this run: Linux on x86-64, and not
    QVL_INT8_KERNEL=fbgemm."""
    import os
    import platform
    import sys

    chosen = os.environ.get("QVL_INT8_KERNEL", "").strip().lower() != "fbgemm"
    return chosen and sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def c_compiler() -> str | None:
    """The C compiler q8.c is built with: $CC, else cc, else gcc."""
    import os
    import shutil

    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def q8_expected() -> bool:
    """Whether --quantize int8 on this CPU would run q8.c (as far as can be told without building it)."""
    return q8_wanted() and c_compiler() is not None


def int8_on_cpu(quantize: str, device: str) -> bool:
    """Whether --quantize runs as int8.py's layers: int8 on an x86 CPU (q8.c, or fbgemm where it
    cannot be built; torch's x86 builds have fbgemm)."""
    if quantize != "int8" or device != "cpu":
        return False
    from qwen2vl_cli import int8

    return int8.available()


def check_quantize(requested: str, device: str) -> str:
    """Quantization of the language model: int8 on an x86 CPU with int8.py (q8.c, or fbgemm);
    elsewhere torchao's weight-only int8 (CPU, CUDA) and int4 (CUDA: torchao's int4 kernels are
    CUDA's; its CPU layout needs a CPU build torch does not ship for every processor)."""
    if requested == "none":
        return requested
    import importlib.util

    if int8_on_cpu(requested, device):
        return requested  # q8.c or fbgemm: nothing to install
    if importlib.util.find_spec("torchao") is None:
        raise UsageError(f"--quantize {requested} needs torchao: {QUANTIZE_HINT}")
    if requested == "int4" and device != "cuda":
        raise UsageError(f"--quantize int4 runs on CUDA (the device is {device}); on this device use --quantize int8")
    if device == "mps":
        raise UsageError("--quantize runs on cuda or cpu (the device is mps); use --quantize none")
    return requested
