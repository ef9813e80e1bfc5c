"""Turn what the user typed (path, file://, http(s)://, data:, '-') into a local file or bytes.

Downloads and stdin go to one temporary directory that is removed when the resolver closes.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

from qwen2vl_cli import config as C
from qwen2vl_cli.errors import MediaError, UsageError

if TYPE_CHECKING:
    from qwen2vl_cli.urlpolicy import UrlPolicy

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    label: str  # how messages name it
    path: Path | None = None
    data: bytes | None = None
    frames: tuple[bytes, ...] | None = None  # a video sent as its sampled frames (frames.py), JPEG each

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.frames is not None:  # hashed as what was sent
            return io.BytesIO(b"".join(self.frames))
        assert self.path is not None
        return open(self.path, "rb")

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower() if self.path is not None else ""


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SourceResolver:
    """Resolves sources; use as a context manager so temporary files are always removed."""

    def __init__(
        self,
        stdin: BinaryIO | None = None,
        max_bytes: int = C.MAX_DOWNLOAD_BYTES,
        timeout: tuple[float, float] = (C.CONNECT_TIMEOUT_S, C.READ_TIMEOUT_S),
        deadline_s: float = C.DOWNLOAD_DEADLINE_S,
        policy: UrlPolicy | None = None,
        max_frames: int | None = None,
    ):
        """`policy`: which addresses URLs may reach (a server's); None fetches what the user names.
        `max_frames`: the frames of a video sent as frames (`data:video/jpeg`; None: frames.MAX_FRAMES)."""
        self._policy = policy
        self._max_frames = max_frames
        self._stdin = stdin
        self._stdin_used = False
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._deadline_s = deadline_s
        self._tmp: str | None = None
        self._lock = threading.Lock()
        self._fetched: dict[str, Source] = {}

    def __enter__(self) -> SourceResolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _tempfile(self, suffix: str) -> Path:
        with self._lock:
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="qvl-")
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=suffix)
        os.close(fd)
        return Path(name)

    def fetch(self, text: str) -> None:
        """Resolve ahead (a server fetches a request's URLs at once, on threads of their own);
        `resolve` then returns the result without another download."""
        source = self.resolve(text)
        with self._lock:
            self._fetched[text] = source

    def resolve(self, text: str) -> Source:
        if text in self._fetched:
            return self._fetched[text]
        if text == "-":
            return self._from_stdin()
        match = _SCHEME.match(text)
        scheme = match.group(1).lower() if match else ""
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme in ("http", "https"):
            return self._download(text)
        if scheme == "file":
            return self._local(text, self._file_uri_path(text))
        if scheme == "data":
            return self._data_uri(text)
        if scheme and text[len(scheme) + 1 :].startswith("//"):
            raise MediaError(text, f"unsupported URL scheme '{scheme}': use a path, file://, http(s):// or data:")
        return self._local(text, Path(text).expanduser())

    def _local(self, label: str, path: Path) -> Source:
        if not path.exists():
            if " " in label.strip() and "/" not in label and os.sep not in label:
                raise MediaError(label, f"no such file; a question goes after -p, as in -p {shlex.quote(label)}")
            raise MediaError(label, "no such file")
        if path.is_dir():
            raise MediaError(label, "is a directory: give the files in it instead (for example DIR/*.jpg)")
        if not os.access(path, os.R_OK):
            raise MediaError(label, "permission denied")
        if path.is_fifo():  # a pipe (`<(cat x.jpg)`, a FIFO): read it once, as stdin is
            try:
                with open(path, "rb") as stream:
                    return Source(label, path=self._spool(label, stream))
            except OSError as e:
                raise MediaError(label, f"cannot read it ({e.strerror or e})") from None
        if not path.is_file():
            raise MediaError(label, "is a device, not a file or a pipe")
        return Source(label, path=path)

    @staticmethod
    def _file_uri_path(uri: str) -> Path:
        from urllib.request import url2pathname  # pulls in http.client: only when a file:// URI is given

        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(uri, f"file:// URIs must name a local file, not host '{parsed.netloc}'")
        return Path(url2pathname(unquote(parsed.path)))

    def _data_uri(self, uri: str) -> Source:
        label = _short(uri, 40)
        head, sep, payload = uri.partition(",")
        if not sep:
            raise MediaError(label, "malformed data: URI (no comma): use data:image/png;base64,...")
        mime = head[5:].split(";")[0].lower()
        if not (mime.startswith("image/") or mime.startswith("video/")):
            raise MediaError(label, f"data: URI of type '{mime or 'text/plain'}': only image/* and video/* are accepted")
        if mime == "video/jpeg" and head.lower().endswith(";base64"):  # a video as the frames a client sampled
            from qwen2vl_cli import frames

            return Source(label, frames=frames.split(payload, label, self._max_frames or frames.MAX_FRAMES))
        if head.lower().endswith(";base64"):
            try:
                data = base64.b64decode("".join(payload.split()), validate=True)  # whitespace aside, only base64
            except (binascii.Error, ValueError) as e:
                raise MediaError(label, f"invalid base64 in data: URI ({e})") from None
        else:
            data = unquote(payload).encode("latin-1", "replace")
        if not data:
            raise MediaError(label, "empty data: URI")
        return Source(label, data=data)

    def _from_stdin(self) -> Source:
        if self._stdin_used:
            raise UsageError("'-' (standard input) can be given only once")
        self._stdin_used = True
        stream = self._stdin if self._stdin is not None else sys.stdin.buffer
        if hasattr(stream, "isatty") and stream.isatty():
            raise MediaError("-", "standard input is a terminal: pipe a file in, as in `qvl describe - < photo.jpg`")
        return Source("<stdin>", path=self._spool("-", stream, "standard input"))

    def _spool(self, label: str, stream: BinaryIO, what: str = "the stream") -> Path:
        """A stream that can be read only once, into a temporary file (media readers seek)."""
        path = self._tempfile("")
        total = 0
        with open(path, "wb") as out:
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
                if total > self._max_bytes:
                    raise MediaError(label, f"{what} is larger than the {format_size(self._max_bytes)} limit (--max-download)")
                out.write(chunk)
        if total == 0:
            raise MediaError(label, f"{what} is empty")
        return path

    def _download(self, url: str) -> Source:
        from qwen2vl_cli.urlpolicy import Deadline, fetch_session

        label = _short(url)
        path = self._tempfile("")  # no name from the URL: what a file is comes from its bytes
        # The deadline runs from connecting to the last byte, headers included, whatever the server sends meanwhile.
        with Deadline(self._deadline_s) as deadline, fetch_session(self._policy, deadline) as session:
            session.max_redirects = C.MAX_REDIRECTS
            late = MediaError(label, f"download took longer than {self._deadline_s:g} s")
            try:
                total = self._stream(session, url, label, path, deadline)
            except MediaError:
                raise
            except Exception as e:
                if deadline.passed:
                    raise late from None
                if (error := self._fetch_error(label, e)) is None:
                    raise
                raise error from None
            if deadline.passed:  # a connection shut mid-body can read as its end
                raise late
        if total == 0:
            raise MediaError(label, "the server sent an empty body")
        return Source(label, path=path)

    def _stream(self, session, url: str, label: str, path: Path, deadline) -> int:
        """The body of `url` into `path`, within the size limit; returns its size."""
        with session.get(url, stream=True, timeout=self._timeout) as resp:
            if resp.status_code >= 400:
                raise MediaError(label, f"HTTP {resp.status_code} {resp.reason}".rstrip())
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self._max_bytes:
                raise MediaError(label, f"is {format_size(int(declared))}, over the {format_size(self._max_bytes)} download limit (--max-download)")
            total = 0
            with open(path, "wb") as out:
                while chunk := resp.raw.read1(_CHUNK, decode_content=True):
                    total += len(chunk)
                    if total > self._max_bytes:
                        raise MediaError(label, f"download exceeds the {format_size(self._max_bytes)} limit (--max-download)")
                    if deadline.passed:  # the watchdog's backstop
                        raise MediaError(label, f"download took longer than {self._deadline_s:g} s")
                    out.write(chunk)
        return total

    def _fetch_error(self, label: str, e: Exception) -> MediaError | None:
        """What a failed download says: with a policy (a server), refused and unreachable read the
        same, so the server cannot be used to scan its own network."""
        import requests
        import urllib3

        from qwen2vl_cli.urlpolicy import RefusedAddress

        unreachable = "could not connect: check the URL and your network"
        if self._policy is not None:
            unreachable = "cannot fetch it: the host is unreachable or not a public address"
        silent = f"server sent nothing for {self._timeout[1]:g} s"
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return MediaError(label, unreachable if self._policy is not None else f"timed out connecting after {self._timeout[0]:g} s")
        if isinstance(e, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):  # the latter from read1 in the body
            return MediaError(label, silent)
        if isinstance(e, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
            return MediaError(label, "the server closed the connection before the end of the file")
        if isinstance(e, urllib3.exceptions.DecodeError):
            return MediaError(label, "the server sent a body that does not decompress")
        if isinstance(e, requests.exceptions.ConnectionError):
            if "timed out" not in str(e).lower() or isinstance(e, RefusedAddress):  # a stall in the body arrives wrapped like this
                return MediaError(label, unreachable)
            return MediaError(label, silent)
        if isinstance(e, requests.exceptions.TooManyRedirects):
            return MediaError(label, f"more than {C.MAX_REDIRECTS} redirects")
        if isinstance(e, requests.exceptions.RequestException):
            return MediaError(label, f"download failed ({type(e).__name__}): check the URL and your network")
        if isinstance(e, OSError):
            return MediaError(label, f"download failed ({e.strerror or e})")
        return None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_size(text: str, option: str = "--max-download") -> int:
    """'500M', '2G', '100k' or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise UsageError(f"{option} {text}: give a size such as 500M or 2G")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))
