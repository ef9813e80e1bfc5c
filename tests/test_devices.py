"""Device, dtype and attention rules over capability tables (no GPU needed)."""

from __future__ import annotations

import pytest

from qwen2vl_cli.devices import Capabilities, choose_attn, choose_device, choose_dtype, usable_attn
from qwen2vl_cli.errors import UsageError

CPU = Capabilities(cpu_bf16=True)
OLD_CPU = Capabilities(cpu_bf16=False)
A100 = Capabilities(cuda=True, cuda_name="A100", cuda_capability=(8, 0), cuda_bf16=True, flash_attn=True)
A100_NO_FLASH = Capabilities(cuda=True, cuda_name="A100", cuda_capability=(8, 0), cuda_bf16=True, flash_attn=False)
T4 = Capabilities(cuda=True, cuda_name="Tesla T4", cuda_capability=(7, 5), cuda_bf16=False, flash_attn=True)
MAC = Capabilities(mps=True, cpu_bf16=True)


@pytest.mark.parametrize(
    "caps,device,dtype,attn",
    [
        (CPU, "cpu", "bfloat16", "sdpa"),
        (OLD_CPU, "cpu", "float32", "sdpa"),
        (A100, "cuda", "bfloat16", "flash_attention_2"),
        (A100_NO_FLASH, "cuda", "bfloat16", "sdpa"),
        (T4, "cuda", "float16", "sdpa"),
        (MAC, "mps", "float16", "sdpa"),
    ],
)
def test_auto_choices(caps, device, dtype, attn):
    d = choose_device("auto", caps)
    t = choose_dtype("auto", d, caps)
    assert (d, t, choose_attn("auto", d, t, caps)) == (device, dtype, attn)


@pytest.mark.parametrize(
    "caps,device,dtype,message",
    [
        (CPU, "cpu", "bfloat16", "needs a CUDA GPU"),
        (T4, "cuda", "float16", "Ampere or newer GPU (Tesla T4 is sm_75)"),
        (A100_NO_FLASH, "cuda", "bfloat16", "pip install 'qwen2vl-cli[flash]'"),
        (A100, "cuda", "float32", "not float32"),
    ],
)
def test_flash_attention_where_it_cannot_run_names_the_fix(caps, device, dtype, message):
    with pytest.raises(UsageError, match="use --attn sdpa") as err:
        choose_attn("flash_attention_2", device, dtype, caps)
    assert message in str(err.value)


def test_explicit_choices_and_missing_devices():
    assert choose_attn("eager", "cpu", "float32", CPU) == "eager"
    assert choose_attn("flash_attention_2", "cuda", "bfloat16", A100) == "flash_attention_2"
    assert choose_dtype("float32", "cuda", A100) == "float32"
    with pytest.raises(UsageError, match="no CUDA GPU"):
        choose_device("cuda", CPU)
    with pytest.raises(UsageError, match="Metal"):
        choose_device("mps", CPU)
    assert usable_attn("cuda", "bfloat16", A100) == ["flash_attention_2", "sdpa", "eager"]
    assert usable_attn("cpu", "bfloat16", CPU) == ["sdpa", "eager"]
