"""What `--schema` takes, as the JSON Schema text the grammar compiles (no torch here: the CLI
reads it before any model loads).

Three forms: a JSON Schema inline (`'{"type": "object", ...}'`), a file holding one, or fields
in short: `'caption, objects: list[str], outdoor: bool'`, each `name` or `name: type`, every field
required, no others allowed. Types: str (the default), int, float, bool, and list[...] of those.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from qwen2vl_cli.errors import QvlError, UsageError
from qwen2vl_cli.types import GenerationOptions, Result

JSON_OBJECT = {"type": "object"}  # --json-object: any JSON object
_TYPES = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"}, "bool": {"type": "boolean"}}
_FIELD = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?::\s*(\w+(?:\[\s*\w+\s*\])?)\s*)?")
_EXAMPLE = "'caption, objects: list[str], outdoor: bool'"


def parse(text: str) -> str:
    """The schema `--schema` names, checked and written out (grammar.canonical's form)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return canonical(_json(stripped, "--schema"))
    path = Path(text).expanduser()
    if path.is_file():
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--schema {text}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        return canonical(_json(body, f"--schema {text}"))
    if path.suffix.lower() == ".json" or "/" in text or path.is_dir():
        problem = "is a directory" if path.is_dir() else "no such file"
        raise UsageError(f"--schema {text}: {problem}; give a JSON Schema file, inline JSON, or fields such as {_EXAMPLE}")
    return canonical(_fields(text))


def canonical(schema: dict) -> str:
    """A schema's text as it is compiled and kept, checked: compact, its fields in the order
    given (the answer writes them in that order)."""
    import llguidance

    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if problem := llguidance.LLMatcher.validate_grammar(grammar(text)):
        raise UsageError(f"--schema: {' '.join(problem.split())}")
    return text


def grammar(text: str) -> str:
    """The grammar llguidance compiles for a schema: its JSON exactly, no whitespace between tokens."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})


def _json(body: str, what: str) -> dict:
    try:
        schema = json.loads(body)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{what}: a JSON Schema is an object, such as {{\"type\": \"object\", \"properties\": {{...}}}}")
    return schema


def _fields(text: str) -> dict:
    properties: dict[str, dict] = {}
    for part in text.split(","):
        match = _FIELD.fullmatch(part)
        if match is None or not part.strip():
            raise UsageError(f"--schema {text}: not a file, a JSON Schema, or fields such as {_EXAMPLE}")
        name, kind = match.group(1), re.sub(r"\s", "", match.group(2) or "str")
        if name in properties:
            raise UsageError(f"--schema {text}: the field {name} is given twice")
        properties[name] = _type(kind, text)
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _type(kind: str, text: str) -> dict:
    if kind in _TYPES:
        return dict(_TYPES[kind])
    inner = re.fullmatch(r"list\[(\w+)\]", kind)
    if inner and inner.group(1) in _TYPES:
        return {"type": "array", "items": dict(_TYPES[inner.group(1)])}
    raise UsageError(f"--schema {text}: unknown type {kind}; use str, int, float, bool or list[...] of them")


def structured(result: Result, gen: GenerationOptions, whole_json: bool = True) -> Result | QvlError:
    """A --schema answer with its JSON parsed into `data`; one that stopped before its JSON was
    complete (or holds a number no 64-bit float can hold) is, with `whole_json`, an error saying
    why and how to give it room (never half an object), else the answer with no data."""
    if result.finish_reason == "stop":
        try:
            data = json.loads(result.text)
        except json.JSONDecodeError:
            data = _INCOMPLETE
        if data is not _INCOMPLETE and _finite(data):
            return replace(result, structured=True, data=data)
        if data is not _INCOMPLETE and whole_json:
            return QvlError(f"{_sources(result)}: the answer's JSON holds a number too large for a 64-bit float: ask again, "
                            "or bound the number in the schema (maximum)")
    if not whole_json:
        return replace(result, structured=True)
    if result.finish_reason == "repetition":
        return QvlError(f"{_sources(result)}: the answer looped before its JSON was complete (the repetition guard stopped it): "
                        "try --no-repeat-guard, or a schema with fewer free strings")
    return QvlError(f"{_sources(result)}: the answer reached --max-new-tokens {gen.max_new_tokens} before its JSON was complete: "
                    f"give it room, e.g. --max-new-tokens {max(4 * gen.max_new_tokens, 256)}")


_INCOMPLETE = object()


def _finite(data) -> bool:
    """Whether every number in `data` is one (json reads a number past a float's range as inf)."""
    if isinstance(data, float):
        return math.isfinite(data)
    if isinstance(data, dict):
        return all(_finite(v) for v in data.values())
    if isinstance(data, list):
        return all(_finite(v) for v in data)
    return True


def _sources(result: Result) -> str:
    return ", ".join(p.source for p in result.inputs) or "the question (no media)"


def response_format(schema: str) -> dict:
    """The OpenAI `response_format` that asks a server for this schema's answers."""
    if schema == canonical(JSON_OBJECT):
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": json.loads(schema), "strict": True}}
