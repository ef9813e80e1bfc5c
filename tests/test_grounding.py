"""Grounding: each family's documented answer shapes read back in the original image's pixels,
what cannot be read reported, the picture drawn, and `--boxes` / `--draw` through the CLI."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from PIL import Image

from qwen2vl_cli import grounding
from qwen2vl_cli.families import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, QWEN3_VL_MOE
from qwen2vl_cli.types import MediaPlan
from tests.helpers import Quiet

# A 1000x300 picture the model saw at 1008x308: the two axes scale differently.
PLAN = MediaPlan("wide.png", "image", 1000, 300, 1008, 308, (1, 22, 72), 396)


def test_qwen2_vl_boxes_with_and_without_their_markers():
    raw = ("<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
           "<|box_start|>(500,0),(1000,1000)<|box_end|> and <|object_ref_start|>Mr. O'Neil's dog, (left)<|object_ref_end|>"
           "<|box_start|>(0,0),(10,10)<|box_end|>")
    found = grounding.read(QWEN2_VL, raw, PLAN, "the red car")
    assert found.problems == ()
    assert found.boxes == (
        {"label": "the red car", "box": [100.0, 60.0, 300.0, 120.0]},
        {"label": "the red car", "box": [500.0, 0.0, 1000.0, 300.0]},
        {"label": "Mr. O'Neil's dog, (left)", "box": [0.0, 0.0, 10.0, 3.0]},
    )
    # Decoding drops the special tokens: the label is the text before the numbers.
    stripped = "the red car(100,200),(300,400)(500,0),(1000,1000)"
    assert grounding.read(QWEN2_VL, stripped, PLAN, "x").boxes == found.boxes[:2]


def test_qwen2_5_vl_json_is_in_pixels_of_the_resized_input():
    answer = '```json\n[\n\t{"bbox_2d": [0, 0, 1008, 308], "label": "everything"},\n\t{"bbox_2d": [504, 154, 756, 231], "label": "car, \\"blue\\""}\n]\n```'
    found = grounding.read(QWEN2_5_VL, answer, PLAN, "car")
    assert found.problems == ()
    assert found.boxes == (
        {"label": "everything", "box": [0.0, 0.0, 1000.0, 300.0]},
        {"label": 'car, "blue"', "box": [500.0, 150.0, 750.0, 225.0]},
    )


@pytest.mark.parametrize("family", [QWEN3_VL, QWEN3_VL_MOE])
def test_qwen3_vl_json_boxes_and_points_on_a_0_to_1000_grid(family):
    answer = '[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}, {"point_2d": [500, 500], "label": "handle"}, {"bbox_2d": [0, 0, 1000, 1000]}]'
    found = grounding.read(family, answer, PLAN, "cup")
    assert found.problems == ()
    assert found.boxes == (
        {"label": "cup", "box": [100.0, 60.0, 300.0, 120.0]},
        {"label": "handle", "point": [500.0, 150.0]},
        {"label": "cup", "box": [0.0, 0.0, 1000.0, 300.0]},  # no label: what was asked for
    )


@pytest.mark.parametrize("family,answer,boxes,problem", [
    (QWEN3_VL, '[{"bbox_2d": [1, 2, 3], "label": "x"}]', 0, "not 2 or 4 numbers"),
    (QWEN3_VL, '[{"bbox_2d": [10, 20, 1200, 40], "label": "x"}]', 0, "outside the 0..1000 grid"),
    (QWEN3_VL, '[{"bbox_2d": [300, 20, 100, 40], "label": "x"}]', 0, "the wrong way round"),
    (QWEN3_VL, '[{"bbox_2d": ["a", 2, 3, 4]}]', 0, "not 2 or 4 numbers"),
    (QWEN3_VL, '[{"bbox_2d": [NaN, 2, 3, 4]}]', 0, "not 2 or 4 numbers"),
    (QWEN3_VL, '[{"label": "x"}]', 0, "neither bbox_2d nor point_2d"),
    (QWEN3_VL, '[{"bbox_2d": 5, "label": "x"}, {"bbox_2d": null}]', 0, "5 is not 2 or 4 numbers"),
    (QWEN3_VL, '[{"bbox_2d": [1, 2, 3, 4]}, 7]', 1, "item 2 is not an object"),
    (QWEN3_VL, '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6', 1, "ends mid-item"),
    (QWEN2_5_VL, '[{"bbox_2d": [0, 0, 1009, 10], "label": "x"}]', 0, "outside the 1008x308 input"),
    (QWEN2_VL, "the car(100,200),(300,400)(500,60", 1, "ends mid-box"),
    (QWEN2_VL, "the car(100,200),(3000,400)", 0, "outside the 0..1000 grid"),
])
def test_what_cannot_be_read_is_reported_not_guessed(family, answer, boxes, problem):
    found = grounding.read(family, answer, PLAN, "x")
    assert len(found.boxes) == boxes
    assert found.problems and problem in found.problems[0]


@pytest.mark.parametrize("family", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL])
@pytest.mark.parametrize("answer", ["(.,.),(.,.)", "{", "[", "```json", '[{"bbox_2d": [1e999, 0, 1, 1]}]', "(1,2),(3,", "{}{}[]",
                                    '{"bbox_2d": [1, 2, 3, 4], "label": 5}', "\x00(1,1),(2,2)"])
def test_odd_answers_never_raise_and_boxes_stay_in_the_picture(family, answer):
    found = grounding.read(family, answer, PLAN, "x")
    for b in found.boxes:
        numbers = b.get("box", []) + b.get("point", [])
        assert all(0 <= x <= PLAN.width for x in numbers[0::2]) and all(0 <= y <= PLAN.height for y in numbers[1::2])


@pytest.mark.parametrize("family", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL])
def test_prose_without_boxes_is_neither_a_box_nor_a_problem(family):
    found = grounding.read(family, "There is no red car in this picture.", PLAN, "the red car")
    assert found.boxes == () and found.problems == ()


@pytest.mark.parametrize("family", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL])
@pytest.mark.parametrize("size,resized", [((1000, 300), (1008, 308)), ((333, 777), (336, 784)), ((4032, 3024), (1288, 966))])
def test_round_trip_through_each_coordinate_system(family, size, resized):
    """A box in original pixels, written as the family writes it (whole numbers), reads back within
    the rounding of one grid step, whatever the resize did to each axis."""
    (w, h), (rw, rh) = size, resized
    plan = MediaPlan("p.png", "image", w, h, rw, rh, (1, rh // 14, rw // 14), 1)
    box = [0.137 * w, 0.41 * h, 0.9 * w, 0.77 * h]
    if family.coordinates == "relative1000":
        sx, sy = 1000 / w, 1000 / h
    else:
        sx, sy = rw / w, rh / h
    written = [round(v * (sx if i % 2 == 0 else sy)) for i, v in enumerate(box)]
    answer = (f'[{{"bbox_2d": {written}, "label": "thing"}}]' if family.json_boxes
              else f"<|object_ref_start|>thing<|object_ref_end|><|box_start|>({written[0]},{written[1]}),({written[2]},{written[3]})<|box_end|>")
    [found] = grounding.read(family, answer, plan, "thing").boxes
    for i, (got, want) in enumerate(zip(found["box"], box)):
        step = 1 / (sx if i % 2 == 0 else sy)
        assert abs(got - want) <= step / 2 + 0.05, (i, got, want)


def test_drawing_keeps_the_picture_and_marks_the_box():
    picture = Image.new("RGB", (400, 300), (255, 255, 255))
    out = grounding.draw(picture, ({"label": "thing", "box": [100.0, 100.0, 300.0, 250.0]}, {"label": "dot", "point": [50.0, 50.0]}))
    assert out.size == picture.size and picture.getpixel((100, 175)) == (255, 255, 255)
    assert out.getpixel((100, 175)) != (255, 255, 255)  # the box's left edge
    assert out.getpixel((200, 175)) == (255, 255, 255)  # its inside stays as it was
    assert out.getpixel((390, 10)) == (255, 255, 255)


class _Grounder(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose model answers `answer`; it keeps the request it got."""

    answer = ""
    model_type: str | None = None
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        extra = {"qvl": {"model_type": type(self).model_type}} if type(self).model_type else {}
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x", **extra}]}).encode())

    def do_POST(self):
        type(self).seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": type(self).answer}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 90, "completion_tokens": 30, "total_tokens": 120}}
        self._send(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")


@pytest.fixture
def grounder():
    _Grounder.seen, _Grounder.model_type = [], None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Grounder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("family,answer", [
    ("qwen2_vl", "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(250,250),(750,500)<|box_end|>"),
    ("qwen2_5_vl", '```json\n[{"bbox_2d": [100, 75, 300, 150], "label": "the cat"}]\n```'),
    ("qwen3_vl", '```json\n[{"bbox_2d": [250, 250, 750, 500], "label": "the cat"}]\n```'),
])
def test_cli_boxes_in_original_pixels_listed_drawn_and_in_json(qvl, family_models, grounder, tmp_path, family, answer):
    """The family's prompt goes out; the answer comes back as lines, JSON and a drawn picture, in
    the pixels of the 400x300 original (the model saw 392x308 or 416x320)."""
    photo = tmp_path / "cat photo.png"
    Image.new("RGB", (400, 300), (200, 200, 200)).save(photo)
    _Grounder.answer = answer
    model = str(family_models(family))
    drawn = tmp_path / "boxes.png"
    r = qvl("describe", str(photo), "--endpoint", grounder, "--model", model, "--boxes", "the cat", "--draw", str(drawn))
    assert r.exit_code == 0, r.stderr
    [sent] = _Grounder.seen
    prompt = sent["messages"][-1]["content"][-1]["text"]
    assert ("<|object_ref_start|>the cat<|object_ref_end|>" in prompt) == (family == "qwen2_vl")
    assert ('"the cat"' in prompt and "JSON" in prompt) == (family != "qwen2_vl")
    expected = [100.0, 75.0, 300.0, 150.0] if family != "qwen2_5_vl" else [100 * 400 / 392, 75 * 300 / 308, 300 * 400 / 392, 150 * 300 / 308]
    label, *numbers = r.stdout.rstrip("\n").split("\t")
    assert label == "the cat" and [float(v) for v in numbers] == [round(v, 1) for v in expected]
    assert "drew 1 box on" in r.stderr
    with Image.open(drawn) as img:
        edge = (round(expected[0]) + 1, round((expected[1] + expected[3]) / 2))  # on the box's left side
        assert img.size == (400, 300) and img.getpixel(edge) != (200, 200, 200)

    r = qvl("describe", str(photo), "--endpoint", grounder, "--model", model, "--boxes", "the cat", "--json")
    out = json.loads(r.stdout)
    assert out["boxes"] == [{"label": "the cat", "box": [round(v, 1) for v in expected]}] and out["box_problems"] == []
    assert out["text"] == answer


def test_cli_boxes_family_from_a_qvl_server_and_unreadable_answers(qvl, grounder, media_dir):
    _Grounder.answer = '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [10, 20, 1200, 40], "label": "b"}]'
    r = qvl("describe", str(media_dir / "photo.png"), "--endpoint", grounder, "--model", "m", "--boxes", "a")
    assert r.exit_code == 2 and "cannot tell how m writes boxes" in r.stderr and not _Grounder.seen
    _Grounder.model_type = "qwen3_vl"  # what `qvl serve` says in /v1/models
    r = qvl("describe", str(media_dir / "photo.png"), "--endpoint", grounder, "--model", "m", "--boxes", "a")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "a\t0.4\t0.6\t1.2\t1.2\n"  # photo.png is 400x300
    assert "left out of the boxes: item 2 (b): box [10, 20, 1200, 40] lies outside the 0..1000 grid" in r.stderr


def test_cli_boxes_with_the_local_model(qvl, family_models, media_dir, tmp_path):
    """The tiny model's answer is noise, but JSON from its first token (the grammar of a JSON
    family's boxes): cut short, no boxes and that said on stderr, the picture still drawn; with
    room, it always parses. The prompt is the family's own (one image, its JSON request)."""
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions

    model = family_models("qwen3_vl")
    drawn = tmp_path / "out.webp"
    r = qvl("describe", str(media_dir / "photo.png"), "--model", str(model), "--boxes", "a cat", "--max-new-tokens", "6",
            "--draw", str(drawn), "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["boxes"] == [] and out["text"].startswith("[") and "the answer ends mid-item" in r.stderr
    with Image.open(drawn) as img:
        assert img.format == "WEBP" and img.size == (400, 300)

    backend = LocalBackend(RuntimeOptions(str(model), device="cpu", dtype="float32"), Quiet())
    prepared = backend.prepare((str(media_dir / "photo.png"),), MediaOptions(), GenerationOptions(boxes="a cat"))
    assert 'Locate every instance that belongs to the following categories: "a cat". Report bbox coordinates in JSON format.' in prepared.text
    for family in ("qwen2_5_vl", "qwen3_vl"):
        r = qvl("describe", str(media_dir / "photo.png"), "--model", str(family_models(family)), "--boxes", "a cat", "--max-new-tokens", "400",
                "--dtype", "float32", "--json")
        out = json.loads(r.stdout)
        assert r.exit_code == 0 and out["finish_reason"] == "stop" and isinstance(json.loads(out["text"]), list), out["text"]
        assert not [p for p in out["box_problems"] if "unreadable" in p or "mid-item" in p or "not 2 or 4 numbers" in p]


@pytest.mark.parametrize("args,message", [
    (["clip.mp4", "--boxes", "x"], "--boxes finds things in a still image"),
    (["anim.gif", "--boxes", "x"], "--first-frame reads an animation's first frame"),
    (["photo.png", "square.png", "--boxes", "x"], "--boxes finds things in one image, not 2 inputs"),
    (["photo.png", "--boxes", "x", "-p", "where?"], "drop --prompt"),
    (["photo.png", "--draw", "out2.png"], "--draw shows what --boxes found"),
    (["photo.png", "--boxes", "x", "--draw", "out.txt"], "name it .png, .jpg or .webp"),
    (["photo.png", "--boxes", "x", "--draw", "out.png/"], "is a directory"),
    (["photo.png", "--boxes", "  "], "--boxes needs what to find"),
    (["photo.png", "--boxes", "x", "--draw", "out2.png", "--each"], "--draw writes one picture"),
])
def test_cli_boxes_usage_errors_before_the_model_loads(qvl, media_dir, tmp_path, args, message):
    (tmp_path / "out.png").mkdir()  # a directory where "out.png/" asks for a file
    args = [str(media_dir / a) if (media_dir / a).exists() else (str(tmp_path / a) if a.startswith("out") else a) for a in args]
    r = qvl("describe", *args, "--model", str(tmp_path / "no-model-here"))
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_cli_draw_never_overwrites(qvl, media_dir, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes((media_dir / "photo.png").read_bytes())
    before = photo.read_bytes()
    r = qvl("describe", str(photo), "--boxes", "x", "--draw", str(photo), "--model", str(tmp_path / "none"))
    assert r.exit_code == 2 and "the file exists" in r.stderr
    assert photo.read_bytes() == before


def test_each_record_carries_its_boxes(qvl, family_models, media_dir, grounder):
    """--each --boxes: one record per image with its boxes; a video among them is that record's
    error, the others go on."""
    _Grounder.answer = '[{"bbox_2d": [0, 0, 500, 500], "label": "x"}]'
    model = str(family_models("qwen3_vl"))
    r = qvl("describe", "--each", str(media_dir / "photo.png"), str(media_dir / "clip.mp4"), str(media_dir / "square.png"),
            "--endpoint", grounder, "--model", model, "--boxes", "x")
    assert r.exit_code == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["index"] for rec in records] == [0, 1, 2]
    assert records[0]["boxes"] == [{"label": "x", "box": [0.0, 0.0, 200.0, 150.0]}]  # photo.png is 400x300
    assert records[2]["boxes"] == [{"label": "x", "box": [0.0, 0.0, 112.0, 112.0]}]  # square.png is 224x224
    assert "--boxes finds things in a still image" in records[1]["error"]["message"]


def test_a_server_that_does_not_follow_the_schema_is_caught(qvl, family_models, media_dir, grounder):
    _Grounder.answer = '{"outdoor": "maybe"}'
    r = qvl("describe", str(media_dir / "photo.png"), "--endpoint", grounder, "--model", str(family_models("qwen3_vl")),
            "--schema", "outdoor: bool")
    assert r.exit_code == 1 and r.stdout == ""
    assert "answered JSON that does not follow the schema ('maybe' is not of type 'boolean')" in r.stderr
    assert _Grounder.seen[-1]["response_format"]["json_schema"]["schema"]["properties"] == {"outdoor": {"type": "boolean"}}
    _Grounder.answer = '{"outdoor": true}'
    ok = qvl("describe", str(media_dir / "photo.png"), "--endpoint", grounder, "--model", str(family_models("qwen3_vl")),
             "--schema", "outdoor: bool")
    assert ok.exit_code == 0 and ok.stdout == '{"outdoor": true}\n'

