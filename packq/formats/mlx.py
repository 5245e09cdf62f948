"""MLX's "affine" quantization (mlx ``nn.QuantizedLinear``), array-API relayouts and MLX's arithmetic in NumPy.

Per quantized Linear of N outputs and K inputs, MLX stores ``weight`` uint32 (..., N, K*b/32), each
row's K values packed from the lowest bits up as one little-endian bit stream (3 bits: 32 values in 3
words, values straddling words, as GPTQ packs K); ``scales`` and ``biases`` (..., N, K/G); and
computes w = scales * q + biases. GPTQ's qweight (K*b/32, N) is that stream along K for every
column, so MLX's ``weight`` is GPTQ's qweight transposed, bit for bit (and compressed-tensors'
``weight_packed`` as it is); AWQ's interleave is undone first. The biases are -s * z.

How exact that is depends on MLX's arithmetic, which packq reproduces here in NumPy:

- ``"cpu"`` (mlx's CPU backend, ``mx.dequantize`` and the quantized matmuls): q * scales rounded to
  the scales' dtype, then + biases rounded again (two roundings in float16 or bfloat16).
- ``"metal"`` (the quantized matmuls' dequantization, ``quantized.h``): scales * q + biases in float32,
  rounded once to the scales' dtype.

With float32 scales and biases from float16 or bfloat16 scales both are exact: s * z and s * q are
exact in float32, so w is exactly (q - z) * s, whose rounding is the source's weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from packq.core import bits as B
from packq.core.bits import Array, Namespace
from packq.formats.awq import unpack_awq, weight_to_gptq
from packq.formats.compressed_tensors import swap

#: group sizes MLX's affine mode has (mlx 0.32.4: 32, 64, 128; 16, 256 and per-channel are refused by it)
GROUP_SIZES = (32, 64, 128)
#: widths MLX's affine mode has; packq's sources have 2, 3, 4 and 8
MLX_BITS = (2, 3, 4, 5, 6, 8)
#: MLX's arithmetic, per backend, as packq reproduces it
ARITHMETIC = ("cpu", "metal")
DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------ relayouts (array API)
def biases_of(xp: Namespace, scales: Array, z: Array, dtype: Any) -> Array:
    """-s * z in ``dtype``: the product computed in float32 (exact for float16 and bfloat16 scales and zero-points
    below 256), rounded once to ``dtype``."""
    wide = xp.astype(scales, xp.float32) * xp.astype(z, xp.float32)
    return xp.astype(-wide, dtype)


def from_gptq(xp: Namespace, qweight: Array, qzeros: Array, scales: Array, bits: int, dtype: Any) -> tuple[Array, Array, Array]:
    """GPTQ (qweight (..., K*b/32, N), v2 qzeros (..., G, N*b/32), scales (..., G, N)) -> MLX (weight, scales, biases)."""
    z = B.unpack(xp, qzeros, "column", bits)  # (..., G, N)
    return swap(xp, qweight), swap(xp, xp.astype(scales, dtype)), swap(xp, biases_of(xp, scales, z, dtype))


def from_awq(xp: Namespace, qweight: Array, qzeros: Array, scales: Array, dtype: Any) -> tuple[Array, Array, Array]:
    """AWQ gemm (qweight (..., K, N/8), qzeros (..., G, N/8), scales (..., G, N)) -> MLX (weight, scales, biases)."""
    z = unpack_awq(xp, qzeros)
    return (swap(xp, weight_to_gptq(xp, qweight)), swap(xp, xp.astype(scales, dtype)),
            swap(xp, biases_of(xp, scales, z, dtype)))


def from_compressed_tensors(xp: Namespace, weight_packed: Array, weight_zero_point: Array | None, weight_scale: Array,
                            bits: int, dtype: Any) -> tuple[Array, Array, Array]:
    """compressed-tensors pack-quantized -> MLX: weight_packed is MLX's weight as it is; zero points unpacked
    along rows ((..., N*b/32, G) -> (..., N, G)), 2**(bits-1) where the scheme is symmetric (None)."""
    if weight_zero_point is None:
        z = xp.full(weight_scale.shape, 1 << (bits - 1), dtype=xp.int32)
    else:
        z = B.unpack(xp, weight_zero_point, "row", bits)
    return weight_packed, xp.astype(weight_scale, dtype), biases_of(xp, weight_scale, z, dtype)


def zero_points_of(xp: Namespace, scales: Array, biases: Array, bits: int) -> Array:
    """The integer zero-points z in [0, 2**bits) whose bias -s * z (rounded to the biases' dtype) is ``biases``: -b / s
    rounded, or its neighbour where that one's bias is the one stored (a narrow dtype can round -b / s past z);
    0 where a scale is 0."""
    s, b = xp.astype(scales, xp.float32), xp.astype(biases, xp.float32)
    zero = s == 0
    z = xp.round(-b / xp.where(zero, xp.ones_like(s), s))
    z = xp.astype(xp.clip(xp.where(zero, xp.zeros_like(z), z), 0, (1 << bits) - 1), xp.int32)
    for step in (-1, 1):
        other = xp.clip(z + step, 0, (1 << bits) - 1)
        better = (biases_of(xp, scales, z, biases.dtype) != biases) & (biases_of(xp, scales, other, biases.dtype) == biases)
        z = xp.where(better, other, z)
    return z


def to_gptq(xp: Namespace, weight: Array, scales: Array, biases: Array, bits: int, dtype: Any) -> tuple[Array, Array, Array]:
    """MLX (weight, scales, biases) -> GPTQ (qweight, v2 qzeros, scales in ``dtype``); exact where biases are -s * z."""
    z = zero_points_of(xp, scales, biases, bits)  # (..., N, G)
    return swap(xp, weight), B.pack(xp, swap(xp, z), "column", bits), swap(xp, xp.astype(scales, dtype))


# ------------------------------------------------------------------ MLX's arithmetic (NumPy)
def bfloat16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32)).astype(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float values rounded once to ``dtype`` ("float16", "bfloat16" (as float32 holding bfloat16 values) or "float32")."""
    if dtype == "bfloat16":
        return bfloat16_round(np.asarray(x, dtype=np.float32))
    return np.asarray(x).astype(dtype)


def dequantize(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, dtype: str, arithmetic: str) -> np.ndarray:
    """w = scales * q + biases as MLX computes it, grouped along the last axis.

    ``q`` (..., N, K) integers; ``scales``, ``biases`` (..., N, G) holding ``dtype`` values (bfloat16 as
    float32); the result (..., N, K) holds ``dtype`` values (bfloat16 as float32). ``"cpu"``: q * scales
    rounded to ``dtype``, then + biases rounded (mlx's CPU backend); ``"metal"``: scales * q + biases in
    float32, rounded once to ``dtype`` (the Metal kernels' dequantization).
    """
    *lead, n, k = q.shape
    groups = scales.shape[-1]
    qg = q.reshape(*lead, n, groups, k // groups)
    s, b = scales[..., None], biases[..., None]
    if arithmetic == "metal" or dtype == "float32":
        # float32 throughout: s * q is exact for float16/bfloat16 scales, so a fused multiply-add rounds alike
        w = round_to(s.astype(np.float32) * qg.astype(np.float32) + b.astype(np.float32), dtype)
    elif dtype == "float16":  # NumPy's float16 operations round each result once, as mlx's do
        w = (s.astype(np.float16) * qg.astype(np.float16)).astype(np.float16) + b.astype(np.float16)
    else:  # bfloat16 through float32: each product and sum rounded to bfloat16, as mlx's CPU kernels do
        w = bfloat16_round(bfloat16_round(s.astype(np.float32) * qg.astype(np.float32)) + b.astype(np.float32))
    return w.reshape(*lead, n, k)

