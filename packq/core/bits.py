"""Bit packing written once against the Python array API standard.

Every function here takes the array namespace ``xp`` first and uses only
standard operations (reshape, slicing, stack, take, shifts, and/or/xor), with
no in-place writes and no data-dependent shapes, so that a single ``jax.jit``
covers it and NumPy, torch and array_api_strict run it unchanged.

Words are int32 throughout: the standard has no bit-cast, and torch cannot
shift uint32 on the CPU. Right shifts of int32 are arithmetic (they copy the
sign bit), so every right shift here is followed by a mask; left shifts wrap,
and words are combined with OR, never with a sum (which would overflow or
promote). Callers bit-cast uint32 input to int32 before calling in.

Nothing here validates: the public layer (``packq._api``) checks shapes,
dtypes and values before any of this runs.
"""

from __future__ import annotations

from math import gcd
from typing import Any

Array = Any
Namespace = Any

#: axis of the matrix that a direction packs: "column" packs along the last
#: axis (consecutive columns share a word), "row" along the one before it.
AXIS = {"column": -1, "row": -2}


def layout(bits: int) -> tuple[int, int]:
    """Values and words in one packing period: (32/bits, 1), or (32, 3) at 3 bits."""
    words = bits // gcd(bits, 32)
    return 32 * words // bits, words


def split(xp: Namespace, x: Array, axis: int, n: int) -> Array:
    """Reshape axis ``axis`` (-1 or -2) of ``x`` into (length // n, n)."""
    *lead, r, c = x.shape
    shape = (r, c // n, n) if axis == -1 else (r // n, n, c)
    return xp.reshape(x, (*lead, *shape))


def merge(xp: Namespace, x: Array, axis: int) -> Array:
    """Undo :func:`split`: fold the group axis back into the matrix axis."""
    if axis == -1:
        *lead, r, g, n = x.shape
        return xp.reshape(x, (*lead, r, g * n))
    *lead, g, n, c = x.shape
    return xp.reshape(x, (*lead, g * n, c))


def member(x: Array, axis: int, i: int) -> Array:
    """Member ``i`` of every group of a split array (groups on ``axis - 1``)."""
    return x[..., i] if axis == -1 else x[..., i, :]


def stack(xp: Namespace, parts: list[Array], axis: int) -> Array:
    """Stack group members back into a split array."""
    return xp.stack(parts, axis=axis)


def fields(bits: int) -> list[list[tuple[int, int]]]:
    """For each value of a period, the (word, shift) pairs its bits touch.

    A value whose bits straddle two words (3-bit packing) has two entries:
    a non-negative shift in the first word and a negative one, meaning
    "the rest comes from the low bits of the next word", in the second.
    """
    n_values, _ = layout(bits)
    out = []
    for i in range(n_values):
        start = bits * i
        word, shift = divmod(start, 32)
        parts = [(word, shift)]
        if shift + bits > 32:
            parts.append((word + 1, shift - 32))
        out.append(parts)
    return out


def unpack(xp: Namespace, words: Array, direction: str, bits: int) -> Array:
    """int32 words to int32 values in [0, 2**bits), packed axis expanded."""
    axis = AXIS[direction]
    n_values, n_words = layout(bits)
    mask = (1 << bits) - 1
    w = split(xp, words, axis, n_words)
    word = [member(w, axis, j) for j in range(n_words)]
    values = []
    for parts in fields(bits):
        v = None
        for j, shift in parts:
            if shift < 0:  # the high part of a value that began in the previous word
                piece = word[j] << -shift
            else:  # mask now: the arithmetic shift may have copied the sign bit down
                piece = (word[j] >> shift) & ((1 << min(bits, 32 - shift)) - 1)
            v = piece if v is None else v | piece
        assert v is not None
        values.append(v & mask)
    return merge(xp, stack(xp, values, axis), axis)


def pack(xp: Namespace, values: Array, direction: str, bits: int) -> Array:
    """Integer values to int32 words; only the low ``bits`` bits of each value are kept."""
    axis = AXIS[direction]
    n_values, n_words = layout(bits)
    mask = (1 << bits) - 1
    v = xp.astype(split(xp, values, axis, n_values), xp.int32) & mask
    words: list[Array | None] = [None] * n_words
    for i, parts in enumerate(fields(bits)):
        vi = member(v, axis, i)
        for j, shift in parts:
            # left shifts drop what passes bit 31; the right shift keeps what the
            # previous word could not hold (vi is masked, so it cannot sign-extend)
            piece = vi << shift if shift >= 0 else vi >> -shift
            words[j] = piece if words[j] is None else words[j] | piece
    return merge(xp, stack(xp, words, axis), axis)


def unpack_as(xp: Namespace, words: Array, direction: str, bits: int, dtype: Any, wrap: bool) -> Array:
    """:func:`unpack` cast to ``dtype``; ``wrap`` reads each field as two's complement."""
    v = unpack(xp, words, direction, bits)
    if wrap:
        v = v - ((v >> (bits - 1)) << bits)
    return xp.astype(v, dtype)


def apply_order(xp: Namespace, x: Array, direction: str, order: tuple[int, ...]) -> Array:
    """Within every group of ``len(order)`` along the direction's axis, take member order[s] to slot s."""
    axis = AXIS[direction]
    g = split(xp, x, axis, len(order))
    return merge(xp, stack(xp, [member(g, axis, s) for s in order], axis), axis)


def count_fields(xp: Namespace, words: Array, value: int, bits: int = 4) -> Array:
    """How many ``bits``-wide fields of column-packed words equal ``value`` (a 0-d int32 array)."""
    return xp.sum(xp.astype(unpack(xp, words, "column", bits) == value, xp.int32))


def nibbles_add(xp: Namespace, words: Array, delta: int, bits: int, direction: str = "column") -> Array:
    """Add ``delta`` to every field of packed words, modulo 2**bits, field by field.

    Never a whole-word add: a field at 0 minus 1 must become the field's maximum
    without borrowing from its neighbour.
    """
    return pack(xp, unpack(xp, words, direction, bits) + delta, direction, bits)
