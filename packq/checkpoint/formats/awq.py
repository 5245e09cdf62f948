"""AWQ gemm (4-bit): qweight (K, N/8) and qzeros (K/G, N/8) packed along N in AWQ's interleave."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.formats.base import (
    QweightFormat,
    Stream,
    declared,
    dequantize,
    exclusions,
    group_size,
    is_int,
    json_text,
    module_arrays,
    quantized_lm_head,
    strings,
)
from packq.checkpoint.formats.gptq import v2_zeros
from packq.checkpoint.model import Checkpoint, Format, Module
from packq.checkpoint.safetensors import Reader
from packq.errors import CheckpointError
from packq.formats import awq

if TYPE_CHECKING:
    from packq.checkpoint.job import Job


def awq_weights(a: dict[str, np.ndarray]) -> np.ndarray:
    """AWQ (qweight, qzeros, scales) dequantized, (..., K, N) in the scales' dtype."""
    q = np.asarray(numpy_backend.run(awq.unpack_awq, a["qweight"].view(np.int32))).astype(np.int16)
    z = np.asarray(numpy_backend.run(awq.unpack_awq, a["qzeros"].view(np.int32))).astype(np.int16)
    return dequantize(q, z, a["scales"], None)


class AWQ(QweightFormat):
    name = "awq"
    title = "AWQ gemm (4-bit)"
    recognised_by = 'quant_method "awq", version "gemm"'
    module = "qweight (K, N/8), qzeros (K/G, N/8), scales (K/G, N)"
    why_not_act_order = "it cannot become AWQ without permuting input features"

    def recognises(self, q: dict[str, Any]) -> bool:
        return str(q.get("quant_method", "")).lower() == "awq"

    def read_config(self, q: dict[str, Any], where: Path) -> Format:
        bits = q.get("bits", q.get("w_bit"))
        if not is_int(bits) or bits != 4:
            raise CheckpointError(f"{str(where)!r}: bits is {json_text(bits)}; AWQ gemm is 4-bit only")
        g = group_size(q, where, "group_size", "q_group_size")
        version = declared(q, where, "version", str, "gemm").lower()
        if version != "gemm":
            raise CheckpointError(
                f"{str(where)!r}: AWQ version {version!r} is not supported; packq converts the 'gemm' layout "
                f"(qweight (K, N/8) packed along N)"
            )
        if declared(q, where, "zero_point", bool, True) is not True:
            raise CheckpointError(f"{str(where)!r}: AWQ with zero_point false (no qzeros) is not supported")
        strings(q, where, "modules_to_not_convert")
        return Format("awq", 4, g, raw=q)

    def dims(self, qweight: tuple[int, ...], values: int, words: int) -> tuple[int, int]:
        return qweight[-2], qweight[-1] * 8

    def qweight_shape(self, k: int, n: int, values: int, words: int) -> tuple[int, int]:
        return k, n // 8

    def weights(self, job: Job, prefix: str) -> np.ndarray:
        return awq_weights(module_arrays(job.ckpt, prefix))

    # ------------------------------------------------------------ writing: from GPTQ's layout
    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        if action == "scales":
            return super().tensor(job, f, m, action)
        if action == "weight":
            return job.convert(awq.weight_to_awq, job.read(m, "qweight", f))
        return job.convert(awq.zeros_to_awq, v2_zeros(job, job.read(m, "qzeros", f)), offset=0)

    def stream(self, job: Job, m: Module, action: str) -> Stream | None:
        if action != "weight" or m.transposed:
            return None
        return Stream("qweight", lambda words: job.convert.over(awq.weight_to_awq, words), 1)

    def config(self, job: Job, config: dict[str, Any]) -> None:
        q = {"quant_method": "awq", "bits": 4, "group_size": job.ckpt.format.group_size, "zero_point": True,
             "version": "gemm"}
        if quantized_lm_head(job.ckpt.modules):  # AWQ loaders keep lm_head a float Linear (transformers always)
            raise CheckpointError(
                f"{str(job.ckpt.root)!r}: lm_head is quantized, and AWQ loaders (transformers, vLLM) keep lm_head in float: "
                "no AWQ checkpoint states a quantized lm_head; convert to gptq or compressed-tensors")
        if exclusions(job.ckpt.format):  # regular expressions; AWQ's modules_to_not_convert are substrings
            raise CheckpointError(
                f"{str(job.ckpt.root)!r}: GPTQModel's dynamic leaves modules unquantized by regular expression "
                f"({', '.join(repr('-:' + p) for p in exclusions(job.ckpt.format))}), which AWQ's "
                "modules_to_not_convert cannot state; convert to gptq or compressed-tensors")
        if job.ckpt.format.raw.get("modules_to_not_convert"):
            q["modules_to_not_convert"] = job.ckpt.format.raw["modules_to_not_convert"]
        config["quantization_config"] = q

    def result_weights(self, job: Job, result: Checkpoint, prefix: str) -> np.ndarray:
        return awq_weights(module_arrays(result, prefix))


FORMAT = AWQ()
