"""`qvl serve` under load: N requests from C clients at once, half of them streaming.

The same load against this tree's server and, with --against REV, against an earlier commit's
server (checked out into a temporary worktree), one after the other on this machine: what a
change costs or buys under concurrent clients. Each server runs the tiny model on the CPU, greedy, fixed token counts.

Usage: python bench/serve_load.py [--requests 200] [--clients 16] [--tokens 16] [--batch-size N] [--mixed]
                                  [--batching fixed,continuous] [--against REV] [--rounds N]

--rounds: each server is measured N times, the order turned round every round (this machine is
shared: which server runs first is not what the numbers show); the table gives medians and ranges.

--mixed: requests ask for tokens/2, tokens or 2 x tokens new tokens in turn (clients that differ in
max_tokens), instead of the same number for all.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from results import machine, write_section  # noqa: E402
from throughput import model_dir  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lengths(tokens: int, mixed: bool, i: int) -> int:
    return (max(1, tokens // 2), tokens, 2 * tokens)[i % 3] if mixed else tokens


def run(tree: Path, model: str, requests_n: int, clients: int, tokens: int, batch_size: int | None = None, mixed: bool = False,
        batching: str | None = None) -> dict:
    import requests

    env = {**os.environ, "PYTHONPATH": str(tree), "QVL_DEVICE": "cpu"}
    server = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "serve", "--model", model, "--port", "0", "--dtype", "float32",
                               *(["--batch-size", str(batch_size)] if batch_size else []), *(["--batching", batching] if batching else [])],
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
    try:
        line = ""
        while "serving" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                raise RuntimeError("the server did not start")
        url = line.split(" on ")[1].split()[0] + "/chat/completions"
        image = "data:image/jpeg;base64," + base64.b64encode((ROOT / "samples" / "photo.jpg").read_bytes()).decode()
        rss_before = rss_mb(server.pid)

        def one(i: int) -> tuple[bool, float]:
            n = lengths(tokens, mixed, i)
            body = {"model": model, "max_tokens": n, "min_tokens": n, "stream": i % 2 == 1,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                              {"type": "text", "text": "Describe this image."}]}]}
            start = time.perf_counter()
            with requests.post(url, json=body, stream=body["stream"], timeout=300) as r:
                content = r.content
                ok = r.status_code == 200 and (b"[DONE]" in content if body["stream"] else b'"choices"' in content)
            return ok, time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(one, range(requests_n)))
        wall = time.perf_counter() - start
        latencies = sorted(t for _, t in outcomes)
        ok = sum(ok for ok, _ in outcomes)
        return {
            "ok": ok,
            "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "rps": requests_n / wall,
            "rss": (rss_before, rss_mb(server.pid)),
            "metrics": scraped(url.removesuffix("/v1/chat/completions"), ok, sum(lengths(tokens, mixed, i) for i in range(requests_n))),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def scraped(base: str, ok: int, tokens: int) -> str:
    """The server's /metrics after the load, against the load's own count: requests answered 200
    and tokens generated ("-" for a server without /metrics)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    page = requests.get(base + "/metrics", timeout=30)
    if page.status_code != 200:
        return "-"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(page.text) for s in f.samples}
    answered = int(samples.get(("qvl_requests_total", (("status", "200"),)), 0))
    generated = int(samples.get(("qvl_generation_tokens_total", ()), 0))
    return f"{answered}/{ok} requests, {generated}/{tokens} tokens"


def summary(got: list[dict]) -> dict:
    """One server's rounds: medians, each with its range when there were several rounds."""
    out = {"ok": sum(g["ok"] for g in got), "rss": got[-1]["rss"], "metrics": "; ".join(dict.fromkeys(g["metrics"] for g in got))}
    for key, fmt in (("p50", "{:.2f}"), ("p99", "{:.2f}"), ("rps", "{:.1f}")):
        values = [g[key] for g in got]
        out[key] = statistics.median(values)
        out[f"{key}_range"] = f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else ""
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, help="the servers' --batch-size (default: theirs, 1 on a CPU)")
    parser.add_argument("--mixed", action="store_true", help="requests differ in max_tokens (tokens/2, tokens, 2 x tokens)")
    parser.add_argument("--batching", help="this tree's server once per mode given (comma-separated: fixed, continuous)")
    parser.add_argument("--against", metavar="REV", help="also measure the server of this commit")
    parser.add_argument("--rounds", type=int, default=1, help="measure each server this many times, alternating the order")
    args = parser.parse_args()
    model = str(model_dir("tiny"))
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [(f"this tree, --batching {mode}" if mode else "this tree", ROOT, mode) for mode in (args.batching or "").split(",")]
        if args.against:
            old = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True, capture_output=True)
            trees.insert(0, (args.against, old, None))
        try:
            for round_ in range(args.rounds):
                for name, tree, mode in trees if round_ % 2 == 0 else trees[::-1]:
                    runs.setdefault(name, []).append(run(tree, model, args.requests, args.clients, args.tokens, args.batch_size, args.mixed, mode))
                    print(round_, name, runs[name][-1], flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "old")], capture_output=True)
    rows = [(name, summary(got)) for name, got in ((name, runs[name]) for name, _, _ in trees)]
    base = rows[0][1]
    lines = [
        "## Server under load (`bench/serve_load.py`)" + (f", batch size {args.batch_size}" if args.batch_size else "")
        + (", mixed lengths" if args.mixed else ""),
        "",
        f"Machine: {machine()}, device cpu. Command: `python bench/serve_load.py --requests {args.requests} --clients {args.clients} "
        f"--tokens {args.tokens}{f' --batch-size {args.batch_size}' if args.batch_size else ''}{' --mixed' if args.mixed else ''}"
        f"{f' --batching {args.batching}' if args.batching else ''}"
        f"{f' --against {args.against}' if args.against else ''}{f' --rounds {args.rounds}' if args.rounds > 1 else ''}`.",
        f"Tiny model, float32, one 1280x720 JPEG per request as a data: URL, "
        f"{f'{max(1, args.tokens // 2)}, {args.tokens} or {2 * args.tokens} new tokens in turn' if args.mixed else f'{args.tokens} new tokens'}, "
        f"half the requests streaming, {args.clients} clients at once, batch size {args.batch_size or 'the default (1 on a CPU)'}; "
        "the servers ran one after the other"
        + (f", {args.rounds} rounds, the order turned round each round: medians, with the range in brackets." if args.rounds > 1 else "."),
        "",
        "| server | OK | p50 | p99 | requests/s | server RSS before → after | p99 vs first row | its /metrics against the load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['ok']}/{args.requests * args.rounds} | {r['p50']:.2f} s{r['p50_range']} | {r['p99']:.2f} s{r['p99_range']} | "
                     f"{r['rps']:.1f}{r['rps_range']} | {r['rss'][0]:.0f} → {r['rss'][1]:.0f} MB | {r['p99'] / base['p99']:.2f}x | {r['metrics']} |")
    write_section("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
