"""compressed-tensors ``pack-quantized``: GPTQ v2's tensors transposed and renamed, with weight_shape.

weight_packed (N, K*b/32), weight_zero_point (N*b/32, G) (absent when symmetric: every zero-point
2**(b-1)), weight_scale (N, G), weight_shape [N, K]; read as GPTQ v2 in GPTQ's layout. Written as
compressed-tensors' own AutoAWQConverter writes it (0.20.1), and checked against that library.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.checkpoint.formats import base
from packq.checkpoint.formats.base import (
    BITS,
    FLOATS,
    WORDS,
    CheckpointFormat,
    Output,
    Piece,
    declared,
    exclusions,
    fields,
    is_int,
    json_text,
    module_arrays,
    quantized_lm_head,
    strings,
)
from packq.checkpoint.formats.gptq import gptq_weights, source_zero_points, v2_zeros
from packq.checkpoint.model import Checkpoint, Format, Module, module_array
from packq.checkpoint.safetensors import Reader, SafetensorsFile
from packq.core.bits import layout
from packq.errors import CheckpointError
from packq.formats import awq
from packq.formats import compressed_tensors as ct

if TYPE_CHECKING:
    from packq.checkpoint.job import Job

NAME = "compressed-tensors"
#: stored tensor -> the GPTQ part it holds (transposed); weight_shape is checked
STORED = {"weight_packed": "qweight", "weight_zero_point": "qzeros", "weight_scale": "scales", "weight_shape": "shape"}
#: writing: a module's part -> the tensors it becomes, and how
MADE = {"qweight": [("weight_packed", "ct_weight"), ("weight_shape", "ct_shape")],
        "qzeros": [("weight_zero_point", "ct_zeros")], "scales": [("weight_scale", "ct_scale")]}


def ignored(entry: str, module: str) -> bool:
    """Whether compressed-tensors' ``ignore`` entry names a module: the name itself, or "re:" and a regular
    expression that ``re.match`` finds at its start (compressed-tensors' own ``_match_name``)."""
    if entry.startswith("re:"):
        try:
            return re.match(entry[3:], module) is not None
        except re.error:
            return False
    return entry == module


class CompressedTensors(CheckpointFormat):
    name = NAME
    title = "compressed-tensors pack-quantized (2, 3, 4, 8-bit)"
    recognised_by = 'quant_method "compressed-tensors", format "pack-quantized"'
    module = "weight_packed (N, K/8), weight_scale (N, K/G), weight_zero_point (N/8, K/G), weight_shape"
    why_not_act_order = ("compressed-tensors 0.20 removed actorder 'group' and weight_g_idx (its "
                         "QuantizationConfig refuses them)")

    def recognises(self, q: dict[str, Any]) -> bool:
        return str(q.get("quant_method", "")).lower() == NAME

    def read_config(self, q: dict[str, Any], where: Path) -> Format:
        """Weight-only int, one config group: read as GPTQ v2."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{str(where)!r}: compressed-tensors config: {why}")

        if q.get("format") != "pack-quantized":
            raise bad(f"format {json_text(q.get('format'))}; packq reads 'pack-quantized'")
        if declared(q, where, "quantization_status", str, "compressed") != "compressed":
            raise bad(f"quantization_status {q.get('quantization_status')!r}; packq reads 'compressed' checkpoints")
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            raise bad("packq reads exactly one config group (every quantized Linear alike)")
        scheme = next(iter(groups.values()))
        w = scheme.get("weights") if isinstance(scheme, dict) else None
        if not isinstance(w, dict):
            raise bad("the config group has no weights")
        if scheme.get("input_activations") is not None or scheme.get("output_activations") is not None:
            raise bad("activations are quantized too; packq reads weight-only schemes")
        label = "weights."
        kind = declared(w, where, "type", str, "int", label=label)
        dynamic = declared(w, where, "dynamic", (bool, str), False, label=label)
        num_bits = declared(w, where, "num_bits", int, label=label)
        if kind != "int" or dynamic is not False or num_bits not in BITS:
            raise bad(f"weights {json_text(w)}; packq reads static 2-, 3-, 4- or 8-bit int weights")
        if w.get("actorder") not in (None, "weight", "static"):
            raise bad(f"actorder {w.get('actorder')!r}")
        strategy = declared(w, where, "strategy", str, None, label=label)
        if strategy == "channel":
            group_size = -1
        elif strategy == "group" and is_int(w.get("group_size")) and w["group_size"] > 0:
            group_size = w["group_size"]
        else:
            raise bad(f"strategy {strategy!r} with group_size {json_text(w.get('group_size'))}; "
                      "packq reads group and channel")
        symmetric = declared(w, where, "symmetric", bool, True, label=label)
        for entry in strings(q, where, "ignore"):
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as e:
                    raise bad(f"ignore entry {entry!r} is not a regular expression ({e})") from None
        return Format("gptq", num_bits, group_size, "gptq_v2", raw=q, container=NAME, symmetric=symmetric)

    def modules(self, root: Path, fmt: Format, shards: dict[str, SafetensorsFile],
                where: dict[str, str]) -> dict[str, Module]:
        prefixes = sorted({p for p, dot, part in map(lambda t: t.rpartition("."), where) if p and part == "weight_packed"})
        modules = {}
        for prefix in prefixes:
            names = {part: f"{prefix}.{stored}" for stored, part in STORED.items() if f"{prefix}.{stored}" in where}
            need = ["qweight", "scales", "shape"] + ([] if fmt.symmetric else ["qzeros"])
            missing = [stored for stored, part in STORED.items() if part in need and part not in names]
            if missing:
                raise CheckpointError(f"{str(root)!r}: {prefix!r} has weight_packed but no {' or '.join(missing)}")
            files = {part: where[name] for part, name in names.items()}
            infos = {part: shards[files[part]].tensors[name] for part, name in names.items()}
            w, s, shape = infos["qweight"], infos["scales"], infos["shape"]

            def bad(why: str) -> CheckpointError:
                got = ", ".join(f"{n.rsplit('.', 1)[-1]} {i.shape} {i.dtype}" for n, i in zip(names.values(), infos.values()))
                return CheckpointError(f"{str(root)!r}: {prefix!r}: {why} (got {got}; {fmt.bits}-bit, group size {fmt.group_size})")

            values, words = layout(fmt.bits)
            if w.dtype not in WORDS or s.dtype not in FLOATS or shape.dtype not in ("I64", "I32"):
                raise bad("weight_packed must be int32 words, weight_scale floats, weight_shape integers")
            if len(w.shape) < 2 or w.shape[:-2] != s.shape[:-2] or 0 in w.shape or w.shape[-1] % words:
                raise bad("weight_packed and weight_scale must be non-empty matrices with the same leading dimensions")
            n, k = w.shape[-2], w.shape[-1] * values // words
            groups = 1 if fmt.group_size == -1 else k // fmt.group_size
            if n % values or (fmt.group_size != -1 and k % fmt.group_size) or s.shape[-2:] != (n, groups):
                raise bad(f"expected weight_scale (..., {n}, {groups}) and N a multiple of {values}")
            if shape.shape != (len(w.shape),):
                raise bad(f"weight_shape must hold {len(w.shape)} sizes")
            zp = (*w.shape[:-2], n * words // values, groups)
            if "qzeros" in infos and (infos["qzeros"].dtype not in WORDS or infos["qzeros"].shape != zp):
                raise bad(f"expected weight_zero_point {zp} int32")
            modules[prefix] = Module(prefix, files, infos, k, n, groups, names, transposed=True, bits=fmt.bits)
        if not modules:
            raise CheckpointError(f"{str(root)!r}: no quantized modules (no tensors named *.weight_packed)")
        for entry in fmt.raw.get("ignore") or []:  # compressed-tensors leaves ignored modules unquantized
            hit = next((p for p in modules if ignored(entry, p)), None)
            if hit is not None:
                raise CheckpointError(f"{str(root)!r}: compressed-tensors config ignores {entry!r}, but {hit!r} is stored "
                                      "packed; compressed-tensors would leave it unquantized")
        return modules

    def weights(self, job: Job, prefix: str) -> np.ndarray:
        return gptq_weights(module_arrays(job.ckpt, prefix), lambda z: source_zero_points(job, z), job.ckpt.format.bits)

    # ------------------------------------------------------------ writing: GPTQ v2's tensors transposed
    def outputs(self, job: Job, m: Module, part: str) -> list[Output]:
        if part == "qzeros" and job.symmetric:
            return []  # symmetric: no zero-points stored
        return MADE.get(part, [])

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        lead = m.lead
        if action == "ct_shape":
            return "I64", (len(lead) + 2,)
        if action == "ct_scale":
            return m.infos["scales"].dtype, (*lead, m.n, m.groups)
        if action == "ct_weight":
            return "I32", (*lead, m.n, m.words(m.k))
        return "I32", (*lead, m.words(m.n), m.groups)

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        if action == "ct_shape":
            return np.array([*m.lead, m.n, m.k], dtype="<i8")
        if action == "ct_scale":  # any float dtype, bfloat16 included: moved bit for bit
            return job.convert(ct.swap, f.array_bits(m.names["scales"]))
        awq_source = job.ckpt.format.method == "awq"
        if action == "ct_weight":
            words = f.array(m.names["qweight"])  # from AWQ in one pass: GPTQ's words, stored transposed
            return job.convert(ct.weight_from_awq, words) if awq_source else job.convert(ct.swap, words.view(np.int32))
        words = f.array(m.names["qzeros"])
        return job.convert(ct.swap, job.convert(awq.zeros_to_gptq, words, offset=0) if awq_source else v2_zeros(job, words))

    def pieces(self, job: Job, f: Reader, m: Module, action: str) -> list[Piece] | None:
        """From a 2-D AWQ qweight on the NumPy backend, weight_packed in pieces (:func:`awq_weight_pieces`); the
        others are made whole by :meth:`tensor`."""
        return awq_weight_pieces(job, f, m) if action == "ct_weight" else None

    def config(self, job: Job, config: dict[str, Any]) -> None:
        """compressed-tensors' quantization_config, as its own AutoAWQConverter writes it (0.20.1)."""
        fmt = job.ckpt.format
        weights: dict[str, Any] = {"num_bits": fmt.bits, "type": "int", "symmetric": job.symmetric, "dynamic": False}
        if fmt.group_size == -1:
            weights["strategy"] = "channel"
        else:
            weights.update(strategy="group", group_size=fmt.group_size)
        # ignore: the Linear modules left in float, and never one stored packed (compressed-tensors would then
        # leave it unquantized): lm_head unless it is quantized, the AWQ modules_to_not_convert (checked on read
        # to match no quantized module), GPTQModel's dynamic exclusions (both match with re.match)
        ignore = [] if quantized_lm_head(job.ckpt.modules) else ["lm_head"]
        ignore += [f"re:.*{re.escape(str(m))}.*" for m in fmt.raw.get("modules_to_not_convert") or []]
        ignore += [f"re:{p}" for p in exclusions(fmt)]
        stored = next(((e, p) for e in ignore for p in job.ckpt.modules if ignored(e, p)), None)
        if stored is not None:
            raise CheckpointError(f"{str(job.ckpt.root)!r}: the compressed-tensors ignore entry {stored[0]!r} would match "
                                  f"{stored[1]!r}, which is stored packed")
        config["quantization_config"] = {
            "config_groups": {"config_group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                                 "output_activations": None, "format": "pack-quantized"}},
            "quant_method": NAME, "kv_cache_scheme": None, "format": "pack-quantized",
            "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
            "moe_sparsity_config": None,
        }

    def result_weights(self, job: Job, result: Checkpoint, prefix: str) -> np.ndarray:
        """Read back as packq reads any compressed-tensors folder (GPTQ v2's layout), weight_shape checked."""
        m = job.ckpt.modules[prefix]
        shape = module_array(result, result.modules[prefix], "shape").tolist()
        if shape != [*m.lead, m.n, m.k]:
            raise CheckpointError(f"verification failed: {prefix + '.weight_shape'!r} is {shape}")
        return gptq_weights(module_arrays(result, prefix), lambda z: fields(z, m.bits), m.bits)


FORMAT = CompressedTensors()


def awq_weight_pieces(job: Job, f: Reader, m: Module,
                      make: Callable[[np.ndarray, int, int, np.ndarray], np.ndarray] | None = None) -> list[Piece] | None:
    """GPTQ's words transposed (compressed-tensors' weight_packed, MLX's weight: the same bytes) from a 2-D AWQ
    qweight on the NumPy backend, in pieces of whole rows (a block of AWQ's word columns each): the qweight is read
    once, on the first piece, into a reused buffer, and each piece converts into one while the one before it is
    written; None where that path does not apply (the caller makes the tensor whole). ``make(qweight, c0, c1, out)``
    converts a piece (default :func:`packq.backends.numpy.weight_to_ct_piece`; MLX's also counts its words)."""
    if job.ckpt.format.method != "awq" or m.lead or job.convert.be.name != "numpy":
        return None
    from packq.backends.numpy import weight_to_ct_piece

    groups, c = m.k // 8, m.n // 8  # output: rows of K/8 words, 8 rows per AWQ word column
    step = max(1, min(c, base.CHUNK_BYTES // (32 * groups)))
    # a piece's words are stored through a transpose whose rows are ``step`` words apart: a power of two, or
    # near one, puts them in a few cache sets (a 4096 x 11008 layer: 22-25 ms in pieces of 512 words, 13-15
    # ms of 495 or 175, 2 cores, 2026-12-01), so the step is 47 past a multiple of 64
    step = min(c, step // 64 * 64 + 47) if step > 64 else step
    blocks = [(c0, min(c, c0 + step)) for c0 in range(0, c, step)]
    held: list[np.ndarray] = []

    def piece(i: int) -> np.ndarray:
        c0, c1 = blocks[i]
        if not held:
            held.append(f.array(m.names["qweight"], job.buffers))
        out = (make or weight_to_ct_piece)(held[0], c0, c1, job.buffers.output(32 * (c1 - c0) * groups))
        if i == len(blocks) - 1:
            job.buffers.give(held.pop())
        return out

    return [Piece(32 * (c1 - c0) * groups, make=functools.partial(piece, i)) for i, (c0, c1) in enumerate(blocks)]
