"""Hostile media: every input ends in a result or a one-line error, in bounded time and memory.

The corpus and the mutants are made here; each runs through `qvl inspect` and through the loading
path of describe/video (resolve, probe, plan, decode; no model) in a subprocess with an address
space limit and a timeout. QVL_FUZZ_MUTANTS sets the number of mutants (default 240; the long run
uses 3000). `python -m tests.robustness.test_robustness [N]` prints the figures for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.robustness.corpus import make_corpus, mutants

ROOT = Path(__file__).resolve().parents[2]
MEMORY_GB = 3.0  # the harness's address space limit; the peak RSS bound below is within it
PEAK_RSS_BOUND = 1.5 * 1024**3
CHUNK = 80


def run_harness(paths: list[Path]) -> list[dict]:
    """One subprocess per chunk; a hang fails the run through the timeout (60 s + 5 s per input)."""
    records = []
    for start in range(0, len(paths), CHUNK):
        chunk = [str(p) for p in paths[start : start + CHUNK]]
        proc = subprocess.run(
            [sys.executable, "-m", "tests.robustness.harness", "--memory-gb", str(MEMORY_GB), *chunk],
            capture_output=True, text=True, timeout=60 + 5 * len(chunk), cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        records += [json.loads(line) for line in proc.stdout.splitlines()]
    return records


def check(record: dict, expect: str = "either") -> None:
    name = Path(record["path"]).name
    assert not record["torch"], "the loading path imported torch"
    assert record["load"] != "crash", f"{name}: {record['detail']}"
    assert "Traceback" not in record["inspect_stderr"], name
    code = record["inspect_code"]
    assert code in (0, 2), (name, record["inspect_stderr"])
    errors = [line for line in record["inspect_stderr"].splitlines() if line.startswith("qvl: error: ")]
    assert len(errors) == (1 if code == 2 else 0), (name, record["inspect_stderr"])
    if code == 2:
        assert record["inspect_stderr"].rstrip().endswith(errors[0]), name
    if expect == "ok":
        assert code == 0 and record["load"] == "ok", (name, record["inspect_stderr"], record["detail"])
    elif expect == "error":
        assert code == 2 and record["load"] == "error", (name, record["inspect_stderr"])
    assert record["peak_rss"] < PEAK_RSS_BOUND, (name, record["peak_rss"])


@pytest.fixture(scope="module")
def corpus(media_dir, tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), media_dir)


def test_corpus(corpus):
    records = run_harness([path for _, path, _ in corpus])
    assert len(records) == len(corpus)
    for (_, _, expect), record in zip(corpus, records):
        check(record, expect)


def test_fuzzed_mutants(media_dir, tmp_path):
    paths = mutants(tmp_path, media_dir, int(os.environ.get("QVL_FUZZ_MUTANTS", "240")))
    records = run_harness(paths)
    assert len(records) == len(paths)
    for record in records:
        check(record)


def figures(count: int) -> str:
    """The numbers for tests/robustness/README.md."""
    import tempfile

    from tests.media_factory import make_all

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = make_all((root / "seeds").mkdir() or root / "seeds")
        corpus = make_corpus((root / "corpus").mkdir() or root / "corpus", seeds)
        paths = [p for _, p, _ in corpus] + mutants((root / "m").mkdir() or root / "m", seeds, count)
        records = run_harness(paths)
    crashes = sum(r["load"] == "crash" or "Traceback" in r["inspect_stderr"] for r in records)
    slowest = max(records, key=lambda r: r["seconds"])
    return (
        f"inputs: {len(corpus)} corpus + {count} mutants = {len(records)}\n"
        f"exit 0: {sum(r['inspect_code'] == 0 for r in records)}, exit 2: {sum(r['inspect_code'] == 2 for r in records)}, "
        f"other: {sum(r['inspect_code'] not in (0, 2) for r in records)}\n"
        f"tracebacks: {crashes}, hangs: 0 (each chunk finished within its timeout)\n"
        f"slowest input: {slowest['seconds']:.2f} s ({Path(slowest['path']).name})\n"
        f"peak RSS of a harness process: {max(r['peak_rss'] for r in records) / 1024**2:.0f} MiB"
    )


if __name__ == "__main__":
    print(figures(int(sys.argv[1]) if len(sys.argv) > 1 else 240))
