"""Three questions about one photo: `-p` three times in one run against three runs of one question.

One model in memory (loading is left out of both sides), the static engine, float32, the 1280x720
sample photo at qvl's CPU sizing. "-p x3" is what `qvl describe photo.jpg -p A -p B -p C` does:
the photo decoded once, the caches on, the later questions joining the first's batch with its
kept prompt, all three decoding together; "three
runs" decodes the photo and runs the tower and the whole prefill for each question, as three
`qvl describe` calls do. The two sides alternate, --rounds times. Models: `tiny` (the test model)
and `2b` (Qwen2-VL-2B's shapes with random weights, bench/decode.py's).

Usage: python bench/questions.py [--model tiny|2b] [--rounds 2] [--tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from decode import cpu_session  # noqa: E402
from results import machine, publish, spread  # noqa: E402

QUESTIONS = ("Describe this image.", "What colours are in it?", "Is there any text in it?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b"), default="2b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()

    from qwen2vl_cli.backend import together
    from qwen2vl_cli.prefix_cache import PrefixCache
    from qwen2vl_cli.types import GenerationOptions, MediaOptions
    from qwen2vl_cli.vision_cache import VisionCache, default_bytes
    from tests.helpers import Quiet

    session = cpu_session(args.model)
    runner = session.runner
    photo = (str(ROOT / "samples" / "photo.jpg"),)
    media = MediaOptions()
    gens = [GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, prompt=q, repeat_guard=False) for q in QUESTIONS]

    def asked_together() -> tuple[float, list]:
        start = time.perf_counter()
        size = default_bytes("cpu")
        runner.vision, runner.prefixes = VisionCache(size // 4), PrefixCache(size - size // 4)
        first = session.prepare(photo, media, gens[0])
        out = list(together(session, first.plans, first.loaded, gens, Quiet(), first.media_s))
        return time.perf_counter() - start, [r.text for r in out]

    def apart() -> tuple[float, list]:
        start = time.perf_counter()
        runner.vision = runner.prefixes = None
        out = [session.generate([session.prepare(photo, media, gen)], gen)[0] for gen in gens]
        return time.perf_counter() - start, [r.text for r in out]

    session.generate([session.prepare(photo, media, gens[0])], gens[0])  # warm-up
    sides = {"-p x3": [], "three runs": []}
    for round_ in range(args.rounds):
        order = [("-p x3", asked_together), ("three runs", apart)]
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            seconds, texts = run()
            sides[name].append((seconds, texts))
            print(name, f"{seconds:.2f} s", flush=True)
    same = all(t == sides["three runs"][0][1] for _, t in sides["-p x3"] + sides["three runs"])
    apart_s = statistics.median(s for s, _ in sides["three runs"])
    lines = [
        f"## Three questions about one photo, {args.model} on cpu (`bench/questions.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/questions.py --model {args.model} --rounds {args.rounds} --tokens {args.tokens}`.",
        f"float32, static engine, the 1280x720 sample photo at qvl's CPU sizing, {args.tokens} tokens an answer; wall time of "
        f"all three answers, media decoding included, loading not; medians of {args.rounds} rounds (range in brackets), the sides "
        f"alternating. The answers were {'the same' if same else 'NOT the same'} on both sides.",
        "",
        "| side | wall | vs three runs |",
        "|---|---|---|",
    ]
    for name, got in sides.items():
        seconds = [s for s, _ in got]
        lines.append(f"| {name} | {spread(seconds, unit=' s')} | {statistics.median(seconds) / apart_s:.2f}x |")
    publish(lines)


if __name__ == "__main__":
    main()
