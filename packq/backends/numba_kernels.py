"""Compiled kernels for the NumPy backend's weight conversions (needs numba: ``pip install packq[fast]``).

One pass over the words: every 8 rows x 1 word block is loaded into
registers, its 8x8 matrix of nibbles transposed by three rounds of delta swaps
(t = ((a >> k) ^ b) & m; a ^= t << k; b ^= t, for 16-, 8- then 4-bit blocks
between words 4, 2, then 1 apart), and stored. Two neighbouring words ride in
one 64-bit integer (the masks keep the halves apart), which halves the work.
The kernels release the GIL and take a range of 8-row groups, so the caller's
threads split a layer between the cores without numba's own threading layer.

4096 x 11008 on this project's 2-core machines: 3.2 ms against 1.4 ms
for a copy of the bytes and 7.4 ms for the ufunc path (benchmarks/results).
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit

_M16 = np.uint64(0x0000FFFF0000FFFF)
_M8 = np.uint64(0x00FF00FF00FF00FF)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW = np.uint64(0xFFFFFFFF)


def _kernel(fn):
    """A GIL-free compiled kernel, cached on disk where numba finds a writable place for its cache.

    Without one (a read-only install run by a user whose HOME is not writable),
    numba refuses cache=True at decoration; the kernel then compiles in memory
    on first use in each process, with one warning.
    """
    try:
        return njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        if not _NO_CACHE_WARNED:
            _NO_CACHE_WARNED.append(True)
            warnings.warn(
                f"packq: numba cannot cache its kernels here ({e}); they compile in memory in every process "
                "(set NUMBA_CACHE_DIR to a writable folder to cache them)",
                RuntimeWarning,
                stacklevel=2,
            )
        return njit(nogil=True, cache=False, boundscheck=False)(fn)


_NO_CACHE_WARNED: list[bool] = []


@njit(inline="always")
def _swap(a, b, k, m):
    t = ((a >> k) ^ b) & m
    return a ^ (t << k), b ^ t


@njit(inline="always")
def _transpose(a0, a1, a2, a3, a4, a5, a6, a7):
    """Nibble s of word i becomes nibble i of word s (in both 32-bit halves)."""
    a0, a4 = _swap(a0, a4, 16, _M16)
    a1, a5 = _swap(a1, a5, 16, _M16)
    a2, a6 = _swap(a2, a6, 16, _M16)
    a3, a7 = _swap(a3, a7, 16, _M16)
    a0, a2 = _swap(a0, a2, 8, _M8)
    a1, a3 = _swap(a1, a3, 8, _M8)
    a4, a6 = _swap(a4, a6, 8, _M8)
    a5, a7 = _swap(a5, a7, 8, _M8)
    a0, a1 = _swap(a0, a1, 4, _M4)
    a2, a3 = _swap(a2, a3, 4, _M4)
    a4, a5 = _swap(a4, a5, 4, _M4)
    a6, a7 = _swap(a6, a7, 4, _M4)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(inline="always")
def _pair(lo, hi, two):
    """Words lo and hi (hi only if ``two``) in one uint64."""
    a = np.uint64(lo)
    return a | (np.uint64(hi) << 32) if two else a


@_kernel
def awq_to_gptq(src, out, g0, g1):
    """AWQ words ``src`` (G, 8, C) to GPTQ words ``out`` (G, C, 8), uint32, for groups g0 <= g < g1.

    Transposed word s is GPTQ column AWQ_PACK_ORDER[s] = (0, 2, 4, 6, 1, 3, 5, 7)[s].
    """
    c = src.shape[2]
    for g in range(g0, g1):
        s = src[g]
        for j in range(0, c, 2):
            two = j + 1 < c
            k = j + 1 if two else j
            t = _transpose(_pair(s[0, j], s[0, k], two), _pair(s[1, j], s[1, k], two),
                           _pair(s[2, j], s[2, k], two), _pair(s[3, j], s[3, k], two),
                           _pair(s[4, j], s[4, k], two), _pair(s[5, j], s[5, k], two),
                           _pair(s[6, j], s[6, k], two), _pair(s[7, j], s[7, k], two))
            o = out[g, j]
            o[0], o[2], o[4], o[6] = t[0] & _LOW, t[1] & _LOW, t[2] & _LOW, t[3] & _LOW
            o[1], o[3], o[5], o[7] = t[4] & _LOW, t[5] & _LOW, t[6] & _LOW, t[7] & _LOW
            if two:
                o = out[g, k]
                o[0], o[2], o[4], o[6] = t[0] >> 32, t[1] >> 32, t[2] >> 32, t[3] >> 32
                o[1], o[3], o[5], o[7] = t[4] >> 32, t[5] >> 32, t[6] >> 32, t[7] >> 32


@_kernel
def gptq_to_awq(src, out, g0, g1):
    """GPTQ words ``src`` (G, C, 8) to AWQ words ``out`` (G, 8, C), uint32, for groups g0 <= g < g1.

    AWQ slot s holds GPTQ column AWQ_PACK_ORDER[s]: gather the columns in slot
    order, transpose, and word i is AWQ row 8g + i.
    """
    c = src.shape[1]
    for g in range(g0, g1):
        s = src[g]
        o = out[g]
        for j in range(0, c, 2):
            two = j + 1 < c
            k = j + 1 if two else j
            t = _transpose(_pair(s[j, 0], s[k, 0], two), _pair(s[j, 2], s[k, 2], two),
                           _pair(s[j, 4], s[k, 4], two), _pair(s[j, 6], s[k, 6], two),
                           _pair(s[j, 1], s[k, 1], two), _pair(s[j, 3], s[k, 3], two),
                           _pair(s[j, 5], s[k, 5], two), _pair(s[j, 7], s[k, 7], two))
            for i in range(8):
                o[i, j] = t[i] & _LOW
                if two:
                    o[i, k] = t[i] >> 32


# Dequantization straight into torch's (N, K) orientation. Every output element is a function of its
# stored value q and its (group, column), (q - z[g, n]) * s[g, n] rounded to the output type: the caller
# computes that function for every q once per (group, column) with NumPy's own arithmetic (a table of
# 2**bits entries each, 1/8 of the output at 4 bits, group 128), so these kernels only extract each field,
# look its bits up and store them transposed, and cannot round differently from the ufunc path.


#: word columns copied together into a local, transposed buffer: one 64-byte line of each stored row
_TILE = 16


@_kernel
def dequant_awq_t(qw, table, cols, out, j0, j1):
    """AWQ words ``qw`` (K, C) uint32 (a view of the stored tensor's columns: any strides) to ``out`` (8C, K)
    for words j0 <= j < j1.

    Nibble p of word (k, j) is column 8j + cols[p]; ``out[n, k] = table[g, n, q]`` for k in group g, the
    groups of equal size K / table.shape[0]. The words of a group's rows are first copied, 16 word columns
    at a time, into a small transposed buffer, so that the stored rows (kilobytes apart) are read once, a
    line each, and every output row is written sequentially.
    """
    groups = table.shape[0]
    group = qw.shape[0] // groups
    buf = np.empty((_TILE, group), np.uint32)
    for jt in range(j0, j1, _TILE):
        width = min(_TILE, j1 - jt)
        for g in range(groups):
            k0 = g * group
            for k in range(group):
                for jj in range(width):
                    buf[jj, k] = qw[k0 + k, jt + jj]
            for jj in range(width):
                words = buf[jj]
                for p in range(8):
                    n = 8 * (jt + jj) + cols[p]
                    o = out[n, k0:k0 + group]
                    t = table[g, n]
                    shift = np.uint32(4 * p)
                    for k in range(group):
                        o[k] = t[(words[k] >> shift) & np.uint32(15)]


@_kernel
def dequant_gptq_t(qw, table, gidx, bits, out, n0, n1):
    """GPTQ words ``qw`` (R, N) uint32 (a view: any strides), values packed down R at ``bits``, to ``out``
    (N, K) for columns n0 <= n < n1: ``out[n, k] = table[gidx[k], n, q]``; a 3-bit value may straddle two
    words. As above, 16 columns' words are copied into a transposed buffer first."""
    r_len, k_len = qw.shape[0], out.shape[1]
    mask = np.uint64((1 << bits) - 1)
    buf = np.empty((_TILE, r_len + 1), np.uint32)  # one word of slack: a straddling read past the last word
    buf[:, r_len] = 0
    for nt in range(n0, n1, _TILE):
        width = min(_TILE, n1 - nt)
        for r in range(r_len):
            for nn in range(width):
                buf[nn, r] = qw[r, nt + nn]
        for nn in range(width):
            n = nt + nn
            words = buf[nn]
            o = out[n]
            t = table[:, n]
            for k in range(k_len):
                pos = k * bits
                w = pos >> 5
                sh = pos & 31
                v = np.uint64(words[w]) >> np.uint64(sh)
                if sh + bits > 32:
                    v |= np.uint64(words[w + 1]) << np.uint64(32 - sh)
                o[k] = t[gidx[k], v & mask]


#: output rows (source columns) a GGUF block kernel reads at once: one 64-byte line of each uint8 row of q
_GGUF_TILE = 64


@njit(inline="always")
def _gguf_kind(kind):
    """(lowest and highest integer, offset to the stored code, bytes a block) of Q4_0 (0), Q5_0 (1), Q8_0 (2)."""
    if kind == 0:
        return -8, 7, 8, 18
    if kind == 1:
        return -16, 15, 16, 22
    return -128, 127, 0, 34


@njit(inline="always")
def _gguf_store_tile(out, d, buf, b, nbytes, kind, nt, width):
    """Block ``b`` of output rows nt <= n < nt + width, from the tile's stored codes ``buf[:, n - nt]``."""
    for nn in range(width):
        n = nt + nn
        _gguf_store(out[n], b * nbytes, buf, nn, d[n, b], kind)


@njit(inline="always")
def _gguf_store(row, o, buf, col, dd, kind):
    """One block at byte ``o`` of ``row``: the scale bits ``dd``, then the stored codes ``buf[:, col]`` as ggml lays
    them out (Q8_0: 32 bytes; Q5_0: qh, bit j = bit 4 of code j, then qs; Q4_0: qs, byte j = code j | code j+16 << 4)."""
    row[o] = np.uint8(dd & 0xFF)
    row[o + 1] = np.uint8(dd >> 8)
    if kind == 2:
        for j in range(32):
            row[o + 2 + j] = np.uint8(buf[j, col] & 0xFF)
        return
    s = o + 2
    if kind == 1:
        qh = np.uint32(0)
        for j in range(32):
            qh |= np.uint32((buf[j, col] >> 4) & 1) << np.uint32(j)
        for i in range(4):
            row[s + i] = np.uint8((qh >> np.uint32(8 * i)) & np.uint32(0xFF))
        s += 4
    for j in range(16):
        row[s + j] = np.uint8((buf[j, col] & 15) | ((buf[j + 16, col] & 15) << 4))


@_kernel
def gguf_blocks(q, z, gidx, d, kind, out, n0, n1):
    """GGUF Q4_0 (kind 0), Q5_0 (1) or Q8_0 (2) blocks of ``out`` (N, K/32 * block bytes) uint8 for output rows
    n0 <= n < n1, from the codes ``q`` (K, N) uint8 (any strides), zero-points ``z`` (G, N) int16, each input
    feature's group ``gidx`` (K,) and the blocks' fp16 scale bits ``d`` (N, K/32) uint16.

    As :func:`packq.formats.gguf.encode`: each weight's ``q - z[gidx[k]]`` clipped to the type's range plus its
    offset; Q4_0 ``d, qs[16]`` (weight j low nibble, j + 16 high), Q5_0 ``d, qh[4], qs[16]`` (bit j of the
    little-endian qh: weight j's fifth bit), Q8_0 ``d, qs[32]`` int8. A block's 32 rows are read 64 columns at
    a time (a line of each row, the differences computed along the row, where they vectorize) into a small
    buffer, from which each output row's block is packed."""
    k_len = q.shape[0]
    nb = k_len // 32
    lo, hi, off, nbytes = _gguf_kind(kind)
    buf = np.empty((32, _GGUF_TILE), np.int32)
    for nt in range(n0, n1, _GGUF_TILE):
        width = min(_GGUF_TILE, n1 - nt)
        for b in range(nb):
            k0 = 32 * b
            for j in range(32):
                qr = q[k0 + j, nt:nt + width]
                zr = z[gidx[k0 + j], nt:nt + width]
                br = buf[j]
                for nn in range(width):
                    br[nn] = min(max(np.int32(qr[nn]) - np.int32(zr[nn]), lo), hi) + off
            _gguf_store_tile(out, d, buf, b, nbytes, kind, nt, width)


@_kernel
def gguf_blocks_awq(qw, cols, slots, z, gidx, d, kind, out, n0, n1):
    """As :func:`gguf_blocks`, reading the codes from AWQ words ``qw`` (K, C) uint32 in place: output row n is
    source column ``cols[n]``, whose code in row k is nibble ``slots[c % 8]`` of word (k, c // 8); ``z`` (G, N)
    holds the source columns' zero-points, ``d`` (rows of out, K/32) the output rows' scale bits."""
    k_len = qw.shape[0]
    nb = k_len // 32
    lo, hi, off, nbytes = _gguf_kind(kind)
    buf = np.empty((32, _GGUF_TILE), np.int32)
    word = np.empty(_GGUF_TILE, np.int64)
    shift = np.empty(_GGUF_TILE, np.uint32)
    for nt in range(n0, n1, _GGUF_TILE):
        width = min(_GGUF_TILE, n1 - nt)
        for nn in range(width):
            c = cols[nt + nn]
            word[nn] = c >> 3
            shift[nn] = np.uint32(4 * slots[c & 7])
        for b in range(nb):
            k0 = 32 * b
            for j in range(32):
                k = k0 + j
                g = gidx[k]
                br = buf[j]
                for nn in range(width):
                    v = np.int32((qw[k, word[nn]] >> shift[nn]) & np.uint32(15)) - np.int32(z[g, cols[nt + nn]])
                    br[nn] = min(max(v, lo), hi) + off
            _gguf_store_tile(out, d, buf, b, nbytes, kind, nt, width)


@_kernel
def awq_histogram(qw, cols, hist):
    """``hist[g, n, v]`` += how many of column n's codes in group g are v, from AWQ words ``qw`` (K, C) uint32 (any
    strides); nibble p of word (k, j) is column 8j + cols[p], the groups of K / hist.shape[0] consecutive rows."""
    groups = hist.shape[0]
    group = qw.shape[0] // groups
    for g in range(groups):
        h = hist[g]
        for k in range(g * group, (g + 1) * group):
            for j in range(qw.shape[1]):
                w = qw[k, j]
                for p in range(8):
                    h[8 * j + cols[p], (w >> np.uint32(4 * p)) & np.uint32(15)] += 1


@_kernel
def gguf_blocks_awq_rows(qw, cols, rowof, z, d, kind, out, i0, i1):
    """As :func:`gguf_blocks_awq` for source columns ``c0 + i``, i0 <= i < i1 (i0 and i1 multiples of 8), of AWQ
    words ``qw`` (K, C) uint32 whose word 0 holds column c0: source column c0 + i becomes output row ``rowof[i]``
    (a permutation of whole rows within the range); ``z`` (G, columns) their zero-points, ``d`` (rows of out, K/32)
    the output rows' scale bits. Each word is read once and its 8 codes stored into a 64-column buffer."""
    k_len = qw.shape[0]
    nb = k_len // 32
    group = k_len // z.shape[0]
    lo, hi, off, nbytes = _gguf_kind(kind)
    buf = np.empty((32, _GGUF_TILE), np.int32)
    for it in range(i0, i1, _GGUF_TILE):
        width = min(_GGUF_TILE, i1 - it)
        for b in range(nb):
            k0 = 32 * b
            for j in range(32):
                k = k0 + j
                zr = z[k // group]
                br = buf[j]
                for jj in range(width // 8):
                    w = qw[k, it // 8 + jj]
                    for p in range(8):
                        c = 8 * jj + cols[p]
                        v = np.int32((w >> np.uint32(4 * p)) & np.uint32(15)) - np.int32(zr[it + c])
                        br[c] = min(max(v, lo), hi) + off
            o = b * nbytes
            for ii in range(width):
                n = rowof[it + ii]
                row = out[n]
                dd = d[n, b]
                _gguf_store(row, o, buf, ii, dd, kind)


@_kernel
def awq_code_bounds(qw, cols, qmin, qmax, j0, j1):
    """The smallest and largest code of every block of 32 rows of every column: ``qmin``, ``qmax`` (K/32, N) uint8,
    from AWQ words ``qw`` (K, C) uint32 (any strides) for word columns j0 <= j < j1; nibble p of word (k, j) is
    column 8j + cols[p]."""
    nb = qw.shape[0] // 32
    for b in range(nb):
        mn = qmin[b]
        mx = qmax[b]
        for j in range(j0, j1):
            for p in range(8):
                mn[8 * j + cols[p]] = 15
                mx[8 * j + cols[p]] = 0
        for k in range(32 * b, 32 * b + 32):
            for j in range(j0, j1):
                w = qw[k, j]
                for p in range(8):
                    v = np.uint8((w >> np.uint32(4 * p)) & np.uint32(15))
                    n = 8 * j + cols[p]
                    mn[n] = min(mn[n], v)  # branch-free: random codes defeat a branch predictor
                    mx[n] = max(mx[n], v)
