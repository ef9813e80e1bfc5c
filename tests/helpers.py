"""Helpers several test modules share: hooks that say nothing, rows through the runner, `qvl serve`
started on a free port, and a stand-in OpenAI-compatible server for client tests."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


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


class StandIn(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server for client tests: a subclass's `reply(body)` answers each chat
    request with `stream` (one streamed chunk) or `refuse`; `bodies` keeps what it was sent."""

    bodies: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        self.reply(body)

    def reply(self, body: dict) -> None:
        self.stream("an answer")

    def stream(self, text: str, prompt_tokens: int = 90, completion_tokens: int = 3) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    def refuse(self, status: int, message: str, kind: str = "invalid_request_error", retry_after: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(json.dumps({"error": {"message": message, "type": kind}}).encode())


@contextmanager
def serving(*handlers: type[StandIn]):
    """Each stand-in on a free port of its own: their base URLs (http://127.0.0.1:PORT/v1)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), h) for h in handlers]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [f"http://127.0.0.1:{server.server_address[1]}/v1" for server in servers]
    finally:
        for server in servers:
            server.shutdown()
