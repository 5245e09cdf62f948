"""The checkpoint formats packq reads and writes, by the names users write, and the routes between them.

One table: the command line takes its ``--to`` choices from it, ``convert_checkpoint`` checks a
route against it before any work, and the README's checkpoint table is generated from it
(``packq formats`` prints it; a test keeps the README equal to it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointFormat:
    name: str  #: as ``--to`` takes it, or as ``packq inspect`` reports the source
    title: str
    recognised_by: str  #: what in config.json's quantization_config makes a folder this format
    module: str  #: a quantized module's tensors
    read: bool
    written: bool
    act_order: bool  #: whether it can hold GPTQ act-order (a g_idx that is not arange(K) // group_size)
    why_not_act_order: str = ""


FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in [
    CheckpointFormat("awq", "AWQ gemm (4-bit)", 'quant_method "awq", version "gemm"',
                     "qweight (K, N/8), qzeros (K/G, N/8), scales (K/G, N)", True, True, False,
                     "it cannot become AWQ without permuting input features"),
    CheckpointFormat("gptq", "GPTQ v1 / v2 (2, 3, 4, 8-bit)", 'quant_method "gptq", checkpoint_format "gptq" or "gptq_v2"',
                     "qweight (K/8, N), qzeros (K/G, N/8), scales (K/G, N), g_idx (K,)", True, True, True),
    CheckpointFormat("compressed-tensors", "compressed-tensors pack-quantized (2, 3, 4, 8-bit)",
                     'quant_method "compressed-tensors", format "pack-quantized"',
                     "weight_packed (N, K/8), weight_scale (N, K/G), weight_zero_point (N/8, K/G), weight_shape",
                     True, True, False, "compressed-tensors 0.20 removed actorder 'group' and weight_g_idx (its "
                     "QuantizationConfig refuses them)"),
    CheckpointFormat("float16", "float16 (dequantized)", "no quantization_config", "weight (N, K)",
                     False, True, True),
    CheckpointFormat("bfloat16", "bfloat16 (dequantized)", "no quantization_config", "weight (N, K)",
                     False, True, True),
    CheckpointFormat("float32", "float32 (dequantized)", "no quantization_config", "weight (N, K)",
                     False, True, True),
]}

#: the ``--to`` choices
TARGETS = tuple(name for name, f in FORMATS.items() if f.written)
SOURCES = tuple(name for name, f in FORMATS.items() if f.read)


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
    if source == "gptq" and not FORMATS[target].act_order:
        notes.append("no act-order")
    return "yes" + (f" ({'; '.join(notes)})" if notes else "")


def table_markdown() -> str:
    """The README's table of checkpoint routes."""
    head = "| `packq convert` from \\ `--to` | " + " | ".join(f"`{t}`" for t in TARGETS) + " |"
    rows = [head, "| --- |" + " --- |" * len(TARGETS)]
    for s in SOURCES:
        cells = [route(s, t) or "—" for t in TARGETS]
        rows.append(f"| {FORMATS[s].title} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
