"""GGUF's whole-word path (``gguf_blocks_awq_words``: AWQ words -> compressed-tensors rows -> block bytes by bit
operations in byte lanes, no numba) writes the array-API encoder's bytes, and the symmetric census shortcut (no pass
over the words) is the census of the codes; each with a negative control."""

from __future__ import annotations

from pathlib import Path

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
    want = G.census(q.astype(np.int32), z, s, rounding=False)
    assert G.census_of_bounds(span, np.full_like(span, 15), z, s) == want
    from packq.checkpoint.formats import gguf as F  # and counted once per (group, column), each weighing its blocks

    assert F._full_span(z, s, k // z.shape[0] // G.BLOCK) == want


@given(pieces())
def test_full_span_census_counts_as_block_by_block(p):
    """Any zero-points, scales fp16 values or not: (group, column) by (group, column) as block by block."""
    from packq.checkpoint.formats import gguf as F

    words, z, s, *_ = p
    k = words.shape[0]
    span = np.zeros((k // G.BLOCK, z.shape[1]), np.uint8)
    assert F._full_span(z, s, k // z.shape[0] // G.BLOCK) == G.census_of_bounds(span, np.full_like(span, 15), z, s)


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


@st.composite
def modules_for_q4_0(draw):
    """A 4-bit AWQ module whose codes sometimes all fit Q4_0 around their zero-points (narrow codes, z near 8) and
    sometimes not, scales fp16 values or not."""
    k = draw(st.sampled_from(KS))
    c = draw(st.sampled_from(WORD_COLUMNS))
    group = draw(st.sampled_from([g for g in (32, 64, 128, k) if k % g == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = rng.integers(-(2**31), 2**31, (k, c), dtype=np.int64).astype(np.int32)
    z = rng.integers(0, 16, (k // group, 8 * c)).astype(np.int16)
    if draw(st.booleans()):  # codes 4-11 (0x4 | 0..7 in each nibble), zero-points 8 or 7: Q4_0 holds them
        words = (words & np.int32(0x33333333)) | np.int32(0x44444444)
        z = np.where(rng.random(z.shape) < 0.5, 8, 7).astype(np.int16)
        if draw(st.booleans()):  # one code out of Q4_0's range
            r, w = draw(st.integers(0, k - 1)), draw(st.integers(0, c - 1))
            words[r, w] |= np.int32(0xF)
    s = rng.standard_normal(z.shape).astype(np.float16 if draw(st.booleans()) else np.float32)
    return words, z, s


@given(m=modules_for_q4_0())
def test_q4_0_decision_by_early_stop_is_the_census(m):
    """The plan's "auto" looks for one block Q4_0 does not hold (stopping there): its answer is the whole census's."""
    from packq.checkpoint.formats import gguf as F

    words, z, s = m
    full = G.census_of_bounds(*numpy_backend.awq_code_bounds_words(words), z, s)
    assert F._q4_0_holds(words, z, s) == full.holds("Q4_0")


def test_the_plans_census_decides_as_the_whole_census(tmp_path, monkeypatch):
    """On the example checkpoint: for "auto", Q5_0 and Q8_0 the decision census gives each module the whole census's
    verdict (and exact counts for the type it decides); for Q5_0/Q8_0 it reads no word, for "auto" only until a block
    Q4_0 does not hold."""
    from packq.checkpoint.folder import open_checkpoint
    from packq.checkpoint.formats import gguf as F

    ckpt = open_checkpoint(Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq")
    monkeypatch.setattr(F, "CENSUS_BYTES", 4096)  # a group of rows at a time: the example's modules are small
    rows, reads = [], []
    real, real_words = numpy_backend.awq_code_bounds_words, F._awq_words
    monkeypatch.setattr(numpy_backend, "awq_code_bounds_words", lambda w, *a: (rows.append(w.shape[0]), real(w, *a))[1])
    monkeypatch.setattr(F, "_awq_words", lambda *a: (reads.append(a[1]), real_words(*a))[1])
    for prefix in ckpt.modules:
        rows.clear()
        full = F.module_census(ckpt, prefix, rounding=False)
        whole = sum(rows)
        for decide in ("auto", "Q5_0", "Q8_0"):
            rows.clear()
            reads.clear()
            c = F.module_census(ckpt, prefix, rounding=False, decide=decide)
            assert (c.blocks, c.weights) == (full.blocks, full.weights)
            if decide == "auto":
                assert c.smallest() == full.smallest() and c.exact["Q5_0"] == full.exact["Q5_0"]
                assert sum(rows) < whole or full.holds("Q4_0")
            else:
                assert c.holds(decide) == full.holds(decide) and c.exact[decide] == full.exact[decide] and not rows
                assert not reads  # not even read from the file
