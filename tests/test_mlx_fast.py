"""MLX's differing-weight counts from each (group, column)'s histogram of codes: the same counts as every weight
dequantized both ways (the reference), for random codes and scales, float16's extremes and subnormals among them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from packq.backends import numpy as numpy_kernels
from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.formats.mlx import code_histogram, counts_by_histogram, counts_direct
from packq.formats import awq
from packq.formats import mlx as M

KS = (64, 128, 256)
NS = (8, 16, 40)
#: float16's extremes: the largest, the smallest normal, the smallest subnormal and one near it, and zeros
SPECIAL = np.array([65504.0, -65504.0, 2.0**-14, 2.0**-24, 3 * 2.0**-24, -(2.0**-20), 0.0, -0.0, 1.0, 1 / 3], np.float32)


@st.composite
def modules(draw, bits=None):
    k, n = draw(st.sampled_from(KS)), draw(st.sampled_from(NS))
    bits = bits or draw(st.sampled_from((2, 3, 4)))
    group = draw(st.sampled_from([g for g in (32, 64, 128) if k % g == 0]))
    groups, levels = k // group, 1 << bits
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(0, draw(st.sampled_from([1, 2, levels])), (k, n)).astype(np.int16)
    z = rng.integers(0, draw(st.sampled_from([1, levels // 2 + 1, levels])), (groups, n)).astype(np.int16)
    source = draw(st.sampled_from(("float16", "bfloat16", "float32")))
    s = rng.standard_normal((groups, n)) * draw(st.sampled_from([2.0**-24, 1e-6, 1e-3, 1.0, 1e3, 3e4, 1e30]))
    special = rng.random((groups, n)) < draw(st.sampled_from([0.0, 0.2, 1.0]))
    s = np.where(special, rng.choice(SPECIAL, (groups, n)), s)
    with np.errstate(over="ignore"):
        s = M.round_to(s.astype(np.float32), source)
    return q, z, s, source, draw(st.sampled_from(M.DTYPES)), levels


@given(modules())
def test_counts_by_histogram_are_the_counts_of_every_weight(m):
    q, z, s, source, dtype, levels = m
    with np.errstate(all="ignore"):
        assert counts_by_histogram(z, s, code_histogram(q, z.shape[0], levels), dtype, source) == \
            counts_direct(q, z, s, dtype, source)


@given(modules(bits=4))
def test_awq_kernel_histogram_gives_the_same_counts(m):
    """From AWQ's words the codes are counted by the compiled kernel: the same histogram, so the same counts."""
    pytest.importorskip("numba")
    q, z, s, source, dtype, _ = m
    words = np.asarray(numpy_backend.run(awq.pack_awq, q.astype(np.int32)))
    hist = numpy_kernels.awq_histogram_t(words, z.shape[0])
    assert hist is not None and np.array_equal(hist, code_histogram(q, z.shape[0], 16))
    with np.errstate(all="ignore"):
        assert counts_by_histogram(z, s, hist, dtype, source) == counts_direct(q, z, s, dtype, source)


def test_code_histogram_counts_each_group_and_column():
    q = np.array([[0, 3], [3, 3], [1, 0], [1, 1]], np.int16)  # two groups of two rows
    h = code_histogram(q, 2, 4)
    assert h.shape == (2, 2, 4)
    assert h[0, 0].tolist() == [1, 0, 0, 1] and h[0, 1].tolist() == [0, 0, 0, 2]
    assert h[1, 0].tolist() == [0, 2, 0, 0] and h[1, 1].tolist() == [1, 1, 0, 0]


def test_negative_control_a_wrong_histogram_is_caught():
    """The comparison can fail: float16 scales of a bfloat16 source differ for some codes, and a histogram with each
    weight moved to the next code (or one weight lost) gives other counts than the weights."""
    rng = np.random.default_rng(7)
    q = rng.integers(0, 16, (128, 16)).astype(np.int16)
    z = rng.integers(0, 16, (2, 16)).astype(np.int16)
    s = M.round_to(rng.standard_normal((2, 16)).astype(np.float32) * 1e-3, "bfloat16")
    want = counts_direct(q, z, s, "float16", "bfloat16")
    assert 0 < want["metal"] < want["cpu"] < q.size
    hist = code_histogram(q, 2, 16)
    assert counts_by_histogram(z, s, hist, "float16", "bfloat16") == want
    assert counts_by_histogram(z, s, np.roll(hist, 1, axis=-1), "float16", "bfloat16") != want
    lost = hist.copy()
    lost[hist > 0] -= 1
    assert counts_by_histogram(z, s, lost, "float16", "bfloat16") != want
