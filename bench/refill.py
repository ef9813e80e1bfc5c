"""`--each` with rows refilled against fixed batches: answers of 32, 64 and 128 tokens in turn.

One model in memory, the engine the device defaults to; N generated JPEGs; every row's answer
forced to its length (min = max new tokens), cycling 32/64/128 as a caption list's answers vary.
"fixed": batches of --batch rows, each run until its longest answer ends (what --each does on a
CPU); "refilled": a batch of --batch rows whose ended rows' slots the next inputs take at once
(what --each does on a GPU, rows.py's join). Images/s of each, alternating --rounds times.
Models: `tiny` (the test model) and `2b` (Qwen2-VL-2B's shapes with random weights, bench/decode.py's).

Usage: python bench/refill.py [--model tiny|2b] [--device cpu|cuda] [--images 24] [--batch 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from decode import build  # noqa: E402
from results import machine, publish, spread  # noqa: E402
from throughput import make_images, model_dir  # noqa: E402

LENGTHS = (32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.rows import Row, Running, generate
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    session = LocalBackend(RuntimeOptions(str(model_dir("tiny")), device=args.device, dtype=str(dtype).split(".")[1]), Quiet())
    session.ready()
    runner = session.runner
    if args.model != "tiny":
        runner.model = build(args.model, args.device, dtype)
    base = GenerationOptions(repeat_guard=False)
    prepared = [session.prepare((path,), MediaOptions(), base) for path in make_images(args.images)]

    def rows() -> list:
        out = []
        for n, p in enumerate(prepared):
            most = LENGTHS[n % len(LENGTHS)]
            out.append(Row(p.text, list(p.loaded), replace(base, max_new_tokens=most, min_new_tokens=most)))
        return out

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def fixed() -> float:
        start = time.perf_counter()
        waiting = rows()
        for i in range(0, len(waiting), args.batch):
            generate(runner, waiting[i : i + args.batch])
        sync()
        return len(waiting) / (time.perf_counter() - start)

    def refilled() -> float:
        start = time.perf_counter()
        waiting = rows()
        running = Running(runner, waiting[: args.batch], capacity=args.batch)
        waiting = waiting[args.batch :]
        while running.live or waiting:
            if not running.live:
                running = Running(runner, waiting[: args.batch], capacity=args.batch)
                waiting = waiting[args.batch :]
            running.advance()
            while waiting and running.open() and running.fits(waiting[0]):
                running.join(waiting.pop(0))
        sync()
        return len(prepared) / (time.perf_counter() - start)

    fixed(), refilled()  # warm-up: the steps made, the kernels chosen
    sides = {"fixed": [], "refilled": []}
    for round_ in range(args.rounds):
        order = [("fixed", fixed), ("refilled", refilled)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            sides[name].append(run())
            print(name, f"{sides[name][-1]:.2f} images/s", flush=True)
    f = statistics.median(sides["fixed"])
    card = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU)"
    lines = [
        f"## --each with rows refilled, {args.model} on {args.device} (`bench/refill.py`)",
        "",
        f"Machine: {machine()}, card: {card}. Command: `python bench/refill.py --model {args.model} --device {args.device} "
        f"--images {args.images} --batch {args.batch} --rounds {args.rounds}`.",
        f"{runner.engine} engine, {str(dtype).split('.')[1]}, {args.images} JPEGs, answers forced to 32/64/128 tokens in turn, batch "
        f"{args.batch}; medians of {args.rounds} rounds (range in brackets), the sides alternating.",
        "",
        "| side | images/s | vs fixed |",
        "|---|---|---|",
    ]
    for name, got in sides.items():
        lines.append(f"| {name} | {spread(got)} | {statistics.median(got) / f:.2f}x |")
    publish(lines)


if __name__ == "__main__":
    main()
