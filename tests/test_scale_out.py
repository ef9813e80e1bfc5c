"""Past one machine: qvl serve's names, /health and /metrics, and --endpoint spread over several servers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import requests

from tests.helpers import StandIn, serving, start_server, wait_for_records

KEY = "scale-key"


def _chat(url: str, model: str | None, tiny: bool = True, key: str = KEY) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5}
    if model is not None:
        body["model"] = model
    return requests.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_served_names_health_and_metrics_that_count_the_load(tiny_model):
    """Any --served-model-name (or the model as given) is answered, another is a 404 naming them;
    /health needs no key, /metrics does; its counters, parsed with prometheus-client's own
    parser, match the requests and tokens served."""
    from prometheus_client.parser import text_string_to_metric_families

    proc, url = start_server(tiny_model, "--api-key", KEY, "--served-model-name", "qwen", "--served-model-name", "qwen-vl")
    base = url.removesuffix("/v1")
    try:
        models = requests.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["qwen", "qwen-vl"]
        answers = [_chat(url, name) for name in ("qwen", "qwen-vl", str(tiny_model), None)]
        assert [r.status_code for r in answers] == [200] * 4
        streamed = requests.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 3,
                                                                  "stream": True}, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert [r.json()["model"] for r in answers] == ["qwen", "qwen-vl", str(tiny_model), "qwen"]
        other = _chat(url, "llama")
        assert other.status_code == 404 and "'qwen', 'qwen-vl'" in other.json()["error"]["message"]
        assert _chat(url, "qwen", key="wrong").status_code == 401

        assert requests.get(base + "/health", timeout=30).json() == {"status": "ok"}  # no key: for load balancers
        assert requests.get(base + "/metrics", timeout=30).status_code == 401
        page = requests.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(page.text) for s in f.samples}
        assert samples[("qvl_requests_total", (("status", "200"),))] == 5  # the stream counted once, when it ended
        assert samples[("qvl_requests_total", (("status", "404"),))] == 1
        assert samples[("qvl_requests_total", (("status", "401"),))] == 1
        usage = [r.json()["usage"] for r in answers]
        assert samples[("qvl_prompt_tokens_total", ())] > sum(u["prompt_tokens"] for u in usage)  # and the stream's
        assert samples[("qvl_generation_tokens_total", ())] > sum(u["completion_tokens"] for u in usage)
        assert samples[("qvl_generation_tokens_total", ())] <= sum(u["completion_tokens"] for u in usage) + 3
        assert samples[("qvl_time_to_first_token_seconds_count", ())] == 5
        assert samples[("qvl_queue_depth", ())] == 0 and samples[("qvl_batch_rows", ())] == 0
        assert ("qvl_cache_hits_total", (("cache", "prefix"),)) in samples  # the reuse caches, on by default in serve
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_spread_over_endpoints_and_go_on_when_one_dies(tiny_model, media_dir, tmp_path):
    """Two servers and an address where none listens: every input gets one record, none twice;
    one server killed after the first records, the rest go to the other; the summary says who
    answered how many."""
    (a, url_a), (b, url_b) = start_server(tiny_model), start_server(tiny_model)
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    listing = tmp_path / "endpoints.txt"
    listing.write_text(f"# the boxes\n{url_b}\n{dead}\n")
    names = ["square.png", "photo.png", "photo.jpg", "transparent.png", "rotated.jpg", "anim.gif"] * 2
    out = tmp_path / "records.jsonl"
    cmd = [sys.executable, "-m", "qwen2vl_cli", "describe", "--each", *[str(media_dir / n) for n in names], "--model", str(tiny_model),
           "--endpoint", url_a, "--endpoint", f"@{listing}", "--concurrency", "1", "--max-new-tokens", "60", "--min-new-tokens", "60",
           "-o", str(out)]
    try:
        run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        wait_for_records(out, 3)
        b.send_signal(signal.SIGKILL)
        _, err = run.communicate(timeout=300)
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait(timeout=30)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert run.returncode == 0, err
    assert [r["index"] for r in records] == list(range(len(names))) and all("error" not in r for r in records)
    said = err.strip().splitlines()[-1]
    served = dict(part.rsplit(" ", 1) for part in said.split("answered by ", 1)[1].split(", "))
    assert set(served) == {url_a, url_b, dead} and served[dead] == "0"
    assert int(served[url_a]) + int(served[url_b]) == len(names) and int(served[url_b]) >= 1


def test_frames_survive_the_trip_within_the_stated_tolerance(media_dir):
    """qvl's frames as JPEG (frames.QUALITY, no chroma subsampling) and back: the same count and
    size, a mean difference under 1 (uint8 units), the metadata that places them kept."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from qwen2vl_cli import frames, media, sizing
    from qwen2vl_cli.sources import Source
    from qwen2vl_cli.types import MediaOptions, VisionSpec

    src = Source("clip.mp4", path=media_dir / "clip.mp4")
    info, _ = media.probe(src)
    plan = sizing.plan("clip.mp4", info, VisionSpec(), MediaOptions())
    loaded = media.load(src, info, plan)
    url = frames.encode(loaded)
    head, payload = url.split(",", 1)
    assert head == "data:video/jpeg;base64"
    back = np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames.split(payload, "clip", 768)])
    assert back.shape == loaded.frames.shape
    assert np.abs(back.astype(np.int16) - loaded.frames).mean() < 1.0
    assert frames.metadata(plan)["frames_indices"] == list(plan.frame_indices) and base64.b64decode(payload.split(",")[0])[:2] == b"\xff\xd8"


def test_a_video_goes_to_the_server_as_the_frames_planned_here(qvl, family_models, media_dir):
    """For each family, a clip and an animated GIF through qvl serve: the server takes the frames
    planned here (the same indices, size, grid, visual tokens, time stamps and prompt tokens as a
    local run), and answers exactly as this model does given the frames sent (their JPEG pixels
    and metadata). A pixel limit is given: a CPU sizes its own media smaller unless told, and a
    remote engine's device is not known here."""
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.endpoint import EndpointBackend
    from qwen2vl_cli.types import EndpointOptions, GenerationOptions, MediaOptions, RuntimeOptions
    from tests.helpers import Quiet

    opts, gen = MediaOptions(max_pixels=50176, fps=3.0), GenerationOptions(max_new_tokens=12)
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model = family_models(family)
        proc, url = start_server(model)
        local = LocalBackend(RuntimeOptions(str(model), device="cpu", dtype="float32"), Quiet())
        try:
            for name in ("clip.mp4", "anim.gif"):
                args = ("video", media_dir / name, "--model", model, "--max-new-tokens", "12", "--dtype", "float32", "--json",
                        "--max-pixels", "50176", "--fps", "3")
                here, there = qvl(*args), qvl(*args, "--endpoint", url)
                assert here.exit_code == there.exit_code == 0, there.stderr
                here, there = json.loads(here.stdout), json.loads(there.stdout)
                mine, theirs = here["inputs"][0], there["inputs"][0]
                for key in ("frame_indices", "resized_width", "resized_height", "grid_thw", "visual_tokens", "tokens_with_markers",
                            "time_stamps_s"):
                    assert mine.get(key) == theirs.get(key), (family, name, key)
                assert there["prompt_tokens"] == here["prompt_tokens"], (family, name)
                # What was sent, answered here as the server answers it.
                sent = EndpointBackend(EndpointOptions((url,)), str(model)).prepare((str(media_dir / name),), opts, gen, True)
                [video] = [p["video_url"]["url"] for p in sent.messages[-1]["content"] if p["type"] == "video_url"]
                assert video.startswith("data:video/jpeg;base64,") and video.count(",") == len(mine["frame_indices"])
                chat = [{"role": "user", "content": [{"type": "media"}, {"type": "text", "text": "Describe this video."}]}]
                prepared = local.prepare_chat(chat, [video], opts, gen, timings=list(sent.timings))
                [answer] = local.generate([prepared], gen)
                assert there["text"] == answer.text, (family, name)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _frames_request(count: int, sizes=((56, 56),), metadata=None) -> dict:
    import base64
    import io

    from PIL import Image

    def jpeg(n: int) -> str:
        out = io.BytesIO()
        Image.new("RGB", sizes[n % len(sizes)], (n % 256, 0, 0)).save(out, "JPEG")
        return base64.b64encode(out.getvalue()).decode()

    url = "data:video/jpeg;base64," + ",".join(jpeg(n) for n in range(count))
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "?"}]}],
            "max_tokens": 3}
    if metadata is not None:
        body["mm_processor_kwargs"] = {"video_metadata": metadata}
    return body


def test_serve_bounds_a_video_sent_as_frames(tiny_model):
    """Frames over --max-frames, frames of two sizes, frames whose pixels together are over
    --max-source-pixels, metadata that does not match the frames: each a 400 naming it, before
    any frame is decoded; four frames with their metadata are answered, placed by it."""
    proc, url = start_server(tiny_model, "--max-frames", "8", "--max-source-pixels", "200000", "--max-visual-tokens", "256")
    post = lambda body: requests.post(url + "/chat/completions", json=body, timeout=120)  # noqa: E731
    try:
        tiny_rate = [{"fps": 1e-310, "frames_indices": [0, 1, 2, 3]}]
        for body, said in ((_frames_request(9), "9 frames: more than the 8 this server takes (--max-frames)"),
                           (_frames_request(4, sizes=((56, 56), (84, 56))), "its frames differ in size"),
                           (_frames_request(8, sizes=((200, 200),)), "over the 200,000 allowed here"),
                           (_frames_request(4, metadata=[{"fps": 30, "frames_indices": [0, 1]}]), "frames_indices"),
                           (_frames_request(4, metadata=[]), "0 entries for 1 videos sent as frames"),
                           (_frames_request(4, metadata=tiny_rate), "fps of"),
                           ({**_frames_request(4), "mm_processor_kwargs": {"nframes": 2}}, "videos sent as frames are taken as they are")):
            r = post(body)
            assert r.status_code == 400 and said in r.json()["error"]["message"], r.text
        ok = post(_frames_request(4, metadata=[{"fps": 30, "frames_indices": [0, 10, 20, 30], "total_num_frames": 31}]))
        assert ok.status_code == 200, ok.text
        [video] = ok.json()["qvl"]["inputs"]
        assert video["frame_indices"] == [0, 10, 20, 30] and video["native_fps"] == 30 and video["grid_thw"][0] == 2
        # A request's own minimum cannot make its frames larger than the server's budget: they are sized into it.
        big = post({**_frames_request(2, sizes=((16, 16),)), "mm_processor_kwargs": {"min_pixels": 2_000_000_000, "fps": 0.5}})
        assert big.status_code == 200, big.text
        [video] = big.json()["qvl"]["inputs"]
        assert video["visual_tokens"] <= 256 and video["frame_times_s"] == [0.0, 2.0]  # its rate, without metadata
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _NoFrames(StandIn):
    """Takes video files, not videos as frames."""

    bodies: list = []

    def reply(self, body: dict) -> None:
        if "video/jpeg" in json.dumps(body):
            self.refuse(400, "unsupported video type video/jpeg")
        else:
            self.stream("a clip")


def test_a_server_that_refuses_frames_gets_the_file_with_a_note(qvl, media_dir):
    with serving(_NoFrames) as [url]:
        r = qvl("video", media_dir / "clip.mp4", "--endpoint", url, "--fps", "4", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["text"] == "a clip" and "refused the videos as frames" in r.stderr and "its own sampling applies" in r.stderr
    framed, filed = _NoFrames.bodies
    part = framed["messages"][-1]["content"][0]
    assert part["video_url"]["url"].startswith("data:video/jpeg;base64,") and len(part["uuid"]) == 32
    assert framed["mm_processor_kwargs"]["do_sample_frames"] is False and "video_metadata" in framed["mm_processor_kwargs"]
    assert filed["messages"][-1]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert filed["mm_processor_kwargs"] == {"fps": 4.0}  # the file is the server's to sample, by the options given


class _Failing(StandIn):
    """Answers 500: a request's own failure."""

    bodies: list = []

    def reply(self, body: dict) -> None:
        self.refuse(500, "this request broke something", "server_error")


def test_a_500_is_the_requests_failure_not_a_reason_to_send_it_elsewhere(qvl, media_dir):
    """Only an endpoint that cannot be reached or says it is unavailable (502, 503, 504) is left for
    another: a 500 is the request's own, and sending it on would take the other servers down too."""
    with serving(_Failing, _Failing) as urls:
        r = qvl("describe", media_dir / "square.png", "--endpoint", urls[0], "--endpoint", urls[1], "--json")
    assert r.exit_code == 1 and "answered 500: this request broke something" in r.stderr
    assert len(_Failing.bodies) == 2  # one endpoint, tried twice (its own retry); the other never
