"""The HTTP path's cost: `describe --each --endpoint` against `qvl serve`, versus local `--each`.

Same images, same model (the tiny one by default), greedy, fixed token counts. The server runs in
its own process (`qvl serve --port 0`); both sides run on this machine.

Usage: python bench/endpoint.py [--images 32] [--tokens 16] [--model tiny|2b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from results import machine, write_section  # noqa: E402
from throughput import make_images, model_dir  # noqa: E402


def each(session, images, tokens, batch_size) -> float:
    from qwen2vl_cli.batch import Emitter, Tally, run_each
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    records: list[dict] = []
    gen = GenerationOptions(prompt="Describe this image.", max_new_tokens=tokens, min_new_tokens=tokens, repeat_guard=False)
    tally = Tally()
    run_each(iter(images), session, MediaOptions(), gen, key="bench", batch_size=batch_size,
             emitter=Emitter(lambda line: records.append(json.loads(line)), "jsonl", True), tally=tally)
    assert tally.failed == 0 and all(r["generated_tokens"] == tokens for r in records), records[:1]
    return len(images) / tally.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--model", choices=("tiny", "2b"), default="tiny")
    args = parser.parse_args()

    from qwen2vl_cli.endpoint import EndpointBackend, EndpointOptions
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import RuntimeOptions
    from tests.helpers import Quiet

    model = str(model_dir(args.model))
    images = make_images(args.images)
    server = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "serve", "--model", model, "--port", "0", "--dtype", "bfloat16"],
                              stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                raise RuntimeError("qvl serve did not start")
        url = line.split(" on ")[1].split()[0]
        local = LocalBackend(RuntimeOptions(model, device="cpu", dtype="bfloat16"), Quiet())
        each(local, images[:2], 2, 1)  # warm-up
        local_rate = each(local, images, args.tokens, 1)
        del local
        remote = {}
        for concurrency in (1, 4):
            session = EndpointBackend(EndpointOptions((url,), concurrency=concurrency), model)
            each(session, images[:2], 2, concurrency)
            remote[concurrency] = each(session, images, args.tokens, concurrency)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        "## HTTP path (`bench/endpoint.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/endpoint.py --images {args.images} --tokens {args.tokens} --model {args.model}`.",
        f"{args.images} JPEGs, {args.tokens} new tokens each, bfloat16 on CPU; `qvl serve` in a second process on the same machine "
        "(batch size 1, the CPU default).",
        "",
        "| path | images/s | vs local |",
        "|---|---|---|",
        f"| local `--each` | {local_rate:.2f} | 1.00 |",
        f"| `--each --endpoint`, concurrency 1 | {remote[1]:.2f} | {remote[1] / local_rate:.2f} |",
        f"| `--each --endpoint`, concurrency 4 | {remote[4]:.2f} | {remote[4] / local_rate:.2f} |",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(report)


if __name__ == "__main__":
    main()
