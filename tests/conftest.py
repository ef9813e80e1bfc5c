"""Shared fixtures: the tiny Qwen2-VL (and one of each family), generated media, a local HTTP server and a CLI runner."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests import media_factory


@pytest.fixture(scope="session", autouse=True)
def on_the_cpu():
    """The suite means the CPU, on every machine: the tiny model in float32 gives the same tokens
    everywhere, and `--each` the same batch size. QVL_DEVICE reaches in-process runs and
    subprocesses alike. Device choice is tested over capability tables (test_devices.py); a test
    that means a GPU passes --device cuda and is skipped without one."""
    import os

    before = os.environ.get("QVL_DEVICE")
    os.environ["QVL_DEVICE"] = "cpu"
    yield
    if before is None:
        os.environ.pop("QVL_DEVICE", None)
    else:
        os.environ["QVL_DEVICE"] = before


@pytest.fixture(autouse=True)
def no_load_outlives_its_test():
    """A run that fails before its first token leaves its weights loading on a thread (the CLI's
    process exits without them); in this one process the next test's own loads wait for it."""
    import time

    from qwen2vl_cli import config

    yield
    while config.loading():
        time.sleep(0.05)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tests.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """A tiny model of each family, built on first use: `family_models("qwen3_vl")`."""
    from tests.tiny_model import build

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return media_factory.make_all(tmp_path_factory.mktemp("media"))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def qvl():
    """Run the CLI in-process; stdout and stderr come back separately."""
    from qwen2vl_cli.cli import app

    runner = CliRunner()

    def run(*args: str, input: bytes | None = None) -> CliResult:
        result = runner.invoke(app, [str(a) for a in args], input=input)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/stall"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8")
            self.wfile.flush()
            time.sleep(3)
            return
        if self.path.startswith("/huge"):
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        if self.path.startswith("/endless"):  # no length, bytes forever
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\x00" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                return
        if self.path.startswith("/short"):  # promises more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 500)
            return
        if self.path.startswith("/liar"):  # says 100 bytes for a whole image
            body = (self.directory_path / "photo.png").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/redirect-loop"):
            self.send_response(302)
            self.send_header("Location", "/redirect-loop")
            self.end_headers()
            return
        super().do_GET()


@pytest.fixture(scope="session")
def http_server(media_dir):
    """Serves media_dir on 127.0.0.1, plus misbehaving paths: /stall, /huge, /endless, /short, /liar and
    /redirect-loop."""

    class Handler(_Handler):
        directory_path = media_dir

    def handler(*args, **kwargs):
        return Handler(*args, directory=str(media_dir), **kwargs)

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # clients that hang up on purpose
            pass

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
