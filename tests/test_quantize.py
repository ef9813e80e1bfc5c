"""--quantize: on a CPU the language model's weights, head and embeddings as int8 (int8.py)
while the vision tower keeps the checkpoint's precision; the weights' format and bytes in results
and in `qvl inspect --model`; the load's peak; refusals."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

FAST = ("--dtype", "float32", "--max-new-tokens", "16")


def _json(qvl, *args) -> dict:
    r = qvl(*args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_int8_weights_are_the_language_models_and_stay_near_float32(tiny_model, media_dir):
    """The language model's linear layers and the head become fbgemm's int8, the embeddings int8
    rows, the vision tower's linear layers keep the checkpoint's float32. A layer's output is
    within 2.5% of float32's; through the tiny model's random 64-wide layers the errors compound
    (measured 2-15% on the last logits, 0 to 11 of 16 greedy tokens agreeing, as chaotic with
    torchao's weight-only int8; bench/RESULTS.md), so the whole model is held to 25%, which a
    wrong scale or a scrambled packing is far past."""
    import torch

    from qwen2vl_cli import int8
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    torch.manual_seed(0)
    layer = torch.nn.Linear(1536, 1536)
    x = torch.randn(1, 1536)
    with torch.inference_mode():
        assert ((int8.Int8Linear(layer)(x) - layer(x)).norm() / layer(x).norm()).item() < 0.025  # 0.9%, 1.6% without VNNI
    full = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    small = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", quantize="int8"), Quiet())
    model = small.runner.model
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, int8.Int8Linear) for m in model.modules()) == 7 * model.config.text_config.num_hidden_layers + 1
    assert isinstance(model.model.language_model.embed_tokens, int8.Int8Embedding)
    assert all(m.weight.dtype == torch.float32 for m in model.model.visual.modules() if isinstance(m, int8.WidenedLinear))
    gen = GenerationOptions(max_new_tokens=4, repeat_guard=False)
    for name in ("photo.png", "photo.jpg", "square.png", "anim.gif", "clip.mp4"):
        prepared = full.prepare((str(media_dir / name),), MediaOptions(), gen)
        inputs = full.runner.inputs(prepared.text, list(prepared.loaded))
        with torch.inference_mode():
            want, got = full.runner.model(**inputs).logits[0, -1], model(**inputs).logits[0, -1]
        assert ((want - got).norm() / want.norm()).item() < 0.25, name


def test_rows_of_unlike_magnitude_keep_their_precision():
    """fbgemm quantizes a call's input with one scale: a token whose activations are a thousand
    times the others' (Qwen's first tokens have such) must not flatten the rest to zero."""
    import torch

    from qwen2vl_cli import int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    quantized = int8.Int8Linear(linear)
    x = torch.randn(40, 256) * torch.exp(torch.randn(40, 1))
    x[0] *= 1000
    with torch.inference_mode():
        want, got = linear(x), quantized(x)
        alone = torch.cat([quantized(row[None]) for row in x])
    error = lambda out: ((out - want).norm(dim=1) / want.norm(dim=1)).max().item()  # noqa: E731
    assert error(alone) < 0.04 and error(got) < 0.06  # a row's scale at most twice its own


def test_the_loads_mapped_pages_are_handed_back(tmp_path):
    """transformers maps the weights file; the pages a conversion read are dropped as it goes, so
    the load's peak is the converted model, not the file beside it (RssFile read around it)."""
    import ctypes

    import torch
    from safetensors.torch import load_file, save_file

    from qwen2vl_cli import int8

    def file_kib() -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:"))

    if not sys.platform.startswith("linux"):
        pytest.skip("RssFile is Linux's")
    save_file({"w": torch.randn(4096, 4096)}, tmp_path / "model.safetensors")  # 64 MiB
    weights = load_file(tmp_path / "model.safetensors")  # copied, so the mapping below is this test's own
    import mmap

    with open(tmp_path / "model.safetensors", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    files = int8._MappedFiles(tmp_path)
    before = file_kib()
    assert sum(mapped[i] for i in range(0, len(mapped), 4096)) >= 0  # every page read in
    touched = file_kib()
    files.release()
    after = file_kib()
    assert touched - before > 60_000 and touched - after > 60_000
    assert mapped[-4096:] == weights["w"].numpy().tobytes()[-4096:]  # a dropped page reads back from the file
    mapped.close()
    with open(tmp_path / "model.safetensors", "rb") as f:
        written = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, as torch maps it
    written[-1:] = b"!" if written[-1:] != b"!" else b"?"
    kept = written[-1:]
    files = int8._MappedFiles(tmp_path)
    address = ctypes.addressof(ctypes.c_char.from_buffer(written))
    assert address in [start for start, _ in files.ranges]
    files.release()
    assert written[-1:] == kept and address not in [start for start, _ in files.ranges]  # a page written to is never dropped
    del address
    written.close()


def test_int8_through_describe_video_and_each(qvl, tiny_model, media_dir):
    full = _json(qvl, "describe", media_dir / "photo.png", "--model", tiny_model, *FAST)
    small = _json(qvl, "describe", media_dir / "photo.png", "--model", tiny_model, *FAST, "--quantize", "int8")
    assert (full["weights"], small["weights"]) == ("float32", "int8")
    assert small["weights_bytes"] < 0.75 * full["weights_bytes"]  # the tiny model's tower and embeddings stay float32
    video = _json(qvl, "video", media_dir / "clip.mp4", "--model", tiny_model, *FAST, "--quantize", "int8")
    assert video["weights"] == "int8" and video["generated_tokens"] > 0
    r = qvl("describe", "--each", media_dir / "photo.png", media_dir / "anim.gif", "--model", tiny_model, *FAST, "--quantize", "int8")
    assert r.exit_code == 0 and [json.loads(line)["weights"] for line in r.stdout.splitlines()] == ["int8", "int8"]


def test_serve_quantized(tiny_model):
    import requests

    from tests.helpers import start_server

    proc, url = start_server(tiny_model, "--quantize", "int8")
    try:
        r = requests.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_quantize_refusals_are_one_line(qvl, tiny_model, media_dir, tmp_path, monkeypatch):
    photo = media_dir / "photo.png"
    r = qvl("describe", photo, "--model", tiny_model, "--quantize", "int4")
    assert r.exit_code == 2 and r.stderr == "qvl: error: --quantize int4 runs on CUDA (the device is cpu); on this device use --quantize int8\n"
    r = qvl("describe", photo, "--model", tiny_model, "--quantize", "int8", "--engine", "compiled")
    assert r.exit_code == 2 and r.stderr == ("qvl: error: --engine compiled does not take --quantize int8 on a CPU (torch's quantized int8 kernels "
                                             "are opaque to the compiler); use --engine static\n")
    r = qvl("describe", photo, "--model", tiny_model, "--quantize", "int3")
    assert r.exit_code == 2 and "--quantize int3: choose one of none, int8, int4" in r.stderr
    awq = tmp_path / "awq"
    shutil.copytree(tiny_model, awq)
    config = json.loads((awq / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    r = qvl("describe", photo, "--model", awq, "--quantize", "int8")
    assert r.exit_code == 1 and f"--quantize int8: {awq} is already quantized (awq); drop --quantize" in r.stderr
    summary = qvl("inspect", "--model", awq, "--json")
    assert summary.exit_code == 0 and json.loads(summary.stdout)["Weights"]["format"] == "awq"
    import importlib.util

    from qwen2vl_cli import devices
    from qwen2vl_cli.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert devices.check_quantize("int8", "cpu") == "int8"  # torch's own kernels: no extra on an x86 CPU
    with pytest.raises(UsageError, match=r"^--quantize int8 needs torchao: pip install 'qwen2vl-cli\[quantize\]'$"):
        devices.check_quantize("int8", "cuda")


def test_inspect_says_the_weights_format_and_bytes(qvl, tiny_model):
    r = qvl("inspect", "--model", tiny_model, "--json")
    weights = json.loads(r.stdout)["Weights"]
    assert weights["format"] == "float32" and weights["on disk"].endswith("KiB")
    assert set(weights) >= {"in memory, float32", "in memory, bfloat16"} and any(k.startswith("in memory, --quantize int8") for k in weights)
