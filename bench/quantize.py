"""Smaller weights on the CPU: `qvl describe` of the 1280x720 sample photo (252 visual tokens at the
CPU's default size) on Qwen2-VL-2B's shapes with random weights (bench/throughput.py builds them
once): float32, bfloat16 and `--quantize int8` (q8.c; and fbgemm's kernel, what int8 ran on
before, with QVL_INT8_KERNEL=fbgemm), each a whole process: wall, load, vision, prefill, decode
tokens/s, peak RSS and the weights' bytes. With --llama-cpp, llama.cpp's llama-mtmd-cli on the same
weights converted with its own converter (f16, Q8_0, Q4_K_M), the same photo at the same visual
token budget, threads and new tokens: built from source in bench/clips/llama.cpp (the source of
llama.cpp that the llama-cpp-python release below vendors, fetched from the package index; a note
instead of its rows where it cannot be fetched or built). The tools alternate, round after round,
in one sitting. Then int8's quality: the logits' error and the greedy tokens that agree with
float32's, on the 2B's shapes and per test medium on the tiny model.

Usage: python bench/quantize.py [--rounds 2] [--tokens 64] [--llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from results import machine, publish, spread  # noqa: E402
from throughput import model_dir  # noqa: E402

MODES = {  # extra arguments, extra environment
    "float32": (["--dtype", "float32"], {}),
    "bfloat16": (["--dtype", "bfloat16"], {}),
    "int8": (["--quantize", "int8"], {}),
    "int8, fbgemm (before)": (["--quantize", "int8"], {"QVL_INT8_KERNEL": "fbgemm"}),
}
LLAMA_CPP_PYTHON = "0.3.36"  # its source release vendors llama.cpp at commit 0c1e570
LLAMA = HERE / "clips" / "llama.cpp"
QUANTS = ("f16", "Q8_0", "Q4_K_M")
PROMPT = "Describe this image."  # qvl's default for one image
VISUAL_TOKENS = 252  # qvl's for the photo at the CPU's default size
THREADS = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True, text=True).stdout or 2)  # qvl's


def run(model: Path, extra: list[str], env: dict, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", str(ROOT / "samples" / "photo.jpg"), "--model", str(model), "--device", "cpu",
           "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens), "--no-repeat-guard", "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-300:])
    result = json.loads(done.stdout)  # peak_memory_bytes: the process's own peak RSS
    return {"wall": wall, "load": result["load_s"], "vision": result["vision_s"], "prefill": result["prefill_s"],
            "decode": result["decode_tokens_per_s"], "compile": result["compile_s"], "peak": result["peak_memory_bytes"],
            "weights": result["weights_bytes"]}


def _flags() -> list[str]:
    try:
        return next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return []


def build_llama_cpp() -> Path | str:
    """llama-mtmd-cli and llama-quantize built in bench/clips/llama.cpp (once), or why not. The
    instruction sets are named from /proc/cpuinfo rather than -march=native: AMX stays off (its
    tiles need a permission some virtual machines refuse: SIGILL in ggml's AMX matmul here)."""
    source, bin_dir = LLAMA / "src", LLAMA / "src" / "build" / "bin"
    if (bin_dir / "llama-mtmd-cli").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    missing = [tool for tool in ("cmake", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        return f"llama.cpp not built: no {', '.join(missing)} here"
    LLAMA.mkdir(parents=True, exist_ok=True)
    if not (source / "CMakeLists.txt").exists():
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(LLAMA),
                                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
        archives = sorted(LLAMA.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if fetched.returncode != 0 or not archives:
            return f"llama.cpp not built: its source did not download ({fetched.stderr.strip()[-200:]})"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            archive.extractall(source, members=members, filter="data")
    flags = set(_flags())
    isa = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2", "GGML_AVX512": "avx512f",
           "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
    options = [f"-D{name}={'ON' if flag in flags else 'OFF'}" for name, flag in isa.items()]
    steps = [["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
              "-DGGML_AMX_BF16=OFF", *options],
             ["cmake", "--build", str(source / "build"), "-j", str(os.cpu_count() or 2), "--target", "llama-mtmd-cli", "llama-quantize"]]
    print("building llama.cpp (minutes) ...", file=sys.stderr, flush=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return f"llama.cpp not built: {' '.join(step[:2])} failed ({(done.stderr or done.stdout).strip()[-200:]})"
    return bin_dir


CONVERT = """import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the random model's tokenizer has Qwen2's layout, not its hash
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(bin_dir: Path, model: Path) -> dict[str, Path] | str:
    """The model as GGUF files (f16, Q8_0, Q4_K_M and the f16 vision projector), made once with
    llama.cpp's converter and quantizer, or why not."""
    out = LLAMA / "gguf"
    files = {q: out / f"model-{q}.gguf" for q in QUANTS} | {"mmproj": out / "mmproj-f16.gguf"}
    if all(f.exists() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    pylib = LLAMA / "pylib"
    if not (pylib / "sentencepiece").exists():  # the converter imports it for Qwen's vocabulary
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(pylib), "sentencepiece"], capture_output=True)
    (LLAMA / "convert.py").write_text(CONVERT)
    env = {**os.environ, "PYTHONPATH": str(pylib)}
    source = LLAMA / "src"
    for target, extra in ((files["f16"], []), (files["mmproj"], ["--mmproj"])):
        if not target.exists():
            done = subprocess.run([sys.executable, str(LLAMA / "convert.py"), str(source), str(model), *extra, "--outtype", "f16",
                                   "--outfile", str(target)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return f"llama.cpp's converter failed ({done.stderr.strip()[-200:]})"
    for q in QUANTS[1:]:
        if not files[q].exists():
            done = subprocess.run([str(bin_dir / "llama-quantize"), str(files["f16"]), str(files[q]), q], capture_output=True, text=True)
            if done.returncode != 0:
                return f"llama-quantize {q} failed ({done.stderr.strip()[-200:]})"
    return files


def _stamp(line: str) -> float | None:
    """llama.cpp's log time (minutes.seconds.milliseconds.microseconds) in seconds."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)\.(\d+) ", line)
    return None if m is None else int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6


def run_llama(bin_dir: Path, files: dict[str, Path], quant: str, tokens: int) -> dict:
    """One llama-mtmd-cli run: wall, load (its log's time when the image starts encoding), vision
    (the image encoded), prefill (the image's tokens decoded), decode tokens/s, peak RSS (of that
    process: wait4)."""
    cmd = [str(bin_dir / "llama-mtmd-cli"), "-m", str(files[quant]), "--mmproj", str(files["mmproj"]), "--image", str(ROOT / "samples" / "photo.jpg"),
           "-p", PROMPT, "-n", str(tokens), "-t", str(THREADS), "--temp", "0", "--ignore-eos", "--no-warmup", "--perf", "-lv", "4",
           "--image-min-tokens", str(VISUAL_TOKENS), "--image-max-tokens", str(VISUAL_TOKENS)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli {quant} exited {proc.returncode}: {log.strip()[-300:]}")
    lines = log.splitlines()
    found = lambda pattern: next((m for m in map(re.compile(pattern).search, lines) if m), None)  # noqa: E731
    began = next((_stamp(line) for line in lines if "encoding mtmd batch" in line), None)
    return {"wall": wall, "load": began, "vision": float(found(r"batch encoding done in (\d+) ms")[1]) / 1e3,
            "prefill": float(found(r"image decoded .* in (\d+) ms")[1]) / 1e3,
            "decode": float(found(r"(?<!prompt )eval time = .*?([\d.]+) tokens per second")[1]), "compile": None, "peak": usage.ru_maxrss * 1024,
            "weights": files[quant].stat().st_size + files["mmproj"].stat().st_size,
            "visual_tokens": int(found(r"n_tokens_batch = (\d+)")[1])}


def cpu_features() -> str:
    """The instruction sets int8 and bfloat16 speed depend on, as /proc/cpuinfo lists them."""
    flags = _flags()
    if not flags:
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
    parser.add_argument("--llama-cpp", action="store_true", help="build llama.cpp (once) and time it on the same weights")
    args = parser.parse_args()
    model = model_dir("2b")
    tools = {mode: (lambda mode=mode: run(model, *MODES[mode], args.tokens)) for mode in MODES}
    note = ""
    if args.llama_cpp:
        bin_dir = build_llama_cpp()
        files = convert(bin_dir, model) if isinstance(bin_dir, Path) else bin_dir
        if isinstance(files, str):
            note = files
        else:
            tools |= {f"llama.cpp {q}": (lambda q=q: run_llama(bin_dir, files, q, args.tokens)) for q in QUANTS}
    runs: dict[str, list[dict]] = {name: [] for name in tools}
    for round_ in range(args.rounds):
        for name in list(tools) if round_ % 2 == 0 else list(tools)[::-1]:
            r = tools[name]()
            runs[name].append(r)
            print(f"round {round_ + 1} {name:22s} wall {r['wall']:6.1f} s  decode {r['decode']:.2f} tok/s  peak {r['peak'] / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)
    gb = lambda values: spread([v / 1e9 for v in values], 2, " GB")  # noqa: E731
    tokens_seen = {r["visual_tokens"] for name, got in runs.items() if name.startswith("llama.cpp") for r in got}
    lines = [
        "## Smaller weights on the CPU (`bench/quantize.py`)",
        "",
        f"Machine: {machine()}; {cpu_features()}. Command: `python bench/quantize.py --rounds {args.rounds} --tokens {args.tokens}"
        f"{' --llama-cpp' if args.llama_cpp else ''}`. Qwen2-VL-2B's shapes, random weights (bf16 on disk), `qvl describe samples/photo.jpg` "
        f"(1280x720, {VISUAL_TOKENS} visual tokens), {args.tokens} new tokens, {THREADS} threads, each run a whole process, "
        "the tools alternated round after round; median (min-max)."
        + (f" llama.cpp: llama-mtmd-cli from llama-cpp-python {LLAMA_CPP_PYTHON}'s vendored source (commit 0c1e570), CPU backend "
           f"without AMX, --image-min/max-tokens {VISUAL_TOKENS} (it sized the photo to {', '.join(map(str, sorted(tokens_seen)))} tokens); "
           "its load is its log's time when the image starts encoding, its prefill the image's tokens decoded." if tokens_seen else "")
        + (f" llama.cpp: {note}." if note else ""),
        "",
        "| tool | whole run | load | vision | prefill | decode | peak RSS | weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, got in runs.items():
        lines.append(f"| {name} | {spread([r['wall'] for r in got], 1, ' s')} | {spread([r['load'] for r in got], 1, ' s')} | "
                     f"{spread([r['vision'] for r in got], 1, ' s')} | {spread([r['prefill'] for r in got], 1, ' s')} | "
                     f"{spread([r['decode'] for r in got], 2, ' tok/s')} | {gb([r['peak'] for r in got])} | {got[0]['weights'] / 1e9:.2f} GB |")
    lines += ["", "qvl int4 has no row: torchao's int4 runs on CUDA only (`--quantize int4` on a CPU is a usage error)."]
    med = lambda name, key: statistics.median(r[key] for r in runs[name])  # noqa: E731
    if "llama.cpp Q8_0" in runs:
        ref = "llama.cpp Q8_0"
        lines += ["", f"Against the targets (llama.cpp Q8_0 in this sitting): qvl int8 peak RSS {med('int8', 'peak') / med(ref, 'peak'):.2f}x "
                  f"(target <= 1.2x), decode {med('int8', 'decode') / med(ref, 'decode'):.2f}x (target >= 1x), whole run "
                  f"{med('int8', 'wall') / med(ref, 'wall'):.2f}x (target <= 1x), load {med('int8', 'load'):.1f} s (target <= 3 s). "
                  f"Against float32: peak {med('int8', 'peak') / med('float32', 'peak'):.2f}x, decode {med('int8', 'decode') / med('float32', 'decode'):.2f}x."]
    lines += ["", quality_2b(model), "",
              "On the tiny test model (random weights, 64 wide: errors compound through its layers):", "", *quality()]
    publish(lines)


if __name__ == "__main__":
    main()
