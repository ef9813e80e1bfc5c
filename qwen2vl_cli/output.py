"""Text made safe to write: control characters shown on terminals, JSON lines any reader takes."""

from __future__ import annotations

import json
import re

# Control characters, and the bidirectional overrides that reorder what a terminal shows
# (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F); text keeps its newlines and tabs, a one-line
# diagnostic does not.
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_BIDI}]")
_CONTROL_IN_LINE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_BIDI}]")
# What json.dumps(ensure_ascii=False) leaves raw that a terminal acts on, or that is not UTF-8 (a
# lone surrogate, from a file name that is not UTF-8): as JSON escapes, the same string to any reader.
_JSON_RAW = re.compile(f"[\\x7f-\\x9f{_BIDI}\\ud800-\\udfff]")


def printable(text: str, lines: bool = True) -> str:
    """`text` with its control characters written out (\\x1b, \\u202e), as `ls` and git do: a file
    name or an answer holding ESC ]0;... cannot retitle or rewrite a terminal. `lines` False: newlines
    and tabs too (a diagnostic naming a file called "a\\nb" stays one line)."""
    return (_CONTROL if lines else _CONTROL_IN_LINE).sub(_written, text)


def _written(match: re.Match) -> str:
    code = ord(match.group())
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(code) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def json_line(obj) -> str:
    """One JSON object on one line: text as it is (ensure_ascii off), but for what must be escaped."""
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))
