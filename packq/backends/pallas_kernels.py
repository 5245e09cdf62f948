"""Dequantization for JAX on GPUs as Pallas kernels (Triton underneath): AWQ, and GPTQ at 2, 3, 4 and 8 bits,
with or without act-order (``g_idx``).

XLA's fusion of the array-API dequantization writes the float16 output at about 1.6 TB/s on an H200,
a third of what the chip can (benchmarks/results/h200): a kernel that loads a tile of words once and
spreads its fields over the output tile in registers, as the torch backend's Triton kernels do, is the
way to the copy's speed. The arithmetic is the core's: (q - z) * s in float32, rounded once to the
scales' dtype (exact for 16-bit scales), so the bits are the core's.

A program writes a tile of BK = 32 rows x BN = 256 columns. At 2, 4 and 8 bits it loads its BK * bits / 32
word rows once and shifts every field out of them. At 3 bits the tile's 32 rows are 3 words per column
(fields 10 and 21 straddle two): the three word rows are loaded once and each row of the tile selects, by a
constant of its row, the word its field starts in and the next one. Without ``g_idx`` the tile lies in one
group: one row of zero-points and scales, broadcast. With ``g_idx`` every row gathers its own group's
zero-points and scales from the column tile's (groups x BN) block (loads of the cache, as the torch kernel
does; at 3 bits the zero fields are repacked at 4 bits first, see :func:`dequantize_gptq`); its group index is clamped to the groups that
exist, so an out-of-range ``g_idx`` can never read outside the arrays (the public call checks the range and
raises; see :mod:`packq._api`).

Stacked experts are folded into the rows by the caller (every expert's K is whole tiles and groups): row
tile i of the merged matrix is expert i // (K / BK), whose groups start at that expert's first group row.
:func:`supported` says when the tiles fit; the caller falls back to XLA otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from packq.core import bits as B

try:  # lower to Triton explicitly: JAX's default for GPUs may be Mosaic GPU, which these kernels are not written for
    from jax.experimental.pallas import triton as _pltriton

    _PARAMS: Any = _pltriton.CompilerParams(num_warps=4)
except ImportError:  # pragma: no cover - a jax without the Triton lowering
    _PARAMS = None

#: rows x words (AWQ) or rows x columns (GPTQ) per program
BK, BJ, BN = 32, 32, 256


def supported(k: int, cols: int, groups: int, tile_cols: int, act_order: bool = False) -> bool:
    """Whether the tiles fit: K and the columns whole tiles; without act-order, each row tile in one group."""
    gsize = k // groups if groups else 0
    return k % BK == 0 and cols % tile_cols == 0 and groups > 0 and (act_order or gsize % BK == 0)


def _call(kernel: Any, **kw: Any) -> Any:
    return pl.pallas_call(kernel, compiler_params=None if kw.get("interpret") else _PARAMS, **kw)


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
    return _call(
        _awq_kernel,
        out_shape=jax.ShapeDtypeStruct((k, c * 8), scales.dtype),
        grid=(k // BK, c // BJ),
        in_specs=[pl.BlockSpec((BK, BJ), lambda i, j: (i, j)),
                  pl.BlockSpec((1, BJ), lambda i, j: (i // per, j)),
                  pl.BlockSpec((1, BJ * 8), lambda i, j: (i // per, j))],
        out_specs=pl.BlockSpec((BK, BJ * 8), lambda i, j: (i, j)),
        interpret=interpret,
    )(qweight, qzeros, scales)


def _srl(x: Any, s: Any) -> Any:
    """Logical shift right of int32 words (the fields are unsigned)."""
    return jax.lax.shift_right_logical(x, jnp.broadcast_to(s, x.shape).astype(jnp.int32))


def _field3(lo: Any, hi: Any, pos: Any) -> Any:
    """The 3-bit field at bit ``pos`` of a stream whose word holding ``pos`` is ``lo`` and the next ``hi``.
    Shifts stay below 32 (a shift by the width is undefined in Triton, as in C)."""
    shift = pos & 31
    straddle = shift > 29
    v = _srl(lo, shift) | jnp.where(straddle, hi << ((32 - shift) & 31), 0)
    return v & 7


def _tile_q(w_ref: Any, bits: int) -> Any:
    """The tile's (BK, BN) values from its BK * bits / 32 word rows, each loaded once."""
    mask = (1 << bits) - 1
    if bits == 3:  # three word rows; row r's field starts in word (3r) >> 5 and may end in the next
        x0, x1, x2 = w_ref[0, :][None, :], w_ref[1, :][None, :], w_ref[2, :][None, :]
        r = jax.lax.broadcasted_iota(jnp.int32, (BK, 1), 0)
        wi = (r * 3) >> 5
        lo = jnp.where(wi == 0, x0, jnp.where(wi == 1, x1, x2))
        hi = jnp.where(wi == 0, x1, x2)  # rows of word 2 never straddle: field 31 ends at bit 96
        return _field3(lo, hi, r * 3)
    per = 32 // bits
    f = jnp.arange(per, dtype=jnp.int32) * bits
    x = w_ref[...]  # (BK / per, BN)
    return ((x[:, None, :] >> f[None, :, None]) & mask).reshape(BK, BN)


def _zero_row(z_ref: Any, row: Any, bits: int) -> Any:
    """Zero-points of the tile's BN columns in group row(s) ``row`` (a scalar, or a (BK, 1) array of rows):
    shape (1, BN) or (BK, BN). The column tile's words are the block ``z_ref`` (rows: groups)."""
    mask = (1 << bits) - 1
    if bits == 3:  # a bit stream along the columns: 3 words per 32 columns, 24 per tile
        c = jax.lax.broadcasted_iota(jnp.int32, (1, BN), 1)
        wi = (c * 3) >> 5
        nxt = jnp.minimum(wi + 1, BN * 3 // 32 - 1)  # (the next word is read only where a field straddles)
        if jnp.ndim(row) == 0:
            lo, hi = z_ref[row, wi[0]][None, :], z_ref[row, nxt[0]][None, :]
        else:
            rows = jnp.broadcast_to(row, (BK, BN))
            lo, hi = z_ref[rows, jnp.broadcast_to(wi, (BK, BN))], z_ref[rows, jnp.broadcast_to(nxt, (BK, BN))]
        return _field3(lo, hi, c * 3)
    per = 32 // bits
    f = jnp.arange(per, dtype=jnp.int32) * bits
    zw = z_ref[row, :][None, :] if jnp.ndim(row) == 0 else z_ref[row[:, 0], :]  # (1 or BK, BN / per)
    return ((zw[:, :, None] >> f[None, None, :]) & mask).reshape(zw.shape[0], BN)


def _gptq_kernel(w_ref, z_ref, s_ref, o_ref, *, bits: int, zadd: int):
    mask = (1 << bits) - 1
    q = _tile_q(w_ref, bits)
    z = (_zero_row(z_ref, 0, bits) + zadd) & mask
    o_ref[...] = ((q - z).astype(jnp.float32) * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def _gptq_act_order_kernel(w_ref, g_ref, z_ref, s_ref, o_ref, *, bits: int, zbits: int, zadd: int, groups: int,
                           row_tiles: int):
    """Each row's group from g_idx (clamped into [0, groups)), plus the first group of the row tile's expert.
    ``zbits``: how ``z_ref`` holds the zero-points: packed at that width (4 for 3-bit weights, repacked by the
    caller), or 0 for their fields one int8 each."""
    mask = (1 << bits) - 1
    q = _tile_q(w_ref, bits)
    expert = pl.program_id(0) // row_tiles
    g = jnp.clip(g_ref[...], 0, groups - 1)[:, None] + expert * groups  # (BK, 1)
    z = z_ref[g[:, 0], :].astype(jnp.int32) if zbits == 0 else _zero_row(z_ref, g, zbits)
    z = (z + zadd) & mask
    s = s_ref[g[:, 0], :]
    o_ref[...] = ((q - z).astype(jnp.float32) * s.astype(jnp.float32)).astype(o_ref.dtype)


#: how 3-bit act-order gives its kernel the zero-points: "nibbles" (repacked at 4 bits) or "bytes" (one int8 each)
ZEROS3 = ("nibbles", "bytes")


@functools.partial(jax.jit, static_argnames=("bits", "zeros", "experts", "interpret", "zeros3"))
def dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, g_idx: Any = None, *, bits: int, zeros: str,
                    experts: int = 1, interpret: bool = False, zeros3: str = ZEROS3[0]) -> Any:
    """GPTQ (E*K*bits/32, N) words, (E*G, N*bits/32) zeros, (E*G, N) scales (``experts`` E stacked along the rows),
    optional g_idx (K,) shared by the experts, bits 2/3/4/8 -> (E*K, N) in the scales' dtype. ``zeros3``: one of
    :data:`ZEROS3`, how 3-bit act-order gathers its zero-points (the first is the faster on an H200; the other stays
    for the benchmark's comparison)."""
    kw, n = qweight.shape
    k = kw * 32 // bits
    groups = qzeros.shape[0]
    zadd = 1 if zeros == "v1" else 0
    wspec = pl.BlockSpec((BK * bits // 32, BN), lambda i, j: (i, j))
    zcols = BN * bits // 32
    out_shape = jax.ShapeDtypeStruct((k, n), scales.dtype)
    out_spec = pl.BlockSpec((BK, BN), lambda i, j: (i, j))
    if g_idx is None:
        tiles_per_group = (k // groups) // BK
        return _call(
            functools.partial(_gptq_kernel, bits=bits, zadd=zadd),
            out_shape=out_shape, grid=(k // BK, n // BN),
            in_specs=[wspec,
                      pl.BlockSpec((1, zcols), lambda i, j: (i // tiles_per_group, j)),
                      pl.BlockSpec((1, BN), lambda i, j: (i // tiles_per_group, j))],
            out_specs=out_spec, interpret=interpret,
        )(qweight, qzeros, scales)
    row_tiles = (k // experts) // BK  # of one expert
    per_expert = groups // experts
    # 3 bits: each row gathering its zero field from the bit stream takes two gathered words per value (1.21x a
    # copy of the output on an H200, 8192 x 28672) and one gathered byte per value (the fields unpacked by XLA)
    # 1.29x; the fields repacked by XLA at 4 bits (groups x N / 2 bytes, under 1% of the output) are gathered as
    # 4-bit act-order's are, one word per 8 columns (benchmarks/results/h200/bench_dequant.txt, 2026-12-02)
    zbits = bits
    if bits == 3:
        if zeros3 not in ZEROS3:
            raise ValueError(f"zeros3 must be one of {ZEROS3}, got {zeros3!r}")
        fields = B.unpack(jnp, qzeros, "column", 3)
        if zeros3 == "nibbles":
            qzeros, zbits, zcols = B.pack(jnp, fields, "column", 4), 4, BN // 8
        else:
            qzeros, zbits, zcols = fields.astype(jnp.int8), 0, BN
    return _call(
        functools.partial(_gptq_act_order_kernel, bits=bits, zbits=zbits, zadd=zadd, groups=per_expert,
                          row_tiles=row_tiles),
        out_shape=out_shape, grid=(k // BK, n // BN),
        in_specs=[wspec,
                  pl.BlockSpec((BK,), lambda i, j: (i % row_tiles,)),
                  pl.BlockSpec((groups, zcols), lambda i, j: (0, j)),
                  pl.BlockSpec((groups, BN), lambda i, j: (0, j))],
        out_specs=out_spec, interpret=interpret,
    )(qweight, g_idx.astype(jnp.int32), qzeros, scales)
