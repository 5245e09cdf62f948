"""What a checkpoint's zero-points are, and what each engine computes from them.

Reads only the qzeros tensors (small: one row per group). Shared by ``packq
inspect`` (which engines compute this checkpoint exactly) and ``packq convert``
(in which convention to read a GPTQ v1 source, or to refuse it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.model import Checkpoint, act_order, module_array
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats import awq
from packq.formats.engines import ENGINES, FIELD, SYMMETRIC, UNMASKED, WORD, producer_convention, read_v1

#: how many module names a report lists before "and N more"
SHOWN = 5


@dataclass
class ZeroReport:
    """The zero-points of every module, and how GPTQ engines read them."""

    stored_format: str  # "awq", "gptq" (v1) or "gptq_v2"
    convention: str | None  # v1 sources: the producer's convention, if known
    zero0: int = 0  # (group, column) pairs whose zero-point is 0
    total: int = 0
    zero0_modules: list[str] = field(default_factory=list)
    ambiguous: dict[str, int] = field(default_factory=dict)  # v1, producer unknown: module -> pairs read differently
    symmetric: bool = True  # every zero-point is 2**(bits-1): storable as compressed-tensors' symmetric: true
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)


def _v1_words(ckpt: Checkpoint, qzeros: np.ndarray) -> np.ndarray:
    """The stored words as a GPTQ v1 reader sees them: AWQ sources as packq writes v1 (per field)."""
    if ckpt.format.method == "awq":
        return np.asarray(numpy_backend.run(awq.zeros_to_gptq, qzeros.view(np.int32), offset=-1)).view(np.uint32)
    return qzeros


def _awq_counts(qzeros: np.ndarray) -> tuple[int, int, bool]:
    """(zero-points of 0, zero-points, whether every one is 8) of 4-bit AWQ qzeros, by whole-word operations: AWQ stores z
    itself, so neither the nibble order nor a v1 reading matters for these two."""
    w = np.ascontiguousarray(qzeros).view(np.uint32).ravel()
    x = w | (w >> np.uint32(1))
    x |= x >> np.uint32(2)
    x &= np.uint32(0x11111111)  # bit 4i: nibble i is not 0
    nonzero = int(((x * np.uint32(0x11111111)) >> np.uint32(28)).sum(dtype=np.int64))  # top nibble: their sum
    return 8 * w.size - nonzero, 8 * w.size, bool(np.all(w == np.uint32(0x88888888)))


def analyse(ckpt: Checkpoint, v1_convention: str | None = None, engines: bool = True) -> ZeroReport:
    """Zero-points of every module; for v1, decoded in the producer's convention (``v1_convention`` overrides).

    ``engines=False`` leaves out what each engine would compute (``report.engines``, which ``packq inspect``
    shows): a conversion needs only the counts, and a 4-bit AWQ source's are then counted on whole words."""
    bits = ckpt.format.bits
    fmt = "awq" if ckpt.format.method == "awq" else ckpt.format.checkpoint_format
    convention = v1_convention or (producer_convention(ckpt.format.raw, ckpt.sidecar) if fmt == "gptq" else None)
    report = ZeroReport(fmt, convention)
    wrong: dict[str, dict[str, int]] = {name: {} for name in ENGINES}
    for prefix, m in ckpt.modules.items():
        if not engines and fmt == "awq" and bits == 4:
            zero0, total, symmetric = _awq_counts(module_array(ckpt, m, "qzeros"))
            report.symmetric = report.symmetric and symmetric
            report.zero0 += zero0
            report.total += total
            if zero0:
                report.zero0_modules.append(prefix)
            continue
        words = _v1_words(ckpt, module_array(ckpt, m, "qzeros").view(np.uint32))
        fields = np.asarray(numpy_backend.run(B.unpack, words.view(np.int32), direction="column", bits=bits))
        if fmt == "gptq_v2":
            true = fields.astype(np.int16)
        elif fmt == "awq":
            true = (fields.astype(np.int16) + 1) % 16  # packq's v1 is per field: exactly the AWQ zeros
        else:
            by_field, by_word = read_v1(fields, words, FIELD, bits), read_v1(fields, words, WORD, bits)
            true = by_word if convention == WORD else by_field
            differ = int(np.count_nonzero(by_field != by_word))
            if convention not in (FIELD, WORD) and differ:  # unknown producer, and it matters here
                report.ambiguous[prefix] = differ
        zero0 = int(np.count_nonzero(true == 0))
        report.symmetric = report.symmetric and bool(np.all(true == 1 << (bits - 1)))
        report.zero0 += zero0
        report.total += true.size
        if zero0:
            report.zero0_modules.append(prefix)
        if fmt == "gptq_v2" or prefix in report.ambiguous or not engines:
            continue
        misread: dict[str, int] = {}  # per convention, not per engine: engines share three
        for name, engine in ENGINES.items():
            conv = engine.v1_convention(bits)
            if conv is None:
                continue
            if conv not in misread:
                misread[conv] = int(np.count_nonzero(read_v1(fields, words, conv, bits) != true))
            if misread[conv]:
                wrong[name][prefix] = misread[conv]
    act = ckpt.format.method == "gptq" and act_order(ckpt)
    for name, engine in ENGINES.items():
        if engine.reads_v1 is None or not engines:
            continue
        refused = None if report.ambiguous else engine.gptq_refusal(bits, report.symmetric, act)
        if refused:  # as GPTQ at all, whatever the zero-point encoding
            report.engines[name] = {"exact": False, "pairs": 0, "modules": [], "refused": refused,
                                    "note": f"does not load GPTQ {refused}; {engine.exact_route(bits, act)}"}
            continue
        if fmt == "gptq_v2":
            report.engines[name] = {"exact": engine.reads_v2, "pairs": 0, "modules": [],
                                    "note": "reads gptq_v2" if engine.reads_v2 else "cannot load checkpoint_format gptq_v2"}
            continue
        if report.ambiguous:
            report.engines[name] = {"exact": None, "pairs": None, "modules": [],
                                    "note": "unknown: the producer's v1 convention is not known"}
            continue
        bad = wrong[name]
        conv = engine.v1_convention(bits)
        note = {FIELD: "reads each field + 1 modulo 2**bits", WORD: "adds 0x11111111 to whole words (carries)",
                UNMASKED: f"reads a stored {2**bits - 1} as {2**bits}, not 0",
                SYMMETRIC: f"loads sym=True only: qzeros unread, every zero-point {1 << (bits - 1)}"}[conv or FIELD]
        report.engines[name] = {"exact": not bad, "pairs": sum(bad.values()), "modules": sorted(bad), "note": note}
    return report


def check_v1_readable(ckpt: Checkpoint, report: ZeroReport) -> None:
    """Refuse a GPTQ v1 source whose zero-points depend on an unknown producer convention."""
    if not report.ambiguous:
        return
    if report.convention == "or":
        why = ("it was written by AutoGPTQ, whose packer ORs a zero-point of 0 into every higher field of its "
               "word, so those fields' zero-points are lost")
        raise CheckpointError(f"{str(ckpt.root)!r}: GPTQ v1 zero-points cannot be read exactly: {why}")
    names = list(report.ambiguous)
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    raise CheckpointError(
        f"{str(ckpt.root)!r}: GPTQ v1 stores zero-points of 0 as 15, which engines read in two ways "
        f"({sum(report.ambiguous.values())} (group, column) pairs in {len(names)} modules differ: {shown}), and "
        "nothing in the checkpoint says which its producer used; pass --v1-zeros word (written by GPTQModel or "
        "transformers) or --v1-zeros field (written per field: TGI, LoRAX, the seed's code, packq)"
    )


@dataclass
class Target:
    """How a conversion to GPTQ writes zero-points: the format, the v1 convention, and any rebias."""

    checkpoint_format: str
    convention: str = FIELD
    engine: str | None = None
    rebias: dict[str, np.ndarray] = field(default_factory=dict)  # module -> AWQ qzeros after the rebias
    rebiased: int = 0  # (group, column) pairs moved to q + 1, z + 1
    inexact: dict[str, int] = field(default_factory=dict)  # module -> pairs the engine computes wrongly
    max_error: float = 0.0  # the largest |weight| difference the engine computes, where inexact
    notes: list[str] = field(default_factory=list)  # what the user should know about the result, said with it


def _names(modules: list[str] | dict[str, int]) -> str:
    names = list(modules)
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def plan_gptq(
    ckpt: Checkpoint, report: ZeroReport, engine: str | None, checkpoint_format: str | None, allow_inexact: bool
) -> Target:
    """Decide how a source (whose zero-points ``report`` describes) becomes GPTQ that ``engine`` computes exactly.

    Refuses before any write where it cannot. Without an engine, v1 is written only where
    every engine reads it alike (no zero-point of 0); otherwise the user must name the
    engine or ask for v2. An engine that does not load this kind of GPTQ at all (vLLM 0.32:
    ``sym=False``, act-order; on its CPU path 8-bit too) is refused in one line naming the
    format it loads exactly instead (compressed-tensors, AWQ).
    """
    if engine is None:
        fmt = checkpoint_format or "gptq"
        if fmt == "gptq" and report.zero0:
            by_engine = report.engines or analyse(ckpt, report.convention).engines  # a conversion's report has none
            exact = [n for n, e in by_engine.items() if e["exact"]]
            wrong = [n for n, e in by_engine.items() if not e["exact"] and not e.get("refused")]
            refusing = [n for n, e in by_engine.items() if e.get("refused")]
            raise CheckpointError(
                f"{str(ckpt.root)!r}: {report.zero0} (group, column) zero-points of 0 in {len(report.zero0_modules)} modules "
                f"({_names(report.zero0_modules)}); GPTQ v1 stores them as 15, which engines read differently "
                f"(exact: {', '.join(exact)}; wrong: {', '.join(wrong)}"
                + (f"; refused: {', '.join(refusing)}" if refusing else "")
                + f"). Pass --for ENGINE ({', '.join(LOADERS)}) to write what that engine reads exactly, or "
                "--checkpoint-format gptq_v2"
            )
        return Target(fmt)
    if engine not in LOADERS:
        raise CheckpointError(f"--for must name an engine that loads GPTQ ({', '.join(LOADERS)}), got {engine!r}")
    e = ENGINES[engine]
    bits, act = ckpt.format.bits, ckpt.format.method == "gptq" and act_order(ckpt)
    refused = e.gptq_refusal(bits, report.symmetric, act)
    if refused:
        what = {"sym=False": f"its zero-points are not all {1 << (bits - 1)} ({report.zero0} of them 0)",
                "desc_act=True": "it is act-order"}
        why = "; ".join(what[r] for r in refused.split(", ") if r in what)
        raise CheckpointError(f"{ckpt.root}: {e.title} does not load GPTQ {refused}" + (f", and {why}" if why else "")
                              + f"; {e.exact_route(bits, act)}")
    fmt, convention = e.target(bits)
    if checkpoint_format is not None and checkpoint_format != fmt:
        if not (checkpoint_format == "gptq_v2" and e.reads_v2) and not (checkpoint_format == "gptq" and e.reads_v1):
            raise CheckpointError(f"{e.title} cannot load checkpoint_format {checkpoint_format!r}; leave it out with --for")
        fmt, convention = checkpoint_format, e.v1_convention(ckpt.format.bits) or FIELD
    target = Target(fmt, convention if convention in (FIELD, WORD) else FIELD, engine)
    for other in ENGINES.values():  # the same engine's other builds (vLLM's CPU path): said with the result
        if other.name.startswith(f"{engine}-") and (refusal := other.gptq_refusal(bits, report.symmetric, act)):
            target.notes.append(f"{other.title} does not load GPTQ {refusal}: {other.exact_route(bits, act)}")
    unmasked = fmt == "gptq" and e.v1_convention(ckpt.format.bits) == UNMASKED
    if not (unmasked and report.zero0):
        return target
    if ckpt.format.bits != 4:
        raise CheckpointError(
            f"{str(ckpt.root)!r}: {report.zero0} zero-points of 0, which {e.title} reads as {1 << ckpt.format.bits}; "
            f"packq rebiases them at 4 bits only, and this checkpoint is {ckpt.format.bits}-bit; choose an engine "
            "that reads them exactly"
        )
    if ckpt.format.method == "gptq" and act_order(ckpt):
        raise CheckpointError(
            f"{str(ckpt.root)!r}: {report.zero0} zero-points of 0, which {e.title} reads as 16; rebiasing them needs "
            "contiguous groups, and this GPTQ source is act-order; choose an engine that reads them exactly"
        )
    # a stored 15 reads as 16: move zero-0 pairs to z = 1 where every q of the pair is <= 14
    for prefix in report.zero0_modules:
        m = ckpt.modules[prefix]
        qweight, qzeros = module_array(ckpt, m, "qweight"), module_array(ckpt, m, "qzeros")
        if ckpt.format.method != "awq":  # the rebias works on AWQ's layout
            qweight = np.asarray(numpy_backend.run(awq.weight_to_awq, qweight.view(np.int32)))
            qzeros = np.asarray(numpy_backend.run(awq.zeros_to_awq, qzeros.view(np.int32), offset=0))
        qweight, qzeros = qweight.view(np.int32), qzeros.view(np.int32)
        _, new_zeros, zero0, fixed = numpy_backend.run(awq.rebias_zero_points, qweight, qzeros)
        target.rebias[prefix] = np.asarray(new_zeros)
        target.rebiased += int(fixed)
        if int(zero0) > int(fixed):
            target.inexact[prefix] = int(zero0) - int(fixed)
            target.max_error = max(target.max_error, _engine_error(ckpt, prefix, qweight, np.asarray(new_zeros)))
    if target.inexact and not allow_inexact:
        raise CheckpointError(
            f"{str(ckpt.root)!r}: {sum(target.inexact.values())} (group, column) pairs with zero-point 0 hold a 15, so no "
            f"GPTQ v1 encoding is exact in {e.title} (it reads a stored 15 as 16): modules {_names(target.inexact)} "
            f"(largest weight error there {target.max_error:.6g}); {target.rebiased} other pairs could be rebiased. "
            "Pass --allow-inexact to write it anyway, or choose an engine that reads them exactly"
        )
    return target


def _engine_error(ckpt: Checkpoint, prefix: str, qweight: np.ndarray, qzeros: np.ndarray) -> float:
    """The largest |W| difference between the module's weights and what an unmasked engine computes."""
    from packq.formats.gptq import dequantize_grouped

    m = ckpt.modules[prefix]
    scales = module_array(ckpt, m, "scales", floats=True)
    q = np.asarray(numpy_backend.run(awq.unpack_awq, qweight)).astype(np.int16)
    z = np.asarray(numpy_backend.run(awq.unpack_awq, qzeros)).astype(np.int16)
    xp = numpy_backend.xp
    exact = dequantize_grouped(xp, q, z, scales).astype(np.float64)
    engine = dequantize_grouped(xp, q, np.where(z == 0, 16, z).astype(np.int16), scales).astype(np.float64)
    return float(np.max(np.abs(exact - engine)))


#: the engines that load GPTQ checkpoints (AutoGPTQ is only a writer here)
LOADERS = [name for name, e in ENGINES.items() if e.reads_v1 is not None]
