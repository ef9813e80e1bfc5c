"""The HTTP path's cost: `describe --each --endpoint` against `qvl serve`, versus local `--each`.

Same images, same model (the tiny one by default), greedy, fixed token counts. The server runs in
its own process (`qvl serve --port 0`); both sides run on this machine.

With --several: three `qvl serve` on this machine behind one `--endpoint` list, first all three
up (how evenly the requests spread), then one killed mid-run (every input one record, none twice,
its share answered by the others).

Usage: python bench/endpoint.py [--images 32] [--tokens 16] [--model tiny|2b]
       python bench/endpoint.py --several [--images 60]
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


def start(model: str) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "serve", "--model", model, "--port", "0", "--dtype", "float32"],
                              stderr=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        line = server.stderr.readline()
        if not line and server.poll() is not None:
            raise RuntimeError("qvl serve did not start")
    return server, line.split(" on ")[1].split()[0]


def several(args) -> None:
    """Three servers: the spread of equal ones, then one killed after a third of the records."""
    import signal
    import tempfile
    import time

    model = str(model_dir(args.model))
    images = make_images(args.images)
    servers = [start(model) for _ in range(3)]
    urls = [url for _, url in servers]
    rows = []
    try:
        for kill in (False, True):
            out = Path(tempfile.mkdtemp()) / "records.jsonl"
            cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *map(str, images), "--model", model,
                   *[a for url in urls for a in ("--endpoint", url)], "--concurrency", "2", "--max-new-tokens", str(args.tokens),
                   "--min-new-tokens", str(args.tokens), "-o", str(out)]
            start_s = time.perf_counter()
            run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
            if kill:
                while not out.exists() or out.read_text().count("\n") < len(images) // 3:
                    time.sleep(0.05)
                servers[2][0].send_signal(signal.SIGKILL)
            _, err = run.communicate()
            wall = time.perf_counter() - start_s
            records = [json.loads(line) for line in out.read_text().splitlines()]
            said = err.strip().splitlines()[-1].split("answered by ", 1)[1]
            served = [int(part.rsplit(" ", 1)[1]) for part in said.split(", ")]
            indices = [r["index"] for r in records]
            rows.append((kill, run.returncode, len(records), len(set(indices)) == len(indices) == len(images),
                         sum("error" in r for r in records), served, wall))
    finally:
        for server, _ in servers:
            server.kill()
            server.wait(timeout=30)
    third = len(images) / 3
    lines = [
        "## Several endpoints (`bench/endpoint.py --several`)",
        "",
        f"Machine: {machine()}. Command: `python bench/endpoint.py --several --images {args.images} --tokens {args.tokens} "
        f"--model {args.model}`. Three `qvl serve` (float32, batch size 1) on this machine, `--endpoint` given three times, "
        f"`--concurrency 2` each; {args.images} JPEGs, {args.tokens} new tokens each.",
        "",
        "| run | exit | records | each input once | error records | answered by server 1, 2, 3 | most off a third | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kill, code, count, once, errors, served, wall in rows:
        off = "-" if kill else f"{max(abs(n - third) / third for n in served):.0%}"
        label = "server 3 killed after a third" if kill else "all three up"
        lines.append(f"| {label} | {code} | {count} | {'yes' if once else 'NO'} | {errors} | {', '.join(map(str, served))} | {off} | {wall:.1f} s |")
    lines += ["", "Target: with equal servers each answers within 20% of a third; with one killed, every input one record, none twice."]
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--model", choices=("tiny", "2b"), default="tiny")
    parser.add_argument("--several", action="store_true", help="three servers, one killed mid-run")
    args = parser.parse_args()
    if args.several:
        return several(args)

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
