"""GGUF (llama.cpp) block types from integer weights, exactly: Q4_0, Q5_0, Q8_0 blocks and F16/BF16/F32.

A quantized module stores integer codes ``q`` (..., K, N), zero-points ``z`` and scales ``s``
(..., G, N), and means ``w = s * (q - z)`` per (group, output column). GGUF stores a Linear
weight as ne = [K, N]: rows of K input features per output column, cut into blocks of 32
consecutive weights, each with one fp16 scale ``d``, which ggml widens to fp32 and multiplies by
the block's integer (ggml-quants.c ``dequantize_row_*``):

======  =====  ==================================  =====================
type    bytes  fields, in order                    value
======  =====  ==================================  =====================
Q4_0    18     d (fp16), qs[16]                    d * (nibble - 8)
Q5_0    22     d (fp16), qh[4], qs[16]             d * (5-bit - 16)
Q8_0    34     d (fp16), qs[32] (int8)             d * qs
======  =====  ==================================  =====================

Byte j of ``qs`` holds weight j in its low nibble and weight j + 16 in its high nibble; bit j of
the little-endian 32-bit ``qh`` is weight j's fifth bit. With ``d = s`` and the block's integers
``q - z`` (plus the type's offset) the block holds the weights exactly: ggml's fp32 product
``fp32(d) * (q - z)`` is then the same IEEE operation as the source's ``fp32(s) * (q - z)``. A
block is *exact* in a type when its 32 weights share one scale (bit for bit: contiguous groups of
a multiple of 32, no act-order), that scale is an fp16 value, and every ``q - z`` of the block is
in the type's range: [-8, 7] for Q4_0 (every 2- and 3-bit group, 4-bit where z = 8), [-16, 15]
for Q5_0 (every 4-bit group), [-128, 127] for Q8_0 (every 2-, 3-, 4-bit group, symmetric 8-bit).

F32 holds the product itself (one rounding, none at all for fp16 and bf16 scales); F16 and BF16
hold it rounded once to nearest even, which is what AWQ/GPTQ engines compute in fp16 (or bf16).

Layers: the integer work (differences ``q - z`` in GGUF's orientation, their per-block range, the
nibble, fifth-bit and int8 bytes) is array-API code (``xp`` first; NumPy, JAX, torch and
array_api_strict run it and share golden fixtures); the float work (which scales are fp16, the
``d`` bytes, F16/BF16 rounding) and the assembly of block bytes are NumPy, in the public functions
below. :func:`dequantize` is ggml's dequantization in NumPy, for ``--verify``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from packq.core.bits import Array, Namespace

#: weights in one block of every quantized type here
BLOCK = 32


@dataclass(frozen=True)
class GGMLType:
    """One GGUF tensor type packq writes: its ggml enum value and layout."""

    name: str
    ggml: int  #: ``enum ggml_type`` (gguf-py ``GGMLQuantizationType``)
    weights: int  #: weights per block (1 for the float types)
    nbytes: int  #: bytes per block
    offset: int = 0  #: stored integer = q - z + offset (quantized types)
    lo: int = 0  #: the range of q - z a block holds
    hi: int = 0

    @property
    def quantized(self) -> bool:
        return self.weights == BLOCK

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.weights


TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in [
        GGMLType("Q4_0", 2, BLOCK, 18, 8, -8, 7),
        GGMLType("Q5_0", 6, BLOCK, 22, 16, -16, 15),
        GGMLType("Q8_0", 8, BLOCK, 34, 0, -128, 127),
        GGMLType("F16", 1, 1, 2),
        GGMLType("BF16", 30, 1, 2),
        GGMLType("F32", 0, 1, 4),
    ]
}
#: the quantized types, smallest first: ``auto`` gives a tensor the first that holds it exactly
QUANTIZED = ("Q4_0", "Q5_0", "Q8_0")
FLOATS = ("F16", "BF16", "F32")
BY_GGML = {t.ggml: t for t in TYPES.values()}


# ---------------------------------------------------------------- array-API core (xp first)
def differences(xp: Namespace, q: Array, z: Array, g_idx: Array) -> Array:
    """``q - z`` per weight as int16, in GGUF's orientation (..., N, K): row n holds output column n's K weights.

    ``q`` (..., K, N) and ``z`` (..., G, N) are integers; ``g_idx`` (K,) gives each input feature's
    group (``arange(K) // group_size`` without act-order).
    """
    zk = xp.take(xp.astype(z, xp.int16), xp.astype(g_idx, xp.int32), axis=-2)
    v = xp.astype(q, xp.int16) - zk
    n = v.ndim
    return xp.permute_dims(v, (*range(n - 2), n - 1, n - 2))


def _blocks(xp: Namespace, v: Array) -> Array:
    *lead, n, k = v.shape
    return xp.reshape(v, (*lead, n, k // BLOCK, BLOCK))


def block_bounds(xp: Namespace, v: Array) -> tuple[Array, Array]:
    """The smallest and largest ``q - z`` of every block of 32: two (..., N, K/32) arrays."""
    b = _blocks(xp, v)
    return xp.min(b, axis=-1), xp.max(b, axis=-1)


def block_integers(xp: Namespace, v: Array, gguf_type: str) -> Array:
    """The integer bytes of every block after its ``d``: uint8 (..., N, K/32, nbytes - 2).

    Q4_0: ``qs[16]``; Q5_0: ``qh[4]`` then ``qs[16]``; Q8_0: ``qs[32]`` (int8 as two's complement).
    Values outside the type's range are clipped (the caller counts them: such a block is not exact).
    """
    t = TYPES[gguf_type]
    c = xp.clip(_blocks(xp, v), t.lo, t.hi) + t.offset  # int16, in [0, 15], [0, 31] or [-128, 127]
    if gguf_type == "Q8_0":
        return xp.astype(xp.bitwise_and(c, 0xFF), xp.uint8)
    c = xp.astype(c, xp.uint8)
    low = xp.bitwise_and(c, 0x0F)
    qs = xp.bitwise_or(low[..., :16], xp.bitwise_left_shift(low[..., 16:], 4))
    if gguf_type == "Q4_0":
        return qs
    # the fifth bits: bit j of the little-endian word qh is weight j's, so byte b holds weights 8b..8b+7
    h = xp.bitwise_and(xp.bitwise_right_shift(c, 4), 1)
    h = xp.reshape(h, (*h.shape[:-1], 4, 8))
    qh = h[..., 0]
    for i in range(1, 8):
        qh = xp.bitwise_or(qh, xp.bitwise_left_shift(h[..., i], i))
    return xp.concat([qh, qs], axis=-1)


# ---------------------------------------------------------------- NumPy: scales, bytes, ggml's reading
def _check(q: Any, z: Any, scales: Any, g_idx: Any) -> np.ndarray:
    """Argument checks of the public functions; the g_idx to use (trivial when None)."""
    for name, a in (("q", q), ("z", z), ("scales", scales)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    for name, a in (("q", q), ("z", z)):
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got {a.dtype}")
    if scales.dtype not in (np.float16, np.float32):
        raise TypeError(f"scales must be float16 or float32 (bfloat16 widened to float32), got {scales.dtype}")
    if q.ndim < 2 or z.ndim != q.ndim or scales.shape != z.shape or z.shape[:-2] != q.shape[:-2] \
            or z.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be (..., K, N) and z, scales (..., G, N) alike, got q {q.shape}, z {z.shape}, "
                         f"scales {scales.shape}")
    k, groups = q.shape[-2], z.shape[-2]
    if k % BLOCK or 0 in q.shape:
        raise ValueError(f"q's K (its axis -2) must be a positive multiple of {BLOCK} (GGUF blocks), got shape {q.shape}")
    if g_idx is None:
        if groups == 0 or k % groups:
            raise ValueError(f"z has {groups} groups, which do not divide K = {k}")
        return np.arange(k, dtype=np.int32) // (k // groups)
    g_idx = np.asarray(g_idx)
    if g_idx.shape != (k,) or g_idx.dtype.kind not in "iu":
        raise ValueError(f"g_idx must be ({k},) integers, got {g_idx.shape} {g_idx.dtype}")
    if k and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise ValueError(f"g_idx must hold groups in [0, {groups}), got values in [{g_idx.min()}, {g_idx.max()}]")
    return g_idx.astype(np.int32)


def _xp() -> Any:
    import array_api_compat.numpy as xp  # NumPy's array-API namespace, what packq's NumPy backend runs the core in

    return xp


def _scale_bits(scales: np.ndarray, g_idx: np.ndarray, nk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block (..., N, K/32): the fp32 bits of its scale (its first weight's), and whether all 32 share it."""
    s32 = np.ascontiguousarray(scales, dtype=np.float32).view(np.uint32)
    first = np.ascontiguousarray(np.swapaxes(np.take(s32, g_idx[::BLOCK], axis=-2), -1, -2))  # (..., N, K/32)
    contiguous = np.array_equal(g_idx, np.arange(nk) // (nk // scales.shape[-2])) and (nk // scales.shape[-2]) % BLOCK == 0
    if contiguous:  # every block inside one group: one scale by construction
        return first, np.ones(first.shape, dtype=bool)
    every = np.swapaxes(np.take(s32, g_idx, axis=-2), -1, -2)  # (..., N, K)
    every = every.reshape(*every.shape[:-1], nk // BLOCK, BLOCK)
    return first, np.all(every == first[..., None], axis=-1)


def block_scales(scales: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """Every block's ``d``: the fp16 rounding of its first weight's scale, as uint16 bits (..., N, K/32).

    ``g_idx`` (K,) gives each input feature's group (as :func:`_check` returns it).

    Examples
    --------
    >>> import numpy as np
    >>> hex(block_scales(np.full((1, 1), 0.25, np.float32), np.zeros(32, np.int32))[0, 0])
    '0x3400'
    """
    s_bits, _ = _scale_bits(scales, g_idx, g_idx.shape[0])
    with np.errstate(over="ignore"):
        return s_bits.view(np.float32).astype(np.float16).view(np.uint16)


def fp16_exact(scales: np.ndarray) -> np.ndarray:
    """Whether each scale is an fp16 value (so that a block's fp16 ``d`` can be it), compared bit for bit.

    Parameters
    ----------
    scales : ndarray of float16 or float32
        bfloat16 scales widened to float32 (which holds them exactly).

    Returns
    -------
    ndarray of bool, the shape of ``scales``

    Examples
    --------
    >>> import numpy as np
    >>> fp16_exact(np.array([0.5, 1 / 3, 2.0**-24, 2.0**-25, 70000.0], dtype=np.float32))
    array([ True, False,  True, False, False])
    """
    if scales.dtype == np.float16:
        return np.ones(scales.shape, dtype=bool)
    s = np.asarray(scales, dtype=np.float32)
    with np.errstate(over="ignore"):
        back = s.astype(np.float16).astype(np.float32)
    return back.view(np.uint32) == s.view(np.uint32)


def product(q: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None = None) -> np.ndarray:
    """The source's exact weights ``fp32(s) * (q - z)`` in GGUF's orientation (..., N, K), float32.

    One IEEE multiplication per weight: exact for fp16 and bfloat16 scales (an 11- or 8-bit
    significand times an integer of at most 9 bits), rounded once for float32 scales. This is
    what a GGUF tensor must dequantize to, bit for bit.

    Parameters
    ----------
    q : ndarray of integers, shape (..., K, N)
        The integer codes, as unpacked from qweight.
    z : ndarray of integers, shape (..., G, N)
        The zero-points (GPTQ v1 already read as its producer wrote it).
    scales : ndarray of float16 or float32, shape (..., G, N)
    g_idx : ndarray of integers, shape (K,), optional
        Each input feature's group; default ``arange(K) // (K // G)``.

    Returns
    -------
    ndarray of float32, shape (..., N, K)

    Examples
    --------
    >>> import numpy as np
    >>> q = np.arange(32).reshape(32, 1) % 16
    >>> w = product(q, np.full((1, 1), 8), np.full((1, 1), 0.5, dtype=np.float16))
    >>> w.shape, w[0, :3].tolist(), w[0, 15]
    ((1, 32), [-4.0, -3.5, -3.0], np.float32(3.5))
    """
    g = _check(q, z, scales, g_idx)
    v = differences(_xp(), q, z, g).astype(np.float32)
    s = np.swapaxes(np.take(scales.astype(np.float32), g, axis=-2), -1, -2)
    return s * v


@dataclass
class Census:
    """How many blocks of a module (or a model) each quantized type holds exactly, and what rounding costs.

    ``blocks`` and ``exact[type]`` count blocks of 32 weights; ``weights`` counts weights, and
    ``rounded[type]`` the weights that F16 or BF16 rounding changes (F32 changes none); ``max_error[type]`` the
    largest weight error that rounding makes, where the census found it (None: not counted). Censuses add.
    """

    blocks: int = 0
    weights: int = 0
    exact: dict[str, int] = field(default_factory=lambda: dict.fromkeys(QUANTIZED, 0))
    rounded: dict[str, int] = field(default_factory=lambda: {"F16": 0, "BF16": 0})
    max_error: dict[str, float] | None = None

    def __add__(self, other: Census) -> Census:
        worst = None
        if self.max_error is not None and other.max_error is not None:
            worst = {t: max(self.max_error[t], other.max_error[t]) for t in self.max_error}
        elif not self.blocks or not other.blocks:  # an empty census knows its (no) errors
            worst = self.max_error if not other.blocks else other.max_error
        return Census(self.blocks + other.blocks, self.weights + other.weights,
                      {t: self.exact[t] + other.exact[t] for t in QUANTIZED},
                      {t: self.rounded[t] + other.rounded[t] for t in self.rounded}, worst)

    def holds(self, gguf_type: str) -> bool:
        """Whether ``gguf_type`` holds every weight counted exactly."""
        if gguf_type == "F32":
            return True
        if gguf_type in self.rounded:
            return self.rounded[gguf_type] == 0
        return self.exact[gguf_type] == self.blocks

    def smallest(self) -> str | None:
        """The smallest quantized type that holds every block exactly, or None."""
        return next((t for t in QUANTIZED if self.holds(t)), None)

    def not_exact(self, gguf_type: str) -> int:
        """Blocks (quantized types) or weights (F16, BF16) that ``gguf_type`` does not hold exactly."""
        if gguf_type == "F32":
            return 0
        if gguf_type in self.rounded:
            return self.rounded[gguf_type]
        return self.blocks - self.exact[gguf_type]


def census(q: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None = None, *,
           rounding: bool = True) -> Census:
    """Which GGUF types hold a module's weights exactly: exact blocks per quantized type, weights F16/BF16 round.

    Parameters
    ----------
    q, z, scales, g_idx
        As for :func:`product`.
    rounding : bool
        Count the weights F16 and BF16 rounding changes (most of the cost); without it they count 0.

    Returns
    -------
    Census

    Examples
    --------
    Asymmetric 4-bit (zero-points 3): Q5_0 and Q8_0 hold it, Q4_0 not (q - z reaches 12):

    >>> import numpy as np
    >>> q = np.arange(64).reshape(64, 1) % 16
    >>> c = census(q, np.full((1, 1), 3), np.full((1, 1), 0.1, dtype=np.float16))
    >>> c.blocks, c.exact, c.smallest()
    (2, {'Q4_0': 0, 'Q5_0': 2, 'Q8_0': 2}, 'Q5_0')
    >>> c.rounded["F16"] > 0, c.holds("F32")
    (True, True)
    """
    g = _check(q, z, scales, g_idx)
    xp = _xp()
    k, groups = q.shape[-2], z.shape[-2]
    size = k // groups
    if (q.dtype == np.uint8 and size % BLOCK == 0 and rounding is False and z.size
            and np.array_equal(g, np.arange(k) // size) and 0 <= z.min() and z.max() < 256):
        # every block inside one group, so one zero-point: its bounds are the codes' bounds less it (no int16
        # array of every difference; codes and zero-points in [0, 256): no int16 wrap-around, as differences has)
        b = q.reshape(*q.shape[:-2], k // BLOCK, BLOCK, q.shape[-1])
        return census_of_bounds(b.min(axis=-2), b.max(axis=-2), z, scales)
    v = differences(xp, q, z, g)
    lo, hi = block_bounds(xp, v)
    s_bits, uniform = _scale_bits(scales, g, q.shape[-2])
    ok = uniform & fp16_exact(s_bits.view(np.float32))
    exact = {t: int(np.count_nonzero(ok & (lo >= TYPES[t].lo) & (hi <= TYPES[t].hi))) for t in QUANTIZED}
    rounded = {"F16": 0, "BF16": 0}
    if rounding:
        w = np.swapaxes(np.take(scales.astype(np.float32), g, axis=-2), -1, -2) * v.astype(np.float32)
        rounded = {"F16": _changed(w, "F16"), "BF16": _changed(w, "BF16")}
    return Census(int(lo.size), int(q.size), exact, rounded)


def rounding_by_histogram(z: np.ndarray, scales: np.ndarray, hist: np.ndarray) -> tuple[dict[str, int], dict[str, float]]:
    """What F16 and BF16 rounding does to a module given how often each code is in each (group, column): the weights
    each changes (:class:`Census`'s ``rounded``) and the largest weight error each makes, from the ``levels``
    products of every (group, column) instead of every weight's (the same products, so the same counts and maxima).

    Parameters
    ----------
    z : ndarray of integers in [0, levels), shape (G, N)
    scales : ndarray of float16 or float32, shape (G, N)
    hist : ndarray of integers, shape (G, N, levels)
        How many weights of each (group, column) have each code.

    Returns
    -------
    (dict, dict)
        Weights changed, and the largest |error| (0.0 where none is finite), by "F16" and "BF16".

    Examples
    --------
    Five weights of code 3 and two of code 9 (z = 8): ``-5 * s`` needs more than fp16's 11 bits, ``1 * s`` is ``s``:

    >>> import numpy as np
    >>> hist = np.zeros((1, 1, 16), np.int64); hist[0, 0, [3, 9]] = [5, 2]
    >>> rounding_by_histogram(np.full((1, 1), 8), np.full((1, 1), 0.1, np.float16), hist)[0]
    {'F16': 5, 'BF16': 7}
    """
    levels = hist.shape[-1]
    diffs = (np.arange(levels)[None, :] - np.arange(levels)[:, None]).astype(np.float32)  # row z: q - z for every q
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.take(diffs, np.asarray(z, np.intp), axis=0) * scales.astype(np.float32)[..., None]
    # in place, in one buffer: every fresh array of (G, N, levels) costs page faults as large as its work
    absent = hist <= 0
    bits = w.view(np.uint32)
    buf = np.empty_like(bits)
    got = buf.view(np.float32)
    changed = np.empty(bits.shape, bool)
    counts: dict[str, int] = {}
    errors: dict[str, float] = {}
    for t in ("BF16", "F16"):
        if t == "BF16":  # ggml's fp32_to_bf16 (uint32 arithmetic; NaNs' weights are NaN whatever it gives them),
            np.not_equal(np.bitwise_and(bits, np.uint32(0xFFFF), out=buf), 0, out=changed)  # widened back
            _bf16_rounded(bits, buf)
        else:
            with np.errstate(over="ignore"):
                np.copyto(got, w.astype(np.float16))
            np.not_equal(buf, bits, out=changed)
        counts[t] = int(np.sum(hist, where=changed))
        # |got - w| in float32 is exact: a rounding to the nearest value lies within a factor of 2 of w, or is 0,
        # or overflows to an infinity (Sterbenz), so float64 (which this once was) gives the same values. NaNs
        # (NaN scales, inf - inf) are passed over; codes no weight has count for nothing (-1, below every error)
        with np.errstate(invalid="ignore"):
            np.subtract(got, w, out=got)
        np.abs(got, out=got)
        got[absent] = -1
        worst = float(np.fmax.reduce(got, axis=None))  # NaN only where every entry is
        errors[t] = worst if worst > 0 else 0.0
    order = ("F16", "BF16")  # the census's order
    return {t: counts[t] for t in order}, {t: errors[t] for t in order}


def census_of_bounds(qmin: np.ndarray, qmax: np.ndarray, z: np.ndarray, scales: np.ndarray) -> Census:
    """:func:`census` (without the roundings) from the smallest and largest code of every block, (..., K/32, N), for
    groups of consecutive input features, each a multiple of 32 (every block in one group, so of one zero-point
    and scale); codes and zero-points in [0, 256).

    Examples
    --------
    >>> import numpy as np
    >>> c = census_of_bounds(np.array([[0]]), np.array([[15]]), np.full((1, 1), 3), np.full((1, 1), 0.1, np.float16))
    >>> c.blocks, c.exact
    (1, {'Q4_0': 0, 'Q5_0': 1, 'Q8_0': 1})
    """
    nb, groups = qmin.shape[-2], z.shape[-2]
    if qmax.shape != qmin.shape or z.shape != scales.shape or z.shape[:-2] != qmin.shape[:-2] \
            or z.shape[-1] != qmin.shape[-1] or not groups or nb % groups:
        raise ValueError(f"qmin, qmax (..., K/32, N) and z, scales (..., G, N) disagree: {qmin.shape}, {qmax.shape}, "
                         f"{z.shape}, {scales.shape}")
    # counted in the bounds' own orientation (..., K/32, N): no transposed copies; every block lies in one group, so
    # it shares that group's scale, and is exact where the scale is an fp16 value and its differences in range
    zb = np.repeat(z.astype(np.int16), nb // groups, axis=-2)
    lo = qmin.astype(np.int16) - zb
    hi = qmax.astype(np.int16) - zb
    fp16 = fp16_exact(scales)
    ok = None if fp16.all() else np.repeat(fp16, nb // groups, axis=-2)
    exact = {}
    for t in QUANTIZED:
        inside = (lo >= TYPES[t].lo) & (hi <= TYPES[t].hi)
        exact[t] = int(np.count_nonzero(inside if ok is None else inside & ok))
    return Census(int(lo.size), int(lo.size) * BLOCK, exact, {"F16": 0, "BF16": 0})


def _changed(w: np.ndarray, gguf_type: str) -> int:
    """How many float32 values one rounding to ``gguf_type`` changes (bit for bit, NaN and signed zeros included)."""
    bits = w.view(np.uint32)
    if gguf_type == "BF16":  # round to nearest even keeps exactly the values whose low 16 bits are 0
        return int(np.count_nonzero(bits & np.uint32(0xFFFF)))
    with np.errstate(over="ignore"):
        back = w.astype(np.float16).astype(np.float32)
    return int(np.count_nonzero(back.view(np.uint32) != bits))


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 values rounded once to bfloat16 (nearest even; NaN kept quiet), as uint16 bits: ggml's ``fp32_to_bf16``.

    Examples
    --------
    >>> import numpy as np
    >>> [hex(b) for b in bf16_bits(np.array([1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8], dtype=np.float32))]
    ['0x3f80', '0x3f80', '0x3f82']
    """
    n = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (_bf16_rounded(n, np.empty_like(n)) >> np.uint32(16)).astype(np.uint16)
    return np.where(nan, ((n >> np.uint32(16)) | np.uint32(64)).astype(np.uint16), rounded)


def _bf16_rounded(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 ``bits`` (uint32) rounded to bfloat16's (nearest even) as ggml's ``fp32_to_bf16`` adds, in uint32: the
    kept high half, the low half 0, into ``out``. Only NaNs (whose sum can wrap) come out wrong: callers set them."""
    np.right_shift(bits, np.uint32(16), out=out)
    out &= np.uint32(1)
    out += np.uint32(0x7FFF)
    out += bits
    out &= np.uint32(0xFFFF0000)
    return out


def encode_floats(w: np.ndarray, gguf_type: str) -> np.ndarray:
    """float32 weights as the bytes of a GGUF F32, F16 or BF16 tensor (uint8, last axis times the item size).

    Examples
    --------
    >>> import numpy as np
    >>> encode_floats(np.array([[1.0, -2.0]], dtype=np.float32), "F16").tolist()
    [[0, 60, 0, 192]]
    """
    if gguf_type == "F32":
        out = np.ascontiguousarray(w, dtype="<f4")
    elif gguf_type == "F16":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(w, dtype=np.float32).astype("<f2")
    elif gguf_type == "BF16":
        out = bf16_bits(w).astype("<u2")
    else:
        raise ValueError(f"gguf_type must be one of {', '.join(FLOATS)} here, got {gguf_type!r}")
    return out.view(np.uint8).reshape(*w.shape[:-1], -1)


def encode(q: np.ndarray, z: np.ndarray, scales: np.ndarray, gguf_type: str, g_idx: np.ndarray | None = None,
           backend: Any = None) -> np.ndarray:
    """A module's weights as the data of one GGUF tensor of ``gguf_type``: uint8 (..., N, bytes per row).

    Quantized types: each block of 32 input features of an output row gets ``d`` = its scale as fp16
    and its integers ``q - z`` (plus the type's offset). Where a block is not exact (see
    :func:`census`) ``d`` is the fp16 rounding of its first weight's scale and the integers are
    clipped: check with :func:`census` first. Float types hold :func:`product`, F16 and BF16 rounded
    once to nearest even. The rows follow each other, and leading (expert) dimensions lead: the
    bytes are the tensor's data with ne = [K, N, ...], in file order.

    Parameters
    ----------
    q, z, scales, g_idx
        As for :func:`product`.
    gguf_type : {"Q4_0", "Q5_0", "Q8_0", "F16", "BF16", "F32"}
    backend : packq backend, optional
        A :class:`packq.backends.Backend` to run the integer work on (default: NumPy, directly); its
        results are brought back to NumPy.

    Returns
    -------
    ndarray of uint8, shape (..., N, K // 32 * block bytes) or (..., N, K * item size)

    Raises
    ------
    TypeError, ValueError
        For arrays of the wrong kind, dtype or shape, or an unknown type.

    Examples
    --------
    Symmetric 4-bit (z = 8) as Q4_0: ``d`` = 0.25 (fp16 0x3400), then the nibbles:

    >>> import numpy as np
    >>> q = (np.arange(32) % 16).reshape(32, 1)
    >>> b = encode(q, np.full((1, 1), 8), np.full((1, 1), 0.25, dtype=np.float16), "Q4_0")
    >>> b.shape, b[0, :2].view("<u2")[0] == 0x3400, b[0, 2:6].tolist()
    ((1, 18), np.True_, [0, 17, 34, 51])
    >>> bool((dequantize(b, "Q4_0", (1, 32)) == product(q, np.full((1, 1), 8), np.full((1, 1), 0.25, np.float16))).all())
    True
    """
    if gguf_type not in TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(TYPES)}, got {gguf_type!r}")
    g = _check(q, z, scales, g_idx)
    t = TYPES[gguf_type]
    if not t.quantized:
        return encode_floats(product(q, z, scales, g), gguf_type)
    if backend is None:  # NumPy
        xp = _xp()
        ints = np.asarray(block_integers(xp, differences(xp, q, z, g), gguf_type))
    else:
        v = backend.run(differences, backend.xp.asarray(q), backend.xp.asarray(z), backend.xp.asarray(g))
        ints = np.asarray(backend.run(block_integers, v, gguf_type=gguf_type))
    d = block_scales(scales, g).astype("<u2").view(np.uint8).reshape(*ints.shape[:-1], 2)
    blocks = np.concatenate([d, ints], axis=-1)  # (..., N, K/32, nbytes)
    return blocks.reshape(*blocks.shape[:-2], -1)


def dequantize(data: np.ndarray, gguf_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor's data dequantized as ggml does (``dequantize_row_*``): fp32(d) times the block's integer.

    Parameters
    ----------
    data : ndarray of uint8
        The tensor's bytes (any shape; read in order).
    gguf_type : {"Q4_0", "Q5_0", "Q8_0", "F16", "BF16", "F32"}
    shape : tuple of int
        The tensor's shape in NumPy order, the row (ne[0]) last: (..., N, K).

    Returns
    -------
    ndarray of float32, of ``shape``

    Examples
    --------
    A Q8_0 block with d = 1.0 (fp16 0x3C00) and integers -16..15:

    >>> import numpy as np
    >>> block = np.concatenate([np.array([0x00, 0x3C], np.uint8), np.arange(-16, 16).astype(np.int8).view(np.uint8)])
    >>> dequantize(block, "Q8_0", (32,))[:4].tolist()
    [-16.0, -15.0, -14.0, -13.0]
    """
    if gguf_type not in TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(TYPES)}, got {gguf_type!r}")
    t = TYPES[gguf_type]
    flat = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    count = int(np.prod(shape))
    if shape[-1] % t.weights or flat.size != count // t.weights * t.nbytes:
        raise ValueError(f"data holds {flat.size} bytes; {gguf_type} of shape {tuple(shape)} takes "
                         f"{count // t.weights * t.nbytes}")
    if gguf_type == "F32":
        return flat.view("<f4").astype(np.float32).reshape(shape)
    if gguf_type == "F16":
        return flat.view("<f2").astype(np.float32).reshape(shape)
    if gguf_type == "BF16":
        return (flat.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    blocks = flat.reshape(-1, t.nbytes)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    if gguf_type == "Q8_0":
        ints = blocks[:, 2:].view(np.int8).astype(np.int32)
    else:
        qs = blocks[:, -16:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)
        if gguf_type == "Q5_0":
            qh = blocks[:, 2:6].copy().view("<u4").astype(np.uint32)  # (blocks, 1)
            low |= (((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)) << np.uint32(4)).astype(np.int32)
        ints = low - t.offset
    # ggml: y = x * d with x the integer converted to float: one fp32 multiplication
    return (ints.astype(np.float32) * d).reshape(shape)


def row_bytes(gguf_type: str, k: int) -> int:
    """Bytes of one row of ``k`` weights (ne[0] = k) in ``gguf_type``.

    Examples
    --------
    >>> row_bytes("Q4_0", 4096), row_bytes("Q8_0", 4096), row_bytes("BF16", 4096)
    (2304, 4352, 8192)
    """
    t = TYPES[gguf_type]
    return k // t.weights * t.nbytes
