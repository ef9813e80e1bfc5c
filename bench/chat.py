"""`qvl chat`: what a turn costs once the conversation is kept, and how soon the prompt comes.

1. Turn 2 against turn 1 about the 1280x720 sample photo at the CPU's default size: time to the
   first token (processor inputs, vision tower, prefill), with the caches (each turn
   prefills only its new tokens) and with --cache-size 0 (every turn prefills it all), the two
   alternated --rounds times in one sitting.
2. Ten turns with two images (the photo at turn 1, samples/grounding.jpg at turn 6), caches on:
   each turn's prompt tokens prefilled against the tokens the turn added to the conversation
   (its question, the template's markers, a new image), and its time to first token.
3. With --prompt: the time from starting `qvl chat --model <tiny>` in a pseudo-terminal to its
   prompt on the screen (the model loads behind it), --rounds x 3 times.

Models: `2b` (Qwen2-VL-2B's shapes with random weights, bench/decode.py's) or `tiny`; float32,
static engine, the CPU. A random model's answers hold stray bytes whose text does not tokenize
back to the same tokens: the next turn prefills those tokens again (column "answer tokens again").

Usage: python bench/chat.py [--model 2b|tiny] [--rounds 2] [--prompt]
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
from throughput import model_dir  # noqa: E402

PHOTO = str(ROOT / "samples" / "photo.jpg")
SECOND = str(ROOT / "samples" / "grounding.jpg")
QUESTIONS = ["Describe this image.", "And the sign on the left?", "What colour is the sky?", "Is anyone in it?", "What time of day is it?",
             "What is in this one?", "What do the two have in common?", "Which is brighter?", "Name three objects.", "One line caption for both."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b"), default="2b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", action="store_true", help="time to the prompt of `qvl chat` on the tiny model, in a pseudo-terminal")
    args = parser.parse_args()
    if args.prompt:
        return prompt_time(args.rounds * 3)

    from qwen2vl_cli.chat import Chat, LocalEngine
    from qwen2vl_cli.types import GenerationOptions, MediaOptions
    from qwen2vl_cli.vision_cache import default_bytes

    session = cpu_session(args.model)
    runner = session.runner
    engine = LocalEngine(session)
    gen = GenerationOptions(max_new_tokens=8, repeat_guard=False)
    opts = MediaOptions(cpu_budget=True)

    def conversation(on: bool, questions: list[str], later: dict[int, str]) -> list:
        runner.use_caches(default_bytes("cpu") if on else 0)
        chat = Chat(lambda: engine, opts, gen)
        chat.add(PHOTO)
        out = []
        for n, q in enumerate(questions):
            if n in later:
                chat.add(later[n])
            before = chat.context_tokens
            answer = chat.ask(q)
            out.append((answer, answer.result.prompt_tokens - before))
            print(f"{'kept' if on else 'none'} turn {n + 1}: {first(answer):.2f} s, {answer.new_tokens} new of "
                  f"{answer.result.prompt_tokens}, added {answer.result.prompt_tokens - before}", flush=True)
        return out

    conversation(True, QUESTIONS[:1], {})  # warm up
    sides: dict[str, list[float]] = {"turn 1": [], "turn 2, conversation kept": [], "turn 2, --cache-size 0": []}
    for round_ in range(args.rounds):
        for on in ((True, False) if round_ % 2 == 0 else (False, True)):
            one, two = conversation(on, QUESTIONS[:2], {})
            if on:
                sides["turn 1"].append(first(one[0]))
                sides["turn 2, conversation kept"].append(first(two[0]))
            else:
                sides["turn 2, --cache-size 0"].append(first(two[0]))
    ten = conversation(True, QUESTIONS, {5: SECOND})

    one = statistics.median(sides["turn 1"])
    lines = [
        f"## `qvl chat`: a turn once the conversation is kept, {args.model} on cpu (`bench/chat.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/chat.py --model {args.model} --rounds {args.rounds}`.",
        "float32, static engine; the 1280x720 sample photo at the CPU's default size (252 visual tokens); 8 tokens an answer. "
        "Time to the first token: the processor inputs of the conversation's media, the vision tower and the prefill "
        "(the engine's own count: a random model's first text may be held back as incomplete bytes); "
        f"medians of {args.rounds} rounds (range in brackets), with and without the caches alternated.",
        "",
        "| turn | time to first token | vs turn 1 |",
        "|---|---|---|",
    ]
    for side, seconds in sides.items():
        lines.append(f"| {side} | {spread(seconds, unit=' s')} | {statistics.median(seconds) / one:.3f}x |")
    lines += [
        "",
        "Ten turns, the second image at turn 6, caches on: prompt tokens prefilled against the tokens the turn added "
        "(question, markers, new image); the difference is the previous answer's tokens that its text does not tokenize back to.",
        "",
        "| turn | added | prefilled | answer tokens again | kept | time to first token |",
        "|---|---|---|---|---|---|",
    ]
    for n, (answer, added) in enumerate(ten, 1):
        r = answer.result
        again = answer.new_tokens - added if n > 1 else 0
        lines.append(f"| {n} | {added} | {answer.new_tokens} | {again} | {r.cached_tokens} | {first(answer):.2f} s |")
    publish(lines)


def first(answer) -> float:
    """A turn's time to its first token as the engine counts it: its processor inputs, vision tower and prefill."""
    return (answer.result.media_s or 0.0) + answer.result.ttft_s


def prompt_time(runs: int) -> None:
    import os

    import pexpect

    tiny = model_dir("tiny")
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        child = pexpect.spawn(sys.executable, ["-m", "qwen2vl_cli", "chat", PHOTO, "--model", str(tiny)], env=env, encoding="utf-8", timeout=60)
        child.expect(">>>")
        times.append(time.perf_counter() - start)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()
    lines = [
        "## `qvl chat`: time to the prompt, tiny model (`bench/chat.py --prompt`)",
        "",
        f"Machine: {machine()}. Command: `python bench/chat.py --prompt` ({runs} starts).",
        "From starting `qvl chat samples/photo.jpg --model <tiny>` in a pseudo-terminal to its prompt on the screen; "
        "the model loads behind the prompt.",
        "",
        f"| starts | time to the prompt |\n|---|---|\n| {runs} | {spread(times, unit=' s')} |",
    ]
    publish(lines)


if __name__ == "__main__":
    main()
