"""Dequantized float checkpoints: each module one ``<m>.weight`` (..., N, K) as torch stores a Linear's."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.backends.numpy import dequantize_awq_t, dequantize_gptq_t
from packq.checkpoint.formats.base import CheckpointFormat, Output, Piece, fields, module_arrays
from packq.checkpoint.model import Module
from packq.checkpoint.safetensors import Reader, SafetensorsFile
from packq.errors import CheckpointError
from packq.formats.awq import REVERSE_AWQ_PACK_ORDER
from packq.formats.engines import WORD

if TYPE_CHECKING:
    from packq.checkpoint.job import Job


def to_float(w: np.ndarray, dtype: str) -> np.ndarray:
    """float16/float32 weights as a contiguous ``dtype`` array; bfloat16 as its raw uint16 bits, rounded to nearest even.

    A value beyond the dtype's range becomes infinite (as a cast does, without NumPy's warning: the
    conversion counts such values itself, :class:`Overflow`).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype != "bfloat16":
            return np.ascontiguousarray(w, dtype=dtype)
        bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


#: a float weight is made in blocks of output rows of about this many bytes of float32 work
BLOCK_BYTES = 16 << 20


class Float(CheckpointFormat):
    read = False
    act_order = True
    recognised_by = "no quantization_config"
    module = "weight (N, K)"

    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype  # type: ignore[misc]
        self.title = f"{name} (dequantized)"  # type: ignore[misc]

    def outputs(self, job: Job, m: Module, part: str) -> list[Output]:
        return [("weight", "dequant")] if part == "qweight" else []

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        return self.dtype, (*m.lead, m.n, m.k)

    def pieces(self, job: Job, f: Reader, m: Module, action: str) -> list[Piece]:
        """The weight in blocks of output rows (source columns) and, for stacked experts, expert by expert: the
        module's packed tensors are read once, on the first block, and dropped after the last, so memory
        holds them and one block's float32 work, never the whole float tensor."""
        experts, item = math.prod(m.lead), 4 if self.dtype == "F32" else 2
        width = m.n if m.n % 32 else max(32, BLOCK_BYTES // (4 * m.k) // 32 * 32)  # whole words at every width
        blocks = [(e, n0, min(m.n, n0 + width)) for e in range(experts) for n0 in range(0, m.n, width)]
        arrays: dict[str, np.ndarray] = {}

        def block(i: int) -> np.ndarray:
            e, n0, n1 = blocks[i]
            if not arrays:
                arrays.update({p: v.reshape(-1, *v.shape[-2:]) if v.ndim >= 2 else v
                               for p, v in module_arrays(job.ckpt, m.prefix).items()})
            try:
                return self._block(job, m, {p: v[e] if v.ndim == 3 else v for p, v in arrays.items()}, n0, n1)
            finally:
                if i == len(blocks) - 1:
                    arrays.clear()

        return [Piece((n1 - n0) * m.k * item, make=functools.partial(block, i)) for i, (e, n0, n1) in enumerate(blocks)]

    def _block(self, job: Job, m: Module, a: dict[str, np.ndarray], n0: int, n1: int) -> np.ndarray:
        """Output rows [n0, n1) of one (expert's) weight: its columns n0..n1 dequantized, transposed."""
        if job.ckpt.format.method == "awq":
            cols = {"qweight": slice(n0 // 8, n1 // 8), "qzeros": slice(n0 // 8, n1 // 8), "scales": slice(n0, n1)}
        else:
            cols = {"qweight": slice(n0, n1), "qzeros": slice(m.words(n0), m.words(n1)), "scales": slice(n0, n1)}
        part = {p: v[..., cols[p]] if p in cols else v for p, v in a.items()}
        return self._dequantize(job, m, part)

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        return self._dequantize(job, m, module_arrays(job.ckpt, m.prefix))

    def _dequantize(self, job: Job, m: Module, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Computed in the scales' dtype, as engines compute them: one rounding of the exact (q - z) * s
        (bfloat16 scales are widened to float32, which holds that product exactly); then converted, so
        that bfloat16 output rounds the float16 product, and float32 holds it exactly.
        """
        fast = self._kernel(job, m, arrays)
        if fast is not None and job.overflow.finite(fast, self.name):
            return fast  # (where a weight overflows, the path below computes it again, to report its magnitude)
        a = {part: job.convert.to_backend(np.ascontiguousarray(v)) for part, v in arrays.items()}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is counted (job.overflow), not warned
            w = self._products(job, m, a)
        w = np.swapaxes(np.asarray(w), -1, -2)
        out = to_float(w, self.name)
        job.overflow.add(m.prefix, w, out, self.name)
        return out

    def _products(self, job: Job, m: Module, a: dict[str, Any]) -> Any:
        import packq

        try:
            if job.ckpt.format.method == "awq":
                w = packq.dequantize_awq(a["qweight"], a["qzeros"], a["scales"])
            else:
                zeros, qzeros = ("v1" if job.v1_zeros else "v2"), a["qzeros"]
                if job.v1_zeros == WORD and m.bits != 3:  # as GPTQModel wrote it: one 32-bit add gives v2
                    zeros, qzeros = "v2", packq.zeros_v1_to_v2(qzeros, bits=m.bits, convention=WORD)
                w = packq.dequantize_gptq(a["qweight"], qzeros, a["scales"], a.get("g_idx"), bits=m.bits, zeros=zeros)
        except ValueError as e:  # g_idx values out of range, say
            raise CheckpointError(f"{str(job.ckpt.root)!r}: {m.prefix!r}: {e}") from None
        return w

    def _kernel(self, job: Job, m: Module, a: dict[str, np.ndarray]) -> np.ndarray | None:
        """The same bits from the NumPy backend's compiled kernels (numba), which write the (N, K) output
        directly from a table of each (group, column)'s 2**bits results; None where they do not apply (other
        backends, no numba, stacked experts, a g_idx out of range: the path below then computes or refuses)."""
        if job.convert.be.name != "numpy" or a["qweight"].ndim != 2:
            return None
        finish = functools.partial(to_float, dtype=self.name)
        if job.ckpt.format.method == "awq":
            z = np.ascontiguousarray(fields(a["qzeros"], 4).reshape(-1, 8)[:, REVERSE_AWQ_PACK_ORDER].reshape(a["scales"].shape))
            return dequantize_awq_t(a["qweight"], z, a["scales"], finish)
        qzeros, bits = a["qzeros"], m.bits
        if job.v1_zeros == WORD and bits != 3:  # as GPTQModel wrote it: one 32-bit add gives v2
            import packq

            z = fields(np.asarray(packq.zeros_v1_to_v2(qzeros, bits=bits, convention=WORD)), bits)
        elif job.v1_zeros:  # per field, modulo 2**bits
            z = (fields(qzeros, bits) + 1) & np.int16((1 << bits) - 1)
        else:
            z = fields(qzeros, bits)
        g_idx = a.get("g_idx")
        groups = a["scales"].shape[0]
        if g_idx is not None and g_idx.size and not (0 <= g_idx.min() and g_idx.max() < groups):
            return None  # the public path raises, naming it
        return dequantize_gptq_t(a["qweight"], z, a["scales"], g_idx, bits, finish)

    def config(self, job: Job, config: dict[str, Any]) -> None:
        del config["quantization_config"]  # a plain checkpoint: no quantization left to state
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = self.name

    def verify(self, job: Job, out: Path, check_each) -> None:
        """Each module's float weight, read back one at a time, against the source dequantized by the verification readers."""
        where = {name: shard for shard in map(SafetensorsFile, sorted(out.glob("*.safetensors"))) for name in shard.tensors}

        def check(prefix: str) -> None:
            want = to_float(np.swapaxes(job.source.weights(job, prefix), -1, -2), self.name)
            shard = where[f"{prefix}.weight"]
            with shard.open() as f:
                name = f"{prefix}.weight"
                got = f.array_bits(name) if shard.tensors[name].dtype == "BF16" else f.array(name)
            if want.shape != got.shape or want.tobytes() != got.tobytes():
                raise CheckpointError(f"verification failed: {prefix + '.weight'!r} is not the dequantized source")

        check_each(check)


FORMATS = [Float("float16", "F16"), Float("bfloat16", "BF16"), Float("float32", "F32")]
