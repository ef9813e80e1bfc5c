"""`qvl serve` and `--endpoint`: the OpenAI-compatible server on the tiny model, and qvl as its client."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import Quiet, StandIn, serving, start_server
from tests.robustness.corpus import png_claiming

KEY = "test-key"
FAST = ("--max-new-tokens", "12", "--dtype", "float32")


@pytest.fixture(scope="module")
def server(tiny_model):
    proc, url = start_server(tiny_model, "--api-key", KEY)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key=KEY, max_retries=0)


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def local_text(qvl, tiny_model, *args) -> str:
    r = qvl("describe", *args, "--model", tiny_model, *FAST, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["text"]


@pytest.mark.parametrize("name", ["square.png", "anim.gif", "clip.mp4"])
def test_endpoint_gives_the_local_answer(qvl, tiny_model, media_dir, server, name):
    """An image's answer is the local one; a video (sent as its JPEG frames, sized as the CPU server
    sizes them) has the local frames, sizes and prompt (its answer, tests/test_scale_out.py)."""
    here = qvl("describe", media_dir / name, "--model", tiny_model, *FAST, "--json")
    assert here.exit_code == 0, here.stderr
    here = json.loads(here.stdout)
    r = qvl("describe", media_dir / name, "--endpoint", server, "--api-key", KEY, "--model", tiny_model, *FAST, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    expected = here["text"] if name.endswith(".png") else out["text"]
    keys = ("kind", "frame_indices", "resized_width", "resized_height", "grid_thw", "visual_tokens", "tokens_with_markers")
    assert [{k: i.get(k) for k in keys} for i in out["inputs"]] == [{k: i.get(k) for k in keys} for i in here["inputs"]]
    assert out["prompt_tokens"] == here["prompt_tokens"]
    assert out["text"] == expected and out["device"] == "endpoint"
    assert out["prompt_tokens"] > out["visual_tokens"] > 0 and out["generated_tokens"] > 0
    streamed = qvl("describe", media_dir / name, "--endpoint", server, "--api-key", KEY, "--model", tiny_model, *FAST)
    assert streamed.exit_code == 0 and streamed.stdout == expected + "\n"
    assert f"{name}:" in streamed.stderr and "tok/s" in streamed.stderr


def test_chat_through_the_endpoint_sends_the_history_and_the_server_reuses_it(qvl, tiny_model, media_dir, server):
    script = f"What is it?\n/image {media_dir / 'square.png'}\nAnd this one?\n".encode()
    args = ("chat", media_dir / "photo.jpg", "--model", tiny_model, *FAST, "--json")
    here = qvl(*args, input=script)
    there = qvl(*args, "--endpoint", server, "--api-key", KEY, input=script)
    assert here.exit_code == 0 and there.exit_code == 0, there.stderr
    here, there = ([json.loads(line) for line in r.stdout.splitlines()] for r in (here, there))
    assert [r["text"] for r in there] == [r["text"] for r in here]  # the whole history went with the second turn
    assert [r["prompt_tokens"] for r in there] == [r["prompt_tokens"] for r in here]
    # usage.prompt_tokens_details: the second turn took the first turn's prompt from the server's cache
    # (the first may have taken what other tests sent before it: the system message, at least).
    assert there[1]["cached_tokens"] > there[0]["prompt_tokens"] > there[0]["cached_tokens"]


def test_several_questions_through_the_endpoint_are_answered_as_here(qvl, tiny_model, media_dir, server):
    photo = media_dir / "photo.png"
    expected = [local_text(qvl, tiny_model, photo, "-p", q) for q in ("What?", "Where?")]
    r = qvl("describe", photo, "--endpoint", server, "--api-key", KEY, "--model", tiny_model, *FAST, "-p", "What?", "-p", "Where?", "--json")
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["question"], x["text"]) for x in records] == list(zip(("What?", "Where?"), expected))
    assert r.stderr.count("photo.png:") == 1  # the media were read once


def test_a_schema_through_the_endpoint_is_sent_as_response_format(qvl, tiny_model, media_dir, server):
    photo = media_dir / "photo.png"
    args = ("--schema", "outdoor: bool, count: int", "--max-new-tokens", "64", "--dtype", "float32", "--json")
    here = qvl("describe", photo, "--model", tiny_model, *args)
    there = qvl("describe", photo, "--endpoint", server, "--api-key", KEY, "--model", tiny_model, *args)
    assert here.exit_code == there.exit_code == 0, there.stderr
    assert json.loads(there.stdout)["data"] == json.loads(here.stdout)["data"] and set(json.loads(here.stdout)["data"]) == {"outdoor", "count"}
    cut = qvl("describe", photo, "--endpoint", server, "--api-key", KEY, "--model", tiny_model, "--schema", "caption", "--max-new-tokens", "3")
    assert cut.exit_code == 1 and cut.stdout == "" and "before its JSON was complete" in cut.stderr


def test_openai_client_models_and_completions(client, media_dir, tiny_model):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_model.name]  # a local directory is served by its name, not its path
    assert models.data[0].model_extra["qvl"] == {"model_type": "qwen2_vl", "device": "cpu"}  # for qvl clients: --boxes, frame sizes
    content = [
        {"type": "image_url", "image_url": {"url": data_url(media_dir / "square.png", "image/png")}},
        {"type": "video_url", "video_url": {"url": data_url(media_dir / "clip.mp4", "video/mp4")}},
        {"type": "text", "text": "Compare them."},
    ]
    done = client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": content}], max_tokens=10)
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 64 and 0 < done.usage.completion_tokens <= 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": content}], max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])  # OpenAI's last chunk: usage alone
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_response_format_is_followed_and_fields_not_done_are_refused(client, media_dir, tiny_model):
    import jsonschema
    import openai

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}}, "required": ["ok", "tag"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(media_dir / "square.png", "image/png")}},
                                             {"type": "text", "text": "JSON, please."}]}]
    asked = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    done = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=48, response_format=asked)
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].message.content), schema)
    chunks = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=48, response_format=asked, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    cut = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=3, response_format=asked)
    assert cut.choices[0].finish_reason == "length" and len(cut.choices[0].message.content) > 0  # as OpenAI answers it
    for fields, param in (({"response_format": {"type": "xml"}}, "response_format"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
                           "response_format"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                              "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}}}}},
                           "response_format"),
                          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "no schema"}}}, "response_format"),
                          ({"response_format": {"type": "json_object"}, "stop": "x"}, "stop"),
                          ({"logprobs": True}, "logprobs"), ({"stop": [""]}, "stop"), ({"frequency_penalty": 0.5}, "frequency_penalty")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=4, **fields)
        assert e.value.body["param"] == param, e.value.body
        assert "--" not in e.value.body["message"], e.value.body  # the request's names, not the CLI's
    fine = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=2, logprobs=False, tool_choice="none",
                                          response_format={"type": "text"}, user="someone", frequency_penalty=0)
    assert fine.choices[0].message.content is not None


def test_mm_processor_kwargs_set_the_sizes(client, media_dir, tiny_model):
    content = [{"type": "image_url", "image_url": {"url": data_url(media_dir / "photo.png", "image/png")}}, {"type": "text", "text": "?"}]
    small = client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": content}], max_tokens=2,
                                           extra_body={"mm_processor_kwargs": {"max_pixels": 28 * 28 * 16}})
    large = client.chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": content}], max_tokens=2,
                                           extra_body={"mm_processor_kwargs": {"max_pixels": 12845056}})
    sizes = [r.model_extra["qvl"]["inputs"][0] for r in (small, large)]
    assert [(s["resized_width"], s["resized_height"], s["visual_tokens"]) for s in sizes] == [(112, 84, 12), (392, 308, 154)]
    assert large.usage.prompt_tokens - small.usage.prompt_tokens == 154 - 12


def test_auth_and_bad_requests(server, media_dir):
    url = server + "/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = requests.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    headers = {"Authorization": f"Bearer {KEY}"}
    assert requests.post(url, json=body, headers=headers).status_code == 200
    cases = [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}, "not an image or a video"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "http(s):// or data: URL"),
        ({"type": "image_url", "image_url": {"url": data_url(media_dir / "truncated.jpg", "image/jpeg")}}, "truncated or corrupt"),
        ({"type": "audio_url", "audio_url": {"url": "x"}}, "unsupported content part"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_claiming(100000, 100000)).decode()}},
         "decompression-bomb"),
    ]
    for part, message in cases:
        r = requests.post(url, json={"messages": [{"role": "user", "content": [part]}]}, headers=headers)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert "Traceback" not in r.text
    r = requests.post(url, data="{not json", headers={**headers, "content-type": "application/json"})
    assert r.status_code == 400
    r = requests.post(url, json={**body, "mm_processor_kwargs": {"bogus": 1}}, headers=headers)
    assert r.status_code == 400 and "unknown" in r.json()["error"]["message"]


def test_a_full_queue_answers_503(tiny_model):
    proc, url = start_server(tiny_model, "--queue-size", "1", "--batch-size", "1")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600, "min_tokens": 600}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: requests.post(url + "/chat/completions", json=body).status_code, range(6)))
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_endpoint_backend_does_not_send_a_cancelled_row_and_stops_reading_one_cancelled_mid_answer(server, tiny_model, media_dir):
    """A row cancelled before the batch goes out is not sent (Cancelled in its place); one cancelled
    while it streams ends at that chunk, its stream closed; the others are answered whole."""
    from qwen2vl_cli.endpoint import EndpointBackend, EndpointOptions
    from qwen2vl_cli.errors import Cancelled
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    backend = EndpointBackend(EndpointOptions((server,), api_key=KEY), str(tiny_model))
    gen = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
    request = backend.prepare((str(media_dir / "square.png"),), MediaOptions(), gen)
    gone, later, whole = threading.Event(), threading.Event(), threading.Event()
    gone.set()
    shown: list[str] = []

    def on_text(chunk: str) -> None:
        shown.append(chunk)
        later.set()

    [result] = backend.generate([request], gen, on_text=on_text, cancels=[later])
    assert result.text == shown[0] and result.generated_tokens < 40  # the first chunk, then nothing more was read
    out = backend.generate([request, request], gen, cancels=[gone, whole])
    assert isinstance(out[0], Cancelled) and out[1].generated_tokens == 40


def test_each_endpoint_keeps_order_and_error_records(qvl, tiny_model, media_dir, server, tmp_path):
    names = ["square.png", "notes.txt", "photo.png", "anim.gif", "photo.jpg"]
    out = tmp_path / "records.jsonl"
    args = ["describe", "--each", *[media_dir / n for n in names], "--endpoint", server, "--api-key", KEY,
            "--model", tiny_model, *FAST, "--concurrency", "3", "--resume", out]
    r = qvl(*args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert r.exit_code == 1 and [o["index"] for o in records] == [0, 1, 2, 3, 4]
    assert "error" in records[1] and all("text" in records[i] for i in (0, 2, 3, 4))
    local = json.loads(qvl("describe", "--each", media_dir / "photo.png", "--model", tiny_model, *FAST).stdout)
    assert records[2]["text"] == local["text"]
    r = qvl(*args)  # resumed: only the failed input is tried again
    assert "0 done, 1 failed, 4 skipped" in r.stderr


class _Flaky(StandIn):
    """Answers 503 twice, then a one-chunk streamed completion."""

    bodies: list = []

    def reply(self, body: dict) -> None:
        if len(type(self).bodies) <= 2:
            self.refuse(503, "busy", "server_overloaded", retry_after="0")
        else:
            self.stream("a red square", prompt_tokens=90, completion_tokens=3)


def test_client_retries_busy_servers(qvl, media_dir):
    with serving(_Flaky) as [url]:
        r = qvl("describe", media_dir / "square.png", "--endpoint", url, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == "a red square" and out["prompt_tokens"] == 90 and len(_Flaky.bodies) == 3


def test_unreachable_endpoint_is_one_line(qvl, media_dir):
    r = qvl("describe", media_dir / "square.png", "--endpoint", "http://127.0.0.1:9/v1")
    assert r.exit_code == 1 and "cannot reach --endpoint http://127.0.0.1:9/v1" in r.stderr and r.stderr.count("\n") == 1


def recorded_session(tiny_model):
    """The tiny model in this process, for driving the engine directly: the batches its backend
    starts are recorded (whether each first row streams). Returns the backend, that record, and
    its generate (answers alone, unrecorded)."""
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import RuntimeOptions

    session = LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32"), Quiet())
    batches: list[list[bool]] = []
    start = session.start

    def recording(rows, capacity=0):
        batches.append([row.on_text is not None for row in rows])
        return start(rows, capacity)

    session.start = recording
    return session, batches, session.generate


def test_streaming_requests_are_batched_and_each_streams_its_own_answer(tiny_model, media_dir):
    """Streams that wait while the model is busy with other settings run as one batch; every client gets its own text,
    chunk by chunk, equal to its answer alone. (The engine is driven in-process; its backend's
    generate is wrapped to record the batches it is given.)"""
    from qwen2vl_cli.scheduler import Engine, Job
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    session, batches, generate = recorded_session(tiny_model)
    assert session.streams_batches
    gen = GenerationOptions(max_new_tokens=16)
    names = ["photo.png", "square.png", "clip.webm", "anim.gif"]
    prepared = [session.prepare((str(media_dir / n),), MediaOptions(), gen) for n in names]
    alone = [generate([p], gen)[0].text for p in prepared]

    engine = Engine(session, batch_size=4, queue_size=16)
    busy = threading.Event()
    # Sampled, so the greedy requests cannot join its batch: they wait for it together.
    blocker = Job(prepared[0], GenerationOptions(max_new_tokens=64, min_new_tokens=64, temperature=0.7, seed=1), stream=True,
                  on_text=lambda t: busy.set())
    engine.submit(blocker)
    assert busy.wait(60)  # the engine is generating: what arrives now waits and is batched
    chunks: list[list[str]] = [[] for _ in names]
    jobs = [Job(p, gen, stream=True, on_text=chunks[i].append) for i, p in enumerate(prepared)]
    futures = [engine.submit(job) for job in jobs]
    results = [f.result(timeout=120) for f in futures]
    blocker.future.result(timeout=120)
    assert [True, True, True, True] in batches  # the four streams went through the model together
    assert [r.text for r in results] == alone
    assert ["".join(c) for c in chunks] == alone and any(len(c) > 1 for c in chunks)  # streamed as it came, not at the end


def test_requests_that_arrive_while_a_batch_runs_join_it(tiny_model, media_dir):
    """Continuous batching in the engine: requests with the running batch's sampling that arrive
    while it decodes join it (no second batch runs), whatever their lengths; each gets its answer
    alone, streamed or not, handed over when its own row ends (the short one first)."""
    from qwen2vl_cli.scheduler import Engine, Job
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    session, batches, generate = recorded_session(tiny_model)
    long, short = GenerationOptions(max_new_tokens=64, min_new_tokens=64), GenerationOptions(max_new_tokens=12, min_new_tokens=12)
    names = ["square.png", "anim.gif", "square.png", "photo.jpg"]
    gens = [long, long, short, long]
    prepared = [session.prepare((str(media_dir / n),), MediaOptions(), long) for n in names]
    alone = [generate([p], g)[0] for p, g in zip(prepared, gens)]

    engine = Engine(session, batch_size=4, queue_size=16, continuous=True)  # the default on a GPU; on a CPU, fixed batches
    busy = threading.Event()
    ended: list[int] = []
    first = Job(prepared[0], long, stream=True, on_text=lambda t: busy.set())
    engine.submit(first)
    assert busy.wait(60)  # the batch is decoding
    chunks: list[list[str]] = [[] for _ in names]
    jobs = [first] + [Job(p, g, stream=i % 2 == 1, on_text=chunks[i].append if i % 2 == 1 else None)
                      for i, (p, g) in enumerate(zip(prepared, gens)) if i > 0]
    for i, job in enumerate(jobs[1:], 1):
        job.future.add_done_callback(lambda f, i=i: ended.append(i))
        engine.submit(job)
    results = [job.future.result(timeout=120) for job in jobs]
    assert [len(b) for b in batches] == [1], batches  # one batch: the others joined it
    assert [r.text for r in results] == [a.text for a in alone]
    assert [r.generated_tokens for r in results] == [64, 64, 12, 64]
    assert ["".join(chunks[i]) for i in (1, 3)] == [alone[1].text, alone[3].text]  # the streamed ones streamed their own text
    assert ended[0] == 2  # the short one joined with the others and its answer went back first


def test_a_request_that_cannot_join_gets_its_error_and_the_batch_goes_on(tiny_model, media_dir):
    """Continuous batching: a waiting request whose inputs fail as it joins is answered with its
    error (not left waiting for ever), and the batch and the next request carry on."""
    from dataclasses import replace

    from qwen2vl_cli.scheduler import Engine, Job
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    session, _, _ = recorded_session(tiny_model)
    gen = GenerationOptions(max_new_tokens=64, min_new_tokens=64)
    good = session.prepare((str(media_dir / "square.png"),), MediaOptions(), gen)
    bad = replace(good, text=good.text.replace("Describe", "Describe (broken)"))
    inputs = session.runner.inputs

    def failing(texts, media):
        if "(broken)" in (texts if isinstance(texts, str) else texts[0]):
            raise ValueError("broken inputs")
        return inputs(texts, media)

    session.runner.inputs = failing
    engine = Engine(session, batch_size=4, queue_size=16, continuous=True)
    busy = threading.Event()
    first = Job(good, gen, stream=True, on_text=lambda t: busy.set())
    engine.submit(first)
    assert busy.wait(60)
    broken, after = Job(bad, gen, stream=False), Job(good, gen, stream=False)
    engine.submit(broken)
    engine.submit(after)
    with pytest.raises(ValueError, match="broken inputs"):
        broken.future.result(timeout=60)
    assert first.future.result(timeout=60).generated_tokens == 64 and after.future.result(timeout=60).generated_tokens == 64


def test_batching_continuous_says_when_it_cannot_join_anything(tiny_model):
    """On a CPU the batch size is 1 unless given: asking for continuous batching then says how to
    get it; with a batch size it runs quietly and answers."""
    for extra, note in ((), True), (("--batch-size", "2"), False):
        seen: list[str] = []
        proc, url = start_server(tiny_model, "--batching", "continuous", *extra, seen=seen)
        try:
            said = any("no request can join another; give --batch-size 4 or more" in line for line in seen)
            assert said == note, seen
            r = requests.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_in_a_fixed_batch_each_answer_goes_back_when_its_row_ends(tiny_model, media_dir):
    """--batching fixed: a row that ends early (the sample GIF's answer ends on its own after 37
    tokens) is answered then, not when the batch's longest row ends."""
    from qwen2vl_cli.scheduler import Engine, Job
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    session, batches, generate = recorded_session(tiny_model)
    gen = GenerationOptions(max_new_tokens=200)
    samples = Path(__file__).parent.parent / "samples"
    gif, photo = (session.prepare((str(path),), MediaOptions(), gen) for path in (samples / "bounce.gif", media_dir / "photo.png"))
    engine = Engine(session, batch_size=2, queue_size=16, continuous=False)
    busy = threading.Event()
    blocker = Job(photo, GenerationOptions(max_new_tokens=64, min_new_tokens=64, temperature=0.7, seed=1), stream=True,
                  on_text=lambda t: busy.set())
    engine.submit(blocker)
    assert busy.wait(60)  # the two below wait together and run as one batch
    ended: list[str] = []
    jobs = {"photo": Job(photo, gen, stream=False), "gif": Job(gif, gen, stream=False)}  # the photo first in the batch
    for name, job in jobs.items():
        job.future.add_done_callback(lambda f, name=name: ended.append(name))
        engine.submit(job)
    results = {name: job.future.result(timeout=120) for name, job in jobs.items()}
    assert [len(b) for b in batches] == [1, 2], batches
    assert results["gif"].finish_reason == "stop" and results["gif"].generated_tokens < results["photo"].generated_tokens
    assert ended == ["gif", "photo"]


@pytest.mark.parametrize("continuous", [False, True])
def test_a_request_whose_inputs_fail_fails_alone_in_its_batch(tiny_model, media_dir, continuous):
    """Four requests batched together, one whose prompt cannot become model inputs (an image token
    with no image): it gets its error, the other three their answers alone."""
    from dataclasses import replace

    from qwen2vl_cli.scheduler import Engine, Job
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    session, batches, generate = recorded_session(tiny_model)
    gen = GenerationOptions(max_new_tokens=8)
    prepared = [session.prepare((str(media_dir / n),), MediaOptions(), gen) for n in ["photo.png", "square.png", "anim.gif"]]
    alone = [generate([p], gen)[0].text for p in prepared]
    broken = replace(prepared[1], text=prepared[1].text.replace("Describe", "<|image_pad|> Describe"))
    engine = Engine(session, batch_size=4, queue_size=16, continuous=continuous)
    busy = threading.Event()
    blocker = Job(prepared[0], GenerationOptions(max_new_tokens=64, min_new_tokens=64, temperature=0.7, seed=1), stream=True,
                  on_text=lambda t: busy.set())
    engine.submit(blocker)
    assert busy.wait(60)  # what arrives now waits, and the four go through the model together
    jobs = [Job(p, gen, stream=False) for p in (prepared[0], broken, prepared[1], prepared[2])]
    futures = [engine.submit(job) for job in jobs]
    with pytest.raises(ValueError):
        futures[1].result(timeout=120)
    assert [futures[i].result(timeout=120).text for i in (0, 2, 3)] == alone
    assert [False] * 4 in batches


def test_hosts_named_are_the_only_ones_answered():
    from qwen2vl_cli.serve_http import allowed_hosts

    assert set(allowed_hosts("0.0.0.0", ("qvl.example",))) == {"qvl.example", "localhost", "127.0.0.1", "[::1]"}  # not any name
    assert allowed_hosts("::", ()) == ["*"]
    assert set(allowed_hosts("127.0.0.1", ("box",))) == {"127.0.0.1", "localhost", "[::1]", "box"}


def test_the_default_length_stays_within_the_servers_bound():
    from qwen2vl_cli.serve_requests import Limits, generation_options

    assert generation_options({}, Limits(max_tokens=100)).max_new_tokens == 100  # was 512: a 400 for every request
    assert generation_options({}, Limits()).max_new_tokens == 512


def test_a_bug_is_one_json_500_and_one_log_line(capfd):
    """A route that fails: OpenAI's JSON 500, and one line on stderr where uvicorn would log 60."""
    from starlette.testclient import TestClient

    from qwen2vl_cli.serve_http import Edge, flood

    async def broken(scope, receive, send):
        raise RuntimeError("a bug\nover two lines")

    r = TestClient(Edge(broken, hosts=None), raise_server_exceptions=False).get("/v1/models")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    err = capfd.readouterr().err
    assert err == "qvl serve: error in /v1/models: RuntimeError: a bug over two lines\n"
    for _ in range(1000):  # a flood of one event: a line a second at most
        flood.note("test flood")
    assert capfd.readouterr().err.count("\n") <= 2


def test_endpoint_lines_stay_apart_and_a_missing_v1_is_hinted(tiny_model, media_dir, server):
    """stdout and stderr on one terminal: the sizes the server says come after the answer's line, not on it."""
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", str(media_dir / "square.png"), "--api-key", KEY, "--model", str(tiny_model),
           "--max-new-tokens", "12"]
    r = subprocess.run(cmd + ["--endpoint", server], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    assert any(line.startswith(f"{media_dir / 'square.png'}: image ") for line in r.stdout.splitlines()), r.stdout
    root = server.rsplit("/v1", 1)[0]
    r = subprocess.run(cmd + ["--endpoint", root], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"try --endpoint {root}/v1" in r.stderr, r.stderr
