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
Checked bit for bit against the array-API core on a GPU (scripts/gpu_torch_check.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from packq.formats import awq

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
            w_programs = triton.cdiv(groups, ROWS) * triton.cdiv(c, WORDS)
        else:
            w_programs = triton.cdiv(groups * 8, AWQ_ROWS) * triton.cdiv(c, AWQ_WORDS)
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
    grid = (w_programs + triton.cdiv(zwords, ZWORDS),)
    # launch on the tensors' device; CPU tensors reach here only in Triton's interpreter (the tests, no GPU)
    on_current = src.device.type != "cuda" or src.device.index == torch.cuda.current_device()
    kernel, tiles = (_awq_to_gptq, (ROWS, WORDS, ZWORDS)) if to_gptq else (_gptq_to_awq, (AWQ_ROWS, AWQ_WORDS, ZWORDS))
    with contextlib.nullcontext() if on_current else torch.cuda.device(src.device):
        _run(kernel, grid, (src, dst, zsrc, zdst), (groups, c, zwords, w_programs, offset), tiles)
    return w_out, z_out


#: compiled kernels by everything Triton specializes a launch on: (kernel, device, tiles, warps, each
#: pointer's 16-byte alignment, each integer's width and its divisibility by 16 and equality to 1)
_compiled: dict[tuple[Any, ...], Any] = {}


def _run(kernel: Any, grid: tuple[int], pointers: tuple[Any, ...], ints: tuple[int, ...], tiles: tuple[int, ...]) -> None:
    """Launch ``kernel``: the first time through Triton's ``kernel[grid](...)``, which binds and specializes
    the arguments in Python (about 30 us a call on the H200's host), then straight through the compiled
    kernel it returned, for every launch that Triton would specialize alike."""
    key = (kernel, pointers[0].device.index, tiles, NUM_WARPS, tuple(p.data_ptr() % 16 == 0 for p in pointers),
           tuple((-(2**31) <= i < 2**31, i % 16 == 0, i == 1) for i in ints))
    compiled = _compiled.get(key)
    args = (*pointers, *ints)
    if compiled is not None:
        compiled[(grid[0], 1, 1)](*args, *tiles)  # (the compiled kernel takes a 3-D grid)
        return
    rows, words, zw = tiles
    compiled = kernel[grid](*args, ROWS=rows, CW=words, ZW=zw, num_warps=NUM_WARPS)
    if FAST_LAUNCH and hasattr(compiled, "function"):  # a compiled GPU kernel (the interpreter returns none)
        _compiled[key] = compiled


#: launch through the cached compiled kernels (set False to go through Triton's own launch every time)
FAST_LAUNCH = True


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
