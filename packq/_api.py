"""The public functions: check the arguments, pick the backend, run the core.

Every function accepts NumPy, JAX (eager, jitted or traced), torch and any
other array API library's arrays, returns the same kind of array on the same
device, and treats the last two axes as the matrix (leading axes are a batch,
e.g. the experts of a mixture-of-experts layer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from numpy import dtype as np_dtype

from packq import _validate as V
from packq import backends
from packq.core import bits as B
from packq.formats import awq, gptq, mlx
from packq.formats import compressed_tensors as ct
from packq.formats.awq import AWQ_PACK_ORDER, REVERSE_AWQ_PACK_ORDER

__all__ = [
    "AWQ_PACK_ORDER",
    "REVERSE_AWQ_PACK_ORDER",
    "apply_order",
    "awq_to_mlx",
    "compressed_tensors_to_gptq",
    "compressed_tensors_to_mlx",
    "dequantize_awq",
    "dequantize_gptq",
    "dequantize_mlx",
    "fast_awq_to_gptq",
    "gptq_to_awq",
    "gptq_to_compressed_tensors",
    "gptq_to_mlx",
    "mlx_to_gptq",
    "pack",
    "unpack",
    "zeros_v1_to_v2",
    "zeros_v2_to_v1",
]

Array = Any


def _period(bits: int) -> str:
    n_values, n_words = B.layout(bits)
    return f"{n_values} {bits}-bit values fill {'a word' if n_words == 1 else f'{n_words} words'}"


def _words_in(be: backends.Backend, x: Array) -> Array:
    return be.as_int32(x) if V.dtype_name(x.dtype) == "uint32" else x


def _check_range(be: backends.Backend, x: Array, name: str, lo: int, hi: int, why: str = "to pack without loss") -> None:
    """Values outside [lo, hi] would lose bits; read them only where they are concrete."""
    if not be.is_concrete(x) or any(d == 0 for d in V.shape_of(x)):
        return
    xp = be.xp
    try:
        vmin, vmax = int(xp.min(x)), int(xp.max(x))
    except (NotImplementedError, RuntimeError, TypeError):  # torch has no min/max for uint16/uint32/uint64
        wide = xp.astype(x, xp.int64)
        vmin, vmax = int(xp.min(wide)), int(xp.max(wide))
    _check_bounds(vmin, vmax, name, lo, hi, why)


def _check_bounds(vmin: int, vmax: int, name: str, lo: int, hi: int, why: str) -> None:
    if vmin < lo or vmax > hi:
        raise ValueError(f"{name} must hold values in [{lo}, {hi}] {why}, got values in [{vmin}, {vmax}]")


def _run_range_checked(be: backends.Backend, fn: Callable[..., Any], arrays: tuple[Any, ...], index: int, name: str,
                       lo: int, hi: int, why: str, **static: Any) -> Array:
    """``be.run(fn, *arrays, **static)`` with ``arrays[index]`` range-checked as :func:`_check_range` does.

    Where the backend reads that array clamped into range and its device runs asynchronously (torch on CUDA
    through the Triton kernel; JAX), the check does not read the values before the launch, which would make the
    device idle for the host's round trip and the launch: the minimum and maximum are reduced on the device
    (JAX: a reduction copied to the host without a wait, before the work; torch CUDA: by one program of the
    kernel itself, into pinned host memory) and the call waits for them alone (not for the work) before it
    returns or raises. So an out-of-range array still raises the same ValueError and no
    result is returned; the work already launched reads clamped indices, never out of bounds, and its output
    is dropped.
    """
    x = arrays[index]
    later = None
    if be.is_concrete(x) and not any(d == 0 for d in V.shape_of(x)):
        later = be.run_range_later(fn, arrays, index, **static)
    if later is None:
        _check_range(be, x, name, lo, hi, why)
        return be.run(fn, *arrays, **static)
    out, wait = later
    _check_bounds(*wait(), name, lo, hi, why)
    return out


def pack(imatrix: Array, direction: str = "column", *, bits: int = 4) -> Array:
    """Pack integer values into 32-bit words.

    Value i of a word sits at bits [bits*i, bits*i + bits). "column" packs
    consecutive columns into one word, "row" consecutive rows. At 3 bits,
    32 values fill 3 words and values 10 and 21 straddle two words (GPTQ's
    layout).

    Parameters
    ----------
    imatrix : array of an integer dtype, shape (..., R, C)
        Values in [-2**(bits-1), 2**bits - 1]; only the low ``bits`` bits are
        stored, so -1 packs as 2**bits - 1. The packed axis must be a multiple
        of 32 // bits (32 at 3 bits).
    direction : {"column", "row"}
        The axis to pack along.
    bits : {2, 3, 4, 8}
        Width of a value.

    Returns
    -------
    array of int32, shape (..., R, C * bits // 32) or (..., R * bits // 32, C)

    Raises
    ------
    TypeError
        If ``imatrix`` is not an array or not of an integer dtype.
    ValueError
        For fewer than 2 dimensions, an unknown direction or width, a packed
        axis of the wrong length, or (when values can be read, i.e. outside a
        trace) values that do not fit in ``bits`` bits.

    Examples
    --------
    >>> import numpy as np, packq
    >>> packq.pack(np.arange(8).reshape(1, 8))
    array([[1985229328]], dtype=int32)
    >>> hex(packq.pack(np.full((1, 8), -1)).view(np.uint32)[0, 0])
    '0xffffffff'
    """
    V.array(imatrix, "imatrix")
    V.integer(imatrix, "imatrix")
    direction = V.direction(direction)
    bits = V.bits(bits)
    V.multiple(imatrix, "imatrix", B.AXIS[direction], B.layout(bits)[0], _period(bits))
    be = backends.for_arrays(imatrix=imatrix)
    _check_range(be, imatrix, "imatrix", -(1 << (bits - 1)), (1 << bits) - 1)
    return be.run(B.pack, imatrix, direction=direction, bits=bits)


def _unpack_dtype(be: backends.Backend, bits: int, dtype: Any) -> tuple[Any, bool]:
    """The output dtype, and whether fields are read as two's complement."""
    if dtype is None:
        return (be.xp.int8 if bits < 8 else be.xp.uint8), False
    name = V.dtype_name(dtype)
    kind, _, width = name.partition("int")
    if kind not in ("", "u") or not width.isdigit():
        raise TypeError(f"dtype must be an integer dtype, got {name}")
    if width not in ("2", "4", "8", "16", "32", "64"):  # "int99": a name no library has
        raise TypeError(f"dtype must be an integer dtype of 2, 4, 8, 16, 32 or 64 bits, got {name}")
    wrap = name == f"int{bits}"
    if not wrap and int(width) < bits + (kind == ""):
        raise ValueError(f"dtype must hold {bits}-bit values 0..{(1 << bits) - 1} (or be int{bits}), got {name}")
    # the same dtype of the input's own library, whichever library's dtype (or name) was passed
    native = getattr(be.xp, name, None)
    if native is None and be.name in ("numpy", "jax"):
        native = dtype  # NumPy-compatible dtypes outside the standard: ml_dtypes' int4/uint4
    if native is None or (be.name not in ("numpy", "jax") and int(width) < 8):
        raise TypeError(f"dtype must be an integer dtype that {_library_name(be)} computes with, got {name}")
    return native, wrap


def _library_name(be: backends.Backend) -> str:
    return be.name if be.name != "generic" else be.xp.__name__.rsplit(".", 1)[-1]  # "torch", "array_api_strict"


def unpack(qmatrix: Array, direction: str = "column", *, bits: int = 4, dtype: Any = None) -> Array:
    """Unpack 32-bit words into their values.

    Parameters
    ----------
    qmatrix : array of int32 or uint32, shape (..., R, C)
        Packed words; int32 words with the top field set are negative, which
        is handled (every shift is masked).
    direction : {"column", "row"}
        The axis the words were packed along; it grows by 32 // bits.
    bits : {2, 3, 4, 8}
        Width of a value. At 3 bits, the packed axis must be a multiple of 3.
    dtype : integer dtype, optional
        Output dtype. Default: int8 (uint8 at 8 bits), values in [0, 2**bits).
        A signed dtype exactly ``bits`` wide (``jnp.int4`` at 4 bits, int8 at
        8) reads each field as two's complement, so that ``pack`` gives the
        words back; ``jnp.uint4`` keeps 0..15. Both are stored natively by XLA.

    Returns
    -------
    array, shape (..., R, C * 32 // bits) or (..., R * 32 // bits, C)

    Raises
    ------
    TypeError
        If ``qmatrix`` is not an array of int32 or uint32, or ``dtype`` is not an integer dtype.
    ValueError
        For fewer than 2 dimensions, an unknown direction or width, a 3-bit
        axis not a multiple of 3, or a ``dtype`` too narrow for the values.

    Examples
    --------
    >>> import numpy as np, packq
    >>> packq.unpack(np.array([[0x76543210]], dtype=np.int32))
    array([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=int8)
    >>> packq.unpack(np.array([[-1]], dtype=np.int32), "row", bits=8).ravel()
    array([255, 255, 255, 255], dtype=uint8)
    """
    V.words(qmatrix, "qmatrix")
    direction = V.direction(direction)
    bits = V.bits(bits)
    V.multiple(qmatrix, "qmatrix", B.AXIS[direction], B.layout(bits)[1], _period(bits))
    be = backends.for_arrays(qmatrix=qmatrix)
    out_dtype, wrap = _unpack_dtype(be, bits, dtype)
    return be.run(B.unpack_as, _words_in(be, qmatrix), direction=direction, bits=bits, dtype=out_dtype, wrap=wrap)


def apply_order(
    imatrix: Array, direction: str = "column", order: Sequence[int] = AWQ_PACK_ORDER, *, bits: int = 4
) -> Array:
    """Reorder within every group of 8 consecutive columns (or rows).

    Member ``order[s]`` of each group moves to position ``s``. With
    ``AWQ_PACK_ORDER`` this turns logical order into AWQ's interleaved slot
    order; ``REVERSE_AWQ_PACK_ORDER`` undoes it.

    Unlike the LoRAX/TGI source, which reshapes to (8, -1) for "row" and so
    permutes 8 blocks of R/8 rows (right only when R == 8), "row" here
    reorders within every group of 8 consecutive rows, like "column" does for
    columns.

    Parameters
    ----------
    imatrix : array, shape (..., R, C)
        Any dtype; the reordered axis must be a multiple of 8.
    direction : {"column", "row"}
    order : sequence of int
        A permutation of range(8).
    bits : {4}
        The AWQ interleave is defined for 4-bit values only; other widths raise.

    Returns
    -------
    array of the same shape and dtype

    Raises
    ------
    TypeError
        If ``imatrix`` is not an array.
    ValueError
        For fewer than 2 dimensions, an unknown direction, an ``order`` that
        is not a permutation of range(8), or an axis not a multiple of 8.

    Examples
    --------
    >>> import numpy as np, packq
    >>> packq.apply_order(np.arange(8).reshape(1, 8))
    array([[0, 2, 4, 6, 1, 3, 5, 7]])
    >>> packq.apply_order(packq.apply_order(np.arange(16).reshape(2, 8)), order=packq.REVERSE_AWQ_PACK_ORDER)
    array([[ 0,  1,  2,  3,  4,  5,  6,  7],
           [ 8,  9, 10, 11, 12, 13, 14, 15]])
    """
    V.array(imatrix, "imatrix")
    direction = V.direction(direction)
    V.bits(bits, (4,), _AWQ_ONLY)
    perm = V.order(order)
    V.multiple(imatrix, "imatrix", B.AXIS[direction], 8, "the order applies to groups of 8")
    be = backends.for_arrays(imatrix=imatrix)
    return be.run(B.apply_order, imatrix, direction=direction, order=perm)


_AWQ_ONLY = " (AWQ and its interleave are 4-bit only)"


def _check_awq_pair(qweight: Array, qzeros: Array, bits: int) -> None:
    V.bits(bits, (4,), _AWQ_ONLY)
    V.words(qweight, "qweight")
    V.words(qzeros, "qzeros")
    V.same_batch(qweight, "qweight", qzeros, "qzeros")
    w, z = V.shape_of(qweight), V.shape_of(qzeros)
    if w[-1] != z[-1]:
        raise ValueError(
            f"qweight and qzeros must have the same number of columns (N/8 packed words), "
            f"got shapes {w!r} and {z!r}"
        )
    V.multiple(qweight, "qweight", -2, 8, "GPTQ packs 8 rows into a word")
    if z[-2] == 0 or w[-2] % z[-2]:
        raise ValueError(
            f"qzeros must have one row per quantization group, a divisor of qweight's {w[-2]} rows, got shape {z!r}"
        )


def fast_awq_to_gptq(qweight: Array, qzeros: Array, *, bits: int = 4) -> tuple[Array, Array]:
    """Convert AWQ (gemm) qweight and qzeros to the GPTQ/ExLlama layout, bit-exactly.

    The values are unpacked along columns, taken out of AWQ's interleaved
    order, and repacked: weights along rows, zeros along columns in GPTQ v1
    form (z - 1 per nibble modulo 16, so a zero-point of 0 is stored as 15
    without borrowing from its neighbour). Scales pass through unchanged; a
    GPTQ checkpoint also needs ``g_idx = arange(K) // group_size``.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K, N/8)
        AWQ packed weights; K must be a multiple of 8.
    qzeros : array of int32 or uint32, shape (..., K/G, N/8)
        AWQ packed zero-points, one row per group.
    bits : {4}
        AWQ is 4-bit only; other widths raise.

    Returns
    -------
    qweight : array of int32, shape (..., K/8, N)
    qzeros : array of int32, shape (..., K/G, N/8)

    Raises
    ------
    TypeError
        If either is not an array of packed 32-bit words, or they come from different libraries.
    ValueError
        For fewer than 2 dimensions, different column counts or batch
        dimensions, K not a multiple of 8, or a qzeros row count that does not divide K.

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight = np.full((8, 1), 0x75316420, dtype=np.int32)  # AWQ order of columns 0..7
    >>> qzeros = np.zeros((1, 1), dtype=np.int32)
    >>> gw, gz = packq.fast_awq_to_gptq(qweight, qzeros)
    >>> gw.shape, [hex(w) for w in gw.view(np.uint32)[0]]
    ((1, 8), ['0x0', '0x11111111', '0x22222222', '0x33333333', '0x44444444', '0x55555555', '0x66666666', '0x77777777'])
    >>> hex(gz.view(np.uint32)[0, 0])
    '0xffffffff'
    """
    _check_awq_pair(qweight, qzeros, bits)
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros)
    return be.run_all([(awq.weight_to_gptq, (_words_in(be, qweight),), {}), (awq.zeros_to_gptq, (_words_in(be, qzeros),), {})])


def _check_gptq_pair(qweight: Array, qzeros: Array, bits: int) -> int:
    """Check GPTQ qweight/qzeros shapes; return K."""
    V.words(qweight, "qweight")
    V.words(qzeros, "qzeros")
    V.same_batch(qweight, "qweight", qzeros, "qzeros")
    n_values, n_words = B.layout(bits)
    V.multiple(qweight, "qweight", -2, n_words, _period(bits))
    V.multiple(qweight, "qweight", -1, n_values, f"qzeros packs {_period(bits)} along columns")
    w, z = V.shape_of(qweight), V.shape_of(qzeros)
    if z[-1] * n_values != w[-1] * n_words:
        raise ValueError(
            f"qzeros must have {w[-1] * n_words // n_values} columns ({bits}-bit zeros of qweight's {w[-1]} columns), "
            f"got shape {z!r}"
        )
    k = w[-2] * n_values // n_words
    if z[-2] == 0 or k % z[-2]:
        raise ValueError(f"qzeros must have one row per quantization group, a divisor of K = {k}, got shape {z!r}")
    return k


def _check_g_idx(g_idx: Array, k: int) -> None:
    V.array(g_idx, "g_idx", min_ndim=1)
    V.integer(g_idx, "g_idx")
    if V.shape_of(g_idx) != (k,):
        raise ValueError(f"g_idx must have shape ({k},), one group index per input feature, got shape {V.shape_of(g_idx)!r}")


def gptq_to_awq(qweight: Array, qzeros: Array, g_idx: Array | None = None, *, bits: int = 4) -> tuple[Array, Array]:
    """Convert 4-bit GPTQ v1 qweight and qzeros to AWQ (gemm), the exact inverse of :func:`fast_awq_to_gptq`.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K/8, N)
    qzeros : array of int32 or uint32, shape (..., K/G, N/8)
        GPTQ v1 zeros (stored z - 1); convert v2 zeros with :func:`zeros_v2_to_v1` first.
    g_idx : array of int, shape (K,), optional
        If given, it must be the trivial ``arange(K) // G``: an act-order
        (desc_act) checkpoint cannot become AWQ without permuting the input
        features. It is checked, so it cannot be a tracer.
    bits : {4}
        AWQ is 4-bit only; other widths raise.

    Returns
    -------
    qweight : array of int32, shape (..., K, N/8)
    qzeros : array of int32, shape (..., K/G, N/8)

    Raises
    ------
    TypeError
        If an argument is not an array of the right dtype, or ``g_idx`` is traced.
    ValueError
        For mismatched shapes, or a ``g_idx`` that is not ``arange(K) // G`` (act-order).

    Examples
    --------
    >>> import numpy as np, packq
    >>> rng = np.random.default_rng(0)
    >>> qweight = rng.integers(-2**31, 2**31, (128, 4)).astype(np.int32)
    >>> qzeros = rng.integers(-2**31, 2**31, (2, 4)).astype(np.int32)
    >>> back = packq.gptq_to_awq(*packq.fast_awq_to_gptq(qweight, qzeros))
    >>> all((a == b).all() for a, b in zip(back, (qweight, qzeros)))
    True
    """
    V.bits(bits, (4,), _AWQ_ONLY)
    k = _check_gptq_pair(qweight, qzeros, 4)
    if g_idx is not None:
        _check_g_idx(g_idx, k)
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, g_idx=g_idx)
    if g_idx is not None:
        groups = V.shape_of(qzeros)[-2]
        if not be.is_concrete(g_idx):
            raise TypeError("g_idx must be a concrete array to be checked for act-order, got a tracer; pass g_idx=None inside jit")
        xp = be.xp
        trivial = xp.arange(k, dtype=g_idx.dtype) // (k // groups)
        if not bool(xp.all(g_idx == trivial)):
            raise ValueError(
                "g_idx must be arange(K) // group_size to convert to AWQ; this one is act-order (desc_act), "
                "whose input features would have to be permuted, which AWQ cannot express"
            )
    return be.run_all([(awq.weight_to_awq, (_words_in(be, qweight),), {}), (awq.zeros_to_awq, (_words_in(be, qzeros),), {})])


CONVENTIONS = ("field", "word")


def _zeros(qzeros: Array, bits: int, delta: int, convention: str) -> Array:
    V.words(qzeros, "qzeros")
    bits = V.bits(bits)
    V.multiple(qzeros, "qzeros", -1, B.layout(bits)[1], _period(bits))
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be 'field' or 'word', got {convention!r}")
    if convention == "word" and bits == 3:
        raise ValueError("convention 'word' is a whole-word add at 2, 4 and 8 bits; 3-bit fields straddle "
                         "words and every engine shifts them field by field: use convention 'field', got bits=3")
    be = backends.for_arrays(qzeros=qzeros)
    if convention == "word":
        return be.run(gptq.zeros_word_add, _words_in(be, qzeros), delta=delta, bits=bits)
    return be.run(gptq.zeros_shift, _words_in(be, qzeros), delta=delta, bits=bits)


def zeros_v1_to_v2(qzeros: Array, *, bits: int = 4, convention: str = "field") -> Array:
    """GPTQ qzeros from v1 storage (z - 1, checkpoint_format "gptq") to v2 (z, "gptq_v2").

    With ``convention="field"`` every field gains 1 modulo 2**bits on its own,
    fields straddling words at 3 bits included: how TGI's and LoRAX's kernels
    read v1, and how packq writes it by default. With ``convention="word"`` the
    word gains 0x11111111 (at 4 bits) as one 32-bit add, a carry crossing into
    the next field wherever a field holds 2**bits - 1: how GPTQModel, and so
    transformers, reads v1 (``gptqmodel/utils/model.py``,
    ``convert_gptq_v1_to_v2_format_module``). The two agree unless a field
    below the top one stores 2**bits - 1 (a zero-point of 0).

    Parameters
    ----------
    qzeros : array of int32 or uint32, shape (..., groups, N * bits / 32)
    bits : {2, 3, 4, 8}
    convention : {"field", "word"}
        "word" is defined at 2, 4 and 8 bits.

    Returns
    -------
    array of int32, same shape

    Raises
    ------
    TypeError
        If ``qzeros`` is not an array of packed 32-bit words.
    ValueError
        For fewer than 2 dimensions, an unknown width, or (3 bits) columns not a multiple of 3.

    Examples
    --------
    >>> import numpy as np, packq
    >>> hex(packq.zeros_v1_to_v2(np.array([[-1]], dtype=np.int32))[0, 0])
    '0x0'
    >>> v1 = np.array([[0x7777777F]], dtype=np.uint32)  # zero-point 0 in field 0, 8 elsewhere
    >>> hex(packq.zeros_v1_to_v2(v1).view(np.uint32)[0, 0]), hex(packq.zeros_v1_to_v2(v1, convention="word").view(np.uint32)[0, 0])
    ('0x88888880', '0x88888890')
    """
    return _zeros(qzeros, bits, +1, convention)


def zeros_v2_to_v1(qzeros: Array, *, bits: int = 4, convention: str = "field") -> Array:
    """GPTQ qzeros from v2 storage (z) to v1 (z - 1), per field or as one word.

    See :func:`zeros_v1_to_v2`, of which this is the inverse in either
    convention. ``convention="word"`` is how GPTQModel writes v1
    (``convert_gptq_v2_to_v1_format_module``: ``qzeros -= 0x11111111``).

    Examples
    --------
    >>> import numpy as np, packq
    >>> hex(packq.zeros_v2_to_v1(np.array([[0x88888880]], dtype=np.uint32)).view(np.uint32)[0, 0])
    '0x7777777f'
    >>> hex(packq.zeros_v2_to_v1(np.array([[0x88888880]], dtype=np.uint32), convention="word").view(np.uint32)[0, 0])
    '0x7777776f'
    """
    return _zeros(qzeros, bits, -1, convention)


def _check_scales(scales: Array, groups: int, n: int, like: Array, like_name: str) -> None:
    V.array(scales, "scales")
    V.floating(scales, "scales")
    if V.shape_of(scales) != V.shape_of(like)[:-2] + (groups, n):
        raise ValueError(
            f"scales must have shape {V.shape_of(like)[:-2] + (groups, n)!r} (one row per group of {like_name}, "
            f"one column per output feature), got shape {V.shape_of(scales)!r}"
        )


def dequantize_awq(qweight: Array, qzeros: Array, scales: Array, *, bits: int = 4) -> Array:
    """Dequantize AWQ (gemm) tensors: W[k, n] = (q[k, n] - z[g, n]) * s[g, n], g = k // G.

    The group size G is inferred as K // scales.shape[-2] and checked
    against qzeros. The result has the scales' dtype (float16, bfloat16 or
    float32); (q - z) is exact, so the only rounding is that of the product.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K, N/8)
    qzeros : array of int32 or uint32, shape (..., K/G, N/8)
    scales : array of float, shape (..., K/G, N)
    bits : {4}
        AWQ is 4-bit only; other widths raise.

    Returns
    -------
    array of the scales' dtype, shape (..., K, N)

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong type, dtype or shape.

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight = np.full((8, 1), 0x75316420, dtype=np.int32)
    >>> qzeros = np.full((1, 1), 0x22222222, dtype=np.int32)
    >>> packq.dequantize_awq(qweight, qzeros, np.full((1, 8), 0.5, dtype=np.float16))[0]
    array([-1. , -0.5,  0. ,  0.5,  1. ,  1.5,  2. ,  2.5], dtype=float16)
    """
    _check_awq_pair(qweight, qzeros, bits)
    w, z = V.shape_of(qweight), V.shape_of(qzeros)
    _check_scales(scales, z[-2], w[-1] * 8, qweight, "qweight")
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales)
    return be.run(gptq.dequantize_awq, _words_in(be, qweight), _words_in(be, qzeros), scales)


def dequantize_gptq(
    qweight: Array,
    qzeros: Array,
    scales: Array,
    g_idx: Array | None = None,
    *,
    bits: int = 4,
    zeros: str = "v1",
) -> Array:
    """Dequantize GPTQ tensors: W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K * bits / 32, N)
    qzeros : array of int32 or uint32, shape (..., groups, N * bits / 32)
    scales : array of float, shape (..., groups, N)
    g_idx : array of int, shape (K,), optional
        Group of each input feature; default ``arange(K) // (K // groups)``.
        An act-order g_idx is honoured. Values are range-checked when concrete (on
        torch CUDA and JAX while the kernel runs, which reads them clamped; the
        call raises before it returns).
    bits : {2, 3, 4, 8}
    zeros : {"v1", "v2"}
        "v1" (checkpoint_format "gptq"): stored z - 1, read as (stored + 1)
        modulo 2**bits. "v2" ("gptq_v2"): stored z.

    Returns
    -------
    array of the scales' dtype, shape (..., K, N)

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong type, dtype, shape or range, or an unknown ``zeros``.

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight = np.full((8, 1), 0x75316420, dtype=np.int32)
    >>> qzeros = np.full((1, 1), 0x22222222, dtype=np.int32)
    >>> scales = np.full((1, 8), 0.5, dtype=np.float16)
    >>> gw, gz = packq.fast_awq_to_gptq(qweight, qzeros)
    >>> bool((packq.dequantize_gptq(gw, gz, scales) == packq.dequantize_awq(qweight, qzeros, scales)).all())
    True
    """
    bits = V.bits(bits)
    if zeros not in ("v1", "v2"):
        raise ValueError(f"zeros must be 'v1' (checkpoint_format gptq) or 'v2' (gptq_v2), got {zeros!r}")
    k = _check_gptq_pair(qweight, qzeros, bits)
    groups = V.shape_of(qzeros)[-2]
    _check_scales(scales, groups, V.shape_of(qweight)[-1], qweight, "qweight")
    if g_idx is not None:
        _check_g_idx(g_idx, k)
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
    arrays = (_words_in(be, qweight), _words_in(be, qzeros), scales, g_idx)
    if g_idx is None:
        return be.run(gptq.dequantize_gptq, *arrays, bits=bits, zeros=zeros)
    return _run_range_checked(be, gptq.dequantize_gptq, arrays, 3, "g_idx", 0, groups - 1,
                              f"(indices of the {groups} groups of qzeros)", bits=bits, zeros=zeros)


def gptq_to_compressed_tensors(qweight: Array, qzeros: Array, scales: Array, *, bits: int = 4) -> tuple[Array, Array, Array]:
    """GPTQ tensors with v2 zeros to compressed-tensors ``pack-quantized``: each matrix transposed.

    Both formats pack a column's K values as one little-endian bit stream (3-bit values
    straddling words), so the relayout is a transpose: no value is unpacked.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K * bits / 32, N)
    qzeros : array of int32 or uint32, shape (..., G, N * bits / 32)
        v2 zeros (z itself; checkpoint_format "gptq_v2"). For v1, call
        :func:`zeros_v1_to_v2` first, in the convention its producer wrote.
    scales : array of float, shape (..., G, N)
    bits : {2, 3, 4, 8}

    Returns
    -------
    weight_packed : int32, (..., N, K * bits / 32)
    weight_zero_point : int32, (..., N * bits / 32, G)
    weight_scale : scales' dtype, (..., N, G)

    Raises
    ------
    TypeError
        If an argument is not an array of the right kind.
    ValueError
        For shapes that do not fit together at ``bits``.

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight, qzeros = np.arange(16, dtype=np.int32).reshape(2, 8), np.zeros((1, 1), np.int32)
    >>> wp, zp, ws = packq.gptq_to_compressed_tensors(qweight, qzeros, np.ones((1, 8), np.float16))
    >>> wp.shape, zp.shape, ws.shape, bool((wp == qweight.T).all())
    ((8, 2), (1, 1), (8, 1), True)
    """
    bits = V.bits(bits)
    _check_gptq_pair(qweight, qzeros, bits)
    _check_scales(scales, V.shape_of(qzeros)[-2], V.shape_of(qweight)[-1], qweight, "qweight")
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales)
    return be.run(ct.from_gptq, _words_in(be, qweight), _words_in(be, qzeros), scales)


def compressed_tensors_to_gptq(
    weight_packed: Array, weight_zero_point: Array, weight_scale: Array, *, bits: int = 4
) -> tuple[Array, Array, Array]:
    """compressed-tensors ``pack-quantized`` tensors to GPTQ with v2 zeros: each matrix transposed back.

    The inverse of :func:`gptq_to_compressed_tensors`; see there. A symmetric scheme stores no
    zero points: pass ``packq.pack(full((..., G, N), 2**(bits-1)), bits=bits)`` transposed, or
    use the checkpoint converter, which makes them.

    Examples
    --------
    >>> import numpy as np, packq
    >>> wp = np.arange(16, dtype=np.int32).reshape(8, 2)
    >>> qw, qz, s = packq.compressed_tensors_to_gptq(wp, np.zeros((1, 1), np.int32), np.ones((8, 1), np.float16))
    >>> qw.shape, qz.shape, s.shape
    ((2, 8), (1, 1), (1, 8))
    """
    bits = V.bits(bits)
    for x, name in ((weight_packed, "weight_packed"), (weight_zero_point, "weight_zero_point")):
        V.words(x, name)
    V.array(weight_scale, "weight_scale")
    V.floating(weight_scale, "weight_scale")
    wp, zp, ws = V.shape_of(weight_packed), V.shape_of(weight_zero_point), V.shape_of(weight_scale)
    n_values, n_words = B.layout(bits)
    n, groups = wp[-2], ws[-1]
    if not (wp[:-2] == zp[:-2] == ws[:-2]) or len(zp) != len(wp) or len(ws) != len(wp):
        raise ValueError(
            f"weight_packed, weight_zero_point and weight_scale must have the same leading dimensions, "
            f"got shapes {wp!r}, {zp!r} and {ws!r}"
        )
    if wp[-1] % n_words or n % n_values:
        raise ValueError(
            f"weight_packed must have a multiple of {n_words} columns and of {n_values} rows ({_period(bits)}), "
            f"got shape {wp!r}"
        )
    k = wp[-1] * n_values // n_words
    if ws[-2] != n or groups == 0 or k % groups:
        raise ValueError(f"weight_scale must have shape (..., {n}, G) with G dividing K = {k}, got shape {ws!r}")
    if zp[-2:] != (n * n_words // n_values, groups):
        raise ValueError(
            f"weight_zero_point must have shape (..., {n * n_words // n_values}, {groups}), got shape {zp!r}"
        )
    be = backends.for_arrays(weight_packed=weight_packed, weight_zero_point=weight_zero_point, weight_scale=weight_scale)
    return be.run(ct.to_gptq, _words_in(be, weight_packed), _words_in(be, weight_zero_point), weight_scale)


# ------------------------------------------------------------------ MLX affine
def _mlx_dtype(be: backends.Backend, dtype: Any) -> Any:
    """The float dtype (a name, or any library's dtype) as the input's own library's dtype."""
    name = "float32" if dtype is None else dtype if isinstance(dtype, str) else V.dtype_name(dtype)
    if name not in mlx.DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16 (MLX's scales and biases), got {name!r}")
    native = getattr(be.xp, name, None)
    if native is None and name == "bfloat16" and be.name in ("numpy", "jax", "torch"):
        native = dtype if not isinstance(dtype, str) else None
        if native is None and be.name == "numpy":
            try:
                import ml_dtypes
            except ImportError:
                raise TypeError("dtype bfloat16 on NumPy arrays needs ml_dtypes (pip install ml_dtypes)") from None
            native = np_dtype(ml_dtypes.bfloat16)
        elif native is None:
            native = importlib.import_module("jax.numpy" if be.name == "jax" else "torch").bfloat16
    if native is None:
        raise TypeError(f"dtype must be a float dtype that {_library_name(be)} computes with, got {name}")
    return native


def _check_group_size(k: int, groups: int) -> None:
    g = k // groups
    if g not in mlx.GROUP_SIZES:
        got = f"one group over all K = {k} (per-channel)" if groups == 1 else f"{g} ({groups} groups of K = {k})"
        raise ValueError(f"the group size must be one MLX's affine mode has ({', '.join(map(str, mlx.GROUP_SIZES))}), got {got}")


def gptq_to_mlx(qweight: Array, qzeros: Array, scales: Array, *, bits: int = 4, dtype: Any = None) -> tuple[Array, Array, Array]:
    """GPTQ tensors with v2 zeros to MLX's affine ``nn.QuantizedLinear`` (weight, scales, biases).

    MLX packs each output row's K values from the lowest bits up as one little-endian bit stream,
    as GPTQ packs each column's: ``weight`` is qweight transposed, bit for bit, at every width.
    ``biases`` are -scales * z, computed in float32 and rounded once to ``dtype``.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K * bits / 32, N)
    qzeros : array of int32 or uint32, shape (..., G, N * bits / 32)
        v2 zeros (z itself; checkpoint_format "gptq_v2"); convert v1 with :func:`zeros_v1_to_v2`
        in the convention its producer wrote.
    scales : array of float, shape (..., G, N)
    bits : {2, 3, 4, 8}
    dtype : {"float32", "float16", "bfloat16"} or a dtype, optional
        MLX's scales and biases. Default float32: from float16 or bfloat16 scales, -s * z and
        MLX's s * q + b are then exact on every MLX backend, so MLX computes exactly
        (q - z) * s. float16/bfloat16 are MLX's faster form, where MLX's arithmetic rounds
        (see :func:`dequantize_mlx`). bfloat16 on NumPy needs ml_dtypes.

    Returns
    -------
    weight : int32, (..., N, K * bits / 32)
        MLX stores it as uint32: the same bits (``.view(np.uint32)``).
    scales, biases : ``dtype``, (..., N, G)

    Raises
    ------
    TypeError
        If an argument is not an array of the right kind, or ``dtype`` is not a float dtype of its library.
    ValueError
        For shapes that do not fit together at ``bits``, or a group size MLX lacks (it has 32, 64, 128).

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight = np.arange(4 * 8, dtype=np.int32).reshape(4, 8)        # K = 32, N = 8
    >>> qzeros = np.full((1, 1), 0x88888888 - 2**32, dtype=np.int32)   # every z = 8
    >>> w, s, b = packq.gptq_to_mlx(qweight, qzeros, np.full((1, 8), 0.5, np.float16))
    >>> w.shape, bool((w == qweight.T).all()), s.dtype, b[0, 0]
    ((8, 4), True, dtype('float32'), np.float32(-4.0))
    """
    bits = V.bits(bits)
    k = _check_gptq_pair(qweight, qzeros, bits)
    _check_scales(scales, V.shape_of(qzeros)[-2], V.shape_of(qweight)[-1], qweight, "qweight")
    _check_group_size(k, V.shape_of(qzeros)[-2])
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales)
    return be.run(mlx.from_gptq, _words_in(be, qweight), _words_in(be, qzeros), scales, bits=bits, dtype=_mlx_dtype(be, dtype))


def awq_to_mlx(qweight: Array, qzeros: Array, scales: Array, *, dtype: Any = None) -> tuple[Array, Array, Array]:
    """AWQ gemm tensors to MLX's affine (weight, scales, biases): AWQ's interleave undone, then as :func:`gptq_to_mlx`.

    Parameters
    ----------
    qweight : array of int32 or uint32, shape (..., K, N/8)
    qzeros : array of int32 or uint32, shape (..., G, N/8)
    scales : array of float, shape (..., G, N)
    dtype : {"float32", "float16", "bfloat16"} or a dtype, optional
        As for :func:`gptq_to_mlx`; default float32 (exact on every MLX backend).

    Returns
    -------
    weight : int32, (..., N, K/8)
    scales, biases : ``dtype``, (..., N, G)

    Raises
    ------
    TypeError, ValueError
        As :func:`fast_awq_to_gptq` and :func:`gptq_to_mlx` raise them.

    Examples
    --------
    >>> import numpy as np, packq
    >>> qweight = np.full((32, 1), 0x75316420, dtype=np.int32)  # AWQ order of columns 0..7, K = 32
    >>> qzeros = np.full((1, 1), 0x22222222, dtype=np.int32)
    >>> w, s, b = packq.awq_to_mlx(qweight, qzeros, np.full((1, 8), 0.5, np.float16))
    >>> w.shape, [hex(x) for x in w.view(np.uint32)[:3, 0]], b[:3, 0]
    ((8, 4), ['0x0', '0x11111111', '0x22222222'], array([-1., -1., -1.], dtype=float32))
    >>> packq.dequantize_mlx(w, s, b, bits=4)[:3, 0]  # (q - z) * s for q = 0, 1, 2
    array([-1. , -0.5,  0. ], dtype=float32)
    """
    _check_awq_pair(qweight, qzeros, 4)
    w, z = V.shape_of(qweight), V.shape_of(qzeros)
    _check_scales(scales, z[-2], w[-1] * 8, qweight, "qweight")
    _check_group_size(w[-2], z[-2])
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales)
    return be.run(mlx.from_awq, _words_in(be, qweight), _words_in(be, qzeros), scales, dtype=_mlx_dtype(be, dtype))


def compressed_tensors_to_mlx(
    weight_packed: Array, weight_zero_point: Array | None, weight_scale: Array, *, bits: int = 4, dtype: Any = None
) -> tuple[Array, Array, Array]:
    """compressed-tensors ``pack-quantized`` tensors to MLX's affine (weight, scales, biases).

    ``weight_packed`` (N, K*b/32) is already MLX's weight, bit for bit; the zero points
    (N*b/32, G), packed along N, are unpacked and become biases -s * z as in :func:`gptq_to_mlx`.

    Parameters
    ----------
    weight_packed : array of int32 or uint32, shape (..., N, K * bits / 32)
    weight_zero_point : array of int32 or uint32, shape (..., N * bits / 32, G), or None
        None for a symmetric scheme (no zero points stored: every one is 2**(bits-1)).
    weight_scale : array of float, shape (..., N, G)
    bits : {2, 3, 4, 8}
    dtype : {"float32", "float16", "bfloat16"} or a dtype, optional
        As for :func:`gptq_to_mlx`; default float32.

    Returns
    -------
    weight : int32, (..., N, K * bits / 32)
    scales, biases : ``dtype``, (..., N, G)

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong kind or shape, or a group size MLX lacks.

    Examples
    --------
    >>> import numpy as np, packq
    >>> wp = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)   # N = 8, K = 32
    >>> w, s, b = packq.compressed_tensors_to_mlx(wp, None, np.full((8, 1), 0.25, np.float16), dtype="float16")
    >>> bool((w == wp).all()), b.dtype, float(b[0, 0])
    (True, dtype('float16'), -2.0)
    """
    bits = V.bits(bits)
    V.words(weight_packed, "weight_packed")
    V.array(weight_scale, "weight_scale")
    V.floating(weight_scale, "weight_scale")
    wp, ws = V.shape_of(weight_packed), V.shape_of(weight_scale)
    n_values, n_words = B.layout(bits)
    if len(ws) != len(wp) or ws[:-1] != wp[:-1] or wp[-1] % n_words or wp[-2] % n_values:
        raise ValueError(
            f"weight_packed (..., N, K * {bits} / 32) and weight_scale (..., N, G) must share N and their leading "
            f"dimensions, with N a multiple of {n_values} and K * {bits} / 32 of {n_words}, got shapes {wp!r} and {ws!r}"
        )
    k, groups = wp[-1] * n_values // n_words, ws[-1]
    if groups == 0 or k % groups:
        raise ValueError(f"weight_scale must have G columns with G dividing K = {k}, got shape {ws!r}")
    _check_group_size(k, groups)
    if weight_zero_point is not None:
        V.words(weight_zero_point, "weight_zero_point")
        zp = V.shape_of(weight_zero_point)
        if zp != (*wp[:-2], wp[-2] * n_words // n_values, groups):
            raise ValueError(f"weight_zero_point must have shape {(*wp[:-2], wp[-2] * n_words // n_values, groups)!r}, "
                             f"got shape {zp!r}")
    be = backends.for_arrays(weight_packed=weight_packed, weight_zero_point=weight_zero_point, weight_scale=weight_scale)
    zero = None if weight_zero_point is None else _words_in(be, weight_zero_point)
    return be.run(mlx.from_compressed_tensors, _words_in(be, weight_packed), zero, weight_scale, bits=bits,
                  dtype=_mlx_dtype(be, dtype))


def _check_mlx(weight: Array, scales: Array, biases: Array, bits: int) -> tuple[int, int, int]:
    """Check MLX (weight, scales, biases) shapes; return (N, K, G)."""
    V.words(weight, "weight")
    for x, name in ((scales, "scales"), (biases, "biases")):
        V.array(x, name)
        V.floating(x, name)
    w, s, b = V.shape_of(weight), V.shape_of(scales), V.shape_of(biases)
    n_values, n_words = B.layout(bits)
    if s != b or len(s) != len(w) or s[:-1] != w[:-1]:
        raise ValueError(f"scales and biases must both have shape (..., N, G) with weight's (..., N), got shapes "
                         f"{w!r}, {s!r} and {b!r}")
    if w[-1] % n_words:
        raise ValueError(f"weight must have a multiple of {n_words} columns ({_period(bits)}), got shape {w!r}")
    k = w[-1] * n_values // n_words
    if s[-1] == 0 or k % s[-1]:
        raise ValueError(f"scales must have G columns with G dividing K = {k}, got shape {s!r}")
    return w[-2], k, s[-1]


def mlx_to_gptq(weight: Array, scales: Array, biases: Array, *, bits: int = 4, dtype: Any = None) -> tuple[Array, Array, Array]:
    """MLX's affine (weight, scales, biases) back to GPTQ with v2 zeros, where that loses nothing.

    The exact inverse of :func:`gptq_to_mlx`: qweight is weight transposed, and the zero-points are
    z = -biases / scales, which must be integers in [0, 2**bits) such that the biases are exactly
    what :func:`gptq_to_mlx` writes for them; where they are not (MLX's own ``mx.quantize`` writes
    biases that are no multiple of the scales), this raises instead of rounding.

    Parameters
    ----------
    weight : array of int32 or uint32, shape (..., N, K * bits / 32)
    scales, biases : arrays of float, shape (..., N, G)
    bits : {2, 3, 4, 8}
    dtype : {"float32", "float16", "bfloat16"} or a dtype, optional
        The GPTQ scales' dtype; default: the scales' own. Narrowing must be exact.

    Returns
    -------
    qweight : int32, (..., K * bits / 32, N)
    qzeros : int32, (..., G, N * bits / 32)
        v2 zeros; :func:`zeros_v2_to_v1` gives v1.
    scales : ``dtype``, (..., G, N)

    Raises
    ------
    TypeError
        If an argument is not an array of the right kind.
    ValueError
        For shapes that do not fit, or (concrete arrays) biases that are not -scales * z for
        integer zero-points z in [0, 2**bits), or scales that ``dtype`` does not hold exactly.
        Inside ``jax.jit`` the values cannot be read, and are not checked.

    Examples
    --------
    >>> import numpy as np, packq
    >>> rng = np.random.default_rng(0)
    >>> qweight = rng.integers(-2**31, 2**31, (8, 16)).astype(np.int32)  # K = 64, N = 16
    >>> qzeros = rng.integers(-2**31, 2**31, (1, 2)).astype(np.int32)
    >>> scales = rng.random((1, 16)).astype(np.float16)
    >>> back = packq.mlx_to_gptq(*packq.gptq_to_mlx(qweight, qzeros, scales), dtype="float16")
    >>> all(a.tobytes() == b.tobytes() for a, b in zip(back, (qweight, qzeros, scales)))
    True
    """
    bits = V.bits(bits)
    n, k, groups = _check_mlx(weight, scales, biases, bits)
    be = backends.for_arrays(weight=weight, scales=scales, biases=biases)
    out_dtype = _mlx_dtype(be, dtype if dtype is not None else V.dtype_name(scales.dtype))
    qweight, qzeros, gscales = be.run(mlx.to_gptq, _words_in(be, weight), scales, biases, bits=bits, dtype=out_dtype)
    if be.is_concrete(scales) and be.is_concrete(biases):
        xp = be.xp
        z = be.run(mlx.zero_points_of, scales, biases, bits=bits)
        again = be.run(mlx.biases_of, scales, z, dtype=biases.dtype)
        bad = int(xp.sum(xp.astype(again != biases, xp.int32)))
        if bad:
            raise ValueError(
                f"biases must be -scales * z for integer zero-points z in [0, {(1 << bits) - 1}] to convert to GPTQ "
                f"without loss; {bad} of the {n * groups} (row, group) pairs are not"
            )
        # in a narrow dtype two zero-points may round to one bias (bfloat16 at 8 bits): then z is not determined
        ambiguous = 0
        for step in (-1, 1):
            other = xp.clip(z + step, 0, (1 << bits) - 1)
            # (a scale of 0 makes every z alike: (q - z) * 0 is 0 whatever z is, so none is a guess there)
            same = (other != z) & (scales != 0) & (be.run(mlx.biases_of, scales, other, dtype=biases.dtype) == biases)
            ambiguous += int(xp.sum(xp.astype(same, xp.int32)))
        if ambiguous:
            raise ValueError(
                f"biases must determine the zero-points: in {V.dtype_name(biases.dtype)}, {ambiguous} (row, group) "
                "biases are -scales * z for two neighbouring z, so GPTQ's (q - z) * s would be a guess"
            )
        if dtype is not None and V.dtype_name(out_dtype) != V.dtype_name(scales.dtype):
            back = xp.astype(xp.astype(scales, out_dtype), scales.dtype)
            lost = int(xp.sum(xp.astype(back != scales, xp.int32)))
            if lost:
                raise ValueError(f"dtype {V.dtype_name(out_dtype)} must hold the scales exactly; {lost} of them round")
    return qweight, qzeros, gscales


def dequantize_mlx(weight: Any, scales: Any, biases: Any, *, bits: int = 4, arithmetic: str = "cpu") -> Any:
    """MLX's affine weights w = scales * q + biases, computed as MLX computes them on one of its backends (NumPy).

    ``"cpu"`` reproduces mlx's CPU backend bit for bit (``mx.dequantize``, checked against mlx 0.32.4):
    q * scales rounded to the scales' dtype, then + biases, rounded again. ``"metal"`` reproduces what
    mlx's Metal kernels compute (read in mlx's ``quantized.h``): scales * q + biases in float32, rounded
    once to the scales' dtype. With float32 scales and biases the two agree. Count the weights a
    conversion changes by comparing with the source's own dequantization.

    Parameters
    ----------
    weight : NumPy array of int32 or uint32, shape (..., N, K * bits / 32)
    scales, biases : NumPy arrays of float16, bfloat16 (ml_dtypes) or float32, shape (..., N, G)
    bits : {2, 3, 4, 8}
    arithmetic : {"cpu", "metal"}

    Returns
    -------
    NumPy array of the scales' dtype, shape (..., N, K)

    Raises
    ------
    TypeError
        If an argument is not a NumPy array of the right dtype, or scales and biases differ in dtype.
    ValueError
        For shapes that do not fit, or an unknown ``arithmetic``.

    Examples
    --------
    >>> import numpy as np, packq
    >>> w = np.full((1, 4), 0x99999999, dtype=np.uint32)                # K = 32 values q = 9
    >>> s = np.full((1, 1), 0.1, np.float16)                            # 0.0999755859375
    >>> b = -8 * s                                                      # z = 8: -8 * s is exact
    >>> float(s[0, 0])                                                  # (q - z) * s, the source's weight
    0.0999755859375
    >>> float(packq.dequantize_mlx(w, s, b)[0, 0])                      # CPU: 9 * s rounds first
    0.10009765625
    >>> float(packq.dequantize_mlx(w, s, b, arithmetic="metal")[0, 0])  # Metal: float32, rounded once
    0.0999755859375
    >>> float(packq.dequantize_mlx(w, s.astype(np.float32), b.astype(np.float32))[0, 0])  # float32: exact
    0.0999755859375
    """
    import numpy as np

    for x, name in ((weight, "weight"), (scales, "scales"), (biases, "biases")):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array (dequantize_mlx reproduces MLX's arithmetic in NumPy), "
                            f"got {type(x).__name__}")
    bits = V.bits(bits)
    _check_mlx(weight, scales, biases, bits)
    if arithmetic not in mlx.ARITHMETIC:
        raise ValueError(f"arithmetic must be 'cpu' or 'metal', got {arithmetic!r}")
    name = V.dtype_name(scales.dtype)
    if V.dtype_name(biases.dtype) != name:
        raise TypeError(f"scales and biases must have the same dtype (MLX computes in it), got {name} and "
                        f"{V.dtype_name(biases.dtype)}")
    be = backends.for_arrays(weight=weight)
    q = np.asarray(be.run(B.unpack, _words_in(be, weight), direction="column", bits=bits)).astype(np.int16)
    if name == "bfloat16":  # widened through the bits: no ml_dtypes arithmetic needed
        def wide(x: np.ndarray) -> np.ndarray:
            return (x.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)

        w = mlx.dequantize(q, wide(scales), wide(biases), name, arithmetic)
        return (w.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(scales.dtype)
    return mlx.dequantize(q, scales, biases, name, arithmetic)
