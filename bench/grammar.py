"""What a JSON Schema costs (--schema): decode tokens/s of constrained rows against free rows of
the same length, a schema's compile time, and the mask time per token.

The constrained side's schema is one string of exactly --chars characters (so both sides decode
about as many tokens); the free side decodes that many tokens (min = max). The static engine,
float32, the 1280x720 sample photo at qvl's CPU sizing; the sides alternate, --rounds times, at
batch 1 and --batch. Models: `tiny` (the test model) and `2b` (Qwen2-VL-2B's shapes with random
weights, bench/decode.py's).

Usage: python bench/grammar.py [--model tiny|2b] [--rounds 3] [--chars 96] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
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

TEN_FIELDS = {
    "type": "object",
    "properties": {
        "caption": {"type": "string"}, "objects": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "outdoor": {"type": "boolean"}, "people": {"type": "integer", "minimum": 0}, "mood": {"enum": ["calm", "busy", "tense"]},
        "colours": {"type": "array", "items": {"type": "string"}}, "text": {"type": ["string", "null"]}, "score": {"type": "number"},
        "time": {"type": "string", "pattern": "^(day|night)$"},
        "location": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["caption", "objects", "outdoor", "people", "mood", "colours", "text", "score", "time", "location"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b"), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import torch

    from qwen2vl_cli import grammar, schemas
    from qwen2vl_cli.types import GenerationOptions, MediaOptions
    from tests.helpers import answers

    session = cpu_session(args.model)
    runner = session.runner
    runner.vision = runner.prefixes = None

    # Compile times: the tokenizer once per model, then each schema (a new one each time, then kept).
    start = time.perf_counter()
    runner.grammars.matcher(schemas.canonical({"type": "object"}))
    tokenizer_ms = (time.perf_counter() - start) * 1000
    cold, kept = [], []
    for n in range(5):
        schema = dict(TEN_FIELDS, properties={**TEN_FIELDS["properties"], f"extra{n}": {"type": "boolean"}})
        text = schemas.canonical(schema)
        start = time.perf_counter()
        runner.grammars.matcher(text)
        cold.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        runner.grammars.matcher(text)
        kept.append((time.perf_counter() - start) * 1000)

    # The mask of one row, a token at a time along an answer.
    matcher = runner.grammars.matcher(schemas.canonical(TEN_FIELDS))
    vocab = runner.model.get_output_embeddings().out_features
    per_token = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        start = time.perf_counter()
        mask = grammar.allowed({0: matcher}, 1, vocab)
        logits = grammar.apply(torch.randn(1, vocab, generator=generator), mask)
        per_token.append((time.perf_counter() - start) * 1e6)
        token = int(logits.argmax())
        grammar.take({0: matcher}, [token])
        if matcher.is_stopped():
            break

    photo = (str(ROOT / "samples" / "photo.jpg"),)
    one_string = {"type": "object", "properties": {"caption": {"type": "string", "minLength": args.chars, "maxLength": args.chars}},
                  "required": ["caption"], "additionalProperties": False}
    constrained = GenerationOptions(max_new_tokens=4 * args.chars, schema=schemas.canonical(one_string), repeat_guard=False)
    probe = answers(runner, [session.prepare(photo, MediaOptions(), constrained)], constrained)[0]  # warm-up, and its length
    tokens = probe.generated_tokens
    free = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repeat_guard=False)
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        sides = [("free", free), ("--schema", constrained)]
        for name, gen in sides if round_ % 2 == 0 else sides[::-1]:
            for rows in (1, args.batch):
                p = session.prepare(photo, MediaOptions(), gen)
                out = answers(runner, [p] * rows, gen)
                assert all(r.finish_reason == "stop" for r in out) or name == "free"
                if name == "--schema":
                    assert all(len(json.loads(r.text)["caption"]) == args.chars for r in out)
                rates.setdefault((name, rows), []).append(statistics.median(r.decode_tokens_per_s for r in out))
                print(name, rows, f"{rates[(name, rows)][-1]:.1f} tok/s", flush=True)

    lines = [
        f"## A JSON Schema's cost, {args.model} on cpu (`bench/grammar.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/grammar.py --model {args.model} --rounds {args.rounds} --chars {args.chars} "
        f"--batch {args.batch}`.",
        f"float32, static engine, the sample photo at qvl's CPU sizing; constrained: a schema of one string of exactly {args.chars} "
        f"characters ({tokens} tokens); free: {tokens} tokens; decode tokens/s a row, medians of {args.rounds} rounds (range in "
        "brackets), the sides alternating.",
        "",
        "| rows | free | --schema | --schema vs free |",
        "|---|---|---|---|",
    ]
    for rows in (1, args.batch):
        f, s = rates[("free", rows)], rates[("--schema", rows)]
        lines.append(f"| {rows} | {spread(f, 1)} | {spread(s, 1)} | {statistics.median(s) / statistics.median(f):.2f}x |")
    per_token.sort()
    lines += [
        "",
        f"Compile (llguidance {_version()}): the model's tokenizer once, {tokenizer_ms:.1f} ms; a 10-field schema (strings, arrays, "
        f"a nested object, an enum, a pattern) {statistics.median(cold):.2f} ms (median of 5 new ones, {min(cold):.2f}-{max(cold):.2f}), "
        f"{statistics.median(kept):.3f} ms kept. The mask of one row along that schema's answer (fill and apply, {len(per_token)} "
        f"tokens, vocabulary {vocab}): median {per_token[len(per_token) // 2]:.0f} us, 90th percentile "
        f"{per_token[int(len(per_token) * 0.9)]:.0f} us.",
    ]
    publish(lines)


def _version() -> str:
    from importlib.metadata import version

    return version("llguidance")


if __name__ == "__main__":
    main()
