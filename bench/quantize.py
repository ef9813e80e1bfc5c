"""Smaller weights on the CPU: `qvl describe` of the 1280x720 sample photo (252 visual tokens at the
CPU's default size) on Qwen2-VL-2B's shapes with random weights (bench/throughput.py builds them
once), float32 and bfloat16 against `--quantize int8` (int8.py: fbgemm) with either as the
activations' dtype, each a whole process: wall, load,
vision, prefill, decode tokens/s, peak RSS and the weights' bytes. The modes alternate, round
after round, in one sitting. Then int8's quality on the tiny test model: the logits' error and
the greedy tokens that agree with float32's, per test medium.

llama.cpp on the same random weights (f16, Q8_0, Q4_K_M) was measured on this machine kind on
2026-12-01 (the issue's table); those numbers stand beside these for the targets, labelled as such.

Usage: python bench/quantize.py [--rounds 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from results import machine, publish, spread  # noqa: E402
from throughput import model_dir  # noqa: E402

MODES = {  # the activations' dtype; int8's layers take float32 in either (int8.py)
    "float32, static": ["--dtype", "float32"],
    "int8, static": ["--dtype", "float32", "--quantize", "int8"],
    "bfloat16, static": ["--dtype", "bfloat16"],
    "int8 + bfloat16, static": ["--dtype", "bfloat16", "--quantize", "int8"],
}
# llama.cpp's llama-mtmd-cli (commit 0c1e570, CPU, 2 threads) on the same random 2B weights, one
# 1280x720 photo at 252 visual tokens, 64 new tokens: measured 2026-12-01 (a quiet round).
LLAMA_CPP = {"f16": (29.7, 6.22, 4.6), "Q8_0": (28.7, 11.11, 3.2), "Q4_K_M": (26.7, 14.99, 3.1)}  # whole run s, decode tok/s, peak GB


def run(model: Path, extra: list[str], tokens: int) -> dict:
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", str(ROOT / "samples" / "photo.jpg"), "--model", str(model), "--device", "cpu",
           "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens), "--no-repeat-guard", "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-300:])
    result = json.loads(done.stdout)  # peak_memory_bytes: the process's own peak RSS
    return {"wall": wall, "load": result["load_s"], "vision": result["vision_s"], "prefill": result["prefill_s"],
            "decode": result["decode_tokens_per_s"], "compile": result["compile_s"], "peak": result["peak_memory_bytes"],
            "weights": result["weights_bytes"]}


def cpu_features() -> str:
    """The instruction sets int8 and bfloat16 speed depend on, as /proc/cpuinfo lists them."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return "CPU features unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return "CPU with " + (", ".join(have) or "none of AVX2, AVX-512, VNNI, AMX")


def quality(tokens: int = 16) -> list[str]:
    """float32 against int8 on the tiny model, each test medium: the last logits' relative error
    and how many of the first `tokens` greedy tokens agree."""
    import tempfile

    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet
    from tests.media_factory import make_all

    tiny = model_dir("tiny")
    full = LocalBackend(RuntimeOptions(str(tiny), device="cpu", dtype="float32"), Quiet())
    small = LocalBackend(RuntimeOptions(str(tiny), device="cpu", dtype="float32", quantize="int8"), Quiet())
    gen = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repeat_guard=False)
    rows = ["| medium | logits' relative error | greedy tokens agreeing |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        make_all(Path(folder))
        for name in ("photo.png", "photo.jpg", "square.png", "anim.gif", "clip.mp4"):
            prepared = full.prepare((str(Path(folder) / name),), MediaOptions(), gen)
            [a], [b] = full.generate([prepared], gen), small.generate([prepared], gen)
            agree = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), tokens)
            inputs = full.runner.inputs(prepared.text, list(prepared.loaded))
            with torch.inference_mode():
                want, got = full.runner.model(**inputs).logits[0, -1], small.runner.model(**inputs).logits[0, -1]
            rows.append(f"| {name} | {((want - got).norm() / want.norm()).item():.1%} | {agree} of {tokens} |")
    return rows


def quality_2b(model: Path, tokens: int = 16) -> str:
    """float32 against int8 on the 2B's shapes, the sample photo: the last logits' relative error
    and the greedy tokens (ids) that agree, one model in memory at a time."""
    import gc

    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    gen = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repeat_guard=False)
    got = []
    for quantize in ("none", "int8"):
        backend = LocalBackend(RuntimeOptions(str(model), device="cpu", dtype="float32", quantize=quantize), Quiet())
        prepared = backend.prepare((str(ROOT / "samples" / "photo.jpg"),), MediaOptions(), gen)
        [result] = backend.generate([prepared], gen)
        with torch.inference_mode():
            logits = backend.runner.model(**backend.runner.inputs(prepared.text, list(prepared.loaded))).logits[0, -1].clone()
        got.append((result.tokens, logits))
        del backend, prepared
        gc.collect()
    (a, want), (b, have) = got
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), tokens)
    return (f"On the 2B's shapes (random weights, the sample photo's prompt): the last logits' relative error "
            f"{((want - have).norm() / want.norm()).item():.1%}, {agree} of {tokens} greedy tokens agreeing.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = model_dir("2b")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        order = list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            r = run(model, MODES[mode], args.tokens)
            runs[mode].append(r)
            print(f"round {round_ + 1} {mode:16s} wall {r['wall']:6.1f} s  decode {r['decode']:.2f} tok/s  peak {r['peak'] / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)
    gb = lambda values: spread([v / 1e9 for v in values], 2, " GB")  # noqa: E731
    lines = [
        "## Smaller weights on the CPU (`bench/quantize.py`)",
        "",
        f"Machine: {machine()}; {cpu_features()}. Command: `python bench/quantize.py --rounds {args.rounds} --tokens {args.tokens}`. Qwen2-VL-2B's shapes, "
        f"random weights (bf16 on disk), `qvl describe samples/photo.jpg` (1280x720, 252 visual tokens), {args.tokens} new tokens, "
        "each mode a whole process, the modes alternated; median (min-max).",
        "",
        "| qvl | whole run | load | vision | prefill | compile | decode | peak RSS | weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, got in runs.items():
        compile_s = [r["compile"] for r in got if r["compile"] is not None]
        lines.append(f"| {mode} | {spread([r['wall'] for r in got], 1, ' s')} | {spread([r['load'] for r in got], 1, ' s')} | "
                     f"{spread([r['vision'] for r in got], 1, ' s')} | {spread([r['prefill'] for r in got], 1, ' s')} | "
                     f"{spread(compile_s, 1, ' s') if compile_s else '-'} | {spread([r['decode'] for r in got], 2, ' tok/s')} | "
                     f"{gb([r['peak'] for r in got])} | {got[0]['weights'] / 1e9:.2f} GB |")
    lines += ["", "llama.cpp on the same random weights (llama-mtmd-cli, 2 threads; measured 2026-12-01 on this machine kind, not in "
              "this sitting):", "", "| llama.cpp | whole run | decode | peak RSS |", "|---|---|---|---|"]
    lines += [f"| {name} | {wall} s | {rate} tok/s | {peak} GB |" for name, (wall, rate, peak) in LLAMA_CPP.items()]
    lines += ["", quality_2b(model), "",
              "On the tiny test model (random weights, 64 wide: errors compound through its layers):", "", *quality()]
    best = min(runs.items(), key=lambda kv: statistics.median(r["wall"] for r in kv[1]))
    q8_wall, q8_rate, q8_peak = LLAMA_CPP["Q8_0"]
    int8 = runs["int8, static"]
    med = lambda key: statistics.median(r[key] for r in int8)  # noqa: E731
    lines += [
        "",
        f"Against the targets (llama.cpp Q8_0: {q8_peak} GB, {q8_rate} tok/s, {q8_wall} s): qvl int8 static peak RSS "
        f"{med('peak') / 1e9:.2f} GB ({med('peak') / 1e9 / q8_peak:.2f}x, target <= 1.2x), decode {med('decode'):.2f} tok/s "
        f"({med('decode') / q8_rate:.2f}x, target >= 1x), whole run {med('wall'):.1f} s ({med('wall') / q8_wall:.2f}x, target <= 1x), "
        f"load {med('load'):.1f} s (target <= 3 s). Fastest whole run here: {best[0]}.",
    ]
    publish(lines)


if __name__ == "__main__":
    main()
