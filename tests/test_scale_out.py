"""Past one machine: qvl serve's names, /health and /metrics, and --endpoint spread over several servers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import requests

from tests.helpers import start_server

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
        assert [r.json()["model"] for r in answers] == ["qwen", "qwen-vl", str(tiny_model), "qwen"]
        other = _chat(url, "llama")
        assert other.status_code == 404 and "'qwen', 'qwen-vl'" in other.json()["error"]["message"]
        assert _chat(url, "qwen", key="wrong").status_code == 401

        assert requests.get(base + "/health", timeout=30).json() == {"status": "ok"}  # no key: for load balancers
        assert requests.get(base + "/metrics", timeout=30).status_code == 401
        page = requests.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(page.text) for s in f.samples}
        assert samples[("qvl_requests_total", (("status", "200"),))] == 4
        assert samples[("qvl_requests_total", (("status", "404"),))] == 1
        assert samples[("qvl_requests_total", (("status", "401"),))] == 1
        usage = [r.json()["usage"] for r in answers]
        assert samples[("qvl_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usage)
        assert samples[("qvl_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usage)
        assert samples[("qvl_time_to_first_token_seconds_count", ())] == 4
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
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.1)
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
