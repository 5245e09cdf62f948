"""AWQ "gemm" layout and its exact conversion to and from GPTQ, array-API only.

AWQ packs qweight (K, N/8) and qzeros (K/G, N/8) along columns and stores
logical column AWQ_PACK_ORDER[s] in nibble slot s of every word. GPTQ packs
qweight (K/8, N) along rows in natural order, and qzeros (K/G, N/8) along
columns in natural order, storing z - 1 per nibble (checkpoint_format "gptq").
"""

from __future__ import annotations

from packq.core import bits as B
from packq.core.bits import Array, Namespace

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE_AWQ_PACK_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
_ORDER = tuple(AWQ_PACK_ORDER)
_REVERSE = tuple(REVERSE_AWQ_PACK_ORDER)


def unpack_awq(xp: Namespace, packed: Array) -> Array:
    """AWQ column-packed words to int32 values in logical column order."""
    return B.apply_order(xp, B.unpack(xp, packed, "column", 4), "column", _REVERSE)


def pack_awq(xp: Namespace, values: Array) -> Array:
    """int32 values in logical column order to AWQ column-packed words."""
    return B.pack(xp, B.apply_order(xp, values, "column", _ORDER), "column", 4)


def awq_zeros_to_gptq(xp: Namespace, qzeros: Array) -> Array:
    """AWQ qzeros to GPTQ v1 qzeros: natural order, z - 1 per nibble modulo 16."""
    return B.pack(xp, unpack_awq(xp, qzeros) - 1, "column", 4)


def gptq_zeros_to_awq(xp: Namespace, qzeros: Array) -> Array:
    """GPTQ v1 qzeros to AWQ qzeros: z + 1 per nibble modulo 16, AWQ order."""
    return pack_awq(xp, B.unpack(xp, qzeros, "column", 4) + 1)


def awq_to_gptq(xp: Namespace, qweight: Array, qzeros: Array) -> tuple[Array, Array]:
    """The seed's composition: unpack, undo the interleave, repack by rows."""
    qw = B.pack(xp, unpack_awq(xp, qweight), "row", 4)
    return qw, awq_zeros_to_gptq(xp, qzeros)


def gptq_to_awq(xp: Namespace, qweight: Array, qzeros: Array) -> tuple[Array, Array]:
    """Inverse of :func:`awq_to_gptq`, by the same primitives."""
    qw = pack_awq(xp, B.unpack(xp, qweight, "row", 4))
    return qw, gptq_zeros_to_awq(xp, qzeros)


# The weight conversion moves no values, only nibbles: for every 8 rows x 1
# word block, an 8x8 nibble transpose and a permutation of the 8 output words.


def awq_to_gptq_weight_transposed(xp: Namespace, qweight: Array) -> Array:
    """AWQ qweight (..., K, N/8) to GPTQ qweight (..., K/8, N) by nibble transpose.

    Word i of a block (row 8kb + i) holds slot s = nibble s; after the transpose,
    word s holds slot s of all 8 rows, which is logical column AWQ_PACK_ORDER[s],
    so output column j takes transposed word REVERSE_AWQ_PACK_ORDER[j].
    """
    g = B.split(xp, qweight, -2, 8)  # (..., K/8, 8, N/8)
    t = B.transpose_nibbles(xp, [B.member(g, -2, i) for i in range(8)])
    return B.merge(xp, B.stack(xp, [t[s] for s in _REVERSE], -1), -1)


def gptq_to_awq_weight_transposed(xp: Namespace, qweight: Array) -> Array:
    """GPTQ qweight (..., K/8, N) to AWQ qweight (..., K, N/8): the inverse transpose."""
    g = B.split(xp, qweight, -1, 8)  # (..., K/8, N/8, 8)
    t = B.transpose_nibbles(xp, [B.member(g, -1, s) for s in _ORDER])
    return B.merge(xp, B.stack(xp, t, -2), -2)


def awq_to_gptq_fast(xp: Namespace, qweight: Array, qzeros: Array) -> tuple[Array, Array]:
    """:func:`awq_to_gptq` with the weight done by nibble transpose (one fused pass under jit)."""
    return awq_to_gptq_weight_transposed(xp, qweight), awq_zeros_to_gptq(xp, qzeros)


def gptq_to_awq_fast(xp: Namespace, qweight: Array, qzeros: Array) -> tuple[Array, Array]:
    """:func:`gptq_to_awq` with the weight done by nibble transpose."""
    return gptq_to_awq_weight_transposed(xp, qweight), gptq_zeros_to_awq(xp, qzeros)
