"""The checkpoint formats packq reads and writes, each in its own module, and the routes between them.

One table: the command line takes its ``--to`` choices from it, ``convert_checkpoint`` checks a
route against it before any work, the folder reader asks it which format a config declares, and
the README's checkpoint table is generated from it (``packq formats`` prints it; a test keeps the
README equal to it). A new format is one module here with a :class:`CheckpointFormat` and one
line below.
"""

from __future__ import annotations

from typing import Any

from packq.checkpoint.formats import awq, compressed_tensors, floats, gguf, gptq, mlx
from packq.checkpoint.formats.base import CheckpointFormat

FORMATS: dict[str, CheckpointFormat] = {
    f.name: f for f in [awq.FORMAT, gptq.FORMAT, compressed_tensors.FORMAT, *floats.FORMATS, mlx.FORMAT, gguf.FORMAT]
}

#: the ``--to`` choices
TARGETS = tuple(name for name, f in FORMATS.items() if f.written)
SOURCES = tuple(name for name, f in FORMATS.items() if f.read)


def recognise(q: dict[str, Any]) -> CheckpointFormat | None:
    """The readable format whose config a quantization_config is, if any."""
    return next((f for f in FORMATS.values() if f.read and f.recognises(q)), None)


def route(source: str, target: str) -> str:
    """How ``packq convert`` goes from ``source`` to ``target``, in a few words ("" where it does not)."""
    if source == target and source != "gptq":
        return ""
    notes = []
    if source == target:
        notes.append("v1 <-> v2")
    if target == "gptq":
        notes.append("`--for ENGINE`")
    if target == "awq" and source != "awq":
        notes.append("4-bit")
    if target == "mlx":
        notes.append("group size 32, 64, 128")
    if source == "gptq" and not FORMATS[target].act_order:
        notes.append("no act-order")
    if target == "gguf":
        notes.append("one .gguf file; `--gguf-type`")
    return "yes" + (f" ({'; '.join(notes)})" if notes else "")


def table_markdown() -> str:
    """The README's table of checkpoint routes."""
    head = "| `packq convert` from \\ `--to` | " + " | ".join(f"`{t}`" for t in TARGETS) + " |"
    rows = [head, "| --- |" + " --- |" * len(TARGETS)]
    for s in SOURCES:
        cells = [route(s, t) or "—" for t in TARGETS]
        rows.append(f"| {FORMATS[s].title} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
