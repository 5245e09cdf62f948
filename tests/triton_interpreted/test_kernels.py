"""packq's Triton kernels in Triton's interpreter: bit for bit the array-API core, both ways, any layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
xp = pytest.importorskip("array_api_compat.torch")

from packq.backends import triton_kernels as tk  # noqa: E402
from packq.formats import awq  # noqa: E402

SHAPES = [(8, 8), (16, 40), (2, 16, 8), (64, 3), (8, 300)]  # 300 words: several column tiles, a ragged one


@st.composite
def words(draw):
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = torch.from_numpy(rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32))
    return a.mT.contiguous().mT if draw(st.booleans()) else a  # column-major storage too


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_the_interpreter_runs():
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"


@given(qw=words(), offset=st.sampled_from([-1, 0, 1]))
def test_kernels_equal_the_core(qw, offset):
    zeros = qw[..., :1, :]
    w, z = tk.fused([(awq.weight_to_gptq, (qw,), {}), (awq.zeros_to_gptq, (zeros,), {"offset": offset})])
    _same(w, awq.weight_to_gptq(xp, qw))
    _same(z, awq.zeros_to_gptq(xp, zeros, offset=offset))
    w2, z2 = tk.fused([(awq.weight_to_awq, (w,), {}), (awq.zeros_to_awq, (z,), {"offset": -offset})])
    _same(w2, qw.contiguous())
    _same(z2, zeros.contiguous())
    _same(tk.KERNELS[awq.weight_to_gptq](qw), w)
    _same(tk.KERNELS[awq.weight_to_awq](w), qw.contiguous())
    _same(tk.KERNELS[awq.zeros_to_gptq](zeros, offset=offset), z)
    _same(tk.KERNELS[awq.zeros_to_awq](z, offset=-offset), zeros.contiguous())


def test_empty_inputs_give_empty_results():
    w, z = tk.fused([(awq.weight_to_gptq, (torch.zeros((0, 8), dtype=torch.int32),), {}),
                     (awq.zeros_to_gptq, (torch.zeros((0, 8), dtype=torch.int32),), {})])
    assert w.shape == (0, 64) and z.shape == (0, 8)
