"""Formats beyond the seed: widths 2/3/8, GPTQ -> AWQ, v1/v2 zeros, dequantization, native 4-bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import packq
from conftest import Lib, assert_same, golden_keys
from packq.core.bits import layout

DIRECTIONS = ["column", "row"]
WIDTHS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", ["small", "batched"])
def test_pack_unpack_widths_golden(lib: Lib, golden, bits, direction, case):
    """GPTQ layouts from the value-by-value bit-stream reference, 3-bit straddling included."""
    v = golden[f"pack{bits}/{case}/{direction}/in"]
    w = golden[f"pack{bits}/{case}/{direction}/out"]
    assert_same(lib, lib.call(packq.pack, lib.asarray(v), direction, bits=bits), w)
    out_dtype = np.uint8 if bits == 8 else np.int8
    assert_same(lib, lib.call(packq.unpack, lib.asarray(w), direction, bits=bits), v.astype(out_dtype))


@pytest.mark.parametrize("case", golden_keys("gptq", "qweight"))
def test_gptq_to_awq_golden(lib: Lib, golden, case):
    gw, gz = lib.asarray(golden[f"gptq/{case}/qweight"]), lib.asarray(golden[f"gptq/{case}/qzeros"])
    aw, az = lib.call(packq.gptq_to_awq, gw, gz)
    assert_same(lib, aw, golden[f"awq/{case}/qweight"])
    assert_same(lib, az, golden[f"awq/{case}/qzeros"])


def test_gptq_to_awq_accepts_trivial_g_idx(lib: Lib, golden):
    gw, gz = golden["gptq/group128/qweight"], golden["gptq/group128/qzeros"]
    g_idx = np.arange(256, dtype=np.int32) // 128
    if lib.name == "jax-traced":
        pytest.skip("g_idx is checked by value, so it cannot be traced (tested in test_errors)")
    aw, _ = packq.gptq_to_awq(lib.asarray(gw), lib.asarray(gz), lib.asarray(g_idx))
    assert_same(lib, aw, golden["awq/group128/qweight"])


@pytest.mark.parametrize("bits", WIDTHS)
def test_zeros_v1_v2_golden(lib: Lib, golden, bits):
    v1, v2 = golden[f"zeros{bits}/v1"], golden[f"zeros{bits}/v2"]
    assert_same(lib, lib.call(packq.zeros_v1_to_v2, lib.asarray(v1), bits=bits), v2)
    assert_same(lib, lib.call(packq.zeros_v2_to_v1, lib.asarray(v2), bits=bits), v1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", golden_keys("awq", "qweight"))
def test_dequantize_awq_and_gptq_golden(lib: Lib, golden, case, dtype):
    """Both formats dequantize the same weights to the same bits, zero-points of 0 included."""
    scales = lib.asarray(golden[f"dequant/{case}/{dtype}/scales"], dtype)
    expected = golden[f"dequant/{case}/{dtype}/out"]
    qw, qz = lib.asarray(golden[f"awq/{case}/qweight"]), lib.asarray(golden[f"awq/{case}/qzeros"])
    assert_same(lib, lib.call(packq.dequantize_awq, qw, qz, scales), expected, dtype)
    gw, gz = lib.asarray(golden[f"gptq/{case}/qweight"]), lib.asarray(golden[f"gptq/{case}/qzeros"])
    assert_same(lib, lib.call(packq.dequantize_gptq, gw, gz, scales), expected, dtype)
    v2 = lib.call(packq.zeros_v1_to_v2, gz)
    assert_same(lib, lib.call(packq.dequantize_gptq, gw, v2, scales, zeros="v2"), expected, dtype)


@pytest.mark.parametrize("bits", WIDTHS)
def test_dequantize_gptq_widths_and_act_order(lib: Lib, golden, bits):
    qw, qz = lib.asarray(golden[f"dq{bits}/qweight"]), lib.asarray(golden[f"dq{bits}/qzeros_v1"])
    scales = lib.asarray(golden[f"dq{bits}/scales"], "float16")
    assert_same(lib, lib.call(packq.dequantize_gptq, qw, qz, scales, bits=bits), golden[f"dq{bits}/out"], "float16")
    g_act = lib.asarray(golden[f"dq{bits}/g_idx_act"])
    out = lib.call(packq.dequantize_gptq, qw, qz, scales, g_act, bits=bits)
    assert_same(lib, out, golden[f"dq{bits}/out_act"], "float16")


def test_unpack_native_int4_for_jax():
    """jnp.uint4 keeps the nibbles; jnp.int4 reads them as two's complement; both pack back."""
    import jax.numpy as jnp

    words = jnp.asarray(np.array([[0x76543210, -0x789ABCE0]], dtype=np.int32))
    u4 = packq.unpack(words, dtype=jnp.uint4)
    i4 = packq.unpack(words, dtype=jnp.int4)
    assert u4.dtype == jnp.uint4 and i4.dtype == jnp.int4 and u4.shape == (1, 16)
    nibbles = np.asarray(packq.unpack(words)).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(u4).astype(np.int64), nibbles)
    np.testing.assert_array_equal(np.asarray(i4).astype(np.int64), np.where(nibbles >= 8, nibbles - 16, nibbles))
    for native in (u4, i4):
        np.testing.assert_array_equal(np.asarray(packq.pack(native)), np.asarray(words))


def test_unpack_dtype_too_narrow(lib: Lib):
    w = lib.asarray(np.zeros((1, 1), np.int32))
    with pytest.raises(ValueError, match=r"dtype must hold 8-bit values 0\.\.255 \(or be int8\), got int4"):
        packq.unpack(w, bits=8, dtype="int4")


# ---------------------------------------------------------------- properties
@st.composite
def values_for(draw, bits, direction):
    n_values, _ = layout(bits)
    shape = draw(st.sampled_from([(n_values, n_values), (2, n_values, 2 * n_values)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, 1 << bits, shape).astype(np.int16)


@given(data=st.data(), bits=st.sampled_from(WIDTHS), direction=st.sampled_from(DIRECTIONS))
def test_unpack_pack_round_trip_every_width(lib: Lib, data, bits, direction):
    v = data.draw(values_for(bits, direction))
    w = lib.call(packq.pack, lib.asarray(v), direction, bits=bits)
    assert_same(lib, lib.call(packq.unpack, w, direction, bits=bits), v.astype(np.uint8 if bits == 8 else np.int8))


@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(8, 8), (32, 16), (2, 16, 8)]))
def test_gptq_to_awq_inverts_fast_awq_to_gptq(lib: Lib, seed, shape):
    rng = np.random.default_rng(seed)
    qw = rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)
    qz = rng.integers(-(2**31), 2**31, shape[:-2] + (shape[-2] // 8, shape[-1]), dtype=np.int64).astype(np.int32)
    back = lib.call(packq.gptq_to_awq, *lib.call(packq.fast_awq_to_gptq, lib.asarray(qw), lib.asarray(qz)))
    assert_same(lib, back[0], qw)
    assert_same(lib, back[1], qz)


@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from(WIDTHS))
def test_zeros_v1_v2_v1_identity(lib: Lib, seed, bits):
    rng = np.random.default_rng(seed)
    z = rng.integers(-(2**31), 2**31, (4, 3 * (2 if bits == 3 else 1)), dtype=np.int64).astype(np.int32)
    x = lib.asarray(z)
    assert_same(lib, lib.call(packq.zeros_v2_to_v1, lib.call(packq.zeros_v1_to_v2, x, bits=bits), bits=bits), z)


@given(seed=st.integers(0, 2**32 - 1), zero_fill=st.sampled_from([None, 0, 15]))
def test_dequantization_equal_across_formats(lib: Lib, seed, zero_fill):
    rng = np.random.default_rng(seed)
    qw = rng.integers(-(2**31), 2**31, (32, 4), dtype=np.int64).astype(np.int32)
    qz = rng.integers(-(2**31), 2**31, (2, 4), dtype=np.int64).astype(np.int32)
    if zero_fill is not None:
        qz[:] = np.int64(0x11111111 * zero_fill).astype(np.uint32).view(np.int32)
    s = lib.asarray((rng.standard_normal((2, 32)) * 0.02).astype(np.float32))
    x, z = lib.asarray(qw), lib.asarray(qz)
    ref = lib.numpy(lib.call(packq.dequantize_awq, x, z, s))
    gw, gz = lib.call(packq.fast_awq_to_gptq, x, z)
    assert_same(lib, lib.call(packq.dequantize_gptq, gw, gz, s), ref)
    assert_same(lib, lib.call(packq.dequantize_gptq, gw, lib.call(packq.zeros_v1_to_v2, gz), s, zeros="v2"), ref)
