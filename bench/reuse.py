"""A second question about the same picture: time to first token with the caches against the first.

One model in memory, the static engine; the 1280x720 sample photo at the reference budget (1196
visual tokens). Each round starts with an empty cache and asks two different questions about the
photo (the second finds the first's prompt kept), then the second question with the vision cache
only and with no cache, so all four are measured in the same sitting. Models: `tiny` (the test model) and `2b`
(Qwen2-VL-2B's shapes with random weights, bench/decode.py's).

With --turns: instead, `qvl serve` on the tiny model, one conversation of 4 turns about one image
(an OpenAI client sends the image again every turn), with the cache and with --cache-size 0 in
turn, each server --rounds times: each turn's whole request time.

Usage: python bench/reuse.py [--model tiny|2b] [--rounds 2] [--turns]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from decode import cpu_session  # noqa: E402
from results import machine, publish, spread  # noqa: E402
from throughput import model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b"), default="2b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turns", action="store_true", help="4 turns of one conversation through qvl serve, with and without the cache")
    args = parser.parse_args()
    if args.turns:
        return turns(args.rounds)

    from qwen2vl_cli.prefix_cache import PrefixCache
    from qwen2vl_cli.types import GenerationOptions, MediaOptions
    from qwen2vl_cli.vision_cache import VisionCache, default_bytes
    from tests.helpers import answers

    session = cpu_session(args.model)
    runner = session.runner
    media = MediaOptions(max_pixels=12845056)  # the reference budget: the photo is 1196 visual tokens

    def ask(question: str, vision, prefixes) -> float:
        gen = GenerationOptions(max_new_tokens=1, prompt=question, repeat_guard=False)
        p = session.prepare((str(ROOT / "samples" / "photo.jpg"),), media, gen)
        runner.vision, runner.prefixes = vision, prefixes
        [g] = answers(runner, [p], gen)
        return g.ttft_s + g.media_s

    ask("Warm up.", None, None)
    sides = {"first (caches empty)": [], "second, prompt kept": [], "second, vision output kept only": [], "second, --cache-size 0": []}
    for _ in range(args.rounds):
        size = default_bytes("cpu")
        vision, prefixes = VisionCache(size // 4), PrefixCache(size - size // 4)
        got = [ask("Describe this image.", vision, prefixes), ask("What colours are in it?", vision, prefixes)]
        got.append(ask("What colours are in it?", vision, None))
        got.append(ask("What colours are in it?", None, None))
        for side, seconds in zip(sides, got):
            sides[side].append(seconds)
        print(got, flush=True)
    first = statistics.median(sides["first (caches empty)"])
    lines = [
        f"## A second question about one picture, {args.model} on cpu (`bench/reuse.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/reuse.py --model {args.model} --rounds {args.rounds}`.",
        "float32, static engine, the 1280x720 sample photo at the reference budget (1196 visual tokens); time to first "
        f"token, processor inputs included; medians of {args.rounds} rounds (range in brackets), each round with empty caches.",
        "",
        "| question | time to first token | vs the first |",
        "|---|---|---|",
    ]
    for side, seconds in sides.items():
        lines.append(f"| {side} | {spread(seconds, unit=' s')} | {statistics.median(seconds) / first:.3f}x |")
    publish(lines)


def turns(rounds: int) -> None:
    import base64
    import time

    import requests

    from tests.helpers import start_server

    image = "data:image/jpeg;base64," + base64.b64encode((ROOT / "samples" / "photo.jpg").read_bytes()).decode()
    runs: dict[str, list[list[float]]] = {"kept": [], "--cache-size 0": []}
    for round_ in range(rounds):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            proc, url = start_server(model_dir("tiny"), *(("--cache-size", "0") if name != "kept" else ()))
            try:
                messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                         {"type": "text", "text": "Describe this image."}]}]
                times = []
                for turn in range(4):
                    start = time.perf_counter()
                    answer = requests.post(url + "/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=300).json()
                    times.append(time.perf_counter() - start)
                    messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                                 {"role": "user", "content": f"And question {turn + 2}?"}]
                runs[name].append(times)
                print(name, times, flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    lines = [
        "## Four turns about one image through `qvl serve`, tiny on cpu (`bench/reuse.py --turns`)",
        "",
        f"Machine: {machine()}. Command: `python bench/reuse.py --turns --rounds {rounds}`.",
        "The tiny model, float32; the 1280x720 sample photo as a data: URL in the first message, sent again every turn as "
        f"OpenAI clients do; max_tokens 1; each request's whole time, medians of {rounds} rounds, the servers in turn.",
        "",
        "| server | turn 1 | turn 2 | turn 3 | turn 4 | turns 2-4 vs turn 1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, got in runs.items():
        med = [statistics.median(t[i] for t in got) for i in range(4)]
        lines.append(f"| {name} | " + " | ".join(f"{m * 1000:.0f} ms" for m in med) + f" | {statistics.mean(med[1:]) / med[0]:.2f}x |")
    publish(lines)


if __name__ == "__main__":
    main()
