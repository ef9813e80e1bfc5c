"""Run inputs through `qvl inspect` and the loading path of describe/video (no model), in one
process with bounded memory, and print one JSON line per input.

Usage: python -m tests.robustness.harness [--memory-gb N] PATH...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import time
import traceback


def inspect_cli(path: str) -> tuple[int, str]:
    import typer

    from qwen2vl_cli.cli import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = typer.main.get_command(app).main(args=["inspect", path, "--json", "--device", "cpu"], standalone_mode=False)
    return code, err.getvalue()


def load_path(path: str) -> tuple[str, str]:
    """describe/video up to the model: resolve, probe, plan, decode. ('ok' | 'error' | 'crash', detail)."""
    from qwen2vl_cli.errors import QvlError
    from qwen2vl_cli.pipeline import decode_all, plan_all, probe_all
    from qwen2vl_cli.sources import SourceResolver
    from qwen2vl_cli.types import MediaOptions, VisionSpec

    opts = MediaOptions(cpu_budget=True)
    try:
        with SourceResolver() as resolver:
            probed = probe_all(resolver, (path,), opts)
            decode_all(probed, plan_all(probed, VisionSpec(), opts), opts)
        return "ok", ""
    except QvlError as e:
        return "error", str(e)
    except Exception:
        return "crash", traceback.format_exc()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    limit = int(args.memory_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for path in args.paths:
        start = time.perf_counter()
        code, err = inspect_cli(path)
        outcome, detail = load_path(path)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"path": path, "inspect_code": code, "inspect_stderr": err, "load": outcome, "detail": detail,
                          "seconds": elapsed, "peak_rss": peak, "torch": "torch" in sys.modules}), flush=True)


if __name__ == "__main__":
    main()
