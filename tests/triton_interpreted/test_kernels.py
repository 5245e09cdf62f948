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


# ------------------------------------------------------------------ dequantization
from packq.formats import gptq  # noqa: E402

FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _scales(rng, shape, dtype):
    """Scales of every magnitude and sign, some subnormal in float16, so that the rounding is exercised."""
    s = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 4, shape))
    return torch.from_numpy(s.astype(np.float32)).to(FLOATS[dtype])


def _rand_words(rng, shape):
    return torch.from_numpy(rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32))


def _exact(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.int16 if got.dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if want.dtype != torch.float32 else torch.int32))


# (K, N, groups): one group, groups the tiles fit (32 | G), groups they do not (G = 16, G = 48), ragged column tiles
GPTQ_SHAPES = [(64, 32, 1), (128, 64, 4), (64, 96, 4), (96, 320, 2), (32, 8, 1)]


@given(bits=st.sampled_from([2, 3, 4, 8]), shape=st.sampled_from(GPTQ_SHAPES), zeros=st.sampled_from(["v1", "v2"]),
       lead=st.sampled_from([(), (3,)]), dtype=st.sampled_from(sorted(FLOATS)), act_order=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gptq_dequantization_equals_the_core(bits, shape, zeros, lead, dtype, act_order, seed):
    k, n, groups = shape
    if n * bits % 32:
        n = 32 * 3  # 3-bit zeros pack 32 columns in 3 words
    rng = np.random.default_rng(seed)
    qw = _rand_words(rng, (*lead, k * bits // 32, n))
    qz = _rand_words(rng, (*lead, groups, n * bits // 32))
    sc = _scales(rng, (*lead, groups, n), dtype)
    g_idx = torch.from_numpy(rng.permutation(np.arange(k) // (k // groups))) if act_order else None  # int64
    got = tk.dequantize_gptq(qw, qz, sc, g_idx, bits, zeros)
    _exact(got, gptq.dequantize_gptq(xp, qw, qz, sc, g_idx, bits=bits, zeros=zeros))


@given(shape=st.sampled_from(GPTQ_SHAPES), lead=st.sampled_from([(), (3,)]), dtype=st.sampled_from(sorted(FLOATS)),
       seed=st.integers(0, 2**32 - 1))
def test_awq_dequantization_equals_the_core(shape, lead, dtype, seed):
    k, n, groups = shape
    rng = np.random.default_rng(seed)
    qw, qz = _rand_words(rng, (*lead, k, n // 8)), _rand_words(rng, (*lead, groups, n // 8))
    sc = _scales(rng, (*lead, groups, n), dtype)
    _exact(tk.dequantize_awq(qw, qz, sc), gptq.dequantize_awq(xp, qw, qz, sc))


def test_dequantization_rounds_once_like_numpy():
    """A float16 product that rounds: the kernel's bits are NumPy's float16 (q - z) * s, not a float32 value."""
    qw = torch.full((8, 1), 0x75316420, dtype=torch.int32)  # AWQ order of 0..7
    qz = torch.zeros((1, 1), dtype=torch.int32)
    s = np.full((1, 8), 0.1, np.float16)
    want = (np.arange(8, dtype=np.float16) * s)[0]
    got = tk.dequantize_awq(qw, qz, torch.from_numpy(s))[0].numpy()
    assert got.tobytes() == want.tobytes()


def test_a_corrupted_kernel_result_fails_the_check():
    """Negative control: one flipped bit in the kernel's output is caught by the same comparison."""
    rng = np.random.default_rng(1)
    qw, qz, sc = _rand_words(rng, (3, 32)), _rand_words(rng, (1, 3)), _scales(rng, (1, 32), "float16")
    got = tk.dequantize_gptq(qw, qz, sc, None, 3, "v1")
    got.view(torch.int16)[5, 7] ^= 1
    with pytest.raises(AssertionError):
        _exact(got, gptq.dequantize_gptq(xp, qw, qz, sc, None, bits=3, zeros="v1"))


def test_dequantization_kernels_decline_what_they_do_not_compute():
    """float64 scales and mixed word dtypes return None, so that the backend runs the core."""
    qw, qz = torch.zeros((8, 1), dtype=torch.int32), torch.zeros((1, 1), dtype=torch.int32)
    assert tk.dequantize_awq(qw, qz, torch.ones((1, 8), dtype=torch.float64)) is None
    assert tk.dequantize_gptq(qw.to(torch.int64), qz, torch.ones((1, 1)), None, 4, "v1") is None
    empty = tk.dequantize_gptq(torch.zeros((0, 8), dtype=torch.int32), torch.zeros((1, 1), dtype=torch.int32),
                               torch.ones((1, 8), dtype=torch.float16), None, 4, "v1")
    assert empty.shape == (0, 8) and empty.dtype == torch.float16


@given(bits=st.sampled_from([2, 3, 4, 8]), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**32 - 1))
def test_act_order_reads_out_of_range_g_idx_clamped(bits, lead, seed):
    """g_idx entries outside [0, groups) read the nearest group (the range check raises after the launch, so the
    kernel must never read outside the arrays): the kernel's bits are the core's on the clamped g_idx."""
    k, n, groups = 64, 96, 4
    rng = np.random.default_rng(seed)
    qw = _rand_words(rng, (*lead, k * bits // 32, n))
    qz = _rand_words(rng, (*lead, groups, n * bits // 32))
    sc = _scales(rng, (*lead, groups, n), "float16")
    wild = torch.from_numpy(rng.integers(-(2**20), 2**20, k) * rng.integers(0, 2, k) + rng.integers(0, groups, k))
    got = tk.dequantize_gptq(qw, qz, sc, wild, bits, "v1")
    _exact(got, gptq.dequantize_gptq(xp, qw, qz, sc, wild.clamp(0, groups - 1), bits=bits, zeros="v1"))


def test_out_of_range_g_idx_raises_after_the_launch(monkeypatch):
    """The public call with the kernels (CPU tensors in the interpreter standing in for CUDA ones): the range of
    g_idx comes from the kernel itself (``dequantize_gptq_checked``: one program reduces it into the slot the host
    reads), a g_idx in range gives the core's bits, one out of range raises the ValueError that names g_idx, the
    range expected and the range it holds; so does the older path, a reduction of its own (``minmax_later``)."""
    import packq
    from packq.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend.TorchBackend, "kernel_devices", ("cuda", "cpu"))
    calls = []
    real = tk.dequantize_gptq_checked
    monkeypatch.setattr(tk, "dequantize_gptq_checked", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    rng = np.random.default_rng(3)
    k, n, groups = 64, 32, 2
    qw, qz = _rand_words(rng, (k * 4 // 32, n)), _rand_words(rng, (groups, n * 4 // 32))
    sc = _scales(rng, (groups, n), "bfloat16")
    g_idx = torch.from_numpy(rng.permutation(np.arange(k) // (k // groups)).astype(np.int32))
    _exact(packq.dequantize_gptq(qw, qz, sc, g_idx), gptq.dequantize_gptq(xp, qw, qz, sc, g_idx, bits=4, zeros="v1"))
    assert len(calls) == 1
    bad = g_idx.clone()
    bad[5], bad[9] = -1, 7
    message = r"^g_idx must hold values in \[0, 1\] \(indices of the 2 groups of qzeros\), got values in \[-1, 7\]$"
    with pytest.raises(ValueError, match=message):
        packq.dequantize_gptq(qw, qz, sc, bad)
    assert len(calls) == 2
    wide = torch.tensor(np.arange(k) // (k // groups), dtype=torch.int64) + (1 << 40)  # past int32: still refused
    with pytest.raises(ValueError, match=r"got values in \[1099511627776, 1099511627777\]"):
        packq.dequantize_gptq(qw, qz, sc, wide)
    # float64 scales take the core, which does not clamp: the check stays before the work
    with pytest.raises(ValueError, match="got values in"):
        packq.dequantize_gptq(qw, qz, sc.to(torch.float64), bad)
    assert len(calls) == 4 and not tk._slots.busy
    # the older path: the same result and the same error
    monkeypatch.setattr(torch_backend, "CHECK_IN_KERNEL", False)
    _exact(packq.dequantize_gptq(qw, qz, sc, g_idx), gptq.dequantize_gptq(xp, qw, qz, sc, g_idx, bits=4, zeros="v1"))
    with pytest.raises(ValueError, match=message):
        packq.dequantize_gptq(qw, qz, sc, bad)
    assert len(calls) == 4


@given(bits=st.sampled_from([2, 3, 4, 8]), lo=st.integers(-(2**40), 3), hi=st.integers(0, 2**40),
       at=st.lists(st.integers(0, 2499), min_size=2, max_size=2), wide=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_the_kernel_reads_the_range_of_g_idx_over_every_chunk(bits, lo, hi, at, wide, seed):
    """The range program reads g_idx in chunks of 1024: a K of 2528 (three chunks, the last ragged) with its extremes
    anywhere gives the range NumPy reads, int32 and int64, and the kernel's bits are the core's on the clamped
    g_idx."""
    k, n, groups = 2528, 32, 4
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, k)
    g[at[0]], g[at[1]] = lo, max(hi, lo)
    g_idx = torch.from_numpy(g if wide else np.clip(g, -(2**31), 2**31 - 1).astype(np.int32))
    qw, qz = _rand_words(rng, (k * bits // 32, n)), _rand_words(rng, (groups, n * bits // 32))
    sc = _scales(rng, (groups, n), "float16")
    out, wait = tk.dequantize_gptq_checked(qw, qz, sc, g_idx, bits, "v2")
    assert wait() == (int(g_idx.min()), int(g_idx.max()))
    _exact(out, gptq.dequantize_gptq(xp, qw, qz, sc, g_idx.clamp(0, groups - 1), bits=bits, zeros="v2"))
