"""Dequantization for JAX on GPUs as Pallas kernels (Triton underneath): AWQ, and GPTQ at 2, 4 and 8 bits.

XLA's fusion of the array-API dequantization writes the float16 output at about 1.6 TB/s on an H200,
a third of what the chip can (benchmarks/results/h200): a kernel that loads a tile of words once and
spreads its fields over the output tile in registers, as the torch backend's Triton kernels do, is the
way to the copy's speed. The arithmetic is the core's: (q - z) * s in float32, rounded once to the
scales' dtype (exact for 16-bit scales), so the bits are the core's. Tiles must divide the matrix and
lie in one quantization group; :func:`supported` says when, and the caller falls back to XLA otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

#: rows x words (AWQ) or rows x columns (GPTQ) per program
BK, BJ, BN = 32, 32, 256


def supported(k: int, cols: int, groups: int, tile_cols: int) -> bool:
    gsize = k // groups if groups else 0
    return k % BK == 0 and cols % tile_cols == 0 and gsize % BK == 0


def _round(w: Any, dtype: Any) -> Any:
    return w.astype(dtype)


def _awq_kernel(w_ref, z_ref, s_ref, o_ref):
    t = jnp.arange(8, dtype=jnp.int32)
    shift = ((t >> 1) | ((t & 1) << 2)) * 4
    x = w_ref[...]
    q = ((x[:, :, None] >> shift[None, None, :]) & 15).reshape(BK, BJ * 8)
    z = ((z_ref[...][:, :, None] >> shift[None, None, :]) & 15).reshape(1, BJ * 8)
    o_ref[...] = ((q - z).astype(jnp.float32) * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def dequantize_awq(qweight: Any, qzeros: Any, scales: Any, interpret: bool = False) -> Any:
    """AWQ (K, N/8) words, (G, N/8) zeros, (G, N) scales -> (K, N) in the scales' dtype (2-D; see :func:`supported`)."""
    k, c = qweight.shape
    groups = qzeros.shape[0]
    per = (k // groups) // BK  # row tiles per group
    return pl.pallas_call(
        _awq_kernel,
        out_shape=jax.ShapeDtypeStruct((k, c * 8), scales.dtype),
        grid=(k // BK, c // BJ),
        in_specs=[pl.BlockSpec((BK, BJ), lambda i, j: (i, j)),
                  pl.BlockSpec((1, BJ), lambda i, j: (i // per, j)),
                  pl.BlockSpec((1, BJ * 8), lambda i, j: (i // per, j))],
        out_specs=pl.BlockSpec((BK, BJ * 8), lambda i, j: (i, j)),
        interpret=interpret,
    )(qweight, qzeros, scales)


def _gptq_kernel(w_ref, z_ref, s_ref, o_ref, *, bits: int, zadd: int):
    per = 32 // bits
    mask = (1 << bits) - 1
    f = jnp.arange(per, dtype=jnp.int32) * bits
    x = w_ref[...]  # (BK / per, BN)
    q = ((x[:, None, :] >> f[None, :, None]) & mask).reshape(BK, BN)
    zw = z_ref[...]  # (1, BN / per)
    z = (((zw[:, :, None] >> f[None, None, :]) & mask).reshape(1, BN) + zadd) & mask
    o_ref[...] = ((q - z).astype(jnp.float32) * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "zeros", "interpret"))
def dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, bits: int, zeros: str, interpret: bool = False) -> Any:
    """GPTQ (K*bits/32, N) words, (G, N*bits/32) zeros, (G, N) scales, no g_idx, bits 2/4/8 -> (K, N)."""
    per = 32 // bits
    kw, n = qweight.shape
    k = kw * per
    groups = qzeros.shape[0]
    tiles_per_group = (k // groups) // BK
    return pl.pallas_call(
        functools.partial(_gptq_kernel, bits=bits, zadd=1 if zeros == "v1" else 0),
        out_shape=jax.ShapeDtypeStruct((k, n), scales.dtype),
        grid=(k // BK, n // BN),
        in_specs=[pl.BlockSpec((BK // per, BN), lambda i, j: (i, j)),
                  pl.BlockSpec((1, BN // per), lambda i, j: (i // tiles_per_group, j)),
                  pl.BlockSpec((1, BN), lambda i, j: (i // tiles_per_group, j))],
        out_specs=pl.BlockSpec((BK, BN), lambda i, j: (i, j)),
        interpret=interpret,
    )(qweight, qzeros, scales)
