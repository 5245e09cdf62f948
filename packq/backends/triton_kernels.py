"""Single-pass Triton kernels for torch CUDA tensors: AWQ <-> GPTQ weights and zero-points.

One kernel per direction does both tensors of a public call in one launch: its first programs
convert weight tiles, the rest zero-point words. Every output word is computed straight from the
input words (no unpacked values in memory), so each byte is read once and written once.

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

#: weight tile (output rows x output columns) and zero-point words per program; chosen on an H200
ROWS, COLS, ZWORDS = 8, 256, 1024


@triton.jit
def _awq_to_gptq(src, dst, zsrc, zdst, rows_out, n, c, zwords, w_programs, offset,
                 ROWS: tl.constexpr, COLS: tl.constexpr, ZW: tl.constexpr):
    pid = tl.program_id(0)
    if pid < w_programs:
        col_blocks = tl.cdiv(n, COLS)
        g = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)[:, None]
        col = (pid % col_blocks) * COLS + tl.arange(0, COLS)[None, :]
        mask = (g < rows_out) & (col < n)
        t = col % 8
        shift = ((t >> 1) | ((t & 1) << 2)) * 4
        row0 = g.to(tl.int64) * 8
        acc = tl.zeros((ROWS, COLS), dtype=tl.int32)
        for i in tl.static_range(8):
            w = tl.load(src + (row0 + i) * c + col // 8, mask=mask, other=0)
            acc |= ((w >> shift) & 15) << (4 * i)
        tl.store(dst + g.to(tl.int64) * n + col, acc, mask=mask)
    else:
        idx = (pid - w_programs).to(tl.int64) * ZW + tl.arange(0, ZW)
        m = idx < zwords
        w = tl.load(zsrc + idx, mask=m, other=0)
        acc = tl.zeros((ZW,), dtype=tl.int32)
        for t in tl.static_range(8):
            acc |= (((w >> (((t >> 1) | ((t & 1) << 2)) * 4)) + offset) & 15) << (4 * t)
        tl.store(zdst + idx, acc, mask=m)


@triton.jit
def _gptq_to_awq(src, dst, zsrc, zdst, rows_out, c, n, zwords, w_programs, offset,
                 ROWS: tl.constexpr, COLS: tl.constexpr, ZW: tl.constexpr):
    pid = tl.program_id(0)
    if pid < w_programs:
        col_blocks = tl.cdiv(c, COLS)
        r = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)[:, None]
        j = (pid % col_blocks) * COLS + tl.arange(0, COLS)[None, :]
        mask = (r < rows_out) & (j < c)
        shift = (r % 8) * 4
        base = (r // 8).to(tl.int64) * n + j * 8
        acc = tl.zeros((ROWS, COLS), dtype=tl.int32)
        for s in tl.static_range(8):
            w = tl.load(src + base + ((s % 4) * 2 + s // 4), mask=mask, other=0)
            acc |= ((w >> shift) & 15) << (4 * s)
        tl.store(dst + r.to(tl.int64) * c + j, acc, mask=mask)
    else:
        idx = (pid - w_programs).to(tl.int64) * ZW + tl.arange(0, ZW)
        m = idx < zwords
        w = tl.load(zsrc + idx, mask=m, other=0)
        acc = tl.zeros((ZW,), dtype=tl.int32)
        for s in tl.static_range(8):
            acc |= (((w >> (((s % 4) * 2 + s // 4) * 4)) + offset) & 15) << (4 * s)
        tl.store(zdst + idx, acc, mask=m)


def _launch(to_gptq: bool, qweight: Any | None, qzeros: Any | None, offset: int) -> tuple[Any | None, Any | None]:
    """Convert ``qweight`` and/or ``qzeros`` (int32 CUDA tensors, any leading dimensions) in one launch."""
    w_programs, w_out, z_out = 0, None, None
    src = dst = zsrc = zdst = None
    rows_out = c = n = 0  # output rows; AWQ words per row (N/8); GPTQ columns (N)
    if qweight is not None:
        src = qweight.contiguous()
        *lead, k, cols = src.shape
        if to_gptq:  # (..., K, N/8) -> (..., K/8, N): tiles over GPTQ columns
            c, n = cols, cols * 8
            rows_out = src.numel() // (8 * c)
            w_out = torch.empty((*lead, k // 8, n), dtype=torch.int32, device=src.device)
            w_programs = triton.cdiv(rows_out, ROWS) * triton.cdiv(n, COLS)
        else:  # (..., K/8, N) -> (..., K, N/8): tiles over AWQ words
            c, n = cols // 8, cols
            rows_out = src.numel() // n * 8
            w_out = torch.empty((*lead, k * 8, c), dtype=torch.int32, device=src.device)
            w_programs = triton.cdiv(rows_out, ROWS) * triton.cdiv(c, COLS)
        dst = w_out
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
    # (CPU tensors reach here only under TRITON_INTERPRET=1, which the tests use where no GPU is)
    with torch.cuda.device(src.device) if src.device.type == "cuda" else contextlib.nullcontext():
        if to_gptq:
            _awq_to_gptq[grid](src, dst, zsrc, zdst, rows_out, n, c, zwords, w_programs, offset,
                               ROWS=ROWS, COLS=COLS, ZW=ZWORDS)
        else:
            _gptq_to_awq[grid](src, dst, zsrc, zdst, rows_out, c, n, zwords, w_programs, offset,
                               ROWS=ROWS, COLS=COLS, ZW=ZWORDS)
    return w_out, z_out


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
