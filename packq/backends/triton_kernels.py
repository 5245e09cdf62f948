"""Single-pass Triton kernels for torch CUDA tensors: AWQ <-> GPTQ weights and zero-points.

One kernel per direction does both tensors of a public call in one launch: its first programs
convert weight tiles, the rest zero-point words. Each input byte is read once from memory and each
output byte written once; no unpacked value touches memory. To GPTQ, a program loads a tile of
whole words contiguously and moves every nibble to its place in registers; to AWQ, each output word
gathers its 8 source words (neighbours in one row, so the loads share cache lines).

AWQ -> GPTQ: GPTQ word (g, c) holds, in nibble i, row 8g + i of column c, which AWQ keeps in word
(8g + i, c // 8) at slot REVERSE_AWQ_PACK_ORDER[c % 8] = (t >> 1) | (t & 1) << 2.
GPTQ -> AWQ: AWQ word (r, j) holds, in nibble s, column 8j + AWQ_PACK_ORDER[s] = 8j + 2(s % 4) + s // 4
of row r, which GPTQ keeps in nibble r % 8 of word (r // 8, that column).
Zero-points keep their words; nibbles are reordered the same way, plus an offset modulo 16.

Dequantization (AWQ, and GPTQ at 2, 3, 4 and 8 bits, with or without g_idx, any leading dimensions):
one pass, each program writing a tile of BK rows x BN columns of float output. At 2, 4 and 8 bits a
program loads its packed words once and spreads their fields over the tile in registers (rows for
GPTQ, columns in AWQ's slot order for AWQ); at 3 bits each value is read from the column's bit
stream, the word (or the two words it straddles) reloaded from the cache. Where the tile lies in one
quantization group (no g_idx, BK dividing the group size) the group's zero-points and scales are one
row broadcast over the tile; otherwise every row gathers its own (act-order: its g_idx entry clamped to
the groups that exist, so that the public call may check the range after the launch: the kernel's
program (0, 0) writes g_idx's range into pinned host memory, see :func:`dequantize_gptq_checked`). The value is
(q - z) * s computed in float32 and rounded once to the scales' dtype: (q - z) is an integer of at
most 9 bits, so the float32 product of it and a float16 or bfloat16 scale is exact and its one
rounding gives the bits of the core's product in the scales' dtype; float32 scales are multiplied in
float32, as the core does.
Checked bit for bit against the array-API core on a GPU (scripts/gpu_torch_check.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from packq.formats import awq, gptq

# Tiles chosen on an H200 (benchmarks/triton_tiles.py, benchmarks/results/h200/triton_tiles.txt): on
# 8192 x 28672, back-to-back calls run at the device copy's speed to GPTQ (0.061 against 0.058 ms) and
# 1.6x it to AWQ. A tile that reorders nibbles in registers was the faster to GPTQ, a gather of the
# 8 words of each output word the faster to AWQ.
#: to GPTQ: GPTQ word rows x AWQ words per program; zero-point words per program
ROWS, WORDS, ZWORDS = 2, 128, 1024


@triton.jit
def _zeros(zsrc, zdst, block, zwords, offset, ZW: tl.constexpr, TO_GPTQ: tl.constexpr):
    """Zero-point words keep their place; nibble u takes nibble REVERSE_AWQ_PACK_ORDER[u] (to GPTQ) or
    AWQ_PACK_ORDER[u] (to AWQ) of the same word, plus ``offset`` modulo 16."""
    idx = block.to(tl.int64) * ZW + tl.arange(0, ZW)
    mask = idx < zwords
    word = tl.load(zsrc + idx, mask=mask, other=0)
    acc = tl.zeros((ZW,), dtype=tl.int32)
    for u in tl.static_range(8):
        if TO_GPTQ:
            acc |= (((word >> (((u >> 1) | ((u & 1) << 2)) * 4)) + offset) & 15) << (4 * u)
        else:
            acc |= (((word >> (((u % 4) * 2 + u // 4) * 4)) + offset) & 15) << (4 * u)
    tl.store(zdst + idx, acc, mask=mask)


@triton.jit
def _awq_to_gptq(src, dst, zsrc, zdst, groups, c, zwords, w_programs, offset,
                 ROWS: tl.constexpr, CW: tl.constexpr, ZW: tl.constexpr):
    """Weights: tile (ROWS groups of 8 AWQ rows) x CW words -> ROWS GPTQ rows x 8 CW columns, in registers."""
    pid = tl.program_id(0)
    if pid < w_programs:
        col_blocks = tl.cdiv(c, CW)
        g = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)
        j = (pid % col_blocks) * CW + tl.arange(0, CW)
        i = tl.arange(0, 8)
        g3, i3, j3 = g[:, None, None], i[None, :, None], j[None, None, :]
        x = tl.load(src + (g3.to(tl.int64) * 8 + i3) * c + j3, mask=(g3 < groups) & (i3 < 8) & (j3 < c), other=0)
        t = tl.arange(0, 8)  # GPTQ column 8j + t sits in AWQ slot (t >> 1) | (t & 1) << 2
        slot = (((t >> 1) | ((t & 1) << 2)) * 4)[None, None, None, :]
        # nibble of row 8g + i, column 8j + t, moved to nibble i: disjoint bits, so the sum is their OR
        y = tl.sum(((x[:, :, :, None] >> slot) & 15) << (i * 4)[None, :, None, None], axis=1)  # (ROWS, CW, 8)
        y = tl.reshape(y, (ROWS, CW * 8))
        col = (pid % col_blocks) * CW * 8 + tl.arange(0, CW * 8)
        tl.store(dst + g[:, None].to(tl.int64) * (c * 8) + col[None, :], y,
                 mask=(g[:, None] < groups) & (col[None, :] < c * 8))
    else:
        _zeros(zsrc, zdst, pid - w_programs, zwords, offset, ZW, True)


@triton.jit
def _gptq_to_awq(src, dst, zsrc, zdst, groups, c, zwords, w_programs, offset,
                        ROWS: tl.constexpr, CW: tl.constexpr, ZW: tl.constexpr):
    """Weights: each output word (r, j) gathers nibble r % 8 of the 8 GPTQ words (r // 8, 8j + s)."""
    pid = tl.program_id(0)
    if pid < w_programs:
        col_blocks = tl.cdiv(c, CW)
        r = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)[:, None]  # AWQ rows
        j = (pid % col_blocks) * CW + tl.arange(0, CW)[None, :]
        mask = (r < groups * 8) & (j < c)
        shift = (r % 8) * 4
        base = (r // 8).to(tl.int64) * (c * 8) + j * 8
        acc = tl.zeros((ROWS, CW), dtype=tl.int32)
        for s in tl.static_range(8):  # slot s holds column 8j + AWQ_PACK_ORDER[s]
            w = tl.load(src + base + ((s % 4) * 2 + s // 4), mask=mask, other=0)
            acc |= ((w >> shift) & 15) << (4 * s)
        tl.store(dst + r.to(tl.int64) * c + j, acc, mask=mask)
    else:
        _zeros(zsrc, zdst, pid - w_programs, zwords, offset, ZW, False)


#: to AWQ: AWQ rows x words per program
AWQ_ROWS, AWQ_WORDS = 4, 512
NUM_WARPS = 4


def _launch(to_gptq: bool, qweight: Any | None, qzeros: Any | None, offset: int) -> tuple[Any | None, Any | None]:
    """Convert ``qweight`` and/or ``qzeros`` (int32 CUDA tensors, any leading dimensions) in one launch."""
    w_programs, w_out, z_out = 0, None, None
    src = dst = zsrc = zdst = None
    groups = c = 0  # GPTQ word rows (K/8 over every leading dimension); AWQ words per row (N/8)
    if qweight is not None:
        src = qweight.contiguous()
        *lead, k, cols = src.shape
        if to_gptq:  # (..., K, N/8) -> (..., K/8, N)
            c = cols
            w_out = torch.empty((*lead, k // 8, cols * 8), dtype=torch.int32, device=src.device)
        else:  # (..., K/8, N) -> (..., K, N/8)
            c = cols // 8
            w_out = torch.empty((*lead, k * 8, c), dtype=torch.int32, device=src.device)
        groups = w_out.numel() // (8 * c) if c else 0
        dst = w_out
        if to_gptq:
            w_programs = _cdiv(groups, ROWS) * _cdiv(c, WORDS)
        else:
            w_programs = _cdiv(groups * 8, AWQ_ROWS) * _cdiv(c, AWQ_WORDS)
    zwords = 0
    if qzeros is not None:
        zsrc = qzeros.contiguous()
        z_out = torch.empty_like(zsrc)
        zdst, zwords = z_out, zsrc.numel()
    if w_programs + zwords == 0:  # empty inputs: the empty results
        return w_out, z_out
    src = src if src is not None else zsrc  # unused pointers still need a tensor
    dst = dst if dst is not None else zdst
    zsrc = zsrc if zsrc is not None else src
    zdst = zdst if zdst is not None else dst
    assert src is not None
    grid = (w_programs + _cdiv(zwords, ZWORDS),)
    # launch on the tensors' device; CPU tensors reach here only in Triton's interpreter (the tests, no GPU)
    on_current = src.device.type != "cuda" or src.device.index == torch.cuda.current_device()
    kernel, tiles = (_awq_to_gptq, (ROWS, WORDS, ZWORDS)) if to_gptq else (_gptq_to_awq, (AWQ_ROWS, AWQ_WORDS, ZWORDS))
    with contextlib.nullcontext() if on_current else torch.cuda.device(src.device):
        _run(kernel, grid, (src, dst, zsrc, zdst), (groups, c, zwords, w_programs, offset), tiles)
    return w_out, z_out


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` in plain integers: Triton's is a constexpr function, whose call costs microseconds of the
    host's time, twice or three times a launch (benchmarks/results/h200/host_act_order.txt)."""
    return -(-a // b)


#: compiled kernels by everything Triton specializes a launch on: (kernel, device, tiles, warps, each
#: pointer's 16-byte alignment, each integer's width and its divisibility by 16 and equality to 1)
_compiled: dict[tuple[Any, ...], Any] = {}


def _run(kernel: Any, grid: tuple[int], pointers: tuple[Any, ...], ints: tuple[int, ...], tiles: tuple[int, ...]) -> None:
    rows, words, zw = tiles
    _fast(kernel, grid, pointers, ints, {"ROWS": rows, "CW": words, "ZW": zw}, NUM_WARPS)


def _fast(kernel: Any, grid: tuple[int, ...], pointers: tuple[Any, ...], ints: tuple[int, ...], constexprs: dict[str, Any],
          warps: int) -> None:
    """Launch ``kernel``: the first time through Triton's ``kernel[grid](...)``, which binds and specializes
    the arguments in Python (about 30 us a call on the H200's host), then straight through the compiled
    kernel it returned, for every launch that Triton would specialize alike (``constexprs`` in the kernel's
    order, after its other arguments)."""
    key = (kernel, pointers[0].device.index, tuple(constexprs.items()), warps,
           tuple((p.dtype, p.data_ptr() % 16 == 0) for p in pointers),
           tuple((-(2**31) <= i < 2**31, i % 16 == 0, i == 1) for i in ints))
    compiled = _compiled.get(key)
    args = (*pointers, *ints)
    if compiled is not None:
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexprs.values())  # (the compiled kernel takes a 3-D grid)
        return
    compiled = kernel[grid](*args, **constexprs, num_warps=warps)
    if FAST_LAUNCH and hasattr(compiled, "function"):  # a compiled GPU kernel (the interpreter returns none)
        _compiled[key] = compiled


#: launch through the cached compiled kernels (set False to go through Triton's own launch every time)
FAST_LAUNCH = True


# ------------------------------------------------------------------ dequantization


@triton.jit
def _field(start, idx, stride, mask, BITS: tl.constexpr):
    """Field ``idx`` of a packed bit stream whose words lie ``stride`` apart from ``start`` (one pointer per
    element), as int32 in [0, 2**BITS): a little-endian stream of words, 3-bit fields straddling two."""
    pos = idx * BITS
    word = (pos >> 5).to(tl.int64) * stride
    shift = pos & 31
    lo = tl.load(start + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if BITS == 3:  # fields 10 and 21 of each 32 take their high bits from the next word
        straddle = shift > 29
        hi = tl.load(start + word + stride, mask=mask & straddle, other=0).to(tl.uint32, bitcast=True)
        lo = lo | tl.where(straddle, hi << (32 - shift).to(tl.uint32), 0)
    return (lo & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)


@triton.jit
def _scaled(q, z, s, out_ptr, offs, mask):
    """(q - z) * s in float32 (exact for 16-bit scales), rounded once to the output's dtype, stored."""
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: the same bits on the GPU (cvt.rn) and in Triton's interpreter,
        # whose own float32 -> bfloat16 cast truncates; the products are finite, so no NaN to keep
        b = w.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, b.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_awq(qw, qz, sc, out, k, c, groups, gsize,
                 BK: tl.constexpr, BJ: tl.constexpr, ONE_GROUP: tl.constexpr):
    """AWQ (K, C = N/8 words) -> (K, N): a tile of BK rows x BJ words, 8 BJ output columns; batch on axis 1."""
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    col_blocks = tl.cdiv(c, BJ)
    rows = (pid // col_blocks) * BK + tl.arange(0, BK)
    j = (pid % col_blocks) * BJ + tl.arange(0, BJ)
    n = c * 8
    qw += b * k * c
    qz += b * groups * c
    sc += b * groups * n
    out += b * k * n
    # column 8j + t sits in AWQ slot (t >> 1) | (t & 1) << 2
    t = tl.arange(0, 8)
    shift = (((t >> 1) | ((t & 1) << 2)) * 4)[None, None, :]
    x = tl.load(qw + rows[:, None].to(tl.int64) * c + j[None, :], mask=(rows[:, None] < k) & (j[None, :] < c), other=0)
    q = tl.reshape((x[:, :, None] >> shift) & 15, (BK, BJ * 8))
    cols = (pid % col_blocks) * BJ * 8 + tl.arange(0, BJ * 8)
    if ONE_GROUP:  # the tile's rows share one group: one row of zeros and scales, broadcast
        g = ((pid // col_blocks) * BK) // gsize
        zw = tl.load(qz + g * c + j, mask=j < c, other=0)
        z = tl.reshape((zw[None, :, None] >> shift) & 15, (1, BJ * 8))
        s = tl.load(sc + g * n + cols, mask=cols < n, other=0)[None, :]
    else:
        g = (rows // gsize)[:, None].to(tl.int64)
        zw = tl.load(qz + g * c + j[None, :], mask=(rows[:, None] < k) & (j[None, :] < c), other=0)
        z = tl.reshape((zw[:, :, None] >> shift) & 15, (BK, BJ * 8))
        s = tl.load(sc + g * n + cols[None, :], mask=(rows[:, None] < k) & (cols[None, :] < n), other=0)
    mask = (rows[:, None] < k) & (cols[None, :] < n)
    _scaled(q, z, s, out, rows[:, None].to(tl.int64) * n + cols[None, :], mask)


@triton.jit
def _range_to_host(gi, k, chk, CHUNK: tl.constexpr):
    """The minimum and maximum of ``gi[:k]`` (k > 0) into ``chk[0]``, ``chk[1]`` (int64), then 1 into ``chk[2]``,
    released at system scope: ``chk`` is pinned host memory, which the host reads without waiting for the kernel."""
    first = tl.load(gi).to(tl.int64)
    lo = tl.full((CHUNK,), 0, tl.int64) + first
    hi = lo
    for start in range(0, k, CHUNK):
        idx = start + tl.arange(0, CHUNK)
        m = idx < k
        g = tl.where(m, tl.load(gi + idx, mask=m, other=0).to(tl.int64), first)
        lo = tl.minimum(lo, g)
        hi = tl.maximum(hi, g)
    tl.store(chk, tl.min(lo, axis=0))
    tl.store(chk + 1, tl.max(hi, axis=0))
    tl.atomic_xchg(chk + 2, 1, sem="release", scope="sys")


@triton.jit
def _dequant_gptq(qw, qz, sc, gi, out, chk, k, n, groups, gsize, zadd,
                  BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, ONE_GROUP: tl.constexpr,
                  HAS_GIDX: tl.constexpr, UNPACKED_Z: tl.constexpr, CHECK: tl.constexpr):
    """GPTQ qweight (K*BITS/32, N) -> (K, N): a tile of BK rows x BN columns; batch on axis 1.
    ``zadd`` is 1 for v1 zeros (stored z - 1, read modulo 2**BITS), 0 for v2. ``UNPACKED_Z``: ``qz`` is the
    zero-points' fields, one int8 each (G, N) (3-bit act-order, see :func:`dequantize_gptq`). ``CHECK``: program
    (0, 0) reduces g_idx's range into ``chk`` (:func:`_range_to_host`), the tiles are programs 1.. of axis 0."""
    pid = tl.program_id(0)
    if CHECK:
        if pid == 0:
            if tl.program_id(1) == 0:
                _range_to_host(gi, k, chk, 1024)
        else:
            _gptq_tile(qw, qz, sc, gi, out, pid - 1, k, n, groups, gsize, zadd, BITS, BK, BN, ONE_GROUP, HAS_GIDX,
                       UNPACKED_Z)
    else:
        _gptq_tile(qw, qz, sc, gi, out, pid, k, n, groups, gsize, zadd, BITS, BK, BN, ONE_GROUP, HAS_GIDX, UNPACKED_Z)


@triton.jit
def _gptq_tile(qw, qz, sc, gi, out, pid, k, n, groups, gsize, zadd,
               BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, ONE_GROUP: tl.constexpr,
               HAS_GIDX: tl.constexpr, UNPACKED_Z: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    col_blocks = tl.cdiv(n, BN)
    r0 = (pid // col_blocks) * BK
    cols = (pid % col_blocks) * BN + tl.arange(0, BN)
    rows = r0 + tl.arange(0, BK)
    kw = k * BITS // 32  # word rows
    nz = n * BITS // 32  # zero-point words per group
    qw += b * kw * n
    qz += b * groups * (n if UNPACKED_Z else nz)
    sc += b * groups * n
    out += b * k * n
    cmask = cols < n
    if BITS == 3:  # each value from the column's bit stream: 32 rows in 3 words, two values straddle
        q = _field(qw + cols[None, :], rows[:, None], n, (rows[:, None] < k) & cmask[None, :], 3)
        q = q.to(tl.int32)
    else:  # the tile's words loaded once, their PER fields spread over PER rows each
        PER: tl.constexpr = 32 // BITS
        wr = r0 // PER + tl.arange(0, BK // PER)
        x = tl.load(qw + wr[:, None].to(tl.int64) * n + cols[None, :], mask=(wr[:, None] < kw) & cmask[None, :], other=0)
        fshift = (tl.arange(0, PER) * BITS)[None, :, None]
        q = tl.reshape((x[:, None, :] >> fshift) & ((1 << BITS) - 1), (BK, BN))
    if ONE_GROUP:
        g = r0 // gsize
        z = (_field(qz + g * nz + tl.zeros_like(cols), cols, 1, cmask, BITS) + zadd) & ((1 << BITS) - 1)
        s = tl.load(sc + g * n + cols, mask=cmask, other=0)
        z, s = z[None, :], s[None, :]
    else:
        if HAS_GIDX:  # clamped: an out-of-range g_idx never reads outside the arrays (the caller raises)
            g = tl.load(gi + rows, mask=rows < k, other=0).to(tl.int64)
            g = tl.minimum(tl.maximum(g, 0), groups - 1)[:, None]
        else:
            g = (rows // gsize).to(tl.int64)[:, None]
        m2 = (rows[:, None] < k) & cmask[None, :]
        if UNPACKED_Z:
            z = tl.load(qz + g * n + cols[None, :], mask=m2, other=0).to(tl.int32)
        elif BITS == 3:
            z = _field(qz + g * nz + tl.zeros_like(cols)[None, :], cols[None, :], 1, m2, BITS)
        else:  # each row's zero-point words loaded once, their fields spread over the columns
            ZPER: tl.constexpr = 32 // BITS
            zc = (pid % col_blocks) * (BN // ZPER) + tl.arange(0, BN // ZPER)
            zw = tl.load(qz + g * nz + zc[None, :], mask=(rows[:, None] < k) & (zc[None, :] < nz), other=0)
            zshift = (tl.arange(0, ZPER) * BITS)[None, None, :]
            z = tl.reshape((zw[:, :, None] >> zshift) & ((1 << BITS) - 1), (BK, BN))
        z = (z + zadd) & ((1 << BITS) - 1)
        s = tl.load(sc + g * n + cols[None, :], mask=m2, other=0)
    mask = (rows[:, None] < k) & cmask[None, :]
    _scaled(q, z, s, out, rows[:, None].to(tl.int64) * n + cols[None, :], mask)


@triton.jit
def _unpack_zeros3(qz, zu, total, n, BLOCK: tl.constexpr):
    """3-bit zero-points (rows of N*3/32 words) -> their fields, one int8 each (rows, N)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    row, col = idx // n, idx % n
    tl.store(zu + idx, _field(qz + row * (n * 3 // 32), col, 1, mask, 3).to(tl.int8), mask=mask)


#: dequantization tiles: rows x AWQ words, and rows x columns for GPTQ (rows a multiple of 32: whole words at
#: every width); warps per program
DQ_ROWS, DQ_WORDS, DQ_COLS, DQ_WARPS = 32, 32, 256, 4
#: zero-point fields per program where 3-bit act-order unpacks them first
ZU_BLOCK = 1024
#: scales' dtypes the kernels compute with (float64 and others take the core)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def takes(arrays: Sequence[Any]) -> bool:
    """Whether the kernels take these inputs: int32 words, 16/32-bit float scales, one CUDA device (or the CPU,
    in Triton's interpreter)."""
    qweight, qzeros, scales = arrays[:3]
    present = [a for a in arrays if a is not None]
    return (qweight.dtype == torch.int32 and qzeros.dtype == torch.int32 and scales.dtype in _FLOATS
            and len({a.device for a in present}) == 1)


def _batch(x: Any) -> Any:
    """``x`` contiguous, its leading dimensions folded into one."""
    return x.contiguous().reshape(-1, *x.shape[-2:])


def dequantize_awq(qweight: Any, qzeros: Any, scales: Any) -> Any | None:
    """The core's ``dequantize_awq`` in one launch, or None for inputs the kernel does not take."""
    if not takes((qweight, qzeros, scales)):
        return None
    *lead, k, c = qweight.shape
    groups = qzeros.shape[-2]
    out = torch.empty((*lead, k, c * 8), dtype=scales.dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    w, z, s = _batch(qweight), _batch(qzeros), _batch(scales)
    gsize = k // groups
    one = gsize % DQ_ROWS == 0
    grid = (_cdiv(k, DQ_ROWS) * _cdiv(c, DQ_WORDS), w.shape[0])
    with _on(qweight):
        _fast(_dequant_awq, grid, (w, z, s, out), (k, c, groups, gsize),
              {"BK": DQ_ROWS, "BJ": DQ_WORDS, "ONE_GROUP": one}, DQ_WARPS)
    return out


def dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, g_idx: Any | None, bits: int, zeros: str) -> Any | None:
    """The core's ``dequantize_gptq`` in one launch, or None for inputs the kernel does not take."""
    return _dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zeros, None)


def dequantize_gptq_checked(qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bits: int,
                            zeros: str) -> tuple[Any, Callable[[], tuple[int, int]]] | None:
    """:func:`dequantize_gptq` with a non-empty act-order ``g_idx``, and the function that returns g_idx's minimum
    and maximum, or None for inputs the kernel does not take.

    The kernel's program (0, 0) reduces g_idx (the values the other programs read, clamped) and writes the range,
    then a flag, into pinned host memory; the function returned spins on that flag, which is set as soon as the
    kernel starts, not when it ends, and reads the range. So the range check costs no launch, reduction or copy of
    its own (those were 5-10 us of device time a call on an H200, beside a 17-44 us kernel on the 4096-wide
    layers: benchmarks/results/h200, 2026-12-02), and the host's wait is for the work queued before the kernel,
    as the copy of a separate reduction's result was."""
    if not takes((qweight, qzeros, scales, g_idx)) or 0 in qweight.shape or g_idx.numel() == 0:
        return None
    slot = _take_slot(g_idx)
    out = _dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zeros, slot.memory, taken=True)
    view = slot.view
    if g_idx.device.type != "cuda":  # Triton's interpreter (the tests): the kernel has run
        _slots.free[slot.device].append(slot)
        return out, lambda: (int(view[0]), int(view[1]))
    done = slot.done
    assert done is not None  # (a CUDA slot's)
    with _on(g_idx):
        done.record()
    _slots.busy.append(slot)

    def wait() -> tuple[int, int]:
        if view[2] != 1:
            deadline = time.perf_counter() + SPIN_S
            while view[2] != 1 and not done.query():  # (a kernel that ended has set the flag: read it once more)
                if time.perf_counter() > deadline:  # a long queue before the kernel: wait without spinning
                    done.synchronize()
                    break
            if view[2] != 1:  # never seen in a run; the range read the plain way rather than a wrong one
                return minmax_later(g_idx)()
        lo, hi = int(view[0]), int(view[1])
        _slots.busy.remove(slot)  # its kernel writes nothing more into it
        _slots.free[slot.device].append(slot)
        return lo, hi

    return out, wait


#: how long a range check spins on its flag before it blocks on the kernel's end (the flag comes when the kernel
#: starts: after the work queued before it)
SPIN_S = 2e-3


class _Slot:
    """Pinned int64[3] that one kernel writes a g_idx's minimum, maximum and a flag into, its NumPy view, and the
    event recorded after that kernel."""

    def __init__(self, x: Any) -> None:
        self.device = (x.device.type, x.device.index)
        with _on(x):
            self.memory = torch.zeros(3, dtype=torch.int64, pin_memory=x.device.type == "cuda")
            self.done = torch.cuda.Event() if x.device.type == "cuda" else None
        self.view = self.memory.numpy()


class _Slots(threading.local):
    """A thread's slots: free ones by device, and busy ones (a kernel launched, its flag not yet read). A slot
    is free again once its wait has read the flag (its kernel writes nothing after it) or its kernel has ended, so
    no two kernels that may still write share a slot: a call whose wait never ran (an interrupt) costs a slot,
    never a wrong range."""

    def __init__(self) -> None:
        self.free: dict[tuple[str, int | None], list[_Slot]] = {}
        self.busy: list[_Slot] = []


_slots = _Slots()


def _take_slot(x: Any) -> _Slot:
    free = _slots.free.setdefault((x.device.type, x.device.index), [])
    if not free and _slots.busy:  # slots left busy by waits that never ran: free those whose kernel has ended
        for slot in [b for b in _slots.busy if b.done is not None and b.done.query()]:
            _slots.busy.remove(slot)
            _slots.free[slot.device].append(slot)
    slot = free.pop() if free else _Slot(x)
    slot.view[2] = 0  # no kernel that may still write it has this slot
    return slot


def _dequantize_gptq(qweight: Any, qzeros: Any, scales: Any, g_idx: Any | None, bits: int, zeros: str,
                     slot: Any | None, taken: bool = False) -> Any | None:
    """:func:`dequantize_gptq`, its kernel's program (0, 0) writing g_idx's range into ``slot`` unless None;
    ``taken``: :func:`takes` is known to hold."""
    if not (taken or takes((qweight, qzeros, scales, g_idx))):
        return None
    *lead, kw, n = qweight.shape
    k = kw * 32 // bits
    groups = qzeros.shape[-2]
    out = torch.empty((*lead, k, n), dtype=scales.dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    w, z, s = _batch(qweight), _batch(qzeros), _batch(scales)
    gsize = k // groups
    # an unused pointer still needs a tensor; int32 and int64 indices are read as they are (no cast's launch)
    gi = w if g_idx is None else (g_idx if g_idx.dtype in (torch.int32, torch.int64) else g_idx.to(torch.int64)).contiguous()
    one = g_idx is None and gsize % DQ_ROWS == 0
    check = slot is not None
    grid = (_cdiv(k, DQ_ROWS) * _cdiv(n, DQ_COLS) + check, w.shape[0])
    # 3-bit act-order: each row would read its group's zero field from the bit stream (two gathered words per
    # value, 5.4x a copy of the output on an H200, 8192 x 28672); the fields unpacked once, one byte each, are a
    # gather like the scales' (groups x N bytes, under 1% of the output)
    unpacked = g_idx is not None and bits == 3
    with _on(qweight):
        if unpacked:
            zu = torch.empty((z.shape[0] * groups, n), dtype=torch.int8, device=z.device)
            _fast(_unpack_zeros3, (_cdiv(zu.numel(), ZU_BLOCK),), (z, zu), (zu.numel(), n), {"BLOCK": ZU_BLOCK}, 4)
            z = zu
        _fast(_dequant_gptq, grid, (w, z, s, gi, out, slot if check else w), (k, n, groups, gsize, 1 if zeros == "v1" else 0),
              {"BITS": bits, "BK": DQ_ROWS, "BN": DQ_COLS, "ONE_GROUP": one, "HAS_GIDX": g_idx is not None,
               "UNPACKED_Z": unpacked, "CHECK": check}, DQ_WARPS)
    return out


def minmax_later(x: Any) -> Callable[[], tuple[int, int]]:
    """The minimum and maximum of the integer tensor ``x``: reduced on its device now, copied to pinned host memory
    without a wait, and returned by the function this returns, which waits for that copy's event alone (not for
    work launched after it, such as the kernel that reads ``x`` clamped). A range check that reads the values
    before the launch makes the GPU idle for the host's round trip and the launch: 0.15 ms of a 0.37 ms act-order
    call on an H200 (benchmarks/results/h200, 2026-12-01). On the CPU (Triton's interpreter) the values at once."""
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no min/max kernels for these
        x = x.to(torch.int64)
    with _on(x):
        both = torch.empty(2, dtype=x.dtype, device=x.device)
        torch.aminmax(x.reshape(-1), out=(both[0], both[1]))  # one reduction into one buffer: one copy back
        if x.device.type != "cuda":
            values = tuple(int(v) for v in both.tolist())
            return lambda: values  # type: ignore[return-value]
        host = torch.empty(2, dtype=x.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

    def wait() -> tuple[int, int]:
        done.synchronize()
        return int(host[0]), int(host[1])

    return wait


def _on(x: Any) -> Any:
    """Launch on ``x``'s device (CPU tensors reach here only in Triton's interpreter)."""
    on_current = x.device.type != "cuda" or x.device.index == torch.cuda.current_device()
    return contextlib.nullcontext() if on_current else torch.cuda.device(x.device)


#: core functions whose kernels read their index arrays clamped into range, so that a range check may wait
#: until after the launch (Backend.run_range_later)
CLAMPED = {gptq.dequantize_gptq}

#: core dequantization -> kernel taking the same arrays (None for absent ones) and static arguments, or
#: returning None where the core must run
DEQUANT: dict[Callable[..., Any], Callable[..., Any]] = {gptq.dequantize_awq: dequantize_awq,
                                                         gptq.dequantize_gptq: dequantize_gptq}


KERNELS: dict[Callable[..., Any], Callable[..., Any]] = {
    awq.weight_to_gptq: lambda q: _launch(True, q, None, 0)[0],
    awq.weight_to_awq: lambda q: _launch(False, q, None, 0)[0],
    awq.zeros_to_gptq: lambda z, offset=-1: _launch(True, None, z, offset)[1],
    awq.zeros_to_awq: lambda z, offset=1: _launch(False, None, z, offset)[1],
}

_PAIRS = {(awq.weight_to_gptq, awq.zeros_to_gptq): True, (awq.weight_to_awq, awq.zeros_to_awq): False}


def fused(calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> tuple[Any, ...] | None:
    """A public call's weight and zero conversions in one launch, where ``calls`` is such a pair."""
    if len(calls) != 2 or tuple(fn for fn, _, _ in calls) not in _PAIRS:
        return None
    (wfn, (qweight,), _), (zfn, (qzeros,), zstatic) = calls
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.device != qzeros.device:
        return None
    to_gptq = _PAIRS[(wfn, zfn)]
    return _launch(to_gptq, qweight, qzeros, zstatic.get("offset", -1 if to_gptq else 1))
