"""Helpers several test modules share: hooks that say nothing, rows through the runner, and `qvl serve` started on a free port."""

from __future__ import annotations

import subprocess
import sys
import time


class Quiet:
    """A LocalBackend's hooks that report no stage and show no text."""

    def stage(self, text):
        pass

    def text(self, chunk):
        pass


def answers(runner, prepared, gen, cancels=None) -> list:
    """Prepared requests as one batch of rows (rows.Running to the end): each Result or exception."""
    from qwen2vl_cli.rows import Row, generate

    return generate(runner, [Row(p.text, list(p.loaded), gen, cancels[i] if cancels else None) for i, p in enumerate(prepared)])


def answer(runner, inputs, gen, on_text=None):
    """One prompt's processor inputs, made by the caller, through the runner: its Result."""
    from qwen2vl_cli.rows import Row, generate

    [out] = generate(runner, [Row(None, None, gen, on_text=on_text, inputs=inputs)])
    if isinstance(out, Exception):
        raise out
    return out


def wait_for_records(path, count: int, timeout: float = 300) -> None:
    """Until `path` holds `count` lines (a run writing its records), or `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or path.read_text().count("\n") < count):
        time.sleep(0.1)


def start_server(tiny_model, *extra, seen: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`qvl serve` on the tiny model and a free port: the process and its base URL, once it says it
    is serving; `seen` gets every line it wrote to stderr until then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen2vl_cli", "serve", "--model", str(tiny_model), "--port", "0", "--dtype", "float32", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if seen is not None:
            seen.append(line)
        if "serving" in line:
            return proc, line.split(" on ")[1].split()[0]
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
    raise RuntimeError("qvl serve did not start")
