"""Sources: paths, file://, data:, stdin and http(s), with their failure modes."""

from __future__ import annotations

import base64
import io

import pytest

from qwen2vl_cli.errors import MediaError, UsageError
from qwen2vl_cli.sources import SourceResolver


def test_path_and_file_uri(media_dir):
    with SourceResolver() as r:
        assert r.resolve(str(media_dir / "photo.png")).path == media_dir / "photo.png"
        assert r.resolve((media_dir / "photo.png").as_uri()).path == media_dir / "photo.png"


def test_data_uri_decodes_bytes(media_dir):
    raw = (media_dir / "photo.png").read_bytes()
    with SourceResolver() as r:
        src = r.resolve("data:image/png;base64," + base64.b64encode(raw).decode())
    assert src.data == raw and src.label.startswith("data:image/png")


def test_stdin_goes_to_a_temporary_file_removed_on_close(media_dir):
    raw = (media_dir / "photo.jpg").read_bytes()
    with SourceResolver(stdin=io.BytesIO(raw)) as r:
        src = r.resolve("-")
        assert src.path.read_bytes() == raw
        with pytest.raises(UsageError, match="only once"):
            r.resolve("-")
    assert not src.path.exists()


def test_http_download_and_cleanup(http_server, media_dir):
    with SourceResolver() as r:
        src = r.resolve(f"{http_server}/photo.jpg")
        assert src.path.read_bytes() == (media_dir / "photo.jpg").read_bytes()
    assert not src.path.exists()


@pytest.mark.parametrize(
    "url,problem",
    [
        ("/missing.jpg", "HTTP 404"),
        ("/huge", "download limit"),
        ("/redirect-loop", "redirects"),
        ("/stall", "sent nothing for 0.5 s"),
    ],
)
def test_http_failures_are_one_line_media_errors(http_server, url, problem):
    with SourceResolver(timeout=(2.0, 0.5)) as r, pytest.raises(MediaError, match=problem):
        r.resolve(http_server + url)


def test_download_size_cap_while_streaming(http_server):
    with SourceResolver(max_bytes=1000) as r, pytest.raises(MediaError, match="limit"):
        r.resolve(f"{http_server}/photo.png")


@pytest.mark.parametrize(
    "text,problem",
    [
        ("ftp://example.com/a.jpg", "unsupported URL scheme 'ftp'"),
        ("data:text/plain;base64,aGVsbG8=", "only image/\\* and video/\\*"),
        ("data:image/png;base64", "no comma"),
        ("/no/such/file.jpg", "no such file"),
        ("file://otherhost/a.jpg", "local file"),
    ],
)
def test_bad_sources(text, problem):
    with SourceResolver() as r, pytest.raises(MediaError, match=problem):
        r.resolve(text)


def test_directory_is_refused(media_dir):
    with SourceResolver() as r, pytest.raises(MediaError, match="is a directory"):
        r.resolve(str(media_dir / "folder"))


@pytest.mark.parametrize(
    "path,code,problem",
    [
        ("/endless", 2, "exceeds the 1.0 MiB limit (--max-download)"),
        ("/huge", 2, "over the 1.0 MiB download limit"),
        ("/short", 2, "closed the connection before the end"),
        ("/liar", 2, "truncated or corrupt"),
        ("/redirect-loop", 2, "more than 5 redirects"),
        ("/missing.png", 2, "HTTP 404"),
    ],
)
def test_misbehaving_servers_give_one_line_and_leave_no_files(qvl, tiny_model, http_server, tmp_path, monkeypatch, path, code, problem):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = qvl("describe", http_server + path, "--model", tiny_model, "--max-download", "1M")
    assert r.exit_code == code and problem in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # the partial download is gone


def test_max_download_parses_sizes(qvl, tiny_model, media_dir):
    r = qvl("inspect", media_dir / "photo.png", "--max-download", "lots")
    assert r.exit_code == 2 and "give a size such as 500M" in r.stderr
