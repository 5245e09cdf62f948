"""GGUF's fast paths write the array-API encoder's bytes: the compiled block kernels (from unpacked codes and from AWQ
words read in place), the byte-wise AWQ unpack, the census by block bounds, and whole conversions with and without
the kernels; each with a negative control (a changed input changes the bytes, so the comparison can fail)."""

from __future__ import annotations

import sys
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

KS = (32, 64, 128, 256)
NS = (1, 7, 8, 64, 65, 130)


def _kernels():
    pytest.importorskip("numba")
    return numpy_backend.numba_kernels()


@st.composite
def modules(draw, awq_words: bool = False):
    """Codes, zero-points (in and beyond the types' ranges: the kernel clips as the encoder does), scales, g_idx."""
    k = draw(st.sampled_from(KS))
    n = draw(st.sampled_from(NS if not awq_words else tuple(x for x in NS if x % 8 == 0)))
    group = draw(st.sampled_from([g for g in (32, 64, 128, k) if k % g == 0]))
    groups = k // group
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    top = 16 if awq_words else draw(st.sampled_from([4, 8, 16, 256]))
    q = rng.integers(0, top, (k, n)).astype(np.uint8)
    z = rng.integers(0, draw(st.sampled_from([1, 9, 16] if awq_words else [1, 9, 16, 256])), (groups, n)).astype(np.int16)
    if draw(st.booleans()) and not awq_words:  # symmetric codes
        z[:] = top // 2
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    with np.errstate(over="ignore"):  # infinite fp16 scales too: their d bytes must agree as well
        s = (rng.standard_normal((groups, n)) * draw(st.sampled_from([1e-3, 1.0, 1e5]))).astype(dtype)
    g = np.arange(k, dtype=np.int32) // group
    if draw(st.booleans()) and not awq_words:  # act-order: a permuted g_idx, blocks of several groups
        g = rng.permutation(g).astype(np.int32)
    return q, z, s, g, draw(st.sampled_from(G.QUANTIZED))


@given(modules())
def test_block_kernel_writes_the_encoders_bytes(m):
    _kernels()
    q, z, s, g, gguf_type = m
    with np.errstate(over="ignore"):
        want = G.encode(q, z, s, gguf_type, g)
        d = G.block_scales(s, g)
    got = numpy_backend.gguf_blocks_t(q, z, g, d, gguf_type)
    assert got is not None and got.dtype == np.uint8 and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def _awq_words(q: np.ndarray) -> np.ndarray:
    return np.asarray(BACKEND.run(awq.pack_awq, q.astype(np.int32)))


@given(modules(awq_words=True), st.integers(0, 2**32 - 1))
def test_awq_block_kernel_writes_the_encoders_bytes(m, seed):
    """From the words in place, for any choice and order of output columns (a row permutation, a column block)."""
    _kernels()
    q, z, s, g, gguf_type = m
    n = q.shape[1]
    rng = np.random.default_rng(seed)
    cols = rng.permutation(n)[: rng.integers(1, n + 1)]
    with np.errstate(over="ignore"):
        want = G.encode(q[:, cols], z[:, cols], s[:, cols], gguf_type, g)
        d = G.block_scales(s[:, cols], g)
    got = numpy_backend.gguf_blocks_awq_t(_awq_words(q), cols, z, d, gguf_type)
    assert got is not None and got.tobytes() == want.tobytes()


@given(modules(awq_words=True), st.integers(0, 2**32 - 1))
def test_awq_rows_kernel_writes_the_encoders_bytes(m, seed):
    """Whole words' columns, each word read once, rows permuted within (as Llama's rotary permutation moves them)."""
    _kernels()
    q, z, s, g, gguf_type = m
    cols = np.random.default_rng(seed).permutation(q.shape[1])
    rowof = np.empty_like(cols)
    rowof[cols] = np.arange(cols.size)
    with np.errstate(over="ignore"):
        want = G.encode(q[:, cols], z[:, cols], s[:, cols], gguf_type, g)
        d = G.block_scales(s[:, cols], g)
    got = numpy_backend.gguf_blocks_awq_rows_t(_awq_words(q), rowof, z, d, gguf_type)
    assert got is not None and got.tobytes() == want.tobytes()


@given(modules(awq_words=True))
def test_census_from_the_kernels_code_bounds(m):
    _kernels()
    q, z, s, g, _ = m
    qmin, qmax = numpy_backend.awq_code_bounds_t(_awq_words(q))
    b = q.reshape(-1, 32, q.shape[1])
    assert np.array_equal(qmin, b.min(axis=1)) and np.array_equal(qmax, b.max(axis=1))
    assert G.census_of_bounds(qmin, qmax, z, s) == G.census(q.astype(np.int32), z, s, g, rounding=False)


@given(modules(awq_words=True), st.sampled_from(G.FLOATS))
def test_awq_float_kernel_writes_the_encoders_bytes(m, gguf_type):
    """F32/F16/BF16 from the words through the table of each (group, column)'s 16 products."""
    _kernels()
    q, z, s, g, _ = m
    with np.errstate(over="ignore", invalid="ignore"):
        want = G.encode(q, z, s, gguf_type, g)
        got = numpy_backend.gguf_floats_awq_t(_awq_words(q), z, s, gguf_type)
    assert got is not None and got.shape == want.shape and got.tobytes() == want.tobytes()


def _histogram(q: np.ndarray, groups: int) -> np.ndarray:
    k, n = q.shape
    qg = q.reshape(groups, k // groups, n)
    return np.stack([(qg == v).sum(axis=1) for v in range(16)], axis=-1)


@given(modules(awq_words=True))
def test_rounding_by_histogram_is_the_census_and_error_of_every_weight(m):
    """The kernel's histogram is NumPy's; the F16/BF16 counts and largest errors from it are those computed weight
    by weight (census(rounding=True) and the error of encode -> dequantize against the product)."""
    _kernels()
    q, z, s, g, _ = m
    hist = numpy_backend.awq_histogram_t(_awq_words(q), z.shape[0])
    assert np.array_equal(hist, _histogram(q, z.shape[0]))
    counts, errors = G.rounding_by_histogram(z, s, hist)
    with np.errstate(over="ignore", invalid="ignore"):
        assert counts == G.census(q, z, s, g).rounded
        w = G.product(q, z, s, g)
        for t in ("F16", "BF16"):
            diff = np.abs(G.dequantize(G.encode(q, z, s, t, g), t, w.shape).astype(np.float64) - w.astype(np.float64))
            want = 0.0 if np.isnan(diff).all() else float(np.nanmax(diff))
            assert errors[t] == want or (np.isnan(errors[t]) and np.isnan(want))


def _rounding_weight_by_weight(q, z, s, g):
    """census(rounding=True)'s counts, and the largest |error| of encode -> dequantize in float64, weight by weight."""
    with np.errstate(over="ignore", invalid="ignore"):
        w = G.product(q, z, s, g)
        errors = {}
        for t in ("F16", "BF16"):
            diff = np.abs(G.dequantize(G.encode(q, z, s, t, g), t, w.shape).astype(np.float64) - w.astype(np.float64))
            errors[t] = 0.0 if np.isnan(diff).all() else float(np.nanmax(diff))
        return G.census(q, z, s, g).rounded, errors


@given(st.sampled_from((np.float16, np.float32)), st.integers(0, 2**32 - 1), st.sampled_from((1, 9, 16)))
def test_rounding_by_histogram_at_every_scale_bit_pattern(dtype, seed, ztop):
    """Scales of any bits (NaN, infinities, subnormals, float32's extremes, where BF16's rounding overflows and
    F16's underflows), with codes some (group, column)s lack: the counts and largest errors are weight by weight's,
    NaN products passed over as they are there."""
    rng = np.random.default_rng(seed)
    k, n, groups = 64, 16, 2
    q = rng.integers(0, 16, (k, n)).astype(np.uint8)
    q[: k // 2, :4] = 3  # the first group of four columns has one code only: the others count for nothing
    z = rng.integers(0, ztop, (groups, n)).astype(np.int16)
    width = 16 if dtype == np.float16 else 32
    s = rng.integers(0, 2**width, (groups, n), dtype=np.uint64).astype(f"u{width // 8}").view(dtype)
    if dtype == np.float32:  # and the edges themselves, which random bits seldom reach
        s[0, :8] = np.array([3.4028235e38, -3.4028235e38, 1e-45, 1.1754942e-38, 65504.0, 6.1e-5, np.inf, -0.0],
                            np.float32)
    g = np.arange(k, dtype=np.int32) // (k // groups)
    hist = _histogram(q, groups)
    counts, errors = G.rounding_by_histogram(z, s, hist)
    want_counts, want_errors = _rounding_weight_by_weight(q, z, s, g)
    assert counts == want_counts and errors == want_errors, (counts, want_counts, errors, want_errors)


@pytest.mark.parametrize("low", (0x7FFF, 0x8000, 0x8001, 0x18000, 0x1FFFF, 0x0001))
def test_rounding_by_histogram_rounds_each_product_as_ggml(low):
    """One product a call, a float32 whose low half sits at, below or above BF16's halfway point (a tie at an even
    and at an odd kept bit): the largest error is that product's own, so an error off by one unit in float32's
    last place shows (the property above takes the largest over many weights, which can hide it). Which way a tie
    rounds cannot show here: both ways are half a unit of BF16's last place."""
    bits = np.uint32(0x3F800000 | low)  # 1.0 and the pattern below it
    s = np.array([[bits]], np.uint32).view(np.float32)
    q, z = np.ones((32, 1), np.uint8), np.zeros((1, 1), np.int16)
    g = np.zeros(32, np.int32)
    counts, errors = G.rounding_by_histogram(z, s, _histogram(q, 1))
    assert (counts, errors) == _rounding_weight_by_weight(q, z, s, g)
    assert errors["BF16"] > 0 and counts["BF16"] == 32


@pytest.mark.parametrize("how", ROUTES)
@given(k=st.sampled_from(KS), c=st.sampled_from((1, 2, 17)), seed=st.integers(0, 2**32 - 1))
def test_awq_byte_unpack_is_unpack_awq(how, k, c, seed):
    """By the C kernel (shifts) and without it (strided byte operations): the plain core's values."""
    import array_api_compat.numpy as xp

    words = np.random.default_rng(seed).integers(0, 2**32, (k, c), dtype=np.uint64).astype(np.uint32).view(np.int32)
    want = np.asarray(awq.unpack_awq(xp, words))
    with route(how):
        assert np.array_equal(numpy_backend.unpack_awq_u8(words), want)
        out = np.empty((k, 8 * c), np.uint8)
        assert numpy_backend.unpack_awq_u8(words, out=out) is out and np.array_equal(out, want)
        out[:] = 0  # on the calling thread alone (packq.jax.load's host path): the same values
        assert numpy_backend.unpack_awq_u8(words, out=out, split=False) is out and np.array_equal(out, want)


@given(modules())
def test_census_by_block_bounds_is_the_census_of_differences(m):
    """uint8 codes take the block-bounds path; the same codes as int32 take the differences path."""
    q, z, s, g, _ = m
    assert G.census(q, z, s, g, rounding=False) == G.census(q.astype(np.int32), z, s, g, rounding=False)


def test_negative_controls():
    """One changed zero-point changes the kernels' bytes and the census: the comparisons above can fail."""
    _kernels()
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, (64, 16)).astype(np.uint8)
    z = rng.integers(0, 16, (2, 16)).astype(np.int16)
    s = rng.random((2, 16)).astype(np.float16)
    g = np.arange(64, dtype=np.int32) // 32
    want = G.encode(q, z, s, "Q5_0", g)
    other = z.copy()
    other[1, 3] ^= 1
    assert numpy_backend.gguf_blocks_t(q, other, g, G.block_scales(s, g), "Q5_0").tobytes() != want.tobytes()
    got = numpy_backend.gguf_blocks_awq_t(_awq_words(q), np.arange(16), other, G.block_scales(s, g), "Q5_0")
    assert got.tobytes() != want.tobytes()
    assert numpy_backend.gguf_floats_awq_t(_awq_words(q), other, s, "F16").tobytes() != G.encode(q, z, s, "F16", g).tobytes()
    hist = numpy_backend.awq_histogram_t(_awq_words(q), 2)
    assert G.rounding_by_histogram(other, s, hist)[0] != G.census(q, z, s, g).rounded or \
        G.rounding_by_histogram(other, s, hist)[1] != G.rounding_by_histogram(z, s, hist)[1]
    far = np.full_like(z, 12)  # q - z reaches -12: Q4_0 not exact, and the census says so on both paths
    assert G.census(q, far, s, g, rounding=False).exact["Q4_0"] < G.census(q, z * 0 + 8, s, g, rounding=False).exact["Q4_0"]


def test_kernels_check_their_arguments():
    _kernels()
    q = np.zeros((64, 8), np.uint8)
    with pytest.raises(ValueError, match="disagree"):
        numpy_backend.gguf_blocks_t(q, np.zeros((2, 8), np.int16), np.full(64, 2, np.int32),
                                    np.zeros((8, 2), np.uint16), "Q4_0")
    with pytest.raises(ValueError, match="disagree"):
        numpy_backend.gguf_blocks_awq_t(np.zeros((64, 1), np.int32), np.array([8]), np.zeros((2, 8), np.int16),
                                        np.zeros((1, 2), np.uint16), "Q4_0")


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"


@pytest.mark.parametrize("gguf_type", ["q4_0", "q5_0", "q8_0", "f16", "bf16", "f32"])
def test_conversions_with_and_without_the_kernels_write_the_same_file(tmp_path, monkeypatch, gguf_type):
    """AWQ (words read in place) and GPTQ v2 (unpacked codes): the file of the fused C kernel, of the whole-word path,
    of the kernels, of the array-API fallbacks and of the route before the AWQ fast paths (module_integers and encode)
    are one file; the kernels ran (the whole-word path off), and the fused kernel and the whole-word path ran for
    AWQ's quantized types."""
    pytest.importorskip("gguf")
    import types

    import gguf_checkpoints as C

    from packq.checkpoint import convert_checkpoint
    from packq.checkpoint.formats import gguf as F

    _kernels()
    module = types.ModuleType("packq.checkpoint.gguf_model")
    module.describe = C.describe  # the Llama-only stand-in of tests/test_gguf_convert.py (no tokenizer)
    monkeypatch.setitem(sys.modules, "packq.checkpoint.gguf_model", module)
    C.make_gptq(tmp_path / "gptq", bits=4, group=32)
    for src in (EXAMPLE, tmp_path / "gptq"):
        files, summaries = {}, {}
        for how in ("fused", "words", "kernels", "fallback", "before"):
            calls: list[bool] = []
            words: list[bool] = []
            fused: list[bool] = []
            with monkeypatch.context() as m:
                real_words, real_fused = numpy_backend.gguf_blocks_awq_words, numpy_backend.gguf_blocks_awq_fused
                if how == "fused":  # the one C kernel from the words, zero-points and scales as stored
                    m.setattr(numpy_backend, "gguf_blocks_awq_fused",
                              lambda *a: (r := real_fused(*a), fused.append(r is not None))[0])
                else:  # the other routes without it
                    m.setattr(numpy_backend, "gguf_blocks_awq_fused", lambda *a: None)
                if how == "words":
                    m.setattr(numpy_backend, "gguf_blocks_awq_words",
                              lambda *a: (r := real_words(*a), words.append(r is not None))[0])
                else:  # the other routes without it
                    m.setattr(numpy_backend, "gguf_blocks_awq_words", lambda *a: None)
                if how == "kernels":
                    m.setattr(numpy_backend, "_kernels_now", lambda wait=False: numpy_backend.numba_kernels())
                    for name in ("gguf_blocks_t", "gguf_blocks_awq_t", "gguf_blocks_awq_rows_t", "gguf_floats_awq_t"):
                        real = getattr(numpy_backend, name)
                        m.setattr(numpy_backend, name, lambda *a, real=real: (r := real(*a), calls.append(r is not None))[0])
                else:
                    m.setattr(numpy_backend, "_kernels_now", lambda wait=False: None)
                if how == "before":
                    m.setattr(F, "_awq_arrays", lambda *a: None)
                dst = tmp_path / f"{src.name}-{how}.gguf"
                s = convert_checkpoint(src, dst, to="gguf", gguf_type=gguf_type, allow_inexact=True, verify=True)
                assert s["verified"]
            if how == "kernels":  # GPTQ sources' float types have no kernel: the array-API encoder writes them
                assert all(calls) and (bool(calls) or (src != EXAMPLE and gguf_type in ("f16", "bf16", "f32")))
            if how == "words" and src == EXAMPLE and gguf_type in ("q5_0", "q8_0"):  # the example is asymmetric: no Q4_0
                assert words and all(words)
            if how == "fused" and src == EXAMPLE and gguf_type in ("q5_0", "q8_0") and numpy_backend.c_kernels():
                assert fused and all(fused)
            files[how] = dst.read_bytes()
            summaries[how] = {key: v for key, v in s.items() if key not in ("dst", "seconds", "elapsed")}
        assert files["fused"] == files["words"] == files["kernels"] == files["fallback"] == files["before"], src
        assert summaries["fused"] == summaries["words"] == summaries["kernels"], src
        assert summaries["kernels"]["max_weight_error"] == summaries["before"]["max_weight_error"], src
        assert summaries["kernels"].keys() == summaries["before"].keys()


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_a_rounding_plan_counts_each_module_once(tmp_path, monkeypatch, gguf_type):
    """F16/BF16 of an AWQ source: each module's rounding counts and largest error come from one pass over its
    histogram (the census's), which the plan's max_weight_error then reads; the same error as counted again."""
    pytest.importorskip("gguf")
    import types

    import gguf_checkpoints as C

    from packq.checkpoint import convert_checkpoint
    from packq.checkpoint.formats import gguf as F

    _kernels()
    module = types.ModuleType("packq.checkpoint.gguf_model")
    module.describe = C.describe
    monkeypatch.setitem(sys.modules, "packq.checkpoint.gguf_model", module)
    monkeypatch.setattr(numpy_backend, "_kernels_now", lambda wait=False: numpy_backend.numba_kernels())
    calls = []
    real = G.rounding_by_histogram
    monkeypatch.setattr(G, "rounding_by_histogram", lambda *a: (calls.append(1), real(*a))[1])
    s = convert_checkpoint(EXAMPLE, tmp_path / "a.gguf", to="gguf", gguf_type=gguf_type, allow_inexact=True)
    assert s["max_weight_error"] > 0 and calls
    once = len(calls)
    census = F.module_census

    def without_errors(*a, **k):  # the plan recounts where the census has no errors (a source without histograms)
        c = census(*a, **k)
        c.max_error = None
        return c

    monkeypatch.setattr(F, "module_census", without_errors)
    calls.clear()
    again = convert_checkpoint(EXAMPLE, tmp_path / "b.gguf", to="gguf", gguf_type=gguf_type, allow_inexact=True)
    assert again["max_weight_error"] == s["max_weight_error"] and len(calls) == 2 * once
