"""The HTTP layer under qvl serve's app: which Host headers it answers (a DNS-rebinding guard),
its outer edge (a bug is one 500 and one log line), uvicorn's h11 protocol with the limits it
lacks (a deadline for a request's headers, a bound on open connections, JSON for malformed HTTP),
and log lines a flood repeats at most once a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.output import printable
from qwen2vl_cli.scheduler import log_bug
from qwen2vl_cli.serve_requests import ApiError, invalid

ACCEPT_BURST = 128  # connections asyncio accepts in one go (uvicorn's backlog)


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}  # what a page elsewhere cannot make a browser send


def allowed_hosts(host: str, extra: tuple[str, ...]) -> list[str]:
    """Host headers the server answers: its own address and names for it (a DNS-rebinding guard)."""
    if host in ("0.0.0.0", "::", ""):  # every address: the names given (and the loopback's), else any name the network gives it
        return sorted(set(extra) | LOOPBACK_NAMES) if extra else ["*"]
    names = {host, f"[{host}]"} if ":" in host else {host}
    if host.startswith("127.") or host in ("::1", "localhost"):
        names |= LOOPBACK_NAMES
    return sorted(names | set(extra))


class Edge:
    """The app's outer edge, as plain ASGI (an HTTP middleware would hide a client's disconnect):
    the Host check (a DNS-rebinding guard), and the one place a bug becomes a 500 and one log
    line (Starlette's own handler re-raises, and uvicorn logs the whole traceback)."""

    def __init__(self, app, hosts: list[str] | None):
        self.app, self.hosts = app, None if hosts is None else {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.hosts is not None and _host(scope) not in self.hosts:
            return await _send_json(send, ApiError(400, "invalid_request_error", "this server does not answer that Host header (--allowed-hosts)"))
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - the one place a bug is answered
            log_bug(scope.get("path", "?"), e)
            if not started:  # else the stream just ends
                await _send_json(send, ApiError(500, "server_error", "internal error in qvl serve (its log has the details)"))


def _host(scope) -> str:
    """The Host header's name without its port ("[::1]:8000" -> "[::1]")."""
    value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").strip().lower()
    return value[: value.index("]") + 1] if value.startswith("[") and "]" in value else value.split(":", 1)[0]


async def _send_json(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def connection_cap(fetch_workers: int) -> int:
    """Connections the server keeps open at once (at most 4096): raises this process's soft limit
    on open files to its hard limit, and leaves what is open now, two bursts of accepts, and room
    for media fetches and temporary files, so accepting never runs out of file descriptors
    (asyncio's accept loop retries a failed accept once per pending connection, a storm)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16), hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(8, min(soft - open_now - 2 * ACCEPT_BURST - 2 * fetch_workers - 64, 4096))


def http_protocol(read_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol with the limits it lacks: a request's headers must arrive within
    `read_timeout_s` of the connection (or of the previous answer), whatever trickles in meanwhile
    (a keep-alive timeout ends at the first byte), a connection beyond `max_connections` is
    closed at once, and malformed HTTP gets OpenAI's JSON error instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _waiting = None  # the timer for the next request's headers
        _since = 0.0  # when it started waiting for them

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                # Make room by closing the connection that has waited longest without sending a
                # request (a client sending its headers a byte at a time); with none, refuse this one.
                idle = [c for c in self.connections if c is not self and getattr(c, "_waiting", None) is not None]
                if not idle:
                    flood.note("connections over --max-connections were refused: every one is in a request")
                    transport.close()
                    return
                flood.note("idle connections were closed to make room (--max-connections)")
                min(idle, key=lambda c: c._since)._late()
            self._await_headers()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._stop_waiting()

        def on_response_complete(self) -> None:
            self._await_headers()  # before: a pipelined request handled in there stops it again
            super().on_response_complete()

        def _await_headers(self) -> None:
            if self._waiting is None and not self.transport.is_closing():
                self._since = self.loop.time()
                self._waiting = self.loop.call_later(read_timeout_s, self._late)

        def _stop_waiting(self) -> None:
            if self._waiting is not None:
                self._waiting.cancel()
                self._waiting = None

        def _late(self) -> None:
            """No request came in time (or room is needed): close, unless one is in progress."""
            self._stop_waiting()
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(invalid("malformed HTTP request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


class _Flood:
    """Log lines that a flood repeats (refused connections, failed accepts), at most one a second."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def note(self, text: str) -> None:
        now = time.monotonic()
        if text not in self._counts and len(self._counts) >= 256:  # texts a client could vary without end: one key for the rest
            text = "other events"
        self._counts[text] = self._counts.get(text, 0) + 1
        if now - self._last.get(text, -1.0) >= 1.0:
            self._last[text] = now
            count, self._counts[text] = self._counts[text], 0
            line = printable(f"qvl serve: {text}" + (f" ({count} times)" if count > 1 else ""), lines=False)
            print(line, file=sys.stderr, flush=True)


flood = _Flood()


class OneLine(logging.Filter):
    """A log record as one line through the flood guard, instead of uvicorn's own handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        flood.note(" ".join(record.getMessage().split()))
        return False


def loop_errors(loop, context: dict) -> None:
    """asyncio's errors (an accept that fails when file descriptors run out, ...) as one line a second at most."""
    if debug_enabled():
        return loop.default_exception_handler(context)
    error = context.get("exception")
    flood.note(context.get("message", "event loop error") + (f": {type(error).__name__}: {error}" if error else ""))
