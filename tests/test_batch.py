"""`--each`: many inputs, one model; records, order, resume, batching and lazy source lists."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2vl_cli.records import RecordFile, iter_sources

FAST = ("--max-new-tokens", "6", "--dtype", "float32")


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_each_gives_one_record_per_input_and_goes_on_after_a_bad_one(qvl, tiny_model, media_dir):
    r = qvl("describe", "--each", media_dir / "photo.png", media_dir / "notes.txt", media_dir / "square.png",
            "--model", tiny_model, *FAST)
    assert r.exit_code == 1  # one input failed
    out = records(r.stdout)
    assert [o["index"] for o in out] == [0, 1, 2]
    assert [Path(o["source"]).name for o in out] == ["photo.png", "notes.txt", "square.png"]
    assert out[1]["error"]["type"] == "bad_input" and "not an image or a video" in out[1]["error"]["message"]
    assert "text" not in out[1] and out[0]["text"] and out[2]["visual_tokens"] == 64
    assert "2 done, 1 failed, 0 skipped" in r.stderr and "items/s" in r.stderr


def test_stdin_list_with_comments_blank_lines_and_a_broken_entry(qvl, tiny_model, media_dir):
    listing = f"# captions\n{media_dir / 'square.png'}\n\n{media_dir / 'missing.jpg'}\n{media_dir / 'photo.jpg'}\n"
    r = qvl("describe", "--from", "-", "--model", tiny_model, *FAST, input=listing.encode())
    out = records(r.stdout)
    assert r.exit_code == 1 and len(out) == 3
    assert "no such file" in out[1]["error"]["message"] and "text" in out[2]


def test_nul_separated_list(qvl, tiny_model, media_dir):
    listing = b"\0".join(str(media_dir / n).encode() for n in ("square.png", "photo.png")) + b"\0"
    r = qvl("describe", "--each", "--from", "-", "-0", "--model", tiny_model, *FAST, input=listing)
    assert r.exit_code == 0 and [Path(o["source"]).name for o in records(r.stdout)] == ["square.png", "photo.png"]


def test_ordered_and_unordered(qvl, tiny_model, media_dir):
    args = ["describe", "--each", media_dir / "square.png", media_dir / "notes.txt", media_dir / "photo.png",
            "--model", tiny_model, *FAST, "--batch-size", "3"]
    assert [o["index"] for o in records(qvl(*args).stdout)] == [0, 1, 2]
    # The bad input is known before the batch is generated; unordered, it comes out first.
    assert [o["index"] for o in records(qvl(*args, "--unordered").stdout)] == [1, 0, 2]


def test_batched_equals_unbatched_under_greedy(qvl, tiny_model, media_dir):
    """float32 on the tiny model: token-identical. (In bfloat16, padding changes GEMM shapes and a
    near-tie can flip a late token.)"""
    names = ["square.png", "photo.png", "photo.jpg", "anim.gif", "clip.mp4"]
    args = ["describe", "--each", *[media_dir / n for n in names], "--model", tiny_model,
            "--max-new-tokens", "16", "--dtype", "float32"]
    one = records(qvl(*args, "--batch-size", "1").stdout)
    many = records(qvl(*args, "--batch-size", "5").stdout)
    assert [o["text"] for o in one] == [o["text"] for o in many]
    assert [o["generated_tokens"] for o in one] == [o["generated_tokens"] for o in many]
    assert [o["prompt_tokens"] for o in one] == [o["prompt_tokens"] for o in many]


def test_refilled_rows_give_the_records_of_fixed_batches(tiny_model, media_dir):
    """--each with ended rows' slots taken by the next inputs at once (the default on a GPU): the
    same records, in order, as one input at a time; a bad input is its own error record."""
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.batch import Emitter, Tally, run_each
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    backend = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    bounce = Path(__file__).parent.parent / "samples" / "bounce.gif"  # its answer ends on its own after 37 tokens
    names = ["square.png", "photo.png", "notes.txt", bounce, "clip.mp4", bounce, "photo.jpg"]
    gen = GenerationOptions(max_new_tokens=48)

    def run(refill: bool, batch_size: int) -> list[dict]:
        got: list[str] = []
        tally = Tally()
        run_each(iter(str(media_dir / n) for n in names), backend, MediaOptions(), gen, "k", batch_size, Emitter(got.append, "jsonl", True),
                 tally, refill=refill)
        assert (tally.done, tally.failed) == (6, 1)
        return [json.loads(line) for line in got]

    started = []
    start = backend.start
    backend.start = lambda rows, capacity=0: started.append(len(rows)) or start(rows, capacity)
    fixed, refilled = run(False, 1), run(True, 3)
    assert started[0] == 3 and sum(started) < 6  # later inputs took the slots of rows that ended
    assert [r["index"] for r in refilled] == list(range(len(names)))
    assert [(r.get("text"), r.get("generated_tokens")) for r in refilled] == [(r.get("text"), r.get("generated_tokens")) for r in fixed]
    assert "error" in refilled[2] and len({r["generated_tokens"] for r in refilled if "text" in r}) > 1  # answers of different lengths


def test_text_format_escapes_both_columns_and_says_failures_on_stderr(qvl, tiny_model, media_dir, tmp_path):
    odd = tmp_path / "tab\there\nnewline.png"
    shutil.copy(media_dir / "square.png", odd)
    r = qvl("describe", "--each", odd, media_dir / "notes.txt", "--model", tiny_model, *FAST, "--format", "text")
    assert r.exit_code == 1
    [line] = r.stdout.splitlines()  # the failure is no caption
    source, text = line.split("\t")
    assert source == str(odd).replace("\t", "\\t").replace("\n", "\\n") and text
    assert f"qvl: error: {media_dir / 'notes.txt'}: not an image or a video" in r.stderr


def test_resume_never_truncates_a_file_it_did_not_write(qvl, tiny_model, media_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nsecond line\n")
    r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, *FAST, "--resume", notes)
    assert r.exit_code == 2 and "line 1 is not a record qvl wrote" in r.stderr
    assert notes.read_text() == "my notes\nsecond line\n"
    r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, "--resume", notes, "--format", "text")
    assert r.exit_code == 2 and "drop --format text" in r.stderr


def test_an_empty_source_list_is_an_error_before_the_model_loads(qvl, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n\n")
    r = qvl("describe", "--from", listing, "--model", tmp_path / "no-model-here", *FAST)  # never looked for
    assert r.exit_code == 2 and r.stderr == f"qvl: error: --from {listing}: no sources in it (one per line; blank lines and # comments are skipped)\n"


def test_video_each(qvl, tiny_model, media_dir):
    r = qvl("video", "--each", media_dir / "clip.mp4", media_dir / "anim.gif", "--model", tiny_model, *FAST)
    assert r.exit_code == 0 and [o["inputs"][0]["kind"] for o in records(r.stdout)] == ["video", "video"]
    r = qvl("video", media_dir / "clip.mp4", media_dir / "anim.gif", "--model", tiny_model)
    assert r.exit_code == 2 and "--each" in r.stderr


def test_output_file_is_never_overwritten(qvl, tiny_model, media_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    out.write_text("precious\n")
    r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, "--output", out)
    assert r.exit_code == 2 and "--resume" in r.stderr and out.read_text() == "precious\n"
    r = qvl("describe", media_dir / "square.png", "--model", tiny_model, "--output", tmp_path / "x.jsonl")
    assert r.exit_code == 2 and "--output works with --each" in r.stderr


def test_several_questions_give_a_record_each_and_resume_by_question(qvl, tiny_model, media_dir, tmp_path):
    """-p twice with --each: per input, a record per question (with it), each the answer a run of
    its own gives, a bad input an error record per question; a resume with a third question adds
    only its records."""
    photo, square, missing = media_dir / "photo.png", media_dir / "square.png", media_dir / "missing.png"
    out = tmp_path / "out.jsonl"
    r = qvl("describe", "--each", photo, missing, square, "--model", tiny_model, *FAST, "-p", "What?", "-p", "Where?", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    got = records(out.read_text())
    assert [(o["index"], o["question"]) for o in got] == [(i, q) for i in range(3) for q in ("What?", "Where?")]
    assert "error" in got[2] and "error" in got[3] and "4 done, 2 failed, 0 skipped" in r.stderr
    alone = records(qvl("describe", "--each", photo, square, "--model", tiny_model, *FAST, "-p", "Where?").stdout)
    assert [got[1]["text"], got[5]["text"]] == [a["text"] for a in alone]
    assert got[1]["request_key"] == alone[0]["request_key"] != got[0]["request_key"]
    r = qvl("describe", "--each", photo, missing, square, "--model", tiny_model, *FAST, "-p", "What?", "-p", "Where?", "-p", "When?",
            "--resume", out)
    assert r.exit_code == 1 and "2 done, 3 failed, 4 skipped" in r.stderr  # the missing file is tried again for each question
    added = records(out.read_text())[6:]
    assert [(o["index"], o["question"], "error" in o) for o in added] == [
        (0, "When?", False), (1, "What?", True), (1, "Where?", True), (1, "When?", True), (2, "When?", False)]


def test_resume_skips_what_is_done_and_redoes_changed_options(qvl, tiny_model, media_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    first = [media_dir / "square.png", media_dir / "notes.txt", media_dir / "photo.png"]
    r = qvl("describe", "--each", *first, "--model", tiny_model, *FAST, "--resume", out)
    assert r.exit_code == 1 and r.stdout == "" and len(records(out.read_text())) == 3
    r = qvl("describe", "--each", *first, media_dir / "photo.jpg", "--model", tiny_model, *FAST, "--resume", out)
    assert "1 done, 1 failed, 2 skipped" in r.stderr  # the failed input is tried again
    sources = [Path(o["source"]).name for o in records(out.read_text()) if "error" not in o]
    assert sources == ["square.png", "photo.png", "photo.jpg"]
    r = qvl("describe", "--each", *first[:1], "--model", tiny_model, *FAST, "--resume", out, "-p", "Other?")
    assert "1 done, 0 failed, 0 skipped" in r.stderr  # another prompt is another request


def test_truncated_last_record_is_detected_and_redone(qvl, tiny_model, media_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    r = qvl("describe", "--each", media_dir / "square.png", media_dir / "photo.png", "--model", tiny_model, *FAST, "--resume", out)
    whole = out.read_text()
    out.write_text(whole[: len(whole) - 40])  # as if killed in the middle of writing the second record
    r = qvl("describe", "--each", media_dir / "square.png", media_dir / "photo.png", "--model", tiny_model, *FAST, "--resume", out)
    assert r.exit_code == 0 and "1 done, 0 failed, 1 skipped" in r.stderr
    assert [Path(o["source"]).name for o in records(out.read_text())] == ["square.png", "photo.png"]


def test_resume_after_a_kill(tiny_model, media_dir, tmp_path):
    from tests.helpers import wait_for_records

    out = tmp_path / "captions.jsonl"
    sources = [str(media_dir / n) for n in ("square.png", "photo.png", "photo.jpg", "transparent.png")]
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *sources, "--model", str(tiny_model),
           "--dtype", "float32", "--max-new-tokens", "800", "--min-new-tokens", "800", "--batch-size", "1",
           "--resume", str(out), "-q"]
    proc = subprocess.Popen(cmd)
    wait_for_records(out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = records(out.read_text())
    assert 1 <= len(written) < 4
    done = subprocess.run(cmd, capture_output=True, text=True)  # the same request: it carries on
    assert done.returncode == 0
    final = records(out.read_text())
    assert final[: len(written)] == written  # nothing already written was touched
    assert sorted(o["source"] for o in final) == sorted(sources)
    assert all("error" not in o for o in final)


def test_source_lists_are_read_lazily():
    class Tracked(io.BytesIO):
        def __init__(self, data):
            super().__init__(data)
            self.max_pos = 0

        def readline(self, *a):
            line = super().readline(*a)
            self.max_pos = max(self.max_pos, self.tell())
            return line

        def __iter__(self):
            return iter(self.readline, b"")

    stream = Tracked(b"".join(f"/data/img{i:06d}.jpg\n".encode() for i in range(100_000)))
    it = iter_sources([], "-", False, stdin=stream)
    assert [next(it), next(it)] == ["/data/img000000.jpg", "/data/img000001.jpg"]
    assert stream.max_pos < 1000


def test_record_file_repairs_a_cut_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "x", "source": "a", "index": 0, "request_key": "k"}\n{"text": "y", "sou')
    f = RecordFile(str(path), resume=True)
    f.write('{"text": "y", "source": "b", "index": 1, "request_key": "k"}')
    f.close()
    assert f.done == {(0, "a", "k")}
    assert [json.loads(line)["source"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_resume_keeps_a_record_per_input_line(qvl, tiny_model, media_dir, tmp_path):
    """A list that names a file twice: each line is an input of its own, done or not by its index."""
    out = tmp_path / "captions.jsonl"
    a, b = str(media_dir / "square.png"), str(media_dir / "photo.png")
    assert qvl("describe", "--each", a, "--model", tiny_model, *FAST, "--resume", out).exit_code == 0
    r = qvl("describe", "--each", a, b, a, "--model", tiny_model, *FAST, "--resume", out)
    assert r.exit_code == 0 and "2 done, 0 failed, 1 skipped" in r.stderr
    assert sorted((o["index"], o["source"]) for o in records(out.read_text())) == [(0, a), (1, b), (2, a)]


@pytest.mark.parametrize("content", [b"my notes, not records, no newline at the end", b'{"a": 1}\n',
                                     b'{"text": "x", "source": "a", "index": 0, "request_key": "k"}\nnot a record, last\n'])
def test_resume_never_touches_a_file_qvl_did_not_write(qvl, tiny_model, media_dir, tmp_path, content):
    out = tmp_path / "notes.jsonl"
    out.write_bytes(content)
    r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, *FAST, "--resume", out)
    assert r.exit_code == 2 and "is not a record qvl wrote" in r.stderr and out.read_bytes() == content


def test_record_file_paths_that_cannot_work_are_usage_errors(qvl, tiny_model, media_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "r.jsonl")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for option, path, problem in [("--output", tmp_path / "no" / "r.jsonl", "no such directory"),
                                  ("--output", tmp_path, "is a directory"),
                                  ("--output", tmp_path / "file" / "r.jsonl", "a part of the path is a file"),
                                  ("--resume", tmp_path / "dangling", "a symbolic link to nothing"),
                                  ("--resume", tmp_path / "loop", "a symbolic link to nothing"),
                                  ("--resume", "/dev/zero", "not a regular file")]:
        r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, option, path)
        assert r.exit_code == 2 and f"{option} {path}: {problem}" in r.stderr and "unexpected" not in r.stderr, r.stderr


def test_a_second_writer_is_refused(qvl, tiny_model, media_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    writing = RecordFile(str(out), resume=True)  # another qvl, still running
    try:
        r = qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, *FAST, "--resume", out)
        assert r.exit_code == 2 and "another qvl is writing to it" in r.stderr and out.read_bytes() == b""
    finally:
        writing.close()
    assert qvl("describe", "--each", media_dir / "square.png", "--model", tiny_model, *FAST, "--resume", out).exit_code == 0


def test_records_reach_redirected_stdout_while_a_progress_bar_runs_on_a_terminal(tiny_model, media_dir, tmp_path):
    """`qvl describe --each *.jpg > captions.jsonl` typed in a terminal: stderr is a TTY, stdout a file."""
    import os
    import pty
    import threading

    names = ["square.png", "photo.png", "photo.jpg"]
    out = tmp_path / "captions.jsonl"
    primary, secondary = pty.openpty()
    screen = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    with open(out, "wb") as stdout:
        proc = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *[str(media_dir / n) for n in names],
                               "--model", str(tiny_model), *FAST], stdout=stdout, stderr=secondary, env=env, timeout=300)
    os.close(secondary)
    reader.join(timeout=10)
    os.close(primary)
    assert proc.returncode == 0, screen.decode(errors="replace")
    assert [Path(o["source"]).name for o in records(out.read_text())] == names
    terminal = screen.decode(errors="replace")
    assert "3 done, 0 failed" in terminal and '"request_key"' not in terminal


def test_a_write_failure_names_the_file_and_the_summary_counts_what_is_on_disk(tiny_model, media_dir, tmp_path):
    """A full disk, made by a file size limit (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource

    out = tmp_path / "captions.jsonl"
    names = ["square.png", "photo.png", "photo.jpg", "transparent.png"]
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *[str(media_dir / n) for n in names],
           "--model", str(tiny_model), *FAST, "--output", str(out)]

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))  # two records of about 650 bytes fit

    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    written = records(out.read_text()) if out.read_text().endswith("\n") else records(out.read_text().rsplit("\n", 1)[0])
    assert r.returncode == 1 and 1 <= len(written) < len(names)
    assert f"qvl: error: --output {out}: cannot write (File too large)" in r.stderr and "Traceback" not in r.stderr
    assert f"{len(written)} done, 0 failed" in r.stderr
