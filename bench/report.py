"""Write one benchmark's section into docs/BENCHMARKS.md without touching the others.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a
rerun replaces only that block (appending it the first time), so several scripts share the file.
"""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every number here was written by the script named in its section; rerun that command to\n"
    "refresh it. Speeds are ratios against a baseline measured in the same process or job, since\n"
    "machines here are noisy.\n"
)


def machine_line() -> str:
    """One line naming the machine, torch and the date, for the top of a section."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    import os

    return (
        f"Machine: {dev}, {os.cpu_count()} cores, torch {torch.__version__}, date {datetime.date.today().isoformat()}"
    )


def write_section(name: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or append) the section ``name`` of docs/BENCHMARKS.md with ``body`` (markdown)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    return doc
