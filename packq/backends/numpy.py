"""NumPy backend: the array-API core through array-api-compat, plus fast paths.

The fast paths do the AWQ <-> GPTQ weight conversion as an 8x8 transpose of
nibbles per 8 rows x 1 word block (three rounds of delta swaps), on every core:

- with numba installed (``pip install packq[fast]``), compiled kernels
  (:mod:`packq.backends.numba_kernels`) do it in one pass, in registers;
- without it, NumPy ufuncs do it on cache-sized blocks of rows, in place on
  preallocated buffers; NumPy releases the GIL inside ufuncs, so threads over
  disjoint row blocks scale a little.

``PACKQ_NUMBA=0`` selects the ufuncs even where numba is installed, and
``PACKQ_NUM_THREADS`` caps the threads. The plain core materialises every
unpacked value (8x the words) and runs about 40x slower than the ufuncs on a
4096 x 11008 layer. Hypothesis properties check that all three agree bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from packq.backends import Backend
from packq.core import bits as B
from packq.formats import awq, gptq
from packq.formats import compressed_tensors as ct
from packq.formats import gguf as G


class _Namespace:
    """``array_api_compat.numpy``, imported on first use: importing it clones NumPy's namespace, which imports
    numpy.testing, f2py, random and ma (0.15-0.4 s of every ``packq`` start, measured on this project's
    2-core machines), while conversions between packed formats run only fast paths, which never touch it."""

    def __getattr__(self, name: str) -> Any:
        import array_api_compat.numpy as real

        self.__dict__.update(vars(real))  # from now on, plain attribute lookups
        return getattr(real, name)


xp: Any = _Namespace()
_U = np.uint32
#: bytes of a block's working set (8 word planes and a scratch half); measured best at about two L2s
BLOCK_BYTES = 2 * 1024 * 1024
_pool: ThreadPoolExecutor | None = None


@functools.cache
def threads() -> int:
    """Threads for the fast paths: ``PACKQ_NUM_THREADS``, read once, else up to 8 by the cores.

    A value that is not a positive integer is ignored with one warning, not an error on every call.
    """
    default = min(8, os.cpu_count() or 1)
    n = os.environ.get("PACKQ_NUM_THREADS", "").strip()
    if not n:
        return default
    if not n.isdigit() or int(n) < 1:
        warnings.warn(
            f"PACKQ_NUM_THREADS must be a positive integer, got {n!r}; using {default} threads", RuntimeWarning, stacklevel=2
        )
        return default
    return int(n)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="packq")
    return _pool


@functools.cache
def numba_kernels() -> ModuleType | None:
    """The compiled kernels, or None where numba is missing (or ``PACKQ_NUMBA=0``): then ufuncs run."""
    if os.environ.get("PACKQ_NUMBA", "1") == "0":
        return None
    try:
        from packq.backends import numba_kernels as kernels
    except ImportError:  # numba not installed, or too old for this NumPy
        return None
    return kernels


@functools.cache
def c_kernels() -> ModuleType | None:
    """packq's compiled C kernels (``packq/backends/_ckernels.c``: the AWQ word transposes and GGUF's blocks), or None
    where the optional extension was not built (no C compiler when packq was installed), on a big-endian host, or
    with ``PACKQ_CEXT=0``: then numba's kernels or the ufuncs run, which write the same bytes. Unlike numba they
    load in about a millisecond, so every conversion uses them, however small."""
    if os.environ.get("PACKQ_CEXT", "1") == "0" or sys.byteorder != "little":
        return None
    try:
        from packq.backends import _ckernels  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _ckernels


def _words(a: np.ndarray) -> np.ndarray:
    """``a``'s 32-bit words as a C-contiguous native uint32 array (itself where it already is one), for the C kernels."""
    if a.dtype.itemsize != 4 or a.dtype.kind not in "iu":
        raise TypeError(f"qweight: expected int32 or uint32 words, got {a.dtype}")
    return np.ascontiguousarray(_native(a)).view(_U)


_ready = threading.Event()  # the compiled kernels have run once in this process
_deferred = [0]  # inside deferred_kernels(): never wait for numba to load
_background: list[threading.Thread] = []


@contextlib.contextmanager
def deferred_kernels(load: bool, dequant: int = 0) -> Iterator[None]:
    """Within: weight conversions never wait for numba (about 0.5 s and 105 MB to load from its cache): they
    take the ufunc paths (same bits) until the kernels have run in this process; ``load`` starts loading
    them on a thread. ``packq convert`` loads them only for checkpoints large enough to repay it. With
    ``dequant`` (the output's bytes per element), the thread loads the float kernels for that output instead
    of the AWQ <-> GPTQ ones; with -1, GGUF's block kernel."""
    _deferred[0] += 1
    if load and not _background and not _ready.is_set():
        def run() -> None:
            kernels = numba_kernels()
            if kernels is None:
                return
            # loads the machine code from numba's cache now, not on a real call
            if dequant == -1:  # GGUF's block kernels
                # the layouts of the real calls: column slices of q and z, whole AWQ words
                kernels.gguf_blocks(np.zeros((32, 2), np.uint8)[:, :1], np.zeros((1, 2), np.int16)[:, :1],
                                    np.zeros(32, np.int64), np.zeros((1, 1), np.uint16), 0, np.zeros((1, 18), np.uint8), 0, 1)
                kernels.gguf_blocks_awq(np.zeros((32, 1), _U), np.arange(8), np.arange(8), np.zeros((1, 8), np.int16),
                                        np.zeros(32, np.int64), np.zeros((8, 1), np.uint16), 0, np.zeros((8, 18), np.uint8), 0, 8)
            elif dequant:
                bits = np.uint16 if dequant == 2 else np.uint32
                kernels.dequant_awq_t(np.zeros((8, 8), _U)[:, :1], np.zeros((1, 8, 16), bits), np.arange(8), np.zeros((8, 8), bits), 0, 1)
                kernels.dequant_gptq_t(np.zeros((1, 16), _U)[:, :8], np.zeros((1, 8, 16), bits), np.zeros(8, np.int64), 4,
                                       np.zeros((8, 8), bits), 0, 8)
            else:
                weight_to_gptq_numba(np.zeros((8, 8), np.int32), kernels)
                weight_to_awq_numba(np.zeros((1, 8), np.int32), kernels)
            _ready.set()

        _background.append(threading.Thread(target=run, name="packq-numba", daemon=True))
        _background[0].start()
    try:
        yield
    finally:
        _deferred[0] -= 1


def _kernels_now(wait: bool = False) -> ModuleType | None:
    """The compiled kernels, or None for the ufuncs (numba missing, or deferred and not yet loaded). With
    ``wait``, a load under way is waited for: the float kernels are 10x the ufuncs, which on 2 cores would
    only slow the load down."""
    if _deferred[0] and not _ready.is_set():
        if not (wait and _background):
            return None
        _background[0].join()
        if not _ready.is_set():
            return None
    kernels = numba_kernels()
    if kernels is not None:
        _ready.set()
    return kernels


def _swap(a: np.ndarray, b: np.ndarray, k: int, m: int, t: np.ndarray, out_a: np.ndarray, out_b: np.ndarray) -> None:
    """The delta swap t = ((a >> k) ^ b) & m; a ^= t << k; b ^= t, into out_a/out_b."""
    np.right_shift(a, _U(k), out=t)
    np.bitwise_xor(t, b, out=t)
    np.bitwise_and(t, _U(m), out=t)
    np.bitwise_xor(b, t, out=out_b)
    np.left_shift(t, _U(k), out=t)
    np.bitwise_xor(a, t, out=out_a)


def _transpose(lo: np.ndarray, hi: np.ndarray, buf: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
    """8x8 nibble transpose of word planes (lo = planes 0..3, hi = planes 4..7, each (b, 4, C)) into ``buf``.

    Each round of delta swaps handles all four of its word pairs in one call
    per operation, through views of ``buf`` whose innermost axis is the
    contiguous word axis: pairs (i, i+4), then (i, i+2), then (i, i+1).
    Returns the 8 transposed planes, each (b, C).
    """
    b, _, c = lo.shape
    _swap(lo, hi, 16, 0x0000FFFF, t, buf[:, 0:4], buf[:, 4:8])
    w = buf.reshape(b, 2, 2, 2, c)  # word i = 4x + 2y + z
    t2 = t.reshape(b, 2, 2, c)
    _swap(w[:, :, 0], w[:, :, 1], 8, 0x00FF00FF, t2, w[:, :, 0], w[:, :, 1])
    _swap(w[:, :, :, 0], w[:, :, :, 1], 4, 0x0F0F0F0F, t2, w[:, :, :, 0], w[:, :, :, 1])
    return [buf[:, i] for i in range(8)]


def _shares(groups: int, n: int, work: Callable[[int, int], None]) -> None:
    """work(g0, g1) on one contiguous share of the groups per thread, n threads.

    One task per thread keeps the GIL hand-offs between many short calls from
    dominating (measured for the ufuncs: 4x slower with a task per block).
    """
    if n == 1:
        work(0, groups)
    else:
        list(_executor().map(lambda i: work(groups * i // n, groups * (i + 1) // n), range(n)))


def _blocked(groups: int, group_bytes: int, work: Callable[[int, int], None]) -> None:
    """Run work(g0, g1) over cache-sized blocks of 8-row groups, each thread walking its share."""
    block = max(1, BLOCK_BYTES * 2 // (3 * group_bytes))

    def share(lo: int, hi: int) -> None:
        for g0 in range(lo, hi, block):
            work(g0, min(g0 + block, hi))

    _shares(groups, min(threads(), max(1, groups // block)), share)


def _split(groups: int, group_bytes: int, kernel: Callable[[int, int], None]) -> None:
    """Run a GIL-free kernel(g0, g1) over the groups, a thread per MiB up to ``threads()``."""
    _shares(groups, max(1, min(threads(), groups * group_bytes // (1 << 20))), kernel)


def _to_gptq(qweight: np.ndarray, fill: Callable[[np.ndarray, np.ndarray], None], over: bool = False) -> np.ndarray:
    """AWQ (..., K, N/8) -> GPTQ (..., K/8, N): fill(src, out) with src (group, row i, word), out (group, word, column);
    ``over``: out is qweight's own memory (group g's words sit at the same bytes in both layouts)."""
    *lead, k, c = qweight.shape
    src = np.ascontiguousarray(qweight).view(_U).reshape(-1, 8, c)
    out = src.reshape(src.shape[0], c, 8) if over else np.empty((src.shape[0], c, 8), _U)
    fill(src, out)
    return out.view(np.int32).reshape(*lead, k // 8, c * 8)


def _to_awq(qweight: np.ndarray, fill: Callable[[np.ndarray, np.ndarray], None], over: bool = False) -> np.ndarray:
    """GPTQ (..., K/8, N) -> AWQ (..., K, N/8): fill(src, out) with src (group, word, column), out (group, row i, word);
    ``over`` as for :func:`_to_gptq`."""
    *lead, kg, n = qweight.shape
    src = np.ascontiguousarray(qweight).view(_U).reshape(-1, n // 8, 8)
    out = src.reshape(src.shape[0], 8, n // 8) if over else np.empty((src.shape[0], 8, n // 8), _U)
    fill(src, out)
    return out.view(np.int32).reshape(*lead, kg * 8, n // 8)


def weight_to_gptq_ufuncs(qweight: np.ndarray, over: bool = False) -> np.ndarray:
    """AWQ -> GPTQ by ufuncs, blocked and threaded; ``over``: written over qweight's own memory, which each block
    may be, since it reads its groups' words whole (into its planes) before it stores any."""

    def fill(src: np.ndarray, out: np.ndarray) -> None:
        def work(g0: int, g1: int) -> None:
            buf, t = np.empty((g1 - g0, 8, src.shape[2]), _U), np.empty((g1 - g0, 4, src.shape[2]), _U)
            planes = _transpose(src[g0:g1, 0:4], src[g0:g1, 4:8], buf, t)
            # transposed word s is output column AWQ_PACK_ORDER[s]; one 2-D copy per
            # column keeps the word axis innermost (a 3-D strided copy would not)
            for s, j in enumerate(awq.AWQ_PACK_ORDER):
                np.copyto(out[g0:g1, :, j], planes[s])

        _blocked(src.shape[0], 32 * src.shape[2], work)

    return _to_gptq(qweight, fill, over)


def weight_to_awq_ufuncs(qweight: np.ndarray, over: bool = False) -> np.ndarray:
    """GPTQ -> AWQ by ufuncs, blocked and threaded; ``over`` as for :func:`weight_to_gptq_ufuncs`."""

    def fill(src: np.ndarray, out: np.ndarray) -> None:
        def work(g0: int, g1: int) -> None:
            planes, t = np.empty((g1 - g0, 8, src.shape[1]), _U), np.empty((g1 - g0, 4, src.shape[1]), _U)
            # AWQ slot s of a row is GPTQ column AWQ_PACK_ORDER[s]: gather the columns
            # as planes in slot order, one 2-D copy each, then transpose into out
            for s, j in enumerate(awq.AWQ_PACK_ORDER):
                np.copyto(planes[:, s], src[g0:g1, :, j])
            _transpose(planes[:, 0:4], planes[:, 4:8], out[g0:g1], t)

        _blocked(src.shape[0], 32 * src.shape[1], work)

    return _to_awq(qweight, fill, over)


def weight_to_gptq_numba(qweight: np.ndarray, kernels: ModuleType) -> np.ndarray:
    """AWQ -> GPTQ by the compiled kernel."""
    return _to_gptq(qweight, lambda src, out: _split(src.shape[0], 32 * src.shape[2],
                                                     lambda g0, g1: kernels.awq_to_gptq(src, out, g0, g1)))


def weight_to_awq_numba(qweight: np.ndarray, kernels: ModuleType) -> np.ndarray:
    """GPTQ -> AWQ by the compiled kernel."""
    return _to_awq(qweight, lambda src, out: _split(src.shape[0], 32 * src.shape[1],
                                                    lambda g0, g1: kernels.gptq_to_awq(src, out, g0, g1)))


def weight_to_gptq_c(qweight: np.ndarray, ck: ModuleType, over: bool = False) -> np.ndarray:
    """AWQ -> GPTQ by the C kernel, a thread per MiB up to ``threads()``; ``over``: written over qweight's own memory
    (the kernel copies each group's 8 rows aside before it stores the group's output row, the same words)."""
    *lead, k, c = qweight.shape
    src = _words(qweight).reshape(-1, c)  # stacked experts are more groups of 8 rows
    out = src if over else np.empty_like(src)
    _split(src.shape[0] // 8, 32 * c, lambda g0, g1: ck.awq_to_gptq(src, src.shape[0], c, out, g0, g1))
    return out.view(np.int32).reshape(*lead, k // 8, c * 8)


def _ct_rows_c(ck: ModuleType, qweight: np.ndarray, c0: int, c1: int, out: np.ndarray | None, threaded: bool) -> np.ndarray:
    """:func:`weight_to_ct_rows` by the C kernel: (8 (c1 - c0), K/8) uint32, into ``out``'s bytes where given."""
    src = _words(qweight)
    k, c = src.shape
    res = np.empty((8 * (c1 - c0), k // 8), _U) if out is None else out.view(_U).reshape(8 * (c1 - c0), k // 8)
    if threaded:
        _split(k // 8, 32 * (c1 - c0), lambda g0, g1: ck.awq_to_ct(src, k, c, c0, c1, res, g0, g1))
    else:
        ck.awq_to_ct(src, k, c, c0, c1, res, 0, k // 8)
    return res


def weight_to_ct(_: Any, qweight: np.ndarray) -> np.ndarray:
    """AWQ (..., K, N/8) -> compressed-tensors weight_packed (..., N, K/8), GPTQ's words transposed: by the ufuncs,
    each cache-sized block's transposed planes stored straight into their transposed places (a whole-tensor
    transposed copy of the GPTQ result, which it replaces, costs 5-40x a copy); by the kernel, then transposed."""
    if c_kernels() is not None:
        return _experts(qweight, lambda e: weight_to_ct_rows(e, 0, e.shape[1]))
    kernels = _kernels_now()
    if kernels is not None:
        return np.ascontiguousarray(np.swapaxes(weight_to_gptq_numba(qweight, kernels), -1, -2))
    return weight_to_ct_ufuncs(qweight)


def _experts(qweight: np.ndarray, one: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``one`` (a 2-D AWQ qweight -> its weight_packed) over stacked experts one by one: each is its own (N, K/8)."""
    if qweight.ndim == 2:
        return one(qweight)
    flat = qweight.reshape(-1, *qweight.shape[-2:])
    return np.stack([one(e) for e in flat]).reshape(*qweight.shape[:-2], qweight.shape[-1] * 8, -1)


def weight_to_ct_ufuncs(qweight: np.ndarray) -> np.ndarray:
    """AWQ -> compressed-tensors weight_packed by ufuncs, blocked and threaded."""
    return _experts(qweight, lambda e: weight_to_ct_rows_ufuncs(e, 0, e.shape[1]))


def weight_to_ct_rows(qweight: np.ndarray, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [8 * c0, 8 * c1) of compressed-tensors' weight_packed (N, K/8) from a 2-D AWQ qweight (K, N/8): its word
    columns [c0, c1), into ``out`` (any array of those bytes) or a new array; so that a converter writes
    weight_packed in pieces of whole rows while the next one converts. By the C kernel where it is built, else
    :func:`weight_to_ct_rows_ufuncs`."""
    ck = c_kernels()
    if ck is not None:
        return _ct_rows_c(ck, qweight, c0, c1, out, threaded=True).view(np.int32)
    return weight_to_ct_rows_ufuncs(qweight, c0, c1, out)


def weight_to_ct_rows_ufuncs(qweight: np.ndarray, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`weight_to_ct_rows` by the ufuncs: each cache-sized block's transposed planes are stored straight into
    their transposed places (a whole transposed copy of the GPTQ words, which this replaces, costs 5-40x a copy)."""
    k, c = qweight.shape
    src = np.ascontiguousarray(qweight).view(_U).reshape(-1, 8, c)[:, :, c0:c1]  # (group, row i, word): a column block
    groups, cb = src.shape[0], c1 - c0
    # (word, column in word, group): row 8 * word + j is output row n
    res = np.empty((cb, 8, groups), _U) if out is None else out.view(_U).reshape(cb, 8, groups)

    def work(g0: int, g1: int) -> None:
        buf, t = np.empty((g1 - g0, 8, cb), _U), np.empty((g1 - g0, 4, cb), _U)
        block = src[g0:g1]
        if cb < c:  # a column block: the delta swaps run 1.4x faster on a contiguous copy of it (measured, 2 cores)
            np.copyto(buf, block)
            block = buf
        planes = _transpose(block[:, 0:4], block[:, 4:8], buf, t)
        for s, j in enumerate(awq.AWQ_PACK_ORDER):  # transposed word s is column AWQ_PACK_ORDER[s] of its word
            np.copyto(res[:, j, g0:g1], planes[s].T)

    _blocked(groups, 32 * cb, work)
    return res.view(np.int32).reshape(8 * cb, groups)


def weight_to_ct_piece(qweight: np.ndarray, c0: int, c1: int, out: np.ndarray) -> np.ndarray:
    """:func:`weight_to_ct_rows` into ``out``; by the C kernel, else numba's where it is loaded (then transposed)."""
    kernels = _kernels_now() if c_kernels() is None else None
    if kernels is None:
        return weight_to_ct_rows(qweight, c0, c1, out)
    res = out.view(np.int32).reshape(8 * (c1 - c0), qweight.shape[0] // 8)
    np.copyto(res, weight_to_gptq_numba(np.ascontiguousarray(qweight[:, c0:c1]), kernels).T)
    return res


def weight_to_gptq(_: Any, qweight: np.ndarray) -> np.ndarray:
    ck = c_kernels()
    if ck is not None:
        return weight_to_gptq_c(qweight, ck)
    kernels = _kernels_now()
    return weight_to_gptq_ufuncs(qweight) if kernels is None else weight_to_gptq_numba(qweight, kernels)


def weight_to_awq(_: Any, qweight: np.ndarray) -> np.ndarray:
    kernels = _kernels_now()
    return weight_to_awq_ufuncs(qweight) if kernels is None else weight_to_awq_numba(qweight, kernels)


def _over(ufuncs: Callable[..., np.ndarray], numba: Callable[..., np.ndarray],
          c: Callable[..., np.ndarray] | None = None) -> Callable[..., np.ndarray]:
    """A weight conversion written over its input by the C kernel or the ufuncs (a conversion's read buffer then
    needs no output buffer beside it, whose fresh pages would fault); numba's kernels store each 8 x 2-word block's
    output over words of later rows that they have not read yet, so they return a new array."""
    def run(qweight: np.ndarray) -> np.ndarray:
        ck = c_kernels()
        if ck is not None and c is not None:
            return c(qweight, ck, over=True)
        kernels = _kernels_now()
        return ufuncs(qweight, over=True) if kernels is None else numba(qweight, kernels)
    return run


# Unpacking and packing at 2, 4 and 8 bits through the bytes of the words: on
# a little-endian machine value i of a word is bits (i % per_byte) * bits of its
# byte i // per_byte, so each value plane is one strided ufunc over the bytes
# (4096 x 11008 at 4 bits: unpack 54 ms against 145 ms for the core, which widens
# every value to int32 first; pack 46 against 90-147 ms; NumPy's strided byte
# loops, about 0.7 ns a byte, are the limit). 3 bits straddle bytes: the core.


def _bytewise(bits: int) -> bool:
    return bits in (2, 4, 8) and sys.byteorder == "little"


def unpack_as(_: Any, words: np.ndarray, direction: str, bits: int, dtype: Any, wrap: bool) -> np.ndarray:
    """The core's ``unpack_as`` by byte planes, into uint8 values, then ``dtype``."""
    out_dtype = np.dtype(dtype)
    # ml_dtypes' int4/uint4 (JAX's): one value a byte, in its low nibble; the byte planes are those bytes already
    # (two's complement or not, the nibble is the field), as the core's cast writes them
    nibbles = bits == 4 and out_dtype.itemsize == 1 and out_dtype.name in ("int4", "uint4")
    if not _bytewise(bits) or (out_dtype.kind not in "iu" and not nibbles):
        return B.unpack_as(xp, words, direction, bits, dtype, wrap)
    per, mask = 8 // bits, (1 << bits) - 1
    b = np.ascontiguousarray(words).view(np.uint8)  # (..., R, 4C)
    *lead, r, c4 = b.shape
    if direction == "column":  # value 4 * per * j + per * x + q of a row is plane q of byte x of word j
        v = np.empty((*lead, r, c4, per), np.uint8)
        planes = [(v[..., q], b, q) for q in range(per)]
    else:  # row 4 * per * i + per * x + q of column n is plane q of byte x of word (i, n)
        v = np.empty((*lead, r, 4, per, c4 // 4), np.uint8)
        by = b.reshape(*lead, r, c4 // 4, 4)
        planes = [(v[..., x, q, :], by[..., x], q) for x in range(4) for q in range(per)]
    for plane, byte, q in planes:
        np.right_shift(byte, np.uint8(q * bits), out=plane)
        if bits < 8:
            np.bitwise_and(plane, np.uint8(mask), out=plane)
    v = v.reshape(*lead, r * (per * 4 if direction == "row" else 1), -1)
    if nibbles:
        return v.view(out_dtype)
    if wrap:  # two's complement: (v ^ half) - half; at 8 bits that is the int8 view itself
        half = np.uint8(1 << (bits - 1))
        v = v.view(np.int8) if bits == 8 else np.subtract((v ^ half).view(np.int8), np.int8(half), dtype=np.int8)
    if out_dtype.itemsize == 1 and (bits < 8 or v.dtype == out_dtype):
        return v.view(out_dtype)  # values fit either 8-bit type unchanged
    return v.astype(out_dtype)


def pack(_: Any, values: np.ndarray, direction: str, bits: int) -> np.ndarray:
    """The core's ``pack`` by byte planes: the low ``bits`` bits of each value, OR-ed into bytes."""
    if not _bytewise(bits):
        return B.pack(xp, values, direction, bits)
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    v = values.astype(np.uint8)  # keeps the low 8 bits, two's complement for negatives
    *lead, r, c = v.shape
    if direction == "column":
        out = np.empty((*lead, r, c // per), np.uint8)
        planes = [(out, v[..., q::per], q) for q in range(per)]
    else:
        tmp = np.empty((*lead, r // (4 * per), 4, c), np.uint8)  # (word row, byte, column)
        g = v.reshape(*lead, r // (4 * per), 4, per, c)
        planes = [(tmp, g[..., q, :], q) for q in range(per)]
    scratch = None
    for dst, plane, q in planes:
        if q == 0:
            np.bitwise_and(plane, mask, out=dst)
            continue
        scratch = np.empty_like(dst) if scratch is None else scratch
        np.bitwise_and(plane, mask, out=scratch)
        np.left_shift(scratch, np.uint8(q * bits), out=scratch)
        np.bitwise_or(dst, scratch, out=dst)
    if direction == "row":
        out = np.ascontiguousarray(np.moveaxis(tmp, -2, -1))  # (word row, column, byte)
    return out.view(np.int32).reshape(*lead, -1, out.shape[-1] // 4 if direction == "column" else c)


def _nibble_reorder(order: tuple[int, ...], default: int) -> Callable[..., np.ndarray]:
    """AWQ <-> GPTQ zero-points as whole-word bit operations: output nibble t is input nibble order[t] + offset.

    The core unpacks every nibble to an int32 and stacks them back (about 2 ms for a layer's small qzeros,
    most of it NumPy's per-call overhead); this is 8 shifts over the words.
    """
    def run(_: Any, qzeros: np.ndarray, offset: int = default) -> np.ndarray:
        w = np.ascontiguousarray(qzeros).view(_U)
        out = np.zeros_like(w)
        add = _U(offset % 16)  # + offset modulo 16 in every field
        for t, src in enumerate(order):
            out |= (((w >> _U(4 * src)) + add) & _U(15)) << _U(4 * t)
        return out.view(np.int32)
    return run


def zeros_shift(_: Any, qzeros: np.ndarray, delta: int, bits: int) -> np.ndarray:
    """The core's ``zeros_shift`` (+ delta in every field, modulo 2**bits) as one whole-word add without carries
    between fields, at 2, 4 and 8 bits: sum = ((a & ~H) + (b & ~H)) ^ ((a ^ b) & H), H the fields' top bits."""
    if not _bytewise(bits):
        return gptq.zeros_shift(xp, qzeros, delta, bits)
    w = np.ascontiguousarray(qzeros).view(_U)
    ones = gptq.field_ones(bits)
    high = _U(ones << (bits - 1))
    add = _U((delta % (1 << bits)) * ones)
    return (((w & ~high) + (add & ~high)) ^ ((w ^ add) & high)).view(np.int32)


def _grouped(q: np.ndarray, z: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The core's ``dequantize_grouped``: (q - z) * s rounded once to the scales' dtype. float16 is computed in
    float32 and rounded at the end: (q - z) * s is exact in float32 (an integer of at most 9 bits times an
    11-bit significand), so the one rounding gives the float16 product's bits, without NumPy's slow float16
    loops."""
    *lead, k, n = q.shape
    groups = scales.shape[-2]
    work = np.float32 if scales.dtype == np.float16 else scales.dtype
    qg = q.reshape(*lead, groups, k // groups, n)
    w = np.subtract(qg, z[..., :, None, :], dtype=np.int16).astype(work)
    w *= scales[..., :, None, :].astype(work)
    return w.reshape(*lead, k, n).astype(scales.dtype, copy=False)


def dequantize_awq(_: Any, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The core's AWQ dequantization with the byte-plane unpack (int16 values: (q - z) is the same integer)."""
    q = B.apply_order(xp, unpack_as(xp, qweight, "column", 4, np.int16, False), "column", tuple(awq.REVERSE_AWQ_PACK_ORDER))
    z = B.apply_order(xp, unpack_as(xp, qzeros, "column", 4, np.int16, False), "column", tuple(awq.REVERSE_AWQ_PACK_ORDER))
    return _grouped(q, z, scales)


def dequantize_gptq(_: Any, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                    bits: int, zeros: str) -> np.ndarray:
    """The core's GPTQ dequantization with the byte-plane unpack."""
    q = unpack_as(xp, qweight, "row", bits, np.int16, False)
    z = unpack_as(xp, qzeros, "column", bits, np.int16, False)
    if zeros == "v1":
        z = (z + 1) & np.int16((1 << bits) - 1)
    if g_idx is None:
        return _grouped(q, z, scales)
    idx = g_idx.astype(np.int32)
    return (q - np.take(z, idx, axis=-2)).astype(scales.dtype) * np.take(scales, idx, axis=-2)


def dequant_table(z: np.ndarray, scales: np.ndarray, bits: int, finish: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``finish((q - z) * s)`` for every value q of ``bits`` bits, per (group, column): (groups, N, 2**bits), the
    product computed exactly as :func:`_grouped` computes it (float16 in float32, rounded once), then passed to
    ``finish`` (the output dtype's conversion), so that looking a value up gives the bits the ufuncs give."""
    work = np.float32 if scales.dtype == np.float16 else scales.dtype
    levels = 1 << bits
    # (q - z) for every z and q, as floats: row z of a (levels, levels) table, gathered per (group, column)
    diffs = (np.arange(levels)[None, :] - np.arange(levels)[:, None]).astype(work)
    t = np.take(diffs, np.asarray(z, np.intp) & (levels - 1), axis=0)
    t *= scales[..., None].astype(work)
    return np.ascontiguousarray(finish(t.astype(scales.dtype, copy=False)))


def _table_pays(qweight: np.ndarray, z: np.ndarray, scales: np.ndarray, bits: int, k: int) -> bool:
    """2-D, not empty, and a table no larger than the output: 2**bits entries per (group, column), K outputs
    per column (8-bit values in groups of 128 would need twice the output's work: the ufuncs do those)."""
    return qweight.ndim == 2 and qweight.size > 0 and z.ndim == scales.ndim == 2 and (1 << bits) * scales.shape[0] <= k


def _bits_view(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32 if a.itemsize == 4 else np.uint64)


def dequantize_awq_t(qweight: np.ndarray, z: np.ndarray, scales: np.ndarray,
                     finish: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    """``finish(dequantize_awq(...))`` transposed to (N, K), C-contiguous, by the compiled kernel, from a 2-D AWQ
    qweight (K, N/8) and its zero-points already unpacked, (groups, N) int16; None without the kernels
    (the caller then takes the ufunc path, which gives the same bits)."""
    kernels = _kernels_now(wait=True)
    if kernels is None or not _table_pays(qweight, z, scales, 4, qweight.shape[0]):
        return None
    k, c = qweight.shape
    if z.shape != (scales.shape[0], 8 * c) or k % scales.shape[0]:  # the kernel reads unchecked
        raise ValueError(f"dequantize_awq_t: qweight {qweight.shape}, zeros {z.shape} and scales {scales.shape} disagree")
    table = dequant_table(z, scales, 4, finish)
    words = _native(qweight).view(_U)  # a view of the stored columns: the kernel reads it in place
    out = np.empty((8 * c, k), table.dtype)
    cols = np.asarray(awq.AWQ_PACK_ORDER, np.int64)  # nibble p of a word is column AWQ_PACK_ORDER[p]
    _split(c, 32 * k, lambda j0, j1: kernels.dequant_awq_t(words, _bits_view(table), cols, _bits_view(out), j0, j1))
    return out


def dequantize_gptq_t(qweight: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, bits: int,
                      finish: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    """As :func:`dequantize_awq_t` for a 2-D GPTQ qweight (K * bits / 32, N) at any width, with its zero-points
    unpacked (v1 already read as v2), (groups, N) int16, and an optional (act-order) g_idx."""
    kernels = _kernels_now(wait=True)
    if kernels is None or not _table_pays(qweight, z, scales, bits, qweight.shape[0] * 32 // bits):
        return None
    r, n = qweight.shape
    k, groups = r * 32 // bits, scales.shape[0]
    if (r * 32 % bits or z.shape != (groups, n) or (g_idx is None and k % groups)
            or (g_idx is not None and (g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= groups))):
        raise ValueError(f"dequantize_gptq_t: qweight {qweight.shape}, zeros {z.shape}, scales {scales.shape} "
                         f"and g_idx {None if g_idx is None else g_idx.shape} disagree")  # the kernel reads unchecked
    gidx = np.arange(k, dtype=np.int64) // (k // groups) if g_idx is None else g_idx.astype(np.int64)
    table = dequant_table(z, scales, bits, finish)
    words = _native(qweight).view(_U)
    out = np.empty((n, k), table.dtype)
    _split(n, 2 * k * out.itemsize, lambda n0, n1: kernels.dequant_gptq_t(words, _bits_view(table), gidx, bits,
                                                                          _bits_view(out), n0, n1))
    return out


def _rows_in_place(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A 2-D array of 4-byte words as (a C-contiguous array holding it, the word offset of its first row there, the
    words from one row to the next): a block of columns of a wider array is read where it is, not copied out."""
    a = _native(a)
    k, c = a.shape
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if (a.itemsize == 4 and a.strides[1] == 4 and (k == 1 or (a.strides[0] % 4 == 0 and a.strides[0] >= 4 * c))
            and root.flags.c_contiguous and (a.ctypes.data - root.ctypes.data) % 4 == 0):
        return root, (a.ctypes.data - root.ctypes.data) // 4, a.strides[0] // 4 if k > 1 else c
    return np.ascontiguousarray(a), 0, c


def dequantize_awq_rows(qweight: np.ndarray, z: np.ndarray, scales: np.ndarray, dtype: Any = None,
                        out: np.ndarray | None = None, threaded: bool = True, direct: bool = True) -> np.ndarray | None:
    """``dequantize_awq(...).astype(dtype)`` laid out as the core lays it out, (K, N) row-major, by packq's C kernels:
    from a 2-D AWQ qweight (K, N/8) whose rows are contiguous (a block of columns is read in place) and its
    zero-points unpacked in column order, (groups, N) uint8; into ``out`` (C-contiguous) where given; rows shared
    over threads unless ``threaded`` is False. Where the CPU has AVX2 and F16C (and ``direct``), float16 -> float16,
    float16 -> float32 and float32 -> float32 are computed 8 values at a time (exactly the core's products and one
    rounding); otherwise each value is looked up in :func:`dequant_table`, whose products NumPy computes as the core
    does. None without the C kernels, where the table would not pay (:func:`_table_pays`) or for outputs of other
    than 2 or 4 bytes (the caller then takes the core)."""
    ck = c_kernels()
    if ck is None or not _table_pays(qweight, z, scales, 4, qweight.shape[0]):
        return None
    k, c = qweight.shape
    groups = scales.shape[0]
    if z.shape != (groups, 8 * c) or scales.shape != (groups, 8 * c) or k % groups:  # the kernels read unchecked
        raise ValueError(f"dequantize_awq_rows: qweight {qweight.shape}, zeros {z.shape} and scales {scales.shape} disagree")
    out_dt = scales.dtype if dtype is None else np.dtype(dtype)
    if out_dt.itemsize not in (2, 4):
        return None
    if out is None:
        out = np.empty((k, 8 * c), out_dt)
    if out.shape != (k, 8 * c) or out.dtype != out_dt or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {out_dt} {(k, 8 * c)}, got {out.dtype} {out.shape}")
    words, off, stride = _rows_in_place(qweight)
    kind = {("float16", "float16"): 0, ("float32", "float32"): 1, ("float16", "float32"): 2}.get((scales.dtype.name, out_dt.name))
    o = _bits_view(out)
    if direct and kind is not None and out_dt.isnative and ck.has_direct():  # (it writes native bits; the table's are out's)
        zu8 = np.ascontiguousarray(z, np.uint8)
        sc = _bits_view(np.ascontiguousarray(_native(scales)))

        def rows(r0: int, r1: int) -> None:
            ck.awq_dequant_direct(words, off, stride, k, c, zu8, sc, groups, k // groups, kind, o, r0, r1)
    else:
        table = dequant_table(z, scales, 4, lambda t: t if dtype is None else t.astype(out_dt))
        t = _bits_view(table)

        def rows(r0: int, r1: int) -> None:
            ck.awq_dequant(words, off, stride, k, c, t, groups, k // groups, table.itemsize, o, r0, r1)

    if threaded:
        _split(k, 8 * c * out_dt.itemsize, rows)
    else:
        rows(0, k)
    return out

def unpack_awq_u8(words: np.ndarray, out: np.ndarray | None = None, split: bool = True) -> np.ndarray:
    """AWQ words (..., R, C) to their values (..., R, 8C) uint8 in logical column order: ``unpack_awq``'s values, one
    byte each; into ``out`` (C-contiguous, that shape) where given. By the C kernel where it is built, else by one
    strided mask or shift of the words' bytes per nibble slot, straight to its column (3.5-4x the four 256-entry
    table look-ups per word this replaced, measured on 4096 x 1376 and 11008 x 512 words). ``split=False``: the C
    kernel on the calling thread only, for a caller whose own threads already share the work (``packq.jax.load``'s
    host path: its int4 load 0.74-0.77 s against 0.81-0.89 s handed to this backend's threads, measured)."""
    w = np.ascontiguousarray(_native(np.asarray(words))).view(np.uint32)
    shape = (*w.shape[:-1], 8 * w.shape[-1])
    if out is None:
        out = np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    ck = c_kernels()
    if ck is not None and w.size:  # one pass of shifts (3x the look-ups, measured), a thread per MiB of words
        if split:
            _split(w.size, 4, lambda i0, i1: ck.awq_unpack_u8(w, w.size, out, i0, i1))
        else:
            ck.awq_unpack_u8(w, w.size, out, 0, w.size)
        return out
    b = w.astype("<u4", copy=False).view(np.uint8).reshape(*w.shape, 4)  # byte i: nibble slots 2i, 2i + 1
    values = out.reshape(*w.shape, 8)
    for p, col in enumerate(awq.AWQ_PACK_ORDER):  # nibble slot p of a word is column AWQ_PACK_ORDER[p] of its 8
        if p % 2:
            np.right_shift(b[..., p // 2], np.uint8(4), out=values[..., col])
        else:
            np.bitwise_and(b[..., p // 2], np.uint8(15), out=values[..., col])
    return out


#: GGUF block types the compiled block kernel writes (its ``kind``)
GGUF_KINDS = {"Q4_0": 0, "Q5_0": 1, "Q8_0": 2}


def gguf_blocks_t(q: np.ndarray, z: np.ndarray, g_idx: np.ndarray, d: np.ndarray, gguf_type: str) -> np.ndarray | None:
    """:func:`packq.formats.gguf.encode`'s bytes (N, K/32 * block bytes) of a quantized type by the compiled kernel,
    from 2-D codes ``q`` (K, N) uint8, zero-points ``z`` (G, N) int16, ``g_idx`` (K,) in range and the blocks' ``d``
    (N, K/32) uint16 (:func:`packq.formats.gguf.block_scales`); None without the kernels (the caller then takes
    the array-API path, which gives the same bytes)."""
    kernels = _kernels_now(wait=True)
    if kernels is None or gguf_type not in GGUF_KINDS or q.ndim != 2 or q.dtype != np.uint8 or 0 in q.shape:
        return None
    k, n = q.shape
    if (k % G.BLOCK or z.ndim != 2 or z.shape[1] != n or g_idx.shape != (k,) or d.shape != (n, k // G.BLOCK)
            or g_idx.min() < 0 or g_idx.max() >= z.shape[0]):
        raise ValueError(f"gguf_blocks_t: q {q.shape}, z {z.shape}, g_idx {g_idx.shape} and d {d.shape} disagree")
    t = G.TYPES[gguf_type]
    out = np.empty((n, k // G.BLOCK * t.nbytes), np.uint8)
    zz, gi, dd = z.astype(np.int16, copy=False), g_idx.astype(np.int64), np.ascontiguousarray(d, np.uint16)
    _split(n, k, lambda n0, n1: kernels.gguf_blocks(q, zz, gi, dd, GGUF_KINDS[gguf_type], out, n0, n1))
    return out


def gguf_blocks_awq_t(qweight: np.ndarray, cols: np.ndarray, z: np.ndarray, d: np.ndarray, gguf_type: str) -> np.ndarray | None:
    """As :func:`gguf_blocks_t`, from a 2-D AWQ qweight (K, N/8) read in place (no unpacked copy): output row i is
    source column ``cols[i]``; ``z`` (G, N) the unpacked zero-points, ``d`` (len(cols), K/32) the rows' scale bits;
    groups of K / G consecutive rows. None without the kernels."""
    kernels = _kernels_now(wait=True)
    if kernels is None or gguf_type not in GGUF_KINDS or qweight.ndim != 2 or 0 in qweight.shape or cols.size == 0:
        return None
    k, c = qweight.shape
    groups = z.shape[0] if z.ndim == 2 else 0
    if (k % G.BLOCK or z.ndim != 2 or z.shape[1] != 8 * c or not groups or k % groups or cols.ndim != 1
            or cols.min() < 0 or cols.max() >= 8 * c or d.shape != (cols.size, k // G.BLOCK)):
        raise ValueError(f"gguf_blocks_awq_t: qweight {qweight.shape}, cols {cols.shape}, z {z.shape} and d {d.shape} disagree")
    t = G.TYPES[gguf_type]
    out = np.empty((cols.size, k // G.BLOCK * t.nbytes), np.uint8)
    words = _native(qweight).view(_U)
    gidx = np.arange(k, dtype=np.int64) // (k // groups)
    slots = np.asarray(awq.REVERSE_AWQ_PACK_ORDER, np.int64)  # column c % 8 is in nibble slot REVERSE[c % 8]
    cc, zz, dd = cols.astype(np.int64), z.astype(np.int16, copy=False), np.ascontiguousarray(d, np.uint16)
    _split(cols.size, k, lambda n0, n1: kernels.gguf_blocks_awq(words, cc, slots, zz, gidx, dd, GGUF_KINDS[gguf_type],
                                                                out, n0, n1))
    return out


def gguf_blocks_awq_rows_t(qweight: np.ndarray, rowof: np.ndarray, z: np.ndarray, d: np.ndarray,
                           gguf_type: str) -> np.ndarray | None:
    """As :func:`gguf_blocks_awq_t` for all the columns of a 2-D AWQ qweight (K, C) (a view of whole words), source
    column i becoming output row ``rowof[i]`` (a permutation); each word read once. None without the kernels."""
    kernels = _kernels_now(wait=True)
    if kernels is None or gguf_type not in GGUF_KINDS or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    n = 8 * c
    if (k % G.BLOCK or z.ndim != 2 or z.shape[1] != n or not z.shape[0] or k % z.shape[0] or d.shape != (n, k // G.BLOCK)
            or rowof.shape != (n,) or not np.array_equal(np.sort(rowof), np.arange(n))):
        raise ValueError(f"gguf_blocks_awq_rows_t: qweight {qweight.shape}, rowof {rowof.shape}, z {z.shape} and d {d.shape} "
                         "disagree")
    out = np.empty((n, k // G.BLOCK * G.TYPES[gguf_type].nbytes), np.uint8)
    words, cols = _native(qweight).view(_U), np.asarray(awq.AWQ_PACK_ORDER, np.int64)
    rows, zz, dd = rowof.astype(np.int64), z.astype(np.int16, copy=False), np.ascontiguousarray(d, np.uint16)
    _split(c, 32 * k, lambda j0, j1: kernels.gguf_blocks_awq_rows(words, cols, rows, zz, dd, GGUF_KINDS[gguf_type],
                                                                  out, 8 * j0, 8 * j1))
    return out


def awq_code_bounds_t(qweight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The smallest and largest code of every block of 32 rows of every column of a 2-D AWQ qweight (K, N/8):
    two (K/32, N) uint8 arrays, by the compiled kernel (loaded now if it is not); None without numba."""
    kernels = numba_kernels() if not _deferred[0] else _kernels_now(wait=True)
    if kernels is None or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    if k % G.BLOCK:
        raise ValueError(f"awq_code_bounds_t: qweight's {k} rows are not blocks of {G.BLOCK}")
    qmin, qmax = np.empty((k // G.BLOCK, 8 * c), np.uint8), np.empty((k // G.BLOCK, 8 * c), np.uint8)
    words, cols = _native(qweight).view(_U), np.asarray(awq.AWQ_PACK_ORDER, np.int64)
    _split(c, 32 * k, lambda j0, j1: kernels.awq_code_bounds(words, cols, qmin, qmax, j0, j1))
    return qmin, qmax


def gguf_floats_awq_t(qweight: np.ndarray, z: np.ndarray, scales: np.ndarray, gguf_type: str) -> np.ndarray | None:
    """:func:`packq.formats.gguf.encode`'s bytes (N, K * item size) of a float type (F32, F16, BF16) of a 2-D AWQ
    module, by the float kernel (``dequant_awq_t``) reading the words in place through a table of every
    (group, column)'s 16 results: ``fp32(s) * (q - z)``, the product :func:`packq.formats.gguf.product` computes,
    then :func:`packq.formats.gguf.encode_floats`'s rounding. None without the kernels."""
    kernels = _kernels_now(wait=True)
    if kernels is None or gguf_type not in G.FLOATS or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    if z.shape != scales.shape or z.ndim != 2 or z.shape[1] != 8 * c or not z.shape[0] or k % z.shape[0]:
        raise ValueError(f"gguf_floats_awq_t: qweight {qweight.shape}, zeros {z.shape} and scales {scales.shape} disagree")
    if z.min() < 0 or z.max() > 15:
        raise ValueError(f"gguf_floats_awq_t: zeros must be 4-bit values, got values in [{z.min()}, {z.max()}]")
    diffs = (np.arange(16)[None, :] - np.arange(16)[:, None]).astype(np.float32)  # row z: q - z for every q
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.take(diffs, np.asarray(z, np.intp) & 15, axis=0)
        t *= scales.astype(np.float32)[..., None]
        table = np.ascontiguousarray(G.encode_floats(t, gguf_type).view(np.uint32 if gguf_type == "F32" else np.uint16))
    words = _native(qweight).view(_U)
    out = np.empty((8 * c, k), table.dtype)
    cols = np.asarray(awq.AWQ_PACK_ORDER, np.int64)
    _split(c, 32 * k, lambda j0, j1: kernels.dequant_awq_t(words, table, cols, out, j0, j1))
    return out.view(np.uint8)


def awq_histogram_t(qweight: np.ndarray, groups: int) -> np.ndarray | None:
    """How often each code is in each (group, column) of a 2-D AWQ qweight (K, N/8): (groups, N, 16) int64, by the
    compiled kernel (None without it); the census and error of a float rounding then come from the 16 products of
    each (group, column) (:func:`packq.formats.gguf.census` computes them weight by weight, with the same result)."""
    kernels = numba_kernels() if not _deferred[0] else _kernels_now(wait=True)
    if kernels is None or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    if groups <= 0 or k % groups:
        raise ValueError(f"awq_histogram_t: {groups} groups do not divide qweight's {k} rows")
    hist = np.zeros((groups, 8 * c, 16), np.int64)
    words = _native(qweight).view(_U)
    cols = np.asarray(awq.AWQ_PACK_ORDER, np.int64)
    bounds = np.linspace(0, groups, min(threads(), groups) + 1).astype(int)  # each thread its own groups of hist

    def work(i: int) -> None:
        g0, g1 = bounds[i], bounds[i + 1]
        kernels.awq_histogram(words[g0 * (k // groups): g1 * (k // groups)], cols, hist[g0:g1])

    list(_executor().map(work, range(len(bounds) - 1)))
    return hist


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's scratch bytes, reused from call to call (fresh megabytes would page-fault every time)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


#: rows of a column block the whole-word GGUF path works on at once (its temporaries stay in the cache)
SWAR_WORDS = 1 << 15
_M = _U(0x0F0F0F0F)


#: one block of each type as a packed record (little-endian fields, ggml's block_q4_0/q5_0/q8_0)
_BLOCK_RECORDS = {
    "Q4_0": np.dtype([("d", "<u2"), ("qs", "V16")]),
    "Q5_0": np.dtype([("d", "<u2"), ("qh", "<u4"), ("qs", "V16")]),
    "Q8_0": np.dtype([("d", "<u2"), ("qs", "V32")]),
}


def _spread_bytes(x: np.ndarray) -> np.ndarray:
    """uint32 -> uint64 with byte i of x at byte 2i (the odd bytes 0)."""
    y = x.astype(np.uint64)
    y |= y << np.uint64(16)
    y &= np.uint64(0x0000FFFF0000FFFF)
    y |= y << np.uint64(8)
    y &= np.uint64(0x00FF00FF00FF00FF)
    return y


def _zip_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """uint32 words -> uint64 whose byte i is nibble i of ``lo`` | nibble i of ``hi`` << 4: Q4_0/Q5_0's qs from the
    words of k 0-7 (or 8-15) and k 16-23 (24-31)."""
    a, b = _spread_bytes(lo), _spread_bytes(hi)
    for y in (a, b):  # bytes at 2i: nibble 2i stays, nibble 2i + 1 moves to the low half of byte 2i + 1
        y |= y << np.uint64(4)
        y &= np.uint64(0x0F0F0F0F0F0F0F0F)
    b <<= np.uint64(4)
    a |= b
    return a


def gguf_blocks_awq_fused(qweight: np.ndarray, c0: int, c1: int, cols: np.ndarray, z: np.ndarray, scales: np.ndarray,
                          gguf_type: str, out: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`gguf_blocks_awq_words`'s bytes by one C kernel reading the AWQ words, zero-points and scales as stored:
    no compressed-tensors rows between, no per-block scale array (``scales`` (G, N), each block's ``d`` the fp16
    rounding of its group's scale, what :func:`packq.formats.gguf.block_scales` gives for groups of a multiple of
    32 rows). None without the C kernels, for Q4_0 where a zero-point of these columns is not 8, and for the
    shapes :func:`gguf_blocks_awq_words` refuses (the caller then takes that path, which gives the same bytes or
    the error)."""
    ck = c_kernels()
    if ck is None or gguf_type not in GGUF_KINDS or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    n, groups = 8 * (c1 - c0), z.shape[0] if z.ndim == 2 else 0
    if (k % G.BLOCK or not 0 <= c0 < c1 <= c or z.ndim != 2 or z.shape != (groups, 8 * c) or scales.shape != z.shape
            or not groups or k % groups or (k // groups) % G.BLOCK or cols.shape != (n,)):
        return None
    zc = z[:, 8 * c0: 8 * c1]  # cols is a permutation of these columns
    if gguf_type == "Q4_0" and not np.all(zc == 8):
        return None
    t = G.TYPES[gguf_type]
    size = n * (k // G.BLOCK) * t.nbytes
    if out is not None and (out.dtype != np.uint8 or not out.flags.c_contiguous or out.size != size):
        raise ValueError(f"gguf_blocks_awq_fused: out must be {size} contiguous bytes, got {out.dtype} {out.shape}")
    rel = cols - 8 * c0
    rowof: bytes | np.ndarray = b""
    if not np.array_equal(rel, np.arange(n)):
        rowof = np.empty(n, np.int64)
        rowof[rel] = np.arange(n)
    with np.errstate(over="ignore"):  # fp16 rounding of float32 (or widened bfloat16) scales, as block_scales does
        bits = np.ascontiguousarray(scales[:, 8 * c0: 8 * c1], np.float16).view(np.uint16)
    res = np.empty(size, np.uint8) if out is None else out.reshape(-1)
    ck.awq_to_gguf(_words(qweight), k, c, c0, c1, rowof, np.ascontiguousarray(zc, np.uint8), bits, k // groups,
                   GGUF_KINDS[gguf_type], res)
    return res.reshape(n, (k // G.BLOCK) * t.nbytes)


def gguf_blocks_awq_words(qweight: np.ndarray, c0: int, c1: int, cols: np.ndarray, z: np.ndarray, d: np.ndarray,
                          gguf_type: str, out: np.ndarray | None = None) -> np.ndarray | None:
    """:func:`packq.formats.gguf.encode`'s bytes (len(cols), K/32 * block bytes) of Q4_0, Q5_0 or Q8_0 from a 2-D 4-bit
    AWQ qweight (K, N/8), by whole-word bit operations (no numba): word columns [c0, c1) transposed to
    compressed-tensors' rows (:func:`weight_to_ct_rows`: a word holds 8 consecutive k of one output column, so one
    zero-point), then every block's bytes from its 4 words, 4 or 8 weights per operation in byte lanes.

    Output row i is source column ``cols[i]`` (a permutation of [8 * c0, 8 * c1)); ``z`` (G, N) the unpacked
    zero-points (4-bit values), groups of K / G rows, each a multiple of 32; ``d`` (len(cols), K/32) the blocks' scale
    bits (:func:`packq.formats.gguf.block_scales`). 4-bit codes less a 4-bit zero-point are always in Q5_0's and
    Q8_0's ranges, so the encoder clips nothing there; Q4_0 is written only where every zero-point is 8 (the
    integers are then the codes themselves): None otherwise, and for a big-endian host (the caller then takes
    another path, which gives the same bytes). ``out``: a uint8 array of the result's bytes to write it into.

    By the C kernels where they are built (the transpose and every block in one pass each, on this thread: the
    GGUF writer runs pieces on threads of its own), else by NumPy's whole-word operations."""
    if gguf_type not in GGUF_KINDS or sys.byteorder != "little" or qweight.ndim != 2 or 0 in qweight.shape:
        return None
    k, c = qweight.shape
    n, groups = 8 * (c1 - c0), z.shape[0] if z.ndim == 2 else 0
    if (k % G.BLOCK or not 0 <= c0 < c1 <= c or z.ndim != 2 or z.shape[1] != 8 * c or not groups or k % groups
            or (k // groups) % G.BLOCK or cols.shape != (n,) or d.shape != (n, k // G.BLOCK)):
        raise ValueError(f"gguf_blocks_awq_words: qweight {qweight.shape}, words [{c0}, {c1}), cols {cols.shape}, "
                         f"z {z.shape} and d {d.shape} disagree")
    zc = z[:, cols]
    if gguf_type == "Q4_0" and not np.all(zc == 8):
        return None
    nb = k // G.BLOCK
    t = G.TYPES[gguf_type]
    if out is not None and (out.dtype != np.uint8 or not out.flags.c_contiguous or out.size != n * nb * t.nbytes):
        raise ValueError(f"gguf_blocks_awq_words: out must be {n * nb * t.nbytes} contiguous bytes, got {out.dtype} {out.shape}")
    rel = cols - 8 * c0
    ck = c_kernels()
    if ck is not None:
        ct = _ct_rows_c(ck, qweight, c0, c1, _scratch(4 * n * (k // 8)), threaded=False)
        rows = b"" if np.array_equal(rel, np.arange(n)) else np.ascontiguousarray(rel, np.int64)
        res = np.empty(n * nb * t.nbytes, np.uint8) if out is None else out.reshape(-1)
        ck.ct_to_gguf(ct, n, k // 8, rows, np.ascontiguousarray(zc.T, np.uint8), groups, n, np.ascontiguousarray(d, np.uint16),
                      GGUF_KINDS[gguf_type], res, 0, n)
        return res.reshape(n, nb * t.nbytes)
    ct = weight_to_ct_rows_ufuncs(qweight, c0, c1).view(_U)  # (n, K/8): row r is source column 8 * c0 + r
    if not np.array_equal(rel, np.arange(n)):
        ct = ct[rel]
    words = ct.reshape(n, nb, 4)  # each block's 4 words: k 0-7, 8-15, 16-23, 24-31
    out = np.empty((n, nb, t.nbytes), np.uint8) if out is None else out.reshape(n, nb, t.nbytes)
    # the blocks as packed records: each field's copy is then one strided loop of fixed-size items over every block
    # (a (..., 16) uint8 copy into 22-byte blocks loops per block: 18% of a conversion, measured)
    rec = out.reshape(n, nb * t.nbytes).view(_BLOCK_RECORDS[gguf_type])
    rec["d"] = d
    zb = np.repeat(np.ascontiguousarray(zc.T).astype(_U), (k // groups) // G.BLOCK, axis=1)  # (n, K/32)
    step = max(1, SWAR_WORDS // (4 * nb))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w, m = words[r0:r1], r1 - r0
        if gguf_type == "Q4_0":  # the integers are the codes: qs is the nibbles of words 0, 1 zipped with those of 2, 3
            rec["qs"][r0:r1] = _zip_nibbles(w[:, :, 0:2], w[:, :, 2:4]).view("V16").reshape(m, nb)
            continue
        even, odd = w & _M, (w >> _U(4)) & _M  # byte lanes: the even k's codes, the odd k's
        if gguf_type == "Q8_0":  # q - z as int8: (128 + q) - z never borrows across lanes; the xor makes it two's complement
            lanes = (zb[r0:r1] * _U(0x01010101))[:, :, None]
            bias = _U(0x80808080)
            even |= bias
            even -= lanes
            even ^= bias
            odd |= bias
            odd -= lanes
            odd ^= bias
            ints = _spread_bytes(even) | (_spread_bytes(odd) << np.uint64(8))  # byte 2j + parity of each word's 8
            rec["qs"][r0:r1] = ints.view("V32").reshape(m, nb)
            continue
        # Q5_0: q - z + 16 in [1, 31]: no carry out of a lane
        lanes = ((_U(16) - zb[r0:r1]) * _U(0x01010101))[:, :, None]
        even += lanes
        odd += lanes
        # bit 4 of lane j of each: at bits 8j (even k) and 8j + 1 (odd k); the multiplication moves them to bits
        # 18 + 2j and 19 + 2j, with no two partial products on one bit (no carries): bit i of each word's qh byte
        h = ((even >> _U(4)) & _U(0x01010101)) | ((odd >> _U(3)) & _U(0x02020202))
        h *= _U(0x41041)
        h >>= _U(18)
        h &= _U(0xFF)  # (m, nb, 4) bytes of qh, in uint32s (the other partial products lie below bit 18 or above bit 25)
        qh = h[:, :, 0] | (h[:, :, 1] << _U(8)) | (h[:, :, 2] << _U(16)) | (h[:, :, 3] << _U(24))
        rec["qh"][r0:r1] = qh
        even &= _M
        odd &= _M
        odd <<= _U(4)
        even |= odd  # the low nibbles, back in the words' order
        rec["qs"][r0:r1] = _zip_nibbles(even[:, :, 0:2], even[:, :, 2:4]).view("V16").reshape(m, nb)
    return out.reshape(n, nb * t.nbytes)


def awq_code_bounds_words(qweight: np.ndarray, rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """:func:`awq_code_bounds_t`'s result (the smallest and largest code of every block of 32 rows of every column of
    a 2-D 4-bit AWQ qweight (K, N/8): two (K/32, N) uint8 arrays) by NumPy's byte reductions, no numba: each byte
    holds two columns' codes, so the masked bytes' minima and maxima over a block's 32 rows are both columns' bounds
    (the high nibble's shifted left by 4); a few blocks of rows (about ``rows`` bytes) at a time."""
    if qweight.ndim != 2 or 0 in qweight.shape or qweight.shape[0] % G.BLOCK:
        raise ValueError(f"awq_code_bounds_words: qweight must be 2-D of rows in blocks of {G.BLOCK}, got {qweight.shape}")
    k, c = qweight.shape
    nb = k // G.BLOCK
    b = np.ascontiguousarray(_native(qweight)).view(_U).astype("<u4", copy=False).view(np.uint8).reshape(nb, G.BLOCK, 4 * c)
    # bounds[(min, max), nibble]: (K/32, word, byte j) of the codes in nibble slot 2j + nibble
    bounds = np.empty((2, 2, nb, c, 4), np.uint8)
    step = max(1, rows // (G.BLOCK * 4 * c))
    masked = np.empty((min(step, nb), G.BLOCK, 4 * c), np.uint8)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        m = masked[: b1 - b0]
        for nibble, mask in ((0, 0x0F), (1, 0xF0)):
            np.bitwise_and(b[b0:b1], np.uint8(mask), out=m)
            np.minimum.reduce(m, axis=1, out=bounds[0, nibble, b0:b1].reshape(b1 - b0, 4 * c))
            np.maximum.reduce(m, axis=1, out=bounds[1, nibble, b0:b1].reshape(b1 - b0, 4 * c))
    bounds[:, 1] >>= 4
    out = np.empty((2, nb, c, 8), np.uint8)
    for j, slot in enumerate(awq.REVERSE_AWQ_PACK_ORDER):  # column j of a word is in nibble slot REVERSE[j]
        np.copyto(out[:, :, :, j], bounds[:, slot % 2, :, :, slot // 2])
    return out[0].reshape(nb, 8 * c), out[1].reshape(nb, 8 * c)


def _contiguous_transposes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A transposing core function whose results are C-contiguous copies, as files and kernels want them."""
    def run(_: Any, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.ascontiguousarray(a) for a in fn(xp, *arrays))
    return run


class NumpyBackend(Backend):
    name = "numpy"
    fast_paths = {awq.weight_to_gptq: weight_to_gptq, awq.weight_to_awq: weight_to_awq, B.unpack_as: unpack_as, B.pack: pack,
                  B.unpack: lambda _, words, direction, bits: unpack_as(_, words, direction, bits, np.int32, False),
                  gptq.dequantize_awq: dequantize_awq, gptq.dequantize_gptq: dequantize_gptq, gptq.zeros_shift: zeros_shift,
                  awq.zeros_to_gptq: _nibble_reorder(tuple(awq.REVERSE_AWQ_PACK_ORDER), -1),
                  awq.zeros_to_awq: _nibble_reorder(tuple(awq.AWQ_PACK_ORDER), 1),
                  ct.from_gptq: _contiguous_transposes(ct.from_gptq), ct.to_gptq: _contiguous_transposes(ct.to_gptq),
                  ct.swap: lambda _, x: np.ascontiguousarray(np.swapaxes(x, -1, -2)), ct.weight_from_awq: weight_to_ct,
                  # by table look-ups, and without importing array_api_compat's NumPy namespace (0.15-0.4 s), which
                  # packed-to-packed conversions reading AWQ zero-points would otherwise pay
                  awq.unpack_awq: lambda _, words: unpack_awq_u8(words).astype(np.int32)}

    #: core function -> its fast path written over its input (``run_over``)
    in_place = {awq.weight_to_gptq: _over(weight_to_gptq_ufuncs, weight_to_gptq_numba, weight_to_gptq_c),
                awq.weight_to_awq: _over(weight_to_awq_ufuncs, weight_to_awq_numba)}

    def run_over(self, fn: Callable[..., Any], x: Any, **static: Any) -> Any:
        over = self.in_place.get(fn)
        if over is None or static or not (isinstance(x, np.ndarray) and x.size and x.dtype.isnative
                                           and x.flags.c_contiguous and x.flags.writeable):
            return self.run(fn, x, **static)
        return over(x)

    def run(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Any:
        arrays = tuple(_native(a) for a in arrays)
        # the fast paths' block layouts assume data; the core returns empty results of the right shape
        plain = plain or any(a is not None and a.size == 0 for a in arrays)
        return super().run(fn, *arrays, plain=plain, **static)

    def as_int32(self, x: Any) -> Any:
        return _native(np.asarray(x)).view(np.int32)


def _native(a: Any) -> Any:
    """``a`` in the machine's byte order (the fast paths reinterpret bytes; checkpoints may be big-endian)."""
    if isinstance(a, np.ndarray) and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


BACKEND = NumpyBackend(xp)


# ------------------------------------------------------------------ MLX's differing-weight counts (C kernels)
def _chunk_bounds(words: int, n: int) -> list[int]:
    """n shares of ``words`` (a multiple of 4) whose bounds are multiples of 4: the C count reads 4 words at a time."""
    return [words // 4 * i // n * 4 for i in range(n + 1)]


def weight_to_ct_piece_mlx(qweight: np.ndarray, c0: int, c1: int, out: np.ndarray,
                           masks: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """:func:`weight_to_ct_piece` of a 2-D AWQ qweight by the C kernel, each tile of the written rows then counted while
    in the cache: the weights whose code's bit is set in its (row, group)'s mask (``masks`` (8 (c1 - c0), G) uint32:
    bit c for MLX's "cpu" arithmetic, bit 16 + c for "metal"); (rows, (cpu, metal)), or None without the C kernels
    (the caller counts otherwise). The same rows as :func:`weight_to_ct_piece`."""
    ck = c_kernels()
    if ck is None:
        return None
    src = _words(qweight)
    k, c = src.shape
    kw, rows = k // 8, 8 * (c1 - c0)
    if masks.dtype != np.uint32 or masks.ndim != 2 or masks.shape[0] != rows:
        raise ValueError(f"masks: expected uint32 ({rows}, G), got {masks.dtype} {masks.shape}")
    masks = np.ascontiguousarray(masks)
    res = out.view(_U).reshape(rows, kw)
    n = max(1, min(threads(), kw // 4, kw * 4 * rows // (1 << 20)))  # a thread per MiB, as _split
    bounds = _chunk_bounds(kw, n)

    def work(i: int) -> tuple[int, int]:
        return ck.awq_to_ct_mlx(src, k, c, c0, c1, res, bounds[i], bounds[i + 1], masks, masks.shape[1], 2)

    parts = [work(0)] if n == 1 else list(_executor().map(work, range(n)))
    return res.view(np.int32), (sum(p[0] for p in parts), sum(p[1] for p in parts))


def mlx_counts(ct: np.ndarray, masks: np.ndarray, simd: int = 2) -> tuple[int, int] | None:
    """The 4-bit codes of weight_packed-layout words ``ct`` (N, K/8) whose bit is set in their (row, group)'s mask
    (``masks`` (N, G) uint32, as :func:`weight_to_ct_piece_mlx`): ("cpu", "metal") counts by the C kernel, or None
    without it. ``simd``: the most to use of 2 (AVX2), 1 (SSSE3), 0 (word by word), as far as the CPU has them; every
    level counts alike (tests/test_mlx_fast.py)."""
    ck = c_kernels()
    if ck is None:
        return None
    words = _words(ct)
    if words.ndim != 2 or masks.dtype != np.uint32 or masks.shape[:1] != words.shape[:1]:
        raise ValueError(f"masks: expected uint32 ({words.shape[0]}, G), got {masks.dtype} {masks.shape}")
    n, kw = words.shape
    masks = np.ascontiguousarray(masks)
    shares = max(1, min(threads(), kw // 4, n * kw * 4 // (1 << 20)))
    bounds = _chunk_bounds(kw, shares)

    def work(i: int) -> tuple[int, int]:
        return ck.mlx_count(words, n, kw, masks, masks.shape[1], 0, n, bounds[i], bounds[i + 1], simd)

    parts = [work(0)] if shares == 1 else list(_executor().map(work, range(shares)))
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def mlx_scales_biases(s: np.ndarray, z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray] | None:
    """MLX's scales and biases (N, G) in ``dtype`` (float16 or float32) of float16 scales ``s`` and zero-points ``z``
    (G, N) by the C kernel, transposed in the same pass: the bytes of ``packq.checkpoint.formats.mlx.MLX.scales_biases``
    (biases -(s * z) in float32, rounded once). None where it does not apply (no C kernels or no F16C, another dtype,
    zero-points wider than 16 bits,
    a NaN scale, which the kernel finds): the caller's NumPy path then, whose bytes these are."""
    ck = c_kernels()
    if (ck is None or dtype not in ("float16", "float32") or s.dtype != np.float16 or s.ndim != 2 or z.shape != s.shape
            or 0 in s.shape or z.dtype.kind not in "iu" or z.dtype.itemsize > 2):
        return None
    groups, n = s.shape
    out = np.float16 if dtype == "float16" else np.float32
    scales, biases = np.empty((n, groups), out), np.empty((n, groups), out)
    if z.dtype != np.int16 and (z.dtype.itemsize < 2 or int(z.max(initial=0)) < 1 << 15):
        z = z.astype(np.int16)  # (uint16 zero-points of 2**15 or more stay NumPy's)
    if z.dtype != np.int16:
        return None
    done = ck.mlx_scales_biases(np.ascontiguousarray(s).view(np.uint16), np.ascontiguousarray(z), groups, n,
                                int(dtype == "float32"), scales, biases, 0, n)
    return (scales, biases) if done else None
