"""qvl chat: turns that reuse the conversation's keys and values and answer as a whole prefill
would, piped turns, the context bound, /save and /load, and a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import Quiet

FAST = ("--max-new-tokens", "8", "--dtype", "float32")


def _backend(model, cache_size=None):
    from qwen2vl_cli.backend import LocalBackend

    return LocalBackend(RuntimeOptions(str(model), dtype="float32", cache_size=cache_size), Quiet())


@pytest.mark.parametrize("family, first, later", [
    ("qwen2_vl", "photo.jpg", "clip.mp4"),
    ("qwen2_5_vl", "anim.gif", "photo.png"),
    ("qwen3_vl", "clip.mp4", "photo.jpg"),
])
def test_each_turn_answers_as_a_whole_prefill_and_prefills_only_its_own_tokens(family_models, media_dir, family, first, later):
    from qwen2vl_cli.chat import Chat, LocalEngine

    model = family_models(family)
    engine = LocalEngine(_backend(model))
    whole = _backend(model, cache_size=0)  # no cache: every prompt prefilled whole
    gen = GenerationOptions(max_new_tokens=8)
    chat = Chat(lambda: engine, MediaOptions(cpu_budget=True), gen)
    chat.add(str(media_dir / first))
    tokenizer = engine.backend.runner.processor.tokenizer
    steps = [("What is in it?", None), ("And the colours?", None), ("What changed?", later), ("Say more.", None)]
    answers = []
    for question, medium in steps:
        if medium is not None:
            chat.add(str(media_dir / medium))
        messages, media = chat.messages(question), chat.media()
        before = chat.context_tokens
        answer = chat.ask(question)
        [alone] = whole.generate([whole.conversation(messages, [m.plan for m in media], [m.loaded for m in media])], gen)
        assert answer.result.tokens == alone.tokens, (family, question)
        assert answer.result.prompt_tokens == alone.prompt_tokens
        if answers:
            # The conversation so far came from the cache: the last prompt and its answer's tokens
            # that its text tokenizes back to (random weights write stray bytes), all but the last.
            last = answers[-1].result
            again = tokenizer(last.text, add_special_tokens=False)["input_ids"]
            same = len(os.path.commonprefix([list(last.tokens), again]))
            assert answer.result.cached_tokens == last.prompt_tokens + min(same, last.generated_tokens - 1), (family, question)
            assert answer.result.cached_tokens <= before
            assert answer.new_tokens == answer.result.prompt_tokens - answer.result.cached_tokens
        if medium is None and answers:
            assert answer.result.vision_s is None  # no medium went through the tower again
        answers.append(answer)
    assert answers[2].result.vision_s is not None  # the new medium did
    assert chat.totals.turns == 4 and chat.totals.cached == sum(a.result.cached_tokens for a in answers)


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_piped_turns_are_records_and_the_first_is_describes_answer(qvl, tiny_model, media_dir):
    photo = str(media_dir / "photo.jpg")
    r = qvl("chat", photo, "--model", tiny_model, *FAST, "--json", input=b"What is it?\n\n/stats\nAnd the colours?\n")
    assert r.exit_code == 0, r.stderr
    first, second = _records(r.stdout)
    assert (first["turn"], first["question"], second["turn"]) == (1, "What is it?", 2)
    assert first["cached_tokens"] == 0 and first["new_prompt_tokens"] == first["prompt_tokens"]
    assert second["cached_tokens"] > first["prompt_tokens"] and second["new_prompt_tokens"] < 40
    assert second["context_tokens"] == second["prompt_tokens"] + second["generated_tokens"]
    assert "turns 1 · context" in r.stderr and "taken from earlier turns 0" in r.stderr  # /stats after the first, on stderr
    assert r.stderr.count("context ") >= 3 and "kept)" in r.stderr  # a status line a turn
    described = qvl("describe", photo, "--model", tiny_model, *FAST, "-p", "What is it?", "--json")
    assert described.exit_code == 0 and json.loads(described.stdout)["text"] == first["text"]

    # --blocks: a turn is lines up to a blank one, a command on its first line run before it.
    r = qvl("chat", "--model", tiny_model, *FAST, "--blocks", "--json", input=f"/image {photo}\nWhat\nis it?\n\n\nAnd now?\n".encode())
    assert r.exit_code == 0, r.stderr
    assert [(x["question"], len(x["inputs"])) for x in _records(r.stdout)] == [("What\nis it?", 1), ("And now?", 1)]
    # A block whose first line fails is not asked; a mistyped command is not a question.
    r = qvl("chat", "--model", tiny_model, *FAST, "--blocks", "--json", input=b"/image /no/such.jpg\nWhat is it?\n\n/sav talk.json\n")
    assert r.exit_code == 2
    assert [(x.get("command"), "error" in x) for x in _records(r.stdout)] == [("/image /no/such.jpg", True), ("/sav talk.json", True)]
    assert "the lines under it were not asked" in r.stderr and "/sav: not a command" in r.stderr


def test_piped_lines_are_answered_as_they_come(tiny_model, media_dir):
    """A script may read an answer before it writes the next question: stdin is read a line at a time."""
    import subprocess
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "chat", str(media_dir / "photo.jpg"), "--model", str(tiny_model), *FAST,
                             "--json", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        proc.stdin.write("What is it?\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # stdin still open
        proc.stdin.write("And now?\n")
        proc.stdin.close()
        second = json.loads(proc.stdout.readline())
        assert proc.wait() == 0
    finally:
        timer.cancel()
    assert (first["turn"], second["turn"]) == (1, 2) and second["cached_tokens"] > first["prompt_tokens"]


def test_a_turn_past_the_context_is_refused_and_clear_starts_again(qvl, tiny_model, media_dir):
    photo = str(media_dir / "photo.jpg")
    r = qvl("chat", photo, "--model", tiny_model, *FAST, "--max-context", "200", "--json",
            input=b"What is it?\nAnd the colours?\n/clear\nHello?\n")
    assert r.exit_code == 2  # the refused turn
    records = _records(r.stdout)
    assert [("turn" in x, x["question"]) for x in records] == [(True, "What is it?"), (False, "And the colours?"), (True, "Hello?")]
    assert "tokens, near the --max-context of 200: /clear starts a new one" in r.stderr  # said before the first turn
    assert "over the --max-context of 200: /clear starts a new one" in records[1]["error"]["message"]
    assert records[2]["prompt_tokens"] < 40 and records[2]["cached_tokens"] < 40  # a new conversation, without the photo
    # An answer that would pass the bound is held to the room left, saying so.
    held = qvl("chat", photo, "--model", tiny_model, "--dtype", "float32", "--max-new-tokens", "64", "--min-new-tokens", "64",
               "--max-context", str(records[0]["prompt_tokens"] + 5), "--json", input=b"What is it?\n")
    assert held.exit_code == 0 and _records(held.stdout)[0]["generated_tokens"] == 5
    assert "this answer may take 5 tokens, the room left under the --max-context" in held.stderr
    # Streamed, a refused turn writes nothing to stdout: it holds the first answer alone.
    refused = qvl("chat", photo, "--model", tiny_model, *FAST, "--max-context", "200", "-q", input=b"What is it?\nAnd the colours?\n")
    alone = qvl("chat", photo, "--model", tiny_model, *FAST, "--max-context", "200", "-q", input=b"What is it?\n")
    assert (refused.exit_code, alone.exit_code) == (2, 0) and refused.stdout == alone.stdout != ""


def test_a_saved_conversation_loads_back_to_the_same_next_answer(qvl, tiny_model, media_dir, tmp_path):
    saved = tmp_path / "talk.json"
    clip = str(media_dir / "clip.mp4")
    script = f"/video {clip} --nframes 4\nWhat happens?\nAnd then?\n/save {saved}\nWhy?\n".encode()
    first = qvl("chat", "--model", tiny_model, *FAST, "--json", input=script)
    assert first.exit_code == 0, first.stderr
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0] == {"type": "video_url", "video_url": {"url": clip}, "options": {"nframes": 4}}
    again = qvl("chat", "--model", tiny_model, *FAST, "--json", input=f"/load {saved}\nWhy?\n".encode())
    assert again.exit_code == 0, again.stderr
    [after_load] = _records(again.stdout)
    assert after_load["text"] == _records(first.stdout)[-1]["text"]
    assert after_load["inputs"][0]["frames"] and after_load["inputs"][0]["frame_indices"] == _records(first.stdout)[0]["inputs"][0]["frame_indices"]
    # /save never overwrites; what is not a conversation that fits is refused, the conversation
    # staying as it was; with --json each failed line is a record.
    files = {"bad": '{"role": "user"}', "broken": "[{", "roles": '[{"role": "assistant", "content": "hi"}]',
             "unanswered": '[{"role": "user", "content": "hi"}]', "long": json.dumps([{"role": "user", "content": "word " * 300},
                                                                                      {"role": "assistant", "content": "ok"}])}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    loads = "".join(f"/load {tmp_path / name}.json\n" for name in files)
    r = qvl("chat", "--model", tiny_model, *FAST, "--json", "--max-context", "200",
            input=f"Hello?\n/save {saved}\n{loads}/load {tmp_path / 'none.json'}\n/stats\nAgain?\n".encode())
    assert r.exit_code == 2 and json.loads(saved.read_text()) == messages
    hello, *failed, again = _records(r.stdout)
    assert again["cached_tokens"] > hello["prompt_tokens"]  # the first conversation went on, kept
    assert [x["command"] for x in failed] == [f"/save {saved}", *loads.splitlines(), f"/load {tmp_path / 'none.json'}"]
    said = [x["error"]["message"] for x in failed]
    assert "the file exists" in said[0] and "not a saved conversation" in said[1] and "not JSON" in said[2]
    assert "is assistant, where user comes" in said[3] and "has no answer" in said[4] and "over the --max-context of 200" in said[5]
    assert "no such file" in said[6] and f"turns 1 · context {hello['context_tokens']} of 200 tokens" in r.stderr


def test_lines_commands_and_media_arguments(tmp_path):
    from qwen2vl_cli.chat_ui import media_line, medium_arguments, turns
    from qwen2vl_cli.errors import UsageError

    spaced = tmp_path / "my [bold]photo.jpg"
    spaced.write_bytes(b"x")
    assert media_line(f"'{spaced}'") == [str(spaced)]  # as a file manager drops it
    assert media_line(str(spaced).replace(" ", "\\ ")) == [str(spaced)]
    assert media_line(str(spaced)) == [str(spaced)]  # as it is, spaces and all
    assert media_line(f"'{spaced}' https://example.com/a.png") == [str(spaced), "https://example.com/a.png"]
    assert media_line(f"what is {spaced}?") is None and media_line("hello") is None and media_line("it's") is None
    assert media_line("/tmp/not/there.jpg") == ["/tmp/not/there.jpg"] and media_line("cat.png") == ["cat.png"]  # said to be missing
    assert media_line("why?") is None and media_line("/etc") is not None
    assert medium_arguments("/video", "clip.mp4 --fps 0.5 --nframes 8") == ("clip.mp4", {"fps": 0.5, "nframes": 8})
    assert medium_arguments("/image", f"{spaced} --max-pixels 50000") == (str(spaced), {"max_pixels": 50000})
    for bad, said in (("clip.mp4 --fps", "give a value"), ("clip.mp4 --speed 2", "not one of its options"), ("--fps 1", "give a path"),
                      ("clip.mp4 --nframes 1.5", "whole number")):
        with pytest.raises(UsageError, match=said):
            medium_arguments("/video", bad)
    assert list(turns(iter(["a\n", "b\n", "\n", "\n", "c\n"]), blocks=True)) == ["a\nb", "c"]
    assert list(turns(iter(["a\n", "b\n"]), blocks=False)) == ["a", "b"]


def test_chat_in_a_real_terminal(tiny_model, media_dir, tmp_path):
    """A pseudo-terminal: the prompt at once, a streamed answer stopped by Ctrl-C with the session
    kept, /image, /save, /load, and Ctrl-D to leave; the line editor's history is written."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HOME=str(tmp_path), XDG_DATA_HOME="", TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", QVL_DEBUG="")
    started = time.perf_counter()
    child = pexpect.spawn(sys.executable, ["-m", "qwen2vl_cli", "chat", str(media_dir / "photo.jpg"), "--model", str(tiny_model),
                                           "--dtype", "float32", "--max-new-tokens", "4000", "--min-new-tokens", "4000", "--no-repeat-guard"],
                          env=env, encoding="utf-8", timeout=90, dimensions=(40, 160))
    try:
        child.expect(">>>")
        assert time.perf_counter() - started < 30  # the prompt does not wait for the model (the suite's machine is busy)
        child.sendline("What is in the picture?")
        child.expect("visual tokens")
        time.sleep(3)  # the answer streaming: 4000 tokens take the tiny model several seconds
        child.send("\x1b[200~line one\nline two\x1b[201~")  # a paste while it streams: kept for the next prompt, not sent
        child.sendcontrol("c")
        child.expect("stopped: Ctrl-C, the answer so far kept")
        child.expect(">>>")
        child.sendline("")  # the pasted lines, one question
        time.sleep(2)  # its answer streaming
        child.sendcontrol("c")
        child.expect("stopped: Ctrl-C, the answer so far kept")
        child.expect(">>>")
        child.sendline(f"/image {media_dir / 'square.png'}")
        child.expect(r"square\.png\S*: \S*image.*visual tokens")
        child.expect(">>>")
        saved = tmp_path / "talk.json"
        child.sendline(f"/save {saved}")
        child.expect("saved 2 turns to")
        child.expect(">>>")
        child.sendline(f"/load {saved}")
        child.expect("loaded 2 turns")
        child.expect(">>>")
        child.sendline("/stats")
        child.expect("turns 2 · context")
        child.expect(">>>")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    questions = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for m in json.loads(saved.read_text())[::2]]
    assert questions == ["What is in the picture?", "line one\nline two"]
    history = (tmp_path / ".local" / "share" / "qvl" / "chat_history").read_text()
    assert "What is in the picture?" in history and "/stats" in history


def test_a_model_that_cannot_load_ends_the_session_in_one_line(qvl, tmp_path):
    r = qvl("chat", "--model", tmp_path / "no-model", "-q", input=b"Hello?\nAnd again?\n")
    assert r.exit_code == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "no-model" in r.stderr and "Traceback" not in r.stderr
    r = qvl("chat", "-p")
    assert r.exit_code == 2 and "requires an argument" in r.stderr and "see `qvl chat --help`" in r.stderr
