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


def zeros_to_gptq(xp: Namespace, qzeros: Array, offset: int = -1) -> Array:
    """AWQ qzeros to GPTQ qzeros in natural order; ``offset`` -1 stores v1 (z - 1), 0 stores v2 (z).

    The offset is added per nibble modulo 16: a zero-point of 0 becomes 15 in
    v1 without borrowing from its neighbour.
    """
    return B.pack(xp, unpack_awq(xp, qzeros) + offset, "column", 4)


def zeros_to_awq(xp: Namespace, qzeros: Array, offset: int = 1) -> Array:
    """GPTQ qzeros to AWQ; ``offset`` +1 reads v1 storage, 0 reads v2."""
    return pack_awq(xp, B.unpack(xp, qzeros, "column", 4) + offset)


def weight_to_gptq(xp: Namespace, qweight: Array) -> Array:
    """AWQ qweight (..., K, N/8) to GPTQ (..., K/8, N): the seed's unpack, reorder, repack by rows."""
    return B.pack(xp, unpack_awq(xp, qweight), "row", 4)


def weight_to_awq(xp: Namespace, qweight: Array) -> Array:
    """GPTQ qweight (..., K/8, N) to AWQ (..., K, N/8), by the same primitives."""
    return pack_awq(xp, B.unpack(xp, qweight, "row", 4))


def rebias_zero_points(xp: Namespace, qweight: Array, qzeros: Array) -> tuple[Array, Array, Array, Array]:
    """Move AWQ (group, column) pairs with zero-point 0 to zero-point 1 where that loses nothing.

    Upstream exllamav2 adds 1 to stored v1 zeros without the modulo, so a zero
    of 0 (stored as 15) is read as 16. Where every quantized value of the pair
    is at most 14, q + 1 and z + 1 give the same dequantized weights. Returns
    the new AWQ qweight and qzeros and the counts of zero-0 pairs and of those
    rebiased (0-d int32 arrays, so that this stays jittable).
    """
    q, z = unpack_awq(xp, qweight), unpack_awq(xp, qzeros)
    *lead, k, n = q.shape
    groups = z.shape[-2]
    qg = xp.reshape(q, (*lead, groups, k // groups, n))
    zero0 = z == 0
    fixable = zero0 & (xp.max(qg, axis=-2) <= 14)
    bump = xp.astype(fixable, xp.int32)
    q2 = xp.reshape(qg + bump[..., None, :], q.shape)
    return pack_awq(xp, q2), pack_awq(xp, z + bump), B.count_fields(xp, qzeros, 0), xp.sum(bump)
