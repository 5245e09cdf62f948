"""GGUF's whole-word path (``gguf_blocks_awq_words``: AWQ words -> compressed-tensors rows -> block bytes by bit
operations in byte lanes, no numba) writes the array-API encoder's bytes, and the symmetric census shortcut (no pass
over the words) is the census of the codes; each with a negative control."""

from __future__ import annotations

import numpy as np
import pytest
from _paths import ROUTES, route
from hypothesis import given
from hypothesis import strategies as st

from packq.backends import numpy as numpy_backend
from packq.backends.numpy import BACKEND
from packq.formats import awq
from packq.formats import gguf as G

KS = (32, 64, 128, 256, 512)
WORD_COLUMNS = (1, 2, 3, 8, 17)
#: float16 extremes among the scales: the largest finite, the smallest normal and subnormal, infinities, NaN, -0
EXTREMES = np.array([65504.0, -65504.0, 2.0**-14, 2.0**-24, np.inf, -np.inf, np.nan, -0.0, 0.0], np.float32)


def _awq_words(q: np.ndarray) -> np.ndarray:
    return np.asarray(BACKEND.run(awq.pack_awq, q.astype(np.int32)))


@st.composite
def pieces(draw):
    """A 4-bit AWQ module (random words, so every code), zero-points (random, or all 8, or one 8-free group), scales
    (float16 or float32, ordinary and extreme), and a column block of whole words in some order."""
    k = draw(st.sampled_from(KS))
    c = draw(st.sampled_from(WORD_COLUMNS))
    group = draw(st.sampled_from([g for g in (32, 64, 128, k) if k % g == 0]))
    groups = k // group
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = rng.integers(-(2**31), 2**31, (k, c), dtype=np.int64).astype(np.int32)
    z = rng.integers(0, 16, (groups, 8 * c)).astype(np.int16)
    if draw(st.booleans()):  # symmetric
        z[:] = 8
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    with np.errstate(over="ignore"):
        s = (rng.standard_normal((groups, 8 * c)) * draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e5]))).astype(dtype)
        if draw(st.booleans()):
            pick = rng.random(s.shape) < 0.3
            s[pick] = rng.choice(EXTREMES, int(pick.sum())).astype(dtype)
    c0 = draw(st.integers(0, c - 1))
    c1 = draw(st.integers(c0 + 1, c))
    cols = np.arange(8 * c0, 8 * c1)
    if draw(st.booleans()):  # a row permutation within the block (llama.cpp's q/k rows)
        cols = rng.permutation(cols)
    return words, z, s, c0, c1, cols, draw(st.sampled_from(G.QUANTIZED))


def _encode(words, z, s, cols, gguf_type):
    q = numpy_backend.unpack_awq_u8(words)[:, cols]
    with np.errstate(over="ignore", invalid="ignore"):
        return G.encode(q, z[:, cols], s[:, cols], gguf_type)


def _words_path(words, z, s, c0, c1, cols, gguf_type):
    g = np.arange(words.shape[0], dtype=np.int32) // (words.shape[0] // s.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):
        d = G.block_scales(s[:, cols], g)
    return numpy_backend.gguf_blocks_awq_words(words, c0, c1, cols, z, d, gguf_type)


@pytest.mark.parametrize("how", ROUTES)
@given(p=pieces())
def test_words_path_writes_the_encoders_bytes(how, p):
    """By the C kernels and by NumPy's byte-lane operations (tests/_paths.py)."""
    words, z, s, c0, c1, cols, gguf_type = p
    with route(how):
        got = _words_path(words, z, s, c0, c1, cols, gguf_type)
    if gguf_type == "Q4_0" and not np.all(z[:, cols] == 8):  # the encoder clips there: left to the other paths
        assert got is None
        return
    want = _encode(words, z, s, cols, gguf_type)
    assert got is not None and got.dtype == np.uint8 and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@given(pieces())
def test_symmetric_census_without_the_words_is_the_codes_census(p):
    words, z, s, *_ = p
    z[:] = 8
    k = words.shape[0]
    span = np.zeros((k // G.BLOCK, z.shape[1]), np.uint8)
    q = numpy_backend.unpack_awq_u8(words)
    assert G.census_of_bounds(span, np.full_like(span, 15), z, s) == G.census(q.astype(np.int32), z, s, rounding=False)


@pytest.mark.parametrize("how", ROUTES)
def test_negative_controls(how):
    """A changed zero-point or code changes the words path's bytes (so the comparison above can fail), and an
    asymmetric module is not given the symmetric census (its Q4_0 count is smaller)."""
    with route(how):
        _negative_controls()


def _negative_controls():
    rng = np.random.default_rng(7)
    words = rng.integers(-(2**31), 2**31, (128, 2), dtype=np.int64).astype(np.int32)
    z = rng.integers(0, 16, (2, 16)).astype(np.int16)
    s = rng.standard_normal((2, 16)).astype(np.float16)
    cols = np.arange(16)
    for t in ("Q5_0", "Q8_0"):
        want = _encode(words, z, s, cols, t).tobytes()
        assert _words_path(words, z, s, 0, 2, cols, t).tobytes() == want
        other = z.copy()
        other[1, 3] = (other[1, 3] + 1) % 16
        assert _words_path(words, other, s, 0, 2, cols, t).tobytes() != want
        flipped = words.copy()
        flipped[5, 1] ^= 1 << 9
        assert _words_path(flipped, z, s, 0, 2, cols, t).tobytes() != want
        assert _words_path(words, z, s, 0, 2, cols[::-1].copy(), t).tobytes() != want
    eights = np.full_like(z, 8)
    assert _words_path(words, z, s, 0, 2, cols, "Q4_0") is None
    assert _words_path(words, eights, s, 0, 2, cols, "Q4_0").tobytes() == _encode(words, eights, s, cols, "Q4_0").tobytes()
    q = numpy_backend.unpack_awq_u8(words).astype(np.int32)
    assert G.census(q, z, s, rounding=False).exact["Q4_0"] < G.census(q, eights, s, rounding=False).exact["Q4_0"]


def test_bad_shapes_named():
    words = np.zeros((64, 2), np.int32)
    z, d = np.zeros((2, 16), np.int16), np.zeros((16, 2), np.uint16)
    with pytest.raises(ValueError, match=r"gguf_blocks_awq_words: .*cols \(8,\)"):
        numpy_backend.gguf_blocks_awq_words(words, 0, 2, np.arange(8), z, d, "Q8_0")


@st.composite
def awq_blocks(draw):
    k = draw(st.sampled_from(KS))
    c = draw(st.sampled_from(WORD_COLUMNS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = rng.integers(-(2**31), 2**31, (k, c), dtype=np.int64).astype(np.int32)
    if draw(st.booleans()):  # narrow codes, so that bounds other than 0 and 15 occur
        words &= np.int32(draw(st.sampled_from([0x37373737, 0x11111111, 0x7E7E7E7E])))
    return words


@given(awq_blocks())
def test_byte_reduction_bounds_are_the_codes_bounds(words):
    """awq_code_bounds_words (NumPy, no numba) gives every block's smallest and largest code, as the codes say."""
    qmin, qmax = numpy_backend.awq_code_bounds_words(words, rows=4096)
    q = numpy_backend.unpack_awq_u8(words).reshape(words.shape[0] // G.BLOCK, G.BLOCK, -1)
    assert np.array_equal(qmin, q.min(axis=1)) and np.array_equal(qmax, q.max(axis=1))


def test_byte_reduction_bounds_negative_control():
    """One code changed in a block of equal codes moves that block's bound, and only that column's."""
    words = np.full((64, 2), 0x55555555, np.int32)
    qmin, qmax = numpy_backend.awq_code_bounds_words(words)
    assert (qmin == 5).all() and (qmax == 5).all()
    words[40, 1] = np.int32(0x55555595)  # byte 0's high nibble: slot 1, column 8 + AWQ_PACK_ORDER[1], block 1
    qmin, qmax = numpy_backend.awq_code_bounds_words(words)
    col = 8 + awq.AWQ_PACK_ORDER[1]
    assert qmax[1, col] == 9 and np.count_nonzero(qmax != 5) == 1 and (qmin == 5).all()
