"""Stop strings (`--stop`, serve's `stop`): the answer ends before the first, as OpenAI trims it,
whole across tokens and across streamed chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.rows import Row, generate
from qwen2vl_cli.streams import StopText
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import Quiet, answers

PHOTO = Path(__file__).parent.parent / "samples" / "photo.jpg"


def test_a_stop_string_is_held_back_until_it_is_not_one():
    chunks = []
    text = StopText(chunks.append, ("END", "xy"))
    for grown in ("ab", "abE", "abEN", "abENx", "abENxy", "abENxyz"):
        text.feed(grown)
    assert "".join(chunks) == text.sent == "abEN" and text.stopped
    later = []
    plain = StopText(later.append, ("END",))
    plain.feed("abEN")
    assert later == ["ab"]  # "EN" could start the stop string: held back
    plain.feed("abENd", final=True)
    assert "".join(later) == "abENd" and not plain.stopped


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_the_answer_ends_before_its_stop_string_streamed_or_not(tiny_model, engine):
    backend = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", engine=engine), Quiet())
    free = GenerationOptions(max_new_tokens=40)
    p = backend.prepare((str(PHOTO),), MediaOptions(), free)
    whole = answers(backend.runner, [p], free)[0].text
    stop = whole[12:17]  # five characters: several tokens of the tiny vocabulary
    expected = whole[: whole.find(stop)]
    gen = GenerationOptions(max_new_tokens=40, stop=(stop, "never in it"))
    streamed: list[str] = []
    [alone] = generate(backend.runner, [Row(p.text, list(p.loaded), gen, on_text=streamed.append)])
    assert alone.text == "".join(streamed) == expected and alone.finish_reason == "stop"
    assert backend.runner.processor.tokenizer.decode(list(alone.tokens)).find(stop) >= 0  # its tokens end with the stop string
    if engine == "static":
        both = answers(backend.runner, [p, p], gen)
        assert [r.text for r in both] == [expected] * 2 and alone.generated_tokens < 40


def test_stop_through_serve_and_the_cli(qvl, tiny_model, media_dir):
    from openai import OpenAI

    from tests.helpers import start_server

    whole = json.loads(qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--max-new-tokens", "40", "--json").stdout)["text"]
    stop = whole[12:17]
    expected = whole[: whole.find(stop)]
    r = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--max-new-tokens", "40", "--stop", stop)
    assert r.exit_code == 0 and r.stdout == expected + "\n"
    proc, url = start_server(tiny_model)
    try:
        client = OpenAI(base_url=url, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                  + __import__("base64").b64encode(PHOTO.read_bytes()).decode()}}]}]
        whole = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=40).choices[0].message.content
        stop = whole[12:17]
        expected = whole[: whole.find(stop)]
        done = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=40, stop=stop)
        assert done.choices[0].message.content == expected and done.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=40, stop=[stop], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        import openai

        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=4, stop=["a", "b", "c", "d", "e"])
        assert e.value.body["param"] == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = qvl("describe", PHOTO, "--model", tiny_model, "--stop", "")
    assert bad.exit_code == 2 and bad.stderr == "qvl: error: --stop: give 1 to 4 strings, none of them empty\n"
