"""--quantize: the language model's weights as int8 (torchao, weight-only) while the vision tower
stays as it is; the weights' format and bytes in results and in `qvl inspect --model`; refusals."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torchao")  # the quantize extra; CI installs it with the test extra

FAST = ("--dtype", "float32", "--max-new-tokens", "16")


def _json(qvl, *args) -> dict:
    r = qvl(*args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_int8_weights_are_the_language_models_and_stay_near_float32(tiny_model, media_dir):
    """The language model's linear weights become int8 (torchao's tensors), the vision tower's stay
    float32; on each test picture the first token agrees with float32's and the logits there are
    within 10% (the tiny model's random weights: measured 1.4-4.9%, and 3 to all 16 greedy tokens
    agreeing; bench/RESULTS.md)."""
    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    full = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    small = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", quantize="int8"), Quiet())
    model = small.runner.model
    assert all(type(m.weight).__name__ != "Parameter" for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear))
    assert all(type(m.weight).__name__ == "Parameter" and m.weight.dtype == torch.float32
               for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear))
    gen = GenerationOptions(max_new_tokens=4, repeat_guard=False)
    for name in ("photo.png", "photo.jpg", "square.png", "anim.gif", "clip.mp4"):
        prepared = full.prepare((str(media_dir / name),), MediaOptions(), gen)
        [a], [b] = full.generate([prepared], gen), small.generate([prepared], gen)
        assert a.tokens[0] == b.tokens[0], name
        inputs = full.runner.inputs(prepared.text, list(prepared.loaded))
        with torch.inference_mode():
            want, got = full.runner.model(**inputs).logits[0, -1], model(**inputs).logits[0, -1]
        assert ((want - got).norm() / want.norm()).item() < 0.1, name


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

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    r = qvl("describe", photo, "--model", tiny_model, "--quantize", "int8")
    assert r.exit_code == 2 and r.stderr == "qvl: error: --quantize int8 needs torchao: pip install 'qwen2vl-cli[quantize]'\n"


def test_inspect_says_the_weights_format_and_bytes(qvl, tiny_model):
    r = qvl("inspect", "--model", tiny_model, "--json")
    weights = json.loads(r.stdout)["Weights"]
    assert weights["format"] == "float32" and weights["on disk"].endswith("KiB")
    assert set(weights) >= {"in memory, float32", "in memory, bfloat16"} and any(k.startswith("in memory, --quantize int8") for k in weights)
