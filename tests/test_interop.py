"""packq.interop on the CPU: zero-copy hand-offs, ExLlama tensors, the zero-point-0 rebias, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from packq.interop import exllama_tensors, from_torch, to_torch

import packq


def test_numpy_to_torch_shares_the_buffer_both_ways():
    a = np.arange(16, dtype=np.int32).reshape(4, 4)
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.dtype == torch.int32 and tuple(t.shape) == (4, 4)
    t[0, 0] = 99
    assert a[0, 0] == 99
    a[1, 1] = -5
    assert int(t[1, 1]) == -5
    b = from_torch(t)
    assert b.ctypes.data == t.data_ptr()
    b[2, 2] = 42
    assert int(t[2, 2]) == 42


def test_jax_to_torch_and_back_share_the_buffer():
    import jax.numpy as jnp

    x = jnp.arange(8, dtype=jnp.int32)
    t = to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    y = from_torch(t, like=x)
    assert y.unsafe_buffer_pointer() == t.data_ptr()
    assert from_torch(t, like="jax").unsafe_buffer_pointer() == t.data_ptr()


def test_strided_views_share_without_copy():
    a = np.arange(64, dtype=np.int32).reshape(8, 8)[:, ::2]
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.stride() == (8, 2)


def test_errors():
    a = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match="negatively strided.*allow_copy=True"):
        to_torch(a[::-1])
    assert to_torch(a[::-1], allow_copy=True).tolist() == a[::-1].tolist()
    ro = a.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        to_torch(ro)
    import ml_dtypes

    with pytest.raises(TypeError, match="x has dtype bfloat16, which torch cannot take"):
        to_torch(np.zeros(2, ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"x is on cpu, not on the requested device meta; pass allow_copy=True"):
        to_torch(a, device="meta")
    assert to_torch(a, device="meta", allow_copy=True).device.type == "meta"
    assert to_torch(a, device="cpu").data_ptr() == a.ctypes.data
    with pytest.raises(TypeError, match="x must be an array"):
        to_torch([1, 2])
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        from_torch(a)
    with pytest.raises(TypeError, match="like must be"):
        from_torch(torch.zeros(2), like="cupy")


def _awq(seed, k=256, n=64, groups=2, zero0=True, max_q=15):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, max_q + 1, (k, n))
    z = rng.integers(1, 16, (groups, n))
    if zero0:
        z[0, :8] = 0
    s = (rng.random((groups, n)) * 0.01 + 0.001).astype(np.float16)
    pack = lambda v: packq.pack(packq.apply_order(v, order=packq.AWQ_PACK_ORDER))  # noqa: E731
    return pack(q), pack(z), s, q, z


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_exllama_tensors_dtypes_shapes_and_values(backend):
    qw, qz, s, _, _ = _awq(0, zero0=False)
    conv = {"numpy": np.asarray, "torch": torch.from_numpy}
    if backend == "jax":
        import jax.numpy as jnp

        conv["jax"] = jnp.asarray
    t = exllama_tensors(conv[backend](qw), conv[backend](qz), conv[backend](s), with_g_idx=True)
    gw, gz = packq.fast_awq_to_gptq(qw, qz)
    assert t.qweight.dtype == torch.int32 and tuple(t.qweight.shape) == (32, 64)
    assert t.qzeros.dtype == torch.int32 and tuple(t.qzeros.shape) == (2, 8)
    assert t.scales.dtype == torch.float16 and tuple(t.scales.shape) == (2, 64)
    assert t.g_idx.dtype == torch.int32 and t.g_idx.device.type == "cpu"
    assert t.g_idx.tolist() == (np.arange(256) // 128).tolist()
    np.testing.assert_array_equal(t.qweight.numpy(), gw)
    np.testing.assert_array_equal(t.qzeros.numpy(), gz)
    assert (t.zero_point_0, t.rebiased, t.unfixable) == (0, 0, 0)
    assert set(t.as_dict()) == {"qweight", "qzeros", "scales", "g_idx"}


def test_exllama_tensors_hand_over_without_copy():
    qw, qz, s, _, _ = _awq(1)
    t = exllama_tensors(qw, qz, s)
    assert t.scales.data_ptr() == s.ctypes.data  # scales pass through, shared
    assert t.zero_point_0 == 8 and t.rebiased == 0  # "keep": counted, nothing changed


@given(seed=st.integers(0, 2**32 - 1))
def test_rebias_keeps_dequantized_weights_identical(seed):
    qw, qz, s, q, z = _awq(seed, max_q=15)
    rng = np.random.default_rng(seed)
    q0 = q.copy()
    # half the zero-0 columns of group 0 get a 15 (unfixable), half stay at most 14 (fixable)
    q0[:128, :8] = np.minimum(q0[:128, :8], 14)
    bad = rng.integers(0, 8, 4)
    q0[rng.integers(0, 128, 4), bad] = 15
    qw = packq.pack(packq.apply_order(q0, order=packq.AWQ_PACK_ORDER))
    with pytest.warns(UserWarning, match="cannot be rebiased"):
        t = exllama_tensors(qw, qz, s, zero_points="rebias", unfixable="warn")
    n_bad = len(set(bad.tolist()))
    assert (t.zero_point_0, t.rebiased, t.unfixable) == (8, 8 - n_bad, n_bad)
    before = packq.dequantize_awq(qw, qz, s)
    after = packq.dequantize_gptq(t.qweight.numpy(), t.qzeros.numpy(), t.scales.numpy())
    assert before.tobytes() == after.tobytes()
    # what remains stored as 15 (zero 0) is exactly the unfixable pairs
    stored = packq.unpack(t.qzeros.numpy())
    assert int((stored == 15).sum()) == n_bad + int((z == 0).sum()) - 8


def test_rebias_unfixable_error_and_option_errors():
    qw, qz, s, _, _ = _awq(3)
    q = np.full((256, 64), 15)
    qw = packq.pack(packq.apply_order(q, order=packq.AWQ_PACK_ORDER))
    with pytest.raises(ValueError, match="8 of 8 .* zero-points of 0 cannot be rebiased"):
        exllama_tensors(qw, qz, s, zero_points="rebias")
    with pytest.raises(ValueError, match="zero_points must be 'keep' or 'rebias', got 'fix'"):
        exllama_tensors(qw, qz, s, zero_points="fix")
    with pytest.raises(TypeError, match="scales must be float16 for ExLlama, got dtype float32"):
        exllama_tensors(qw, qz, s.astype(np.float32))
    assert exllama_tensors(qw, qz, s.astype(np.float32), allow_copy=True).scales.dtype == torch.float16
    with pytest.raises(ValueError, match="qweight and qzeros must have the same number of columns"):
        exllama_tensors(qw, qz[:, :4], s)


def test_interop_imports_no_torch_until_used():
    code = "import sys, packq.interop; assert 'torch' not in sys.modules and 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interop_folder_is_packq_interop_in_regular_and_editable_installs(tmp_path):
    """interop/ maps to packq.interop: here (the test environment's install) and in a fresh regular install."""
    import packq.interop

    assert packq.interop.__file__.endswith("interop/__init__.py")
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(repo)], check=True)
    code = ("import packq.interop, packq; print(packq.interop.__file__); "
            f"assert packq.interop.__file__.startswith({str(target)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(target)})
