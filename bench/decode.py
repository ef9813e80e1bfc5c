"""Decode speed: transformers' `generate` (the reference recipe's loop) against qvl's engine.

One model in memory, shared by every path; greedy, a fixed number of new tokens. For each path:
decode tokens/s at batch 1, the same as a share of the memory-bandwidth limit measured in the
same run (bytes of the language model's weights read per token, over a device copy's bandwidth),
time to first token, peak memory; then images/s at batch 1 and batch 8.

Models: `tiny` (the test model, a CPU smoke run of a few seconds), `2b` and `7b` (Qwen2-VL's
shapes with random weights, built straight on the device: on CUDA, seconds).

Usage: python bench/decode.py [--model tiny|2b|7b] [--device cpu|cuda] [--tokens 256] [--images 8] [--busy N]
                              [--quantize none,int8,int4]

--quantize: the language model's weights as `--quantize` makes them (on CUDA torchao's weight-only
int8 or int4, group 128; on a CPU int8.py's), each a fresh model timed in turn, the limit counted
from the bytes each holds; the rows say which.

--busy N: N processes spin on the CPU beside the benchmark, as other jobs do on a user's machine
(a step whose threads wait at many barriers loses a time slice at each); its own section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from results import machine, write_section  # noqa: E402
from throughput import make_images, model_dir  # noqa: E402

# Text-model shapes of the real checkpoints (their config.json); the vision tower is the same for both.
SHAPES = {
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, tie=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie=False),
}


def build(name: str, device: str, dtype):
    """The model: the tiny one from disk, or random weights of a real shape made on the device."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tiny = model_dir("tiny")
    if name == "tiny":
        return Qwen2VLForConditionalGeneration.from_pretrained(tiny, dtype=dtype).to(device).eval()
    shape = dict(SHAPES[name])
    config = Qwen2VLConfig.from_pretrained(tiny)  # the tiny tokenizer's special-token ids
    text = config.text_config
    config.tie_word_embeddings = shape.pop("tie")
    for key, value in shape.items():
        setattr(text, key, value)
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    vision = config.vision_config
    vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio, vision.hidden_size = 32, 1280, 16, 4, text.hidden_size
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def cpu_session(name: str):
    """A LocalBackend on the CPU in float32 with the static engine: the tiny model's processor and
    tokenizer, `name`'s weights (built here), the seed set."""
    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import RuntimeOptions
    from tests.helpers import Quiet

    torch.manual_seed(0)
    session = LocalBackend(RuntimeOptions(str(model_dir("tiny")), device="cpu", dtype="float32", engine="static"), Quiet())
    session.runner.model = build(name, "cpu", torch.float32)
    return session


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write), best of five."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() / best


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def text_weight_bytes(model) -> int:
    """What one decode step reads at least: the language model and the head (tied: counted once;
    quantized: as held)."""
    import torch

    from qwen2vl_cli.runner import weight_bytes

    return weight_bytes(torch.nn.ModuleList([model.model.language_model, model.lm_head]))


def quantized(model, how: str, device: str):
    """`model` with its language model's weights as `--quantize how` makes them on `device`."""
    import torch

    if how == "none":
        return model
    if device == "cpu":
        from qwen2vl_cli import int8

        if how != "int8":
            raise SystemExit(f"--quantize {how} runs on CUDA; on a CPU use int8")
        int8.quantize_cpu(model, torch.float32, torch.float32)
        return model
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(model.model.language_model, Int8WeightOnlyConfig() if how == "int8" else Int4WeightOnlyConfig(group_size=128))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b", "7b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU beside the benchmark")
    parser.add_argument("--quantize", default="none", help="comma-separated: none, int8, int4")
    args = parser.parse_args()
    import subprocess

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        measure(args)
    finally:
        for p in busy:
            p.kill()


def measure(args) -> None:
    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.runner import peak_memory_bytes
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    bandwidth = copy_bandwidth(args.device)

    from qwen2vl_cli.steps import use_compile_cache
    from tests.helpers import Quiet, answer, answers

    cache_dir = Path(use_compile_cache())
    warm_cache = cache_dir.is_dir() and any(cache_dir.iterdir())
    gen = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, repeat_guard=False)
    media = MediaOptions(max_pixels=12845056)  # the reference budget: a 1280x720 photo is 1196 tokens
    runners, limits = {}, {}
    for how in args.quantize.split(","):
        model = quantized(build(args.model, args.device, dtype), how, args.device)
        limits[how] = bandwidth / text_weight_bytes(model)
        engines = ("hf", "static", "compiled") + (("graph",) if args.device == "cuda" else ())
        if args.device == "cpu" and how != "none":
            engines = ("hf", "static")  # the compiled step does not take int8.py's layers
        for engine in engines:  # the tiny model's processor (its tokenizer ids are the model's), then the model
            session = LocalBackend(RuntimeOptions(str(model_dir("tiny")), device=args.device, dtype=str(dtype).split(".")[1],
                                                  attn="sdpa", engine=engine), Quiet())
            session.runner.model = model
            runners[engine if how == "none" else f"{engine}, {how}"] = session.runner, limits[how]
    photo = session.prepare((str(ROOT / "samples" / "photo.jpg"),), media, gen)
    images = [session.prepare((p,), media, gen) for p in make_images(args.images)]
    first = args.quantize.split(",")[0]

    rows = []
    for engine, (runner, limit) in runners.items():
        inputs = runner.inputs(photo.text, list(photo.loaded))
        # Warm-up, one per shape (a compiled or captured step is made once per batch size and cache length).
        start = time.perf_counter()
        warm = answer(runner, inputs, GenerationOptions(max_new_tokens=8, min_new_tokens=8, repeat_guard=False))
        setup = time.perf_counter() - start if warm.compile_s is not None else None
        for part in (images[:1], images[:8]):  # the batches timed below: their cache length and batch size
            answers(runner, part, gen)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        one = answer(runner, inputs, gen)
        sync(args.device)
        wall = time.perf_counter() - start
        rates = {}
        for batch in (1, 8):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                part = images[i : i + batch]
                answers(runner, part, gen)
            sync(args.device)
            rates[batch] = len(images) / (time.perf_counter() - start)
        rows.append((engine, one, wall, rates, peak_memory_bytes(args.device), setup, limit))
        print(engine, one.decode_tokens_per_s, one.ttft_s, rates, flush=True)

    base = rows[0][1].decode_tokens_per_s
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (CPU)"
    lines = [
        f"## Decode, {args.model} on {args.device} (`bench/decode.py`)" + (f", {args.busy} busy processes beside it" if args.busy else ""),
        "",
        f"Machine: {machine()}, card: {card}. Command: `python bench/decode.py --model {args.model} --device {args.device} "
        f"--tokens {args.tokens} --images {args.images}{f' --busy {args.busy}' if args.busy else ''}"
        f"{f' --quantize {args.quantize}' if args.quantize != 'none' else ''}`.",
        f"{str(dtype).split('.')[1]}, sdpa, greedy, {args.tokens} new tokens; batch 1 on a 1280x720 photo ({photo.plans[0].visual_tokens} "
        f"visual tokens); images/s on {args.images} JPEGs. Limit: {bandwidth / 1e9:.0f} GB/s copy bandwidth over "
        f"{bandwidth / limits[first] / 1e6:.1f} MB of text weights read per token = {limits[first]:.0f} tok/s"
        + "".join(f"; {how}: {bandwidth / lim / 1e6:.1f} MB, {lim:.0f} tok/s" for how, lim in limits.items() if how != first)
        + ". \"of the limit\": of the row's own weights' limit.",
        "",
        "| engine | tok/s, batch 1 | of the limit | vs hf | first token (vision + prefill) | whole answer | images/s, batch 1 | images/s, batch 8 | peak memory | step made in |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, one, wall, rates, peak, setup, limit in rows:
        rate = one.decode_tokens_per_s or 0.0
        split = f" ({one.vision_s * 1000:.0f} + {(one.ttft_s - one.vision_s) * 1000:.0f})" if one.vision_s is not None else ""
        lines.append(f"| {engine} | {rate:.1f} | {rate / limit:.1%} | {rate / base:.2f}x | {one.ttft_s * 1000:.0f} ms{split} | {wall:.2f} s | "
                     f"{rates[1]:.2f} | {rates[8]:.2f} | {peak / 1024**3:.2f} GiB | {'-' if setup is None else f'{setup:.1f} s'} |")
    lines += ["", "\"step made in\": the first request's whole time for the compiled and graph engines (compiling or capturing "
              f"the step at batch 1), with inductor's cache {'warm (from an earlier run)' if warm_cache else 'cold (empty)'}."]
    write_section("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
