"""compressed-tensors ``pack-quantized``: GPTQ v2's tensors transposed, array-API only.

weight_packed (..., N, K*b/32) is GPTQ's qweight (..., K*b/32, N) transposed (both pack each column's
K values as one little-endian bit stream, 3-bit values straddling words); weight_zero_point
(..., N*b/32, G) is GPTQ v2's qzeros (..., G, N*b/32) transposed; weight_scale (..., N, G) the scales
(..., G, N) transposed. Checked against compressed-tensors' own packer and dequantizer.
"""

from __future__ import annotations

from packq.core.bits import Array, Namespace
from packq.formats.awq import weight_to_gptq


def swap(xp: Namespace, x: Array) -> Array:
    """The last two axes exchanged."""
    n = x.ndim
    return xp.permute_dims(x, (*range(n - 2), n - 1, n - 2))


def weight_from_awq(xp: Namespace, qweight: Array) -> Array:
    """AWQ gemm qweight (..., K, N/8) -> weight_packed (..., N, K/8): GPTQ's qweight, transposed."""
    return swap(xp, weight_to_gptq(xp, qweight))


def from_gptq(xp: Namespace, qweight: Array, qzeros: Array, scales: Array) -> tuple[Array, Array, Array]:
    """GPTQ v2 (qweight, qzeros, scales) -> compressed-tensors (weight_packed, weight_zero_point, weight_scale)."""
    return swap(xp, qweight), swap(xp, qzeros), swap(xp, scales)


def to_gptq(xp: Namespace, weight_packed: Array, weight_zero_point: Array, weight_scale: Array) -> tuple[Array, Array, Array]:
    """compressed-tensors (weight_packed, weight_zero_point, weight_scale) -> GPTQ v2 (qweight, qzeros, scales)."""
    return swap(xp, weight_packed), swap(xp, weight_zero_point), swap(xp, weight_scale)
