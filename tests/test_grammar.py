"""Answers that parse: --schema and --json-object on the tiny model, whose free answers are noise."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qwen2vl_cli import schemas
from qwen2vl_cli.backend import LocalBackend
from qwen2vl_cli.rows import Row, Running
from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions
from tests.helpers import Quiet, answers

PHOTO = Path(__file__).parent.parent / "samples" / "photo.jpg"

# Bounded strings and arrays: any path through them ends well inside the token budget.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "kind": {"enum": ["a", "b"]}, "tag": {"type": "string", "maxLength": 5}},
     "required": ["ok", "n", "kind", "tag"], "additionalProperties": False},
    {"type": "object", "properties": {"where": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
                                                "required": ["city"], "additionalProperties": False},
                                      "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["where", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
]


def bounded_schemas() -> st.SearchStrategy:
    """JSON Schemas whose every answer is short: strings and arrays bounded, objects small."""
    names = st.text("abcdefgh", min_size=1, max_size=6)
    leaves = st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.integers(-50, 50).flatmap(lambda low: st.integers(low, low + 100).map(lambda high: {"type": "integer", "minimum": low, "maximum": high})),
        st.just({"type": "integer"}),
        st.just({"type": "number"}),
        st.floats(-10, 10).map(lambda low: {"type": "number", "minimum": round(low, 2)}),
        st.lists(st.text("xyz", min_size=1, max_size=3), min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
        st.integers(1, 8).map(lambda most: {"type": "string", "maxLength": most}),
        st.sampled_from(["^[a-z]{1,4}$", "^(cat|dog)$", "^[0-9]{2}-[a-z]$"]).map(lambda p: {"type": "string", "pattern": p}),
    )

    def objects(children):
        return st.dictionaries(names, children, min_size=1, max_size=3).flatmap(lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required, "additionalProperties": False}))

    def arrays(children):
        return st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])})

    return st.recursive(leaves, lambda children: st.one_of(objects(children), arrays(children)), max_leaves=5)


@pytest.fixture(scope="module")
def engines(tiny_model):
    return {engine: LocalBackend(RuntimeOptions(str(tiny_model), device="cpu", dtype="float32", engine=engine), Quiet())
            for engine in ("static", "hf")}


def test_constrained_rows_parse_beside_free_rows_whose_tokens_do_not_change(engines):
    """Each schema's answer validates, greedy and sampled, the same tokens on both engines; in one
    batch with free rows, those rows' tokens are their tokens without the constrained row."""
    free = GenerationOptions(max_new_tokens=48)
    for n, schema in enumerate(SCHEMAS):
        for sampling in ({}, {"temperature": 1.0, "seed": n}):
            gen = GenerationOptions(max_new_tokens=96, schema=schemas.canonical(schema), **sampling)
            got = {}
            for engine, backend in engines.items():
                [p] = [backend.prepare((str(PHOTO),), MediaOptions(), gen)]
                got[engine] = answers(backend.runner, [p, p], gen)
                for r in got[engine]:
                    assert r.finish_reason == "stop", r.text
                    jsonschema.validate(json.loads(r.text), schema)
            if not sampling:
                assert [r.tokens for r in got["static"]] == [r.tokens for r in got["hf"]]
    backend = engines["static"]
    p = backend.prepare((str(PHOTO),), MediaOptions(), free)
    alone = answers(backend.runner, [p], free)[0]
    constrained = GenerationOptions(max_new_tokens=48, schema=schemas.canonical(SCHEMAS[0]))
    rows = [Row(p.text, list(p.loaded), free), Row(p.text, list(p.loaded), constrained), Row(p.text, list(p.loaded), free)]
    running, out = Running(backend.runner, rows), {}
    while running.live:
        out.update(running.advance())
    assert out[0].tokens == out[2].tokens == alone.tokens
    jsonschema.validate(json.loads(out[1].text), SCHEMAS[0])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(bounded_schemas(), min_size=8, max_size=8), st.booleans())
def test_two_hundred_generated_schemas_always_parse_and_validate(engines, media_dir, drawn, sampled):
    """25 batches of 8 rows, each row with a schema of its own, greedy or sampled."""
    backend = engines["static"]
    gens = [GenerationOptions(max_new_tokens=256, schema=schemas.canonical(schema), temperature=1.0 if sampled else 0.0, seed=7)
            for schema in drawn]
    p = backend.prepare((str(media_dir / "square.png"),), MediaOptions(max_pixels=28 * 28 * 16), gens[0])
    out = {}
    running = Running(backend.runner, [Row(p.text, list(p.loaded), gen) for gen in gens])
    while running.live:
        out.update(running.advance())
    for n, schema in enumerate(drawn):
        assert out[n].finish_reason == "stop", (schema, out[n].text)
        jsonschema.validate(json.loads(out[n].text), schema)


def test_every_family_follows_a_schema(family_models):
    gen = GenerationOptions(max_new_tokens=96, schema=schemas.canonical(SCHEMAS[0]))
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        backend = LocalBackend(RuntimeOptions(str(family_models(family)), device="cpu", dtype="float32"), Quiet())
        p = backend.prepare((str(PHOTO),), MediaOptions(), gen)
        for r in answers(backend.runner, [p, p], gen):
            assert r.finish_reason == "stop", (family, r.text)
            jsonschema.validate(json.loads(r.text), SCHEMAS[0])


def test_a_row_that_joins_a_running_batch_follows_its_schema(engines):
    backend = engines["static"]
    free = GenerationOptions(max_new_tokens=64, min_new_tokens=64)
    gen = GenerationOptions(max_new_tokens=80, schema=schemas.canonical(SCHEMAS[1]))
    p = backend.prepare((str(PHOTO),), MediaOptions(), gen)
    alone = answers(backend.runner, [p], gen)[0]
    running, out = Running(backend.runner, [Row(p.text, list(p.loaded), free)], capacity=2), {}
    out.update(running.advance())
    joiner = Row(p.text, list(p.loaded), gen)
    assert running.open() and running.fits(joiner)
    number = running.join(joiner)
    while running.live:
        out.update(running.advance())
    assert out[number].tokens == alone.tokens and out[number].finish_reason == "stop"
    jsonschema.validate(json.loads(out[number].text), SCHEMAS[1])


def test_describe_with_a_schema_writes_only_complete_json(qvl, tiny_model, tmp_path):
    fields = "caption, objects: list[str], outdoor: bool"
    r = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--schema", fields, "--max-new-tokens", "64")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("\n") == 1
    data = json.loads(r.stdout)
    assert list(data) == ["caption", "objects", "outdoor"] and isinstance(data["outdoor"], bool)
    j = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--schema", fields, "--max-new-tokens", "64", "--json")
    record = json.loads(j.stdout)
    assert j.exit_code == 0 and record["data"] == data and json.loads(record["text"]) == data

    schema_file = tmp_path / "answer schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    f = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--schema", schema_file, "--max-new-tokens", "64")
    assert f.exit_code == 0, f.stderr
    jsonschema.validate(json.loads(f.stdout), SCHEMAS[0])

    cut = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--schema", fields, "--max-new-tokens", "6")
    assert cut.exit_code == 1 and cut.stdout == ""
    assert cut.stderr.endswith(f"qvl: error: {PHOTO}: the answer reached --max-new-tokens 6 before its JSON was complete: "
                               "give it room, e.g. --max-new-tokens 256\n")


def test_each_with_a_schema_gives_data_or_an_error_record(qvl, tiny_model, media_dir):
    args = ("describe", "--each", PHOTO, media_dir / "square.png", "--model", tiny_model, "--dtype", "float32", "--schema", "caption")
    r = qvl(*args, "--max-new-tokens", "64")
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(records) == 2
    assert all(set(x["data"]) == {"caption"} and json.loads(x["text"]) == x["data"] for x in records)
    short = qvl(*args, "--max-new-tokens", "2")
    records = [json.loads(line) for line in short.stdout.splitlines()]
    assert short.exit_code == 1 and [x["error"]["message"].split(": ", 1)[1].split(":")[0] for x in records] == [
        "the answer reached --max-new-tokens 2 before its JSON was complete"] * 2
    assert all("data" not in x for x in records)


@pytest.mark.parametrize("args, message", [
    (("--schema", "a: dict"), "--schema a: dict: unknown type dict; use str, int, float, bool or list[...] of them"),
    (("--schema", "a, a"), "--schema a, a: the field a is given twice"),
    (("--schema", "{not json"), "--schema: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    (("--schema", "[1]"), "--schema [1]: not a file, a JSON Schema, or fields such as 'caption, objects: list[str], outdoor: bool'"),
    (("--schema", "a", "--json-object"), "--schema and --json-object both given: --json-object is any object; give one"),
    (("--json-object", "--min-new-tokens", "3"),
     "--min-new-tokens with --schema or --json-object: a JSON answer ends where it is complete; drop --min-new-tokens"),
    (("--schema", "a", "--stop", "x"), "--stop with --schema or --json-object: a JSON answer ends where it is complete; drop --stop"),
    (("--stop", "x", "--min-new-tokens", "3"), "--min-new-tokens with --stop: an answer ends at its stop string; drop one of them"),
    (("--schema", "no such.json"),
     "--schema no such.json: no such file; give a JSON Schema file, inline JSON, or fields such as 'caption, objects: list[str], outdoor: bool'"),
    (("--json-object", "--boxes", "the cat"), "--boxes writes the model's own answer: drop --schema or --json-object"),
])
def test_schema_mistakes_are_usage_errors(qvl, tiny_model, args, message):
    r = qvl("describe", PHOTO, "--model", tiny_model, *args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"qvl: error: {message}\n"


def test_a_schema_the_grammar_cannot_take_is_a_usage_error(qvl, tiny_model):
    r = qvl("describe", PHOTO, "--model", tiny_model, "--dtype", "float32", "--schema", '{"type": "object", "properties": {"a": {"type": "nope"}}}')
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith("qvl: error: --schema: ") and r.stderr.count("\n") == 1


def test_a_number_past_a_float_is_an_error_not_infinity():
    from qwen2vl_cli.types import MediaPlan, Result

    plan = MediaPlan("photo.jpg", "image", 4, 4, 28, 28, (1, 2, 2), 1)
    result = Result("[1e999]", "m", "cpu", "float32", "sdpa", 9, 1, 3, 0.0, 0.1, 1.0, 0, "stop", inputs=(plan,))
    gen = GenerationOptions(schema=schemas.canonical({"type": "array"}))
    error = schemas.structured(result, gen)
    assert str(error) == "photo.jpg: the answer's JSON holds a number too large for a 64-bit float: ask again, or bound the number in the schema (maximum)"
    assert schemas.structured(result, gen, whole_json=False).data is None
    assert schemas.structured(replace_text(result, "[1e300]"), gen).data == [1e300]


def replace_text(result, text):
    from dataclasses import replace

    return replace(result, text=text)


def test_a_matcher_in_error_lets_its_row_only_end(engines):
    """A row whose matcher took a token its grammar refuses (it never should) is not let loose: only its end tokens stay."""
    import torch

    from qwen2vl_cli import grammar

    runner = engines["static"].runner
    matcher = runner.grammars.matcher(schemas.canonical({"type": "boolean"}))
    matcher.consume_token(runner.processor.tokenizer.encode("zzz", add_special_tokens=False)[0])
    assert matcher.is_error()
    vocab = runner.model.get_output_embeddings().out_features
    logits = grammar.apply(torch.zeros(2, vocab), grammar.allowed({0: matcher}, 2, vocab))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted(runner.eos_ids())
    assert torch.isfinite(logits[1]).all()  # a row without a matcher keeps every token

