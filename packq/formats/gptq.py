"""GPTQ zero-point storage (v1/v2) and dequantization of both formats, array-API only.

GPTQ v1 (checkpoint_format "gptq") stores z - 1 in every qzeros field, v2
("gptq_v2") stores z. packq's own v1 is per field modulo 2**bits (a zero-point
of 0 is stored as 2**bits - 1, the "field" convention); GPTQModel, and so
transformers, reads and writes v1 as one 32-bit add of 1 in every field (the
"word" convention), whose carries and borrows cross fields where a zero-point
is 0. :mod:`packq.formats.engines` says which engine uses which.
"""

from __future__ import annotations

from packq.core import bits as B
from packq.core.bits import Array, Namespace
from packq.formats.awq import unpack_awq


def zeros_shift(xp: Namespace, qzeros: Array, delta: int, bits: int) -> Array:
    """Add ``delta`` to every column-packed zero field, modulo 2**bits."""
    return B.pack(xp, B.unpack(xp, qzeros, "column", bits) + delta, "column", bits)


def field_ones(bits: int) -> int:
    """The 32-bit word with 1 in every ``bits``-wide field (0x11111111 at 4 bits)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def zeros_word_add(xp: Namespace, qzeros: Array, delta: int, bits: int) -> Array:
    """Add ``delta`` (+1 or -1) to every field of int32 words as one 32-bit add, carries crossing fields.

    GPTQModel's v1 <-> v2 at 2, 4 and 8 bits (``qzeros += 0x11111111``); int32
    arithmetic wraps modulo 2**32 in every library packq runs on, which is that add.
    """
    return qzeros + delta * field_ones(bits)


def _scale(xp: Namespace, q: Array, z: Array, scales: Array) -> Array:
    # (q - z) is an exact small integer: the float product is rounded once, so
    # every route to the same (q, z, s) gives the same bits.
    return xp.astype(q - z, scales.dtype) * scales


def dequantize_grouped(xp: Namespace, q: Array, z: Array, scales: Array) -> Array:
    """W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], G = K // groups."""
    *lead, k, n = q.shape
    groups = scales.shape[-2]
    qg = xp.reshape(q, (*lead, groups, k // groups, n))
    w = _scale(xp, qg, z[..., :, None, :], scales[..., :, None, :])
    return xp.reshape(w, (*lead, k, n))


def dequantize_awq(xp: Namespace, qweight: Array, qzeros: Array, scales: Array) -> Array:
    """Dequantize AWQ gemm tensors to the scales' dtype."""
    return dequantize_grouped(xp, unpack_awq(xp, qweight), unpack_awq(xp, qzeros), scales)


def dequantize_gptq(
    xp: Namespace,
    qweight: Array,
    qzeros: Array,
    scales: Array,
    g_idx: Array | None,
    bits: int,
    zeros: str,
) -> Array:
    """Dequantize GPTQ tensors; ``g_idx`` None means the trivial k // G."""
    q = B.unpack(xp, qweight, "row", bits)
    z = B.unpack(xp, qzeros, "column", bits)
    if zeros == "v1":
        z = (z + 1) & ((1 << bits) - 1)
    if g_idx is None:
        return dequantize_grouped(xp, q, z, scales)
    idx = xp.astype(g_idx, xp.int32)
    return _scale(xp, q, xp.take(z, idx, axis=-2), xp.take(scales, idx, axis=-2))
