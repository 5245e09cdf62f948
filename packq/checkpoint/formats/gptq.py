"""GPTQ (2, 3, 4, 8-bit): qweight (K*b/32, N) packed along K, qzeros (G, N*b/32), scales, g_idx.

v1 ("gptq") stores each zero-point minus one, v2 ("gptq_v2") stores it as it is; engines read
v1 zero-points of 0 differently (``packq.formats.engines``), so a v1 source is read in its
producer's convention and a v1 result written in the convention of the engine named by ``--for``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq import __version__
from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.formats.base import (
    BITS,
    Output,
    QweightFormat,
    Stream,
    declared,
    dequantize,
    fields,
    group_size,
    json_text,
    module_arrays,
    quantized_lm_head,
    strings,
)
from packq.checkpoint.model import Checkpoint, Format, Module, act_order, module_array
from packq.checkpoint.safetensors import Reader
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats import awq, gptq
from packq.formats.engines import ENGINES, FIELD, WORD, read_v1

if TYPE_CHECKING:
    from packq.checkpoint.job import Job


# ---------------------------------------------------------------- reading a GPTQ-layout source's zeros
def v2_zeros(job: Job, words: np.ndarray) -> np.ndarray:
    """A GPTQ-layout source's qzeros as v2 (z itself), read as its producer wrote them."""
    bits = job.ckpt.format.bits
    if job.ckpt.format.checkpoint_format != "gptq":
        return words
    if job.read_word and bits != 3:  # GPTQModel shifts 3-bit fields one by one
        return job.convert(gptq.zeros_word_add, words, delta=1, bits=bits)
    return job.convert(gptq.zeros_shift, words, delta=1, bits=bits)


def source_zero_points(job: Job, qzeros: np.ndarray) -> np.ndarray:
    """A GPTQ source's zero-points, read as its producer wrote them (v2 and compressed-tensors: as stored)."""
    bits = job.ckpt.format.bits
    if job.ckpt.format.checkpoint_format == "gptq_v2":
        return fields(qzeros, bits)
    return read_v1(fields(qzeros, bits), qzeros.view(np.uint32), WORD if job.read_word else FIELD, bits)


def gptq_weights(a: dict[str, np.ndarray], zero_points: Callable[[np.ndarray], np.ndarray], bits: int) -> np.ndarray:
    """GPTQ-layout (qweight, qzeros, scales, g_idx) dequantized, (..., K, N) in the scales' dtype."""
    q = np.asarray(numpy_backend.run(B.unpack, a["qweight"].view(np.int32), direction="row", bits=bits))
    return dequantize(q.astype(np.int16), zero_points(a["qzeros"]), a["scales"], a.get("g_idx"))


class GPTQ(QweightFormat):
    name = "gptq"
    title = "GPTQ v1 / v2 (2, 3, 4, 8-bit)"
    recognised_by = 'quant_method "gptq", checkpoint_format "gptq" or "gptq_v2"'
    module = "qweight (K/8, N), qzeros (K/G, N/8), scales (K/G, N), g_idx (K,)"
    act_order = True

    def recognises(self, q: dict[str, Any]) -> bool:
        return str(q.get("quant_method", "")).lower() == "gptq"

    def read_config(self, q: dict[str, Any], where: Path) -> Format:
        bits = declared(q, where, "bits", int, alias="w_bit", choices=BITS)
        g = group_size(q, where, "group_size", "q_group_size")
        desc_act = declared(q, where, "desc_act", bool, False)
        fmt = declared(q, where, "checkpoint_format", str, "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{str(where)!r}: GPTQ checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
        declared(q, where, "lm_head", bool, False)
        declared(q, where, "sym", bool, True)
        strings(q, where, "modules_to_not_convert")
        dynamic = declared(q, where, "dynamic", dict, {})
        for pattern, override in dynamic.items():  # GPTQModel's per-module overrides, "+:regex" / "-:regex"
            if not isinstance(override, dict):
                raise CheckpointError(f"{str(where)!r}: dynamic[{pattern!r}] must be an object, got {json_text(override)}")
            try:
                re.compile(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern)
            except re.error as e:
                raise CheckpointError(f"{str(where)!r}: dynamic key {pattern!r} is not a regular expression ({e})") from None
            if pattern.startswith("-:"):
                continue  # modules left unquantized: stored as float tensors, which packq copies
            # packq reads every module at one width, group size and order: an override that changes them
            # would be read wrongly, so it is refused; one that repeats them changes nothing
            for key, value in (("bits", bits), ("group_size", g), ("desc_act", desc_act)):
                if key in override and (override[key] != value or type(override[key]) is not type(value)):
                    raise CheckpointError(
                        f"{str(where)!r}: dynamic[{pattern!r}] sets {key} {json_text(override[key])} for some modules, "
                        f"where the checkpoint's is {json_text(value)}; packq converts checkpoints quantized alike "
                        "throughout")
        return Format("gptq", bits, g, fmt, desc_act, raw=q)

    def dims(self, qweight: tuple[int, ...], values: int, words: int) -> tuple[int, int]:
        return qweight[-2] * values // words, qweight[-1]

    def qweight_shape(self, k: int, n: int, values: int, words: int) -> tuple[int, int]:
        return k * words // values, n

    def weights(self, job: Job, prefix: str) -> np.ndarray:
        return gptq_weights(module_arrays(job.ckpt, prefix), lambda z: source_zero_points(job, z), job.ckpt.format.bits)

    # ------------------------------------------------------------ writing
    def extra(self, m: Module) -> list[Output]:
        return [("g_idx", "g_idx")]

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        if action == "g_idx":
            return "I32", (m.k,)
        return super().entry(job, m, action)

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        if action == "g_idx":  # the source's (act-order kept), else arange(K) // group_size
            if "g_idx" in m.names:
                return module_array(job.ckpt, m, "g_idx").astype("<i4")
            return (np.arange(m.k, dtype=np.int32) // (m.k // m.groups)).astype("<i4")
        if action == "scales":
            return super().tensor(job, f, m, action)
        part = "qweight" if action == "weight" else "qzeros"
        rebias = job.target.rebias.get(m.prefix)
        if job.ckpt.format.method == "gptq" and rebias is None:
            # GPTQ's layout already (v1, v2, compressed-tensors): weights as they are, zeros re-encoded
            words = job.read(m, part, f)
            return words.view(np.int32) if part == "qweight" else self.zeros(job, v2_zeros(job, words), m.bits)
        # from AWQ's layout (an AWQ source, or a GPTQ one brought there for the rebias)
        words = job.read(m, part, f)
        if job.ckpt.format.method != "awq":
            words = (job.convert(awq.weight_to_awq, words) if part == "qweight"
                     else job.convert(awq.zeros_to_awq, v2_zeros(job, words), offset=0))
        if action == "weight":
            if rebias is not None:  # q + 1 wherever the pair's zero-point moved from 0 to 1
                qzeros = self._awq_zeros(job, m)
                words = np.asarray(numpy_backend.run(awq.rebias_zero_points, words.view(np.int32),
                                                     qzeros.view(np.int32))[0])
            return job.convert(awq.weight_to_gptq, words)
        return self.zeros(job, job.convert(awq.zeros_to_gptq, rebias if rebias is not None else words, offset=0), 4)

    def stream(self, job: Job, m: Module, action: str) -> Stream | None:
        if action != "weight" or m.transposed or m.prefix in job.target.rebias:
            return None
        if job.ckpt.format.method == "awq":  # 8 AWQ rows make one GPTQ row
            return Stream("qweight", lambda words: job.convert.over(awq.weight_to_gptq, words), 8)
        return Stream("qweight", None, 1)  # GPTQ's weights as they are: copied by the kernel

    @staticmethod
    def _awq_zeros(job: Job, m: Module) -> np.ndarray:
        """The source module's qzeros in AWQ's layout, before any rebias."""
        words = module_array(job.ckpt, m, "qzeros")
        if job.ckpt.format.method == "awq":
            return words
        return job.convert(awq.zeros_to_awq, v2_zeros(job, words), offset=0)

    @staticmethod
    def zeros(job: Job, v2: np.ndarray, bits: int) -> np.ndarray:
        """v2 qzeros (z) stored as the target writes them: as they are, z - 1 per field, or as GPTQModel does."""
        if job.target.checkpoint_format == "gptq_v2":
            return v2.view(np.int32)
        if job.target.convention == WORD and bits != 3:  # one 32-bit subtraction; 3-bit fields shift one by one
            return job.convert(gptq.zeros_word_add, v2, delta=-1, bits=bits)
        return job.convert(gptq.zeros_shift, v2, delta=-1, bits=bits)

    def config(self, job: Job, config: dict[str, Any]) -> None:
        ckpt = job.ckpt
        fmt = job.target.checkpoint_format
        q: dict[str, Any] = {
            "quant_method": "gptq", "bits": ckpt.format.bits, "group_size": ckpt.format.group_size,
            "desc_act": act_order(ckpt) if ckpt.format.method == "gptq" else False,
            # sym=True where every zero-point is 2**(bits-1): vLLM 0.32 loads GPTQ only so (its kernels then read no qzeros)
            "sym": job.symmetric, "checkpoint_format": fmt, "true_sequential": True,
        }
        if fmt == "gptq":  # say how v1 zeros were written, so that any reader can know
            q["meta"] = {"quantizer": [f"packq:{__version__}"], "packq_v1_zeros": job.target.convention}
        if quantized_lm_head(ckpt.modules):  # GPTQModel and transformers quantize lm_head only when told so
            q["lm_head"] = True
        if ckpt.format.raw.get("modules_to_not_convert"):
            q["modules_to_not_convert"] = ckpt.format.raw["modules_to_not_convert"]
        if ckpt.format.method == "gptq" and ckpt.format.container is None and ckpt.format.raw.get("dynamic"):
            q["dynamic"] = ckpt.format.raw["dynamic"]  # GPTQModel's per-module overrides: checked consistent on read
        config["quantization_config"] = q

    def result_weights(self, job: Job, result: Checkpoint, prefix: str) -> np.ndarray:
        """As the engine it was written for reads it (packq's own reading without one); g_idx checked."""
        m = job.ckpt.modules[prefix]
        b = module_arrays(result, prefix)
        want = module_array(job.ckpt, m, "g_idx") if "g_idx" in m.names else np.arange(m.k) // (m.k // m.groups)
        if not np.array_equal(b["g_idx"], want):
            raise CheckpointError(f"verification failed: {prefix + '.g_idx'!r} is not the source's")
        bits = m.bits
        convention = job.target.convention
        if job.target.engine is not None:
            convention = ENGINES[job.target.engine].v1_convention(bits) or FIELD

        def zero_points(qzeros: np.ndarray) -> np.ndarray:
            if job.target.checkpoint_format == "gptq_v2":
                return fields(qzeros, bits)
            return read_v1(fields(qzeros, bits), qzeros.view(np.uint32), convention, bits)

        return gptq_weights(b, zero_points, bits)


FORMAT = GPTQ()
