"""bench/RESULTS.md: each benchmark owns one section and rewrites only that one."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

PATH = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"


def write_section(section: str) -> None:
    """Replace the section that starts with the same `## ` heading, keeping the others."""
    text = PATH.read_text() if PATH.exists() else "# Benchmark results\n"
    head = section.splitlines()[0]
    if head in text:
        before, rest = text.split(head, 1)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    PATH.write_text(text)


def spread(values, digits: int = 2, unit: str = "") -> str:
    """A table cell: the median, and the range in brackets."""
    import statistics

    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def publish(lines: list[str]) -> None:
    """A benchmark's section into RESULTS.md, and on stdout."""
    write_section("\n".join(lines) + "\n")
    print("\n".join(lines))

