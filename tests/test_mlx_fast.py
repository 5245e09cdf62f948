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
from packq.core import bits as B
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


# ------------------------------------------------------------------ masks of the differing codes, and their C counts
from pathlib import Path  # noqa: E402

from _paths import ROUTES, route  # noqa: E402

from packq.checkpoint.formats import mlx as mlx_format  # noqa: E402
from packq.checkpoint.formats.mlx import MaskTable, code_masks, counts_by_masks  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"


@given(modules())
def test_counts_by_masks_are_the_counts_of_every_weight(m):
    """Each (group, column)'s mask of differing codes, weighed by its histogram: every weight's counts."""
    q, z, s, source, dtype, levels = m
    with np.errstate(all="ignore"):
        assert counts_by_masks(code_histogram(q, z.shape[0], levels), code_masks(z, s, dtype, source, levels)) == \
            counts_direct(q, z, s, dtype, source)


@pytest.mark.parametrize("how", ROUTES)
@given(m=modules(), v1=st.booleans())
def test_mask_table_gives_every_pairs_own_mask(how, m, v1):
    """The table (each scale's masks for all zero-points, filled as scales are seen, here over two calls) and its C
    gather into (N, G): the masks computed pair by pair; zero-points up to 2**bits (a GPTQ v1 source's) too."""
    q, z, s, source, dtype, levels = m
    if v1:
        z = z + 1
    table = MaskTable(dtype, source, levels)
    with route(how), np.errstate(all="ignore"):
        want = code_masks(z, s, dtype, source, levels)
        half = z.shape[1] // 2
        table(z[:, :half], s[:, :half])  # some scales seen first
        assert np.array_equal(table(z, s), want)
        got = table.transposed(z, s)
        assert got.flags.c_contiguous and np.array_equal(got, want.T)


def _ct_words(q: np.ndarray) -> np.ndarray:
    """compressed-tensors' weight_packed (N, K/8) of 4-bit codes q (K, N): the layout MLX's weight has."""
    return np.ascontiguousarray(np.asarray(numpy_backend.run(B.pack, q.astype(np.int32), direction="row", bits=4)).T)


@st.composite
def counted(draw):
    """4-bit codes (K, N) and (N, G) masks: random bits (every bit pattern) or the masks of random scales."""
    k, n = draw(st.sampled_from(KS)), draw(st.sampled_from(NS))
    group = draw(st.sampled_from([g for g in (32, 64, 128) if k % g == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(0, draw(st.sampled_from([1, 2, 16])), (k, n)).astype(np.int16)
    masks = rng.integers(0, 2**32, (n, k // group), dtype=np.uint64).astype(np.uint32)
    masks &= draw(st.sampled_from([0, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x80018001]))
    return q, masks, group


@given(counted())
def test_c_counts_are_the_masked_histogram(c):
    """The C count (word by word, SSSE3 and AVX2, each as far as this CPU has it) of weight_packed words: the masked
    histogram of the same codes."""
    ck = numpy_kernels.c_kernels()
    if ck is None:
        pytest.skip("the C extension is not built")
    q, masks, group = c
    k, n = q.shape
    want = counts_by_masks(code_histogram(q, k // group, 16), np.ascontiguousarray(masks.T))
    words = _ct_words(q)
    for simd in (0, 1, 2):
        assert numpy_kernels.mlx_counts(words, masks, simd) == (want["cpu"], want["metal"])


@given(counted(), st.data())
def test_awq_to_ct_mlx_writes_weight_packed_and_counts_it(c, data):
    """The transpose that counts: weight_packed's rows of a block of AWQ word columns, the plain transpose's bytes,
    and the counts of exactly those rows; every simd level, in shares of word columns as threads take them."""
    ck = numpy_kernels.c_kernels()
    if ck is None:
        pytest.skip("the C extension is not built")
    q, masks, group = c
    k, n = q.shape
    words = np.asarray(numpy_backend.run(awq.pack_awq, q.astype(np.int32)))
    c0 = data.draw(st.integers(0, n // 8 - 1))
    c1 = data.draw(st.integers(c0 + 1, n // 8))
    rows = masks[8 * c0: 8 * c1]
    want_words = numpy_kernels.weight_to_ct_rows_ufuncs(words, c0, c1)
    want = counts_by_masks(code_histogram(q[:, 8 * c0: 8 * c1], k // group, 16), np.ascontiguousarray(rows.T))
    got, counts = numpy_kernels.weight_to_ct_piece_mlx(words, c0, c1, np.empty(32 * (c1 - c0) * k // 8, np.uint8), rows)
    assert np.array_equal(got, want_words) and counts == (want["cpu"], want["metal"])
    split = data.draw(st.integers(0, k // 32)) * 4  # two shares of whole 4-word chunks
    for level in range(ck.transposes(-1) + 1):  # the transposes plain and, where the CPU has it, by AVX-512
        ck.transposes(level)
        try:
            for simd in (0, 1, 2):
                out = np.zeros((8 * (c1 - c0), k // 8), np.uint32)
                parts = [ck.awq_to_ct_mlx(words.view(np.uint32), k, n // 8, c0, c1, out, g0, g1,
                                          np.ascontiguousarray(rows), masks.shape[1], simd)
                         for g0, g1 in ((0, split), (split, k // 8))]
                assert np.array_equal(out.view(np.int32), want_words)
                assert tuple(map(sum, zip(*parts))) == (want["cpu"], want["metal"])
        finally:
            ck.transposes(-1)


def test_negative_control_the_c_counts_see_one_bit_and_one_code():
    """The counts move with one mask bit and with one code: a count that ignored either would pass the properties
    above only by luck."""
    ck = numpy_kernels.c_kernels()
    if ck is None:
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, (128, 16)).astype(np.int16)
    masks = rng.integers(0, 2**32, (16, 1), dtype=np.uint64).astype(np.uint32)
    base = numpy_kernels.mlx_counts(_ct_words(q), masks)
    code = int(q[5, 7])
    flipped = masks.copy()
    flipped[7, 0] ^= np.uint32(1 << code)  # "cpu" bit of a code that column 7 has
    assert numpy_kernels.mlx_counts(_ct_words(q), flipped) != base
    moved = q.copy()
    moved[5, 7] = (code + 1) % 16
    other = masks.copy()
    other[7, 0] = np.uint32(1 << code)  # only that code differs in column 7: moving one weight off it is seen
    assert numpy_kernels.mlx_counts(_ct_words(moved), other)[0] == numpy_kernels.mlx_counts(_ct_words(q), other)[0] - 1


def test_c_mask_kernels_refuse_bad_arguments():
    ck = numpy_kernels.c_kernels()
    if ck is None:
        pytest.skip("the C extension is not built")
    table = np.zeros(65536 * 17, np.uint32)
    with pytest.raises(ValueError, match="mlx_masks: a zero-point of 17 or more"):
        ck.mlx_masks(np.zeros((1, 4), np.uint16), np.full((1, 4), 17, np.uint8), 1, 4, table, 17, np.zeros((4, 1), np.uint32),
                     0, 4)
    with pytest.raises(ValueError, match="table: 4 bytes, needs"):
        ck.mlx_masks(np.zeros((1, 4), np.uint16), np.zeros((1, 4), np.uint8), 1, 4, np.zeros(1, np.uint32), 17,
                     np.zeros((4, 1), np.uint32), 0, 4)
    with pytest.raises(ValueError, match=r"mlx_count: rows of 4 words, 1 groups, words \[0, 2\) disagree"):
        ck.mlx_count(np.zeros((8, 4), np.uint32), 8, 4, np.zeros((8, 1), np.uint32), 1, 0, 8, 0, 2, 2)
    with pytest.raises(ValueError, match="masks: 4 bytes, needs 128"):
        ck.mlx_count(np.zeros((8, 16), np.uint32), 8, 16, np.zeros(1, np.uint32), 4, 0, 8, 0, 16, 2)
    with pytest.raises(ValueError, match=r"masks: expected uint32 \(8, G\), got int32"):
        numpy_kernels.weight_to_ct_piece_mlx(np.zeros((32, 1), np.int32), 0, 1, np.zeros(128, np.uint8),
                                             np.zeros((8, 1), np.int32))


# ------------------------------------------------------------------ whole conversions
def _files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_counts_while_writing_are_the_counts_before_it(tmp_path, monkeypatch, dtype):
    """--mlx-scales float16/bfloat16 counted by the writing pass's C kernel, by after_write() (a kernel that counted
    nothing), and without the C kernels (before writing, from histograms): the same files and the same summary, which
    --verify checks against every weight."""
    from packq.checkpoint import convert_checkpoint
    from packq.checkpoint.formats import mlx as mlx_format

    calls = []
    real = numpy_kernels.weight_to_ct_piece_mlx
    monkeypatch.setattr(numpy_kernels, "weight_to_ct_piece_mlx", lambda *a: calls.append(1) or real(*a))
    results = {}
    for how in ("C", "after_write", "no C"):
        with route("C" if how != "no C" else "no C"), monkeypatch.context() as m:
            if how == "after_write":
                m.setattr(numpy_kernels, "weight_to_ct_piece_mlx", lambda *a: None)
            s = convert_checkpoint(EXAMPLE, tmp_path / how, to="mlx", mlx_scales=dtype, verify=True)
        results[how] = (_files(tmp_path / how), s["mlx"])
    assert calls and results["C"] == results["after_write"] == results["no C"]
    assert results["C"][1]["differing"]["cpu"] > 0 and results["C"][1]["modules_differing"]["cpu"]
    assert mlx_format.FORMAT.after_write is not None


def test_an_interrupted_counting_write_leaves_no_dst(tmp_path, monkeypatch):
    """A failure in the writing pass's counting kernel: no DST, nothing half-counted reported."""
    from packq.checkpoint import convert_checkpoint

    real, calls = numpy_kernels.weight_to_ct_piece_mlx, []

    def failing(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(numpy_kernels, "weight_to_ct_piece_mlx", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(EXAMPLE, tmp_path / "out", to="mlx", mlx_scales="float16")
    assert len(calls) >= 3 and not (tmp_path / "out").exists()  # (pieces queued behind it may still be made)
    assert [p.name for p in tmp_path.iterdir()] == []


@st.composite
def float16_scales(draw):
    """float16 scales (G, N) with float16's extremes among random ones, and zero-points of AWQ, GPTQ v1 or wider."""
    groups, n = draw(st.sampled_from([1, 2, 32])), draw(st.sampled_from([1, 7, 8, 40]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.standard_normal((groups, n)) * draw(st.sampled_from([2.0**-24, 1e-3, 1.0, 3e4]))
    extremes = np.array([65504.0, -65504.0, 2.0**-14, 2.0**-24, -(2.0**-24), 0.0, -0.0, np.inf, -np.inf], np.float32)
    s = np.where(rng.random((groups, n)) < draw(st.sampled_from([0.0, 0.3, 1.0])), rng.choice(extremes, (groups, n)), s)
    with np.errstate(over="ignore"):
        s = s.astype(np.float16)
    z = rng.integers(0, draw(st.sampled_from([16, 17, 256, 2**15])), (groups, n)).astype(np.int16)
    return s, z


@given(float16_scales(), st.sampled_from(["float16", "float32"]))
def test_c_scales_biases_are_numpys(sz, dtype):
    """The C kernel's scales and biases (F16C's conversions, transposed in one pass): the NumPy path's bytes, float16's
    extremes, infinities (whose products with a zero-point of 0 are NaN) and signed zeros among them."""
    s, z = sz
    got = numpy_kernels.mlx_scales_biases(s, z, dtype)
    if numpy_kernels.c_kernels() is None or got is None:
        pytest.skip("no C extension, or no F16C on this CPU")
    with np.errstate(all="ignore"):
        want = [mlx_format._stored(x, dtype) for x in mlx_format.MLX.scales_biases(s, z, dtype)]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()


def test_c_scales_biases_leave_nans_to_numpy_and_see_each_zero_point():
    """A NaN scale goes to NumPy's path (F16C would quiet a signalling NaN); one zero-point changed changes one bias."""
    if numpy_kernels.c_kernels() is None or numpy_kernels.mlx_scales_biases(
            np.ones((1, 1), np.float16), np.ones((1, 1), np.int16), "float16") is None:
        pytest.skip("no C extension, or no F16C on this CPU")
    s = np.full((2, 8), 0.1, np.float16)
    z = np.full((2, 8), 8, np.int16)
    nan = s.copy()
    nan.view(np.uint16)[1, 3] = 0x7D00  # a signalling NaN
    assert numpy_kernels.mlx_scales_biases(nan, z, "float16") is None
    scales, biases = numpy_kernels.mlx_scales_biases(s, z, "float16")
    z2 = z.copy()
    z2[1, 3] = 9
    _, other = numpy_kernels.mlx_scales_biases(s, z2, "float16")
    assert np.flatnonzero((other != biases).ravel()).tolist() == [3 * 2 + 1]
