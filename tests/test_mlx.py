"""MLX's affine layout: relayouts on every backend, MLX's arithmetic in NumPy, and MLX itself where installed.

The golden fixtures (tests/fixtures/mlx.npz, scripts/make_mlx_fixtures.py) were made without packq: a
bit-stream packer written there, biases rounded once from float64, MLX's Metal arithmetic in float64,
and MLX's CPU arithmetic from ``mx.dequantize`` itself (mlx 0.32.4). Where mlx is installed (the test
extra installs mlx[cpu] on Linux x86-64), hypothesis properties compare packq's reproduction of MLX's
CPU arithmetic with ``mx.dequantize`` on random inputs.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import packq
from conftest import FIXTURES, Lib, assert_same

BITS = (2, 3, 4, 8)
K, N, G = 128, 32, 64


@functools.cache
def fixtures() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "mlx.npz") as f:
        return {k: f[k] for k in f.files}


def fx(bits: int, name: str) -> np.ndarray:
    return fixtures()[f"mlx/b{bits}/{name}"]


def f16(bits_: np.ndarray) -> np.ndarray:
    return bits_.view(np.float16)


# ------------------------------------------------------------------ golden fixtures, every backend
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", BITS)
def test_gptq_to_mlx_golden(lib: Lib, bits: int, dtype: str) -> None:
    qweight, qzeros = lib.asarray(fx(bits, "gptq_qweight")), lib.asarray(fx(bits, "gptq_qzeros"))
    scales = lib.asarray(fx(bits, "scales"), "float16")
    w, s, b = lib.call(packq.gptq_to_mlx, qweight, qzeros, scales, bits=bits, dtype=dtype)
    assert_same(lib, w, fx(bits, "weight"))
    assert_same(lib, s, fx(bits, f"{dtype}/mlx_scales"), dtype)
    assert_same(lib, b, fx(bits, f"{dtype}/mlx_biases"), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_awq_to_mlx_golden(lib: Lib, dtype: str) -> None:
    qweight, qzeros = lib.asarray(fx(4, "awq_qweight")), lib.asarray(fx(4, "awq_qzeros"))
    w, s, b = lib.call(packq.awq_to_mlx, qweight, qzeros, lib.asarray(fx(4, "scales"), "float16"), dtype=dtype)
    assert_same(lib, w, fx(4, "weight"))
    assert_same(lib, s, fx(4, f"{dtype}/mlx_scales"), dtype)
    assert_same(lib, b, fx(4, f"{dtype}/mlx_biases"), dtype)


@pytest.mark.parametrize("bits", BITS)
def test_compressed_tensors_to_mlx_golden(lib: Lib, bits: int) -> None:
    wp = lib.asarray(fx(bits, "weight"))  # weight_packed is MLX's weight
    zp = lib.asarray(fx(bits, "ct_zero_point"))
    ws = lib.asarray(np.ascontiguousarray(f16(fx(bits, "scales")).T))
    w, s, b = lib.call(packq.compressed_tensors_to_mlx, wp, zp, ws, bits=bits)
    assert_same(lib, w, fx(bits, "weight"))
    assert_same(lib, s, fx(bits, "float32/mlx_scales"), "float32")
    assert_same(lib, b, fx(bits, "float32/mlx_biases"), "float32")


@pytest.mark.parametrize("bits", BITS)
def test_mlx_to_gptq_golden(lib: Lib, bits: int) -> None:
    """float32 MLX tensors back to GPTQ with float16 scales: the source's bytes."""
    w = lib.asarray(fx(bits, "weight"))
    s = lib.asarray(fx(bits, "float32/mlx_scales"), "float32")
    b = lib.asarray(fx(bits, "float32/mlx_biases"), "float32")
    if lib.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16 to narrow the scales to")
    qweight, qzeros, scales = lib.call(packq.mlx_to_gptq, w, s, b, bits=bits, dtype="float16")
    assert_same(lib, qweight, fx(bits, "gptq_qweight"))
    assert_same(lib, qzeros, fx(bits, "gptq_qzeros"))
    assert_same(lib, scales, fx(bits, "scales"), "float16")


@pytest.mark.parametrize("arithmetic", ["cpu", "metal"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_mlx_golden(bits: int, dtype: str, arithmetic: str) -> None:
    s = fx(bits, f"{dtype}/mlx_scales").view(dtype)
    b = fx(bits, f"{dtype}/mlx_biases").view(dtype)
    got = packq.dequantize_mlx(fx(bits, "weight"), s, b, bits=bits, arithmetic=arithmetic)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), fx(bits, f"{dtype}/{arithmetic}"))


@pytest.mark.parametrize("bits", BITS)
def test_float32_form_is_exact_and_float16_is_not(bits: int) -> None:
    """What the fixtures say about MLX: float32 scales and biases give the source's weights on the CPU (MLX's own
    output) and on Metal; float16 ones differ in many (the negative control of every exactness claim)."""
    source = f16(fx(bits, "source"))
    for arithmetic in ("cpu", "metal"):
        w32 = fx(bits, f"float32/{arithmetic}").view(np.float32)
        np.testing.assert_array_equal(w32.astype(np.float16), source)
        w16 = fx(bits, f"float16/{arithmetic}").view(np.float16)
        assert np.count_nonzero(w16 != source) > source.size // 10, arithmetic


# ------------------------------------------------------------------ properties
WORDS = st.integers(-(2**31), 2**31 - 1)


def _module(draw, bits: int, lead: tuple[int, ...] = ()):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.sampled_from([64, 128, 256]))
    n = draw(st.sampled_from([32, 64]))
    g = draw(st.sampled_from([32, 64, 128]).filter(lambda x: x <= k))
    q = rng.integers(0, 1 << bits, (*lead, k, n))
    z = rng.integers(0, 1 << bits, (*lead, k // g, n))
    kind = draw(st.sampled_from(["float16", "bfloat16"]))
    s32 = (rng.random((*lead, k // g, n)) * draw(st.sampled_from([1e-3, 1e-2, 1.0, 100.0]))).astype(np.float32)
    s32 = np.maximum(s32, np.float32(2**-14))  # no scale of 0, where z would be anything (and no subnormals)
    if kind == "float16":
        s = s32.astype(np.float16)
    else:
        s = s32.astype(_bf16())
    qweight = packq.pack(q, "row", bits=bits)
    qzeros = packq.pack(z, "column", bits=bits)
    return q, z, s, qweight, qzeros, g


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


ANY_BITS = st.sampled_from(BITS)


@st.composite
def modules(draw, bits=ANY_BITS):
    b = draw(bits)
    return (b, *_module(draw, b))


@given(modules())
def test_round_trip_through_mlx_is_identity(m) -> None:
    bits, q, z, s, qweight, qzeros, g = m
    for dtype in ("float32", str(s.dtype)):
        mlx_form = packq.gptq_to_mlx(qweight, qzeros, s, bits=bits, dtype=dtype)
        if dtype == "bfloat16" and bits == 8:  # 255 * s rounds by about s: two zero-points may share one bias
            try:
                back = packq.mlx_to_gptq(*mlx_form, bits=bits, dtype=str(s.dtype))
            except ValueError as e:
                assert "determine the zero-points" in str(e)
                continue
        back = packq.mlx_to_gptq(*mlx_form, bits=bits, dtype=str(s.dtype))
        assert back[0].tobytes() == qweight.tobytes() and back[1].tobytes() == qzeros.tobytes(), dtype
        assert back[2].tobytes() == s.tobytes(), dtype


@given(modules())
def test_float32_form_computes_exactly_q_minus_z_times_s(m) -> None:
    """On both backends MLX computes (q - z) * s exactly from float32 scales and biases: the float64 product."""
    bits, q, z, s, qweight, qzeros, g = m
    w, sc, b = packq.gptq_to_mlx(qweight, qzeros, s, bits=bits)
    exact = ((q - np.repeat(z, g, -2)) * np.repeat(s.astype(np.float64), g, -2)).swapaxes(-1, -2)
    for arithmetic in ("cpu", "metal"):
        got = packq.dequantize_mlx(w, sc, b, bits=bits, arithmetic=arithmetic)
        np.testing.assert_array_equal(got.astype(np.float64), exact)


@given(modules())
def test_symmetric_float16_is_exact_on_metal_only_by_arithmetic(m) -> None:
    """z = 2**(bits-1): -z * s is exact in float16, so Metal's float32-then-round gives (q - z) * s rounded once;
    the CPU rounds s * q first."""
    bits, q, z, s, qweight, qzeros, g = m
    s = s.astype(np.float16)
    z = np.full_like(z, 1 << (bits - 1))
    qzeros = packq.pack(z, "column", bits=bits)
    w, sc, b = packq.gptq_to_mlx(qweight, qzeros, s, bits=bits, dtype="float16")
    want = packq.dequantize_gptq(qweight, qzeros, s, bits=bits, zeros="v2").swapaxes(-1, -2)
    metal = packq.dequantize_mlx(w, sc, b, bits=bits, arithmetic="metal")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(metal[finite], want[finite])


@given(st.integers(0, 2**32 - 1), st.sampled_from([(), (2,)]))
def test_awq_equals_gptq_route(seed: int, lead: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    qweight = rng.integers(-(2**31), 2**31, (*lead, 128, 8)).astype(np.int32)
    qzeros = rng.integers(-(2**31), 2**31, (*lead, 2, 8)).astype(np.int32)
    s = rng.random((*lead, 2, 64)).astype(np.float16)
    gw, gz = packq.fast_awq_to_gptq(qweight, qzeros)
    a = packq.awq_to_mlx(qweight, qzeros, s)
    b = packq.gptq_to_mlx(gw, packq.zeros_v1_to_v2(gz), s)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


@given(modules())
def test_compressed_tensors_equals_gptq_route(m) -> None:
    bits, q, z, s, qweight, qzeros, g = m
    wp, zp, ws = packq.gptq_to_compressed_tensors(qweight, qzeros, s, bits=bits)
    a = packq.compressed_tensors_to_mlx(wp, zp, ws, bits=bits, dtype="float16")
    b = packq.gptq_to_mlx(qweight, qzeros, s, bits=bits, dtype="float16")
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def _mx():
    try:
        import mlx.core as mlx_core
    except ImportError:
        pytest.skip("mlx is not installed (the test extra installs mlx[cpu] on Linux x86-64)")
    return mlx_core


@given(modules(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_cpu_arithmetic_is_mlx_own(m, dtype: str) -> None:
    """packq's reproduction of MLX's CPU arithmetic equals mx.dequantize on random tensors, every width and dtype."""
    mxc = _mx()
    bits, q, z, s, qweight, qzeros, g = m
    w, sc, b = packq.gptq_to_mlx(qweight, qzeros, s, bits=bits, dtype=dtype)
    ours = packq.dequantize_mlx(w, sc, b, bits=bits)
    as_mx = {"bfloat16": mxc.bfloat16, "float16": mxc.float16, "float32": mxc.float32}[dtype]

    def arr(x):
        return mxc.array(x.view(np.uint16)).view(as_mx) if dtype == "bfloat16" else mxc.array(x)

    theirs = mxc.dequantize(mxc.array(w.view(np.uint32)), arr(sc), arr(b), group_size=g, bits=bits)
    theirs = np.array(theirs.view(mxc.uint16) if dtype == "bfloat16" else theirs)
    np.testing.assert_array_equal(ours.view(f"u{ours.itemsize}"), theirs.view(f"u{theirs.itemsize}"))


def test_mlx_reads_its_weight_as_packq_writes_it() -> None:
    """MLX's own quantizer packs along K from the low bits, as gptq_to_mlx writes: its output unpacks as packq reads."""
    mxc = _mx()
    x = mxc.random.normal((32, 128), key=mxc.random.key(0))
    for bits in BITS:
        wq, s, b = mxc.quantize(x, group_size=64, bits=bits)
        q = packq.unpack(np.array(wq).view(np.int32), bits=bits).astype(np.float32)
        s, b = np.array(s), np.array(b)
        mine = q.reshape(32, 2, 64) * s[..., None] + b[..., None]
        np.testing.assert_allclose(mine.reshape(32, 128), np.array(mxc.dequantize(wq, mxc.array(s), mxc.array(b),
                                                                                   group_size=64, bits=bits)), rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_errors_name_the_argument() -> None:
    qweight, qzeros = fx(4, "gptq_qweight"), fx(4, "gptq_qzeros")
    s = f16(fx(4, "scales"))
    with pytest.raises(TypeError, match="qweight must be an array"):
        packq.gptq_to_mlx([1], qzeros, s)
    with pytest.raises(ValueError, match=r"group size must be one MLX's affine mode has \(32, 64, 128\), got 16"):
        packq.gptq_to_mlx(qweight, np.tile(qzeros, (4, 1)), np.tile(s, (4, 1)))
    with pytest.raises(ValueError, match="per-channel"):
        packq.gptq_to_mlx(np.tile(qweight, (2, 1)), qzeros[:1], s[:1])
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        packq.gptq_to_mlx(qweight, qzeros, s, dtype="int8")
    with pytest.raises(TypeError, match="weight must be a NumPy array"):
        packq.dequantize_mlx([1], s, s)
    with pytest.raises(ValueError, match="arithmetic must be 'cpu' or 'metal'"):
        packq.dequantize_mlx(fx(4, "weight"), s.T.copy(), s.T.copy(), arithmetic="cuda")
    with pytest.raises(TypeError, match="same dtype"):
        packq.dequantize_mlx(fx(4, "weight"), s.T.copy(), s.T.astype(np.float32))
    w, sc, b = packq.gptq_to_mlx(qweight, qzeros, s)
    with pytest.raises(ValueError, match="biases must be -scales \\* z"):
        packq.mlx_to_gptq(w, sc, b + np.float32(1e-3))
    with pytest.raises(ValueError, match="must hold the scales exactly"):
        packq.mlx_to_gptq(*packq.gptq_to_mlx(qweight, qzeros, s.astype(np.float32) * np.float32(1 + 2**-20)),
                          dtype="float16")
