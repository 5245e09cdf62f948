"""packq's C kernels (packq/backends/_ckernels.c) write the plain core's and the reference encoder's bytes.

AWQ -> GPTQ (into a new array and over its input, experts stacked), AWQ -> compressed-tensors' weight_packed rows
(any block of word columns, any share of the groups), GGUF's Q4_0 / Q5_0 / Q8_0 blocks of a column block (rows
permuted within it), by way of weight_packed's rows and in one pass from the words; each against the array-API
core or :func:`packq.formats.gguf.encode`, with negative controls; bad buffers refused with a ValueError naming
them; and whole conversions write the same files with and without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
from _paths import route
from hypothesis import given
from hypothesis import strategies as st

from packq.backends import numpy as numpy_backend
from packq.formats import awq
from packq.formats import compressed_tensors as ct
from packq.formats import gguf as G

ROOT = Path(__file__).resolve().parent.parent
#: tiles of 16 words and 64 groups: whole ones (SSE2 stores), partial ones, several of each (1040 = 2 x 64 + 2 groups)
SHAPES = [(8, 1), (8, 8), (16, 24), (64, 5), (32, 17), (256, 40), (1040, 33), (2, 16, 8), (3, 24, 7)]


def _ck():
    ck = numpy_backend.c_kernels()
    if ck is None:
        pytest.skip("packq's C extension is not built here")
    return ck


def _levels(ck) -> list[int]:
    """Every level of the word transposes this CPU runs: 0 (plain), and 1 (AVX-512) where it has it."""
    return list(range(ck.transposes(-1) + 1))


@contextlib.contextmanager
def _transposes(ck, level: int):
    """Within: the word transposes at ``level``; after: at what the CPU has."""
    assert ck.transposes(level) == level
    try:
        yield
    finally:
        ck.transposes(-1)


def _words(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)


def _core():
    import array_api_compat.numpy as xp

    return xp


def test_the_c_extension_is_built():
    """Wherever a C compiler exists (this project's machines and CI), pip built the extension: otherwise every
    property below would skip its C route."""
    if os.environ.get("PACKQ_CEXT") == "0":
        pytest.skip("PACKQ_CEXT=0")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: packq installs without its C kernels")
    assert numpy_backend.c_kernels() is not None, "packq/backends/_ckernels.c was not built: reinstall packq (pip install -e .)"


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1))
def test_awq_to_gptq_equals_plain_core(shape, seed):
    ck = _ck()
    qw = _words(shape, seed)
    want = np.asarray(awq.weight_to_gptq(_core(), qw))
    for level in _levels(ck):
        with _transposes(ck, level):
            got = numpy_backend.weight_to_gptq_c(qw, ck)
            assert got.dtype == np.int32 and got.shape == want.shape and got.tobytes() == want.tobytes()
            mine = qw.copy()
            over = numpy_backend.weight_to_gptq_c(mine, ck, over=True)
            assert np.shares_memory(over, mine) and over.tobytes() == want.tobytes()
    with route("C"):  # the public dispatch and the in-place route take it
        assert numpy_backend.weight_to_gptq(None, qw).tobytes() == want.tobytes()
        assert numpy_backend.BACKEND.run_over(awq.weight_to_gptq, qw.copy()).tobytes() == want.tobytes()


@given(shape=st.sampled_from([s for s in SHAPES if len(s) == 2]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_awq_to_ct_rows_equal_plain_core(shape, seed, data):
    """Any block of word columns, into a given buffer, by the public row function (threaded) and by one call per
    share of the groups."""
    ck = _ck()
    qw = _words(shape, seed)
    plain = np.asarray(ct.weight_from_awq(_core(), qw))
    k, c = shape
    c0 = data.draw(st.integers(0, c - 1))
    c1 = data.draw(st.integers(c0 + 1, c))
    cut = data.draw(st.integers(0, k // 8))
    for level in _levels(ck):
        buf = np.full(32 * (c1 - c0) * k // 8, 0xAB, np.uint8)
        with route("C"), _transposes(ck, level):
            got = numpy_backend.weight_to_ct_rows(qw, c0, c1, buf)
            assert np.shares_memory(got, buf) and got.tobytes() == plain[8 * c0 : 8 * c1].tobytes()
            out = np.full((8 * (c1 - c0), k // 8), 0x5A5A5A5A, np.uint32)
            ck.awq_to_ct(qw, k, c, c0, c1, out, 0, cut)
            ck.awq_to_ct(qw, k, c, c0, c1, out, cut, k // 8)
            assert out.tobytes() == plain[8 * c0 : 8 * c1].tobytes()


@st.composite
def gguf_pieces(draw):
    k = draw(st.sampled_from([32, 64, 128, 256]))
    c = draw(st.sampled_from([1, 2, 3, 17]))
    group = draw(st.sampled_from([g for g in (32, 64, 128, k) if k % g == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = rng.integers(-(2**31), 2**31, (k, c), dtype=np.int64).astype(np.int32)
    z = rng.integers(0, 16, (k // group, 8 * c)).astype(np.int16)
    gguf_type = draw(st.sampled_from(G.QUANTIZED))
    if gguf_type == "Q4_0" or draw(st.booleans()):
        z[:] = 8
    s = rng.standard_normal(z.shape).astype(draw(st.sampled_from([np.float16, np.float32])))
    c0 = draw(st.integers(0, c - 1))
    c1 = draw(st.integers(c0 + 1, c))
    cols = np.arange(8 * c0, 8 * c1)
    if draw(st.booleans()):
        cols = rng.permutation(cols)
    return words, z, s, c0, c1, cols, gguf_type


def _blocks(words, z, s, c0, c1, cols, gguf_type, out=None):
    g = np.arange(words.shape[0], dtype=np.int32) // (words.shape[0] // s.shape[0])
    d = G.block_scales(s[:, cols], g)
    return numpy_backend.gguf_blocks_awq_words(words, c0, c1, cols, z, d, gguf_type, out)


@given(gguf_pieces(), st.booleans())
def test_gguf_blocks_equal_the_encoders(p, into):
    """The C route's blocks are :func:`packq.formats.gguf.encode`'s bytes and the NumPy route's, into a given buffer
    or a new array."""
    words, z, s, c0, c1, cols, gguf_type = p
    q = numpy_backend.unpack_awq_u8(words)[:, cols]
    want = G.encode(q, z[:, cols], s[:, cols], gguf_type).tobytes()
    with route("no C"):
        assert _blocks(*p).tobytes() == want
    out = np.full(len(want), 0xCD, np.uint8) if into else None
    with route("C"):
        got = _blocks(*p, out=out)
    assert got.dtype == np.uint8 and got.tobytes() == want
    assert out is None or np.shares_memory(got, out)


@given(gguf_pieces(), st.booleans())
def test_fused_gguf_blocks_equal_the_encoders(p, into):
    """The one-pass kernel (AWQ words, zero-points and scales as stored, no weight_packed rows between) writes
    :func:`packq.formats.gguf.encode`'s bytes, rows permuted within the words, float16 or float32 scales (rounded to
    fp16 as :func:`packq.formats.gguf.block_scales` rounds them); Q4_0 only where every zero-point is 8."""
    ck = _ck()
    words, z, s, c0, c1, cols, gguf_type = p
    q = numpy_backend.unpack_awq_u8(words)[:, cols]
    want = G.encode(q, z[:, cols], s[:, cols], gguf_type).tobytes()
    for level in _levels(ck):
        out = np.full(len(want), 0xCD, np.uint8) if into else None
        with route("C"), _transposes(ck, level):
            got = numpy_backend.gguf_blocks_awq_fused(words, c0, c1, cols, z, s, gguf_type, out)
        assert got is not None and got.dtype == np.uint8 and got.tobytes() == want
        assert out is None or np.shares_memory(got, out)
    with route("no C"):
        assert numpy_backend.gguf_blocks_awq_fused(words, c0, c1, cols, z, s, gguf_type) is None


def test_the_transposes_run_at_every_level_the_cpu_has():
    """AVX-512 where the CPU has it (F, BW and VL, as /proc/cpuinfo names them), by default; a level the CPU lacks
    is capped, one that does not exist refused."""
    ck = _ck()
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo here")
    wide = int(sys.maxsize > 2**32 and {"avx512f", "avx512bw", "avx512vl"} <= set(flags))
    assert ck.transposes() == wide
    assert ck.transposes(1) == wide and ck.transposes(0) == 0 and ck.transposes(-1) == wide
    with pytest.raises(ValueError, match="transposes: level must be 0"):
        ck.transposes(2)
    assert ck.transposes() == wide


def test_negative_controls():
    """The comparisons above can fail: a group share left out leaves its words unwritten; a changed zero-point, a
    flipped code bit or reversed rows change the blocks; numba's kernel run over its own input is wrong where the C
    kernel, which copies each group aside first, is right."""
    ck = _ck()
    qw = _words((64, 5), 3)
    plain = np.asarray(ct.weight_from_awq(_core(), qw))
    out = np.zeros((40, 8), np.uint32)
    ck.awq_to_ct(qw, 64, 5, 0, 5, out, 0, 7)
    assert out.tobytes() != plain.tobytes() and out[:, :7].tobytes() == plain.view(np.uint32)[:, :7].tobytes()
    words, z = _words((128, 2), 5), np.random.default_rng(1).integers(0, 16, (2, 16)).astype(np.int16)
    s, cols = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float16), np.arange(16)
    with route("C"):
        for t in ("Q5_0", "Q8_0"):
            want = _blocks(words, z, s, 0, 2, cols, t).tobytes()
            other = z.copy()
            other[1, 3] = (other[1, 3] + 1) % 16
            flipped = words.copy()
            flipped[70, 1] ^= 1 << 9
            assert _blocks(words, other, s, 0, 2, cols, t).tobytes() != want
            assert _blocks(flipped, z, s, 0, 2, cols, t).tobytes() != want
            assert _blocks(words, z, s, 0, 2, cols[::-1].copy(), t).tobytes() != want
        assert _blocks(words, z, s, 0, 2, cols, "Q4_0") is None  # Q4_0 only where every zero-point is 8
        fused = numpy_backend.gguf_blocks_awq_fused
        for t in ("Q5_0", "Q8_0"):  # the one-pass kernel: the same controls, and a changed scale too
            want = fused(words, 0, 2, cols, z, s, t).tobytes()
            assert want == _blocks(words, z, s, 0, 2, cols, t).tobytes()
            other, flipped, scaled = z.copy(), words.copy(), s.copy()
            other[1, 3] = (other[1, 3] + 1) % 16
            flipped[70, 1] ^= 1 << 9
            scaled[1, 9] *= 2
            assert fused(words, 0, 2, cols, other, s, t).tobytes() != want
            assert fused(flipped, 0, 2, cols, z, s, t).tobytes() != want
            assert fused(words, 0, 2, cols, z, scaled, t).tobytes() != want
            assert fused(words, 0, 2, cols[::-1].copy(), z, s, t).tobytes() != want
        assert fused(words, 0, 2, cols, z, s, "Q4_0") is None


def test_bad_buffers_and_ranges_named():
    ck = _ck()
    qw = np.zeros((16, 3), np.int32)
    with pytest.raises(ValueError, match=r"src: 188 bytes, needs 192"):
        ck.awq_to_ct(np.zeros(47, np.int32), 16, 3, 0, 3, np.zeros((24, 2), np.int32), 0, 2)
    with pytest.raises(ValueError, match=r"out: 188 bytes, needs 192"):
        ck.awq_to_ct(qw, 16, 3, 0, 3, np.zeros(47, np.int32), 0, 2)
    with pytest.raises(ValueError, match=r"awq_to_ct: K 16, C 3, words \[2, 4\)"):
        ck.awq_to_ct(qw, 16, 3, 2, 4, np.zeros(64, np.int32), 0, 2)
    with pytest.raises(ValueError, match=r"awq_to_gptq: K 12"):
        ck.awq_to_gptq(qw, 12, 3, qw, 0, 1)
    with pytest.raises(ValueError, match=r"awq_to_gptq: .*groups \[0, 3\)"):
        ck.awq_to_gptq(qw, 16, 3, qw, 0, 3)
    with pytest.raises(ValueError, match="not C-contiguous"):  # a strided view is no contiguous buffer
        ck.awq_to_gptq(np.zeros((16, 6), np.int32)[:, ::2], 16, 3, qw, 0, 2)
    with pytest.raises(TypeError):  # a read-only output
        ck.awq_to_gptq(qw, 16, 3, bytes(192), 0, 2)
    ctw, z, d = np.zeros((8, 4), np.uint32), np.zeros((8, 1), np.uint8), np.zeros((8, 1), np.uint16)
    with pytest.raises(ValueError, match=r"ct_to_gguf: a row index outside \[0, 8\)"):
        ck.ct_to_gguf(ctw, 8, 4, np.full(8, 8, np.int64), z, 1, 8, d, 1, np.zeros(8 * 22, np.uint8), 0, 8)
    with pytest.raises(ValueError, match=r"out: 175 bytes, needs 176"):
        ck.ct_to_gguf(ctw, 8, 4, b"", z, 1, 8, d, 1, np.zeros(175, np.uint8), 0, 8)
    with pytest.raises(ValueError, match=r"kind 3"):
        ck.ct_to_gguf(ctw, 8, 4, b"", z, 1, 8, d, 3, np.zeros(8 * 34, np.uint8), 0, 8)
    with pytest.raises(ValueError, match=r"src: 8 bytes, needs 12"):
        ck.awq_unpack_u8(np.zeros(2, np.uint32), 3, np.zeros(24, np.uint8), 0, 3)
    with pytest.raises(ValueError, match=r"out: 23 bytes, needs 24"):
        ck.awq_unpack_u8(np.zeros(3, np.uint32), 3, np.zeros(23, np.uint8), 0, 3)
    with pytest.raises(ValueError, match=r"awq_unpack_u8: 3 words, \[0, 4\)"):
        ck.awq_unpack_u8(np.zeros(3, np.uint32), 3, np.zeros(24, np.uint8), 0, 4)
    with pytest.raises(TypeError, match=r"qweight: expected int32 or uint32 words, got float32"):
        numpy_backend.weight_to_gptq_c(np.zeros((8, 1), np.float32), ck)
    zz, ss = np.zeros((1, 8), np.uint8), np.zeros((1, 8), np.uint16)
    with pytest.raises(ValueError, match=r"awq_to_gguf: an output row outside \[0, 8\)"):
        ck.awq_to_gguf(np.zeros((32, 1), np.uint32), 32, 1, 0, 1, np.full(8, 8, np.int64), zz, ss, 32, 1, np.zeros(176, np.uint8))
    with pytest.raises(ValueError, match=r"out: 175 bytes, needs 176"):
        ck.awq_to_gguf(np.zeros((32, 1), np.uint32), 32, 1, 0, 1, b"", zz, ss, 32, 1, np.zeros(175, np.uint8))
    with pytest.raises(ValueError, match=r"awq_to_gguf: K 32, C 1, words \[0, 1\), 16 rows a group"):
        ck.awq_to_gguf(np.zeros((32, 1), np.uint32), 32, 1, 0, 1, b"", zz, ss, 16, 1, np.zeros(176, np.uint8))
    with pytest.raises(ValueError, match=r"s: 16 bytes, needs 32"):  # two groups' scales where one is given
        ck.awq_to_gguf(np.zeros((64, 1), np.uint32), 64, 1, 0, 1, b"", np.zeros((2, 8), np.uint8), ss, 32, 1,
                       np.zeros(352, np.uint8))
    with pytest.raises(ValueError, match=r"gguf_blocks_awq_fused: out must be 176 contiguous bytes"):
        numpy_backend.gguf_blocks_awq_fused(np.zeros((32, 1), np.int32), 0, 1, np.arange(8), np.full((1, 8), 8, np.int16),
                                            np.ones((1, 8), np.float16), "Q5_0", out=np.zeros(170, np.uint8))
    with pytest.raises(ValueError, match=r"gguf_blocks_awq_words: out must be 176 contiguous bytes"):
        _blocks(np.zeros((32, 1), np.int32), np.full((1, 8), 8, np.int16), np.ones((1, 8), np.float16), 0, 1,
                np.arange(8), "Q5_0", out=np.zeros(170, np.uint8))


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors", "mlx", "gguf"])
def test_conversions_write_the_same_files_without_the_c_kernels(tmp_path, monkeypatch, to):
    """The example checkpoint converted with the C kernels and without them (numba off too, so the ufuncs): the same
    bytes in every file; GGUF through the Llama stand-in of tests/test_gguf_convert.py (the example has no
    tokenizer)."""
    import gguf_checkpoints as C

    from packq.checkpoint import convert_checkpoint

    monkeypatch.setenv("PACKQ_NUMBA", "0")
    numpy_backend.numba_kernels.cache_clear()
    monkeypatch.setattr(numpy_backend, "_kernels_now", lambda wait=False: None)
    if to == "gguf":
        pytest.importorskip("gguf")
        module = types.ModuleType("packq.checkpoint.gguf_model")
        module.describe = C.describe
        monkeypatch.setitem(sys.modules, "packq.checkpoint.gguf_model", module)
    kw = {"for_engine": "tgi"} if to == "gptq" else {"to": to}
    ck, calls = _ck(), []
    def counting(name):
        real = getattr(ck, name)
        return lambda *a: (calls.append(name), real(*a))[1]

    counted = types.SimpleNamespace(**{name: counting(name) for name in dir(ck) if not name.startswith("_")})
    digests = []
    for how in ("C", "no C"):
        out = tmp_path / (f"{how}.gguf" if to == "gguf" else how)
        with route(how), monkeypatch.context() as m:
            if how == "C":
                m.setattr(numpy_backend, "c_kernels", lambda: counted)
            convert_checkpoint(ROOT / "examples" / "tiny-llama-awq", out, **kw)
        files = sorted(f for f in out.rglob("*") if f.is_file()) if out.is_dir() else [out]
        digests.append({f.relative_to(out).as_posix() if out.is_dir() else "DST": f.read_bytes() for f in files})
    assert digests[0] == digests[1] and digests[0]
    # the C route ran its kernels: AWQ -> GPTQ; weight_packed's rows (compressed-tensors, MLX); GGUF's blocks
    assert {"gptq": {"awq_to_gptq"}, "gguf": {"awq_to_gguf"}}.get(to, {"awq_to_ct"}) <= set(calls)
    numpy_backend.numba_kernels.cache_clear()


# ------------------------------------------------------------------ AWQ dequantization (packq.jax.load's host path)
#: (K, words a row, group size): groups of 16 rows or more (where the table pays), one group or many, odd word counts
DEQUANT_SHAPES = [(16, 1, 16), (32, 3, 16), (64, 2, 64), (128, 5, 32), (256, 17, 128), (96, 7, 48)]
#: (scales' dtype, output dtype or None for the scales'): the direct kernel's three kinds, then the table's others
DEQUANT_DTYPES = [("float16", None), ("float32", None), ("float16", "float32"), ("float16", "bfloat16"),
                  ("bfloat16", None), ("float32", "float16")]


def _dtype(name):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _every_bit_pattern(shape, name, rng):
    """Scales drawn from every bit pattern of their dtype: NaNs, infinities, subnormals and zeros among them."""
    bits = {2: np.uint16, 4: np.uint32}[_dtype(name).itemsize]
    return rng.integers(0, 1 << (8 * np.dtype(bits).itemsize), shape, dtype=np.uint64).astype(bits).view(_dtype(name))


def _dequant_case(shape, seed, scale_dtype):
    k, c, gs = shape
    rng = np.random.default_rng(seed)
    qw, qz = _words((k, c), seed), _words((k // gs, c), seed + 1)
    return qw, qz, _every_bit_pattern((k // gs, 8 * c), scale_dtype, rng)


def _dequant_want(qw, qz, s, out):
    from packq.backends.numpy import BACKEND
    from packq.formats import gptq

    with np.errstate(all="ignore"):
        want = np.asarray(BACKEND.run(gptq.dequantize_awq, qw, qz, s, plain=True))  # the array-API core
        return want if out is None else want.astype(_dtype(out))


@given(shape=st.sampled_from(DEQUANT_SHAPES), seed=st.integers(0, 2**30), dtypes=st.sampled_from(DEQUANT_DTYPES),
       direct=st.booleans(), block=st.booleans(), threaded=st.booleans())
def test_awq_dequant_rows_equal_plain_core(shape, seed, dtypes, direct, block, threaded):
    """dequantize_awq_rows writes the plain core's dequantization cast to the output dtype, bit for bit, for scales
    of every bit pattern: by the direct kernel (AVX2 + F16C) where it covers the dtypes and by the table's look-ups
    otherwise, over threads or not, from a whole qweight or from a block of columns of a wider one (read in place)."""
    _ck()
    scale_dtype, out = dtypes
    qw, qz, s = _dequant_case(shape, seed, scale_dtype)
    want = _dequant_want(qw, qz, s, out)
    words = qw
    if block:  # the block of columns a device takes, inside the box the loader read
        wide = _words((shape[0], 3 * shape[1] + 2), seed + 2)
        wide[:, shape[1] + 1 : 2 * shape[1] + 1] = qw
        words = wide[:, shape[1] + 1 : 2 * shape[1] + 1]
        assert not words.flags.c_contiguous
    z = numpy_backend.unpack_awq_u8(qz)
    with np.errstate(all="ignore"):
        got = numpy_backend.dequantize_awq_rows(words, z, s, None if out is None else _dtype(out), threaded=threaded,
                                                direct=direct)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


def test_awq_dequant_direct_is_there_and_declines_what_it_does_not_cover():
    """On x86-64 (this project's machines) the direct kernel runs; where the table would not pay (groups of fewer than
    16 rows), for 1-byte outputs and without the C kernels the function declines (None: the caller takes the core)."""
    import platform

    ck = _ck()
    if platform.machine() in ("x86_64", "AMD64"):
        assert ck.has_direct()
    qw, qz, s = _dequant_case((64, 2, 8), 1, "float16")  # 8 groups of 8 rows: a table of 16 entries a group is 2x K
    z = numpy_backend.unpack_awq_u8(qz)
    assert numpy_backend.dequantize_awq_rows(qw, z, s) is None
    qw, qz, s = _dequant_case((64, 2, 32), 1, "float16")
    z = numpy_backend.unpack_awq_u8(qz)
    assert numpy_backend.dequantize_awq_rows(qw, z, s, np.dtype(np.int8)) is None
    with route("no C"):
        assert numpy_backend.dequantize_awq_rows(qw, z, s) is None


def test_awq_dequant_negative_controls():
    """The comparison above can fail: a changed zero-point, a flipped code bit, a changed scale, a share of rows left
    out, each changes the output of both kernels."""
    _ck()
    qw, qz, s = _dequant_case((128, 5, 32), 7, "float16")
    s = np.where(np.isfinite(s) & (np.abs(s) < 1000), s, np.float16(1)).astype(np.float16)  # no overflow: no warnings
    want = _dequant_want(qw, qz, s, None).tobytes()
    z = numpy_backend.unpack_awq_u8(qz)
    for direct in (True, False):
        assert numpy_backend.dequantize_awq_rows(qw, z, s, direct=direct).tobytes() == want
        other = z.copy()
        other[2, 9] ^= 1
        flipped = qw.copy()
        flipped[70, 3] ^= 1 << 13
        scaled = s.copy()
        scaled[1, 30] = -scaled[1, 30] if scaled[1, 30] else np.float16(1)
        assert numpy_backend.dequantize_awq_rows(qw, other, s, direct=direct).tobytes() != want
        assert numpy_backend.dequantize_awq_rows(flipped, z, s, direct=direct).tobytes() != want
        assert numpy_backend.dequantize_awq_rows(qw, z, scaled, direct=direct).tobytes() != want
    ck = numpy_backend.c_kernels()
    out = np.zeros((128, 40), np.float16)
    ck.awq_dequant_direct(qw, 0, 5, 128, 5, z, s.view(np.uint16), 4, 32, 0, out.view(np.uint16), 0, 64)  # rows [0, 64)
    assert out.tobytes() != want and out[:64].tobytes() == np.frombuffer(want, np.float16).reshape(128, 40)[:64].tobytes()


def test_awq_dequant_bad_buffers_and_arguments_named():
    ck = _ck()
    qw, z = np.zeros((32, 2), np.int32), np.zeros((2, 16), np.uint8)
    s, out = np.zeros((2, 16), np.uint16), np.zeros((32, 16), np.uint16)
    table = np.zeros((2, 16, 16), np.uint16)
    with pytest.raises(ValueError, match=r"src: 252 bytes, needs 256"):
        ck.awq_dequant(np.zeros(63, np.int32), 0, 2, 32, 2, table, 2, 16, 2, out, 0, 32)
    with pytest.raises(ValueError, match=r"src: 256 bytes, needs 260"):  # one word of offset past the end
        ck.awq_dequant(qw, 1, 2, 32, 2, table, 2, 16, 2, out, 0, 32)
    with pytest.raises(ValueError, match=r"table: 1024 bytes, needs 2048"):
        ck.awq_dequant(qw, 0, 2, 32, 2, table, 2, 16, 4, np.zeros((32, 16), np.uint32), 0, 32)
    with pytest.raises(ValueError, match=r"out: 1022 bytes, needs 1024"):
        ck.awq_dequant(qw, 0, 2, 32, 2, table, 2, 16, 2, np.zeros(511, np.uint16), 0, 32)
    with pytest.raises(ValueError, match=r"awq_dequant: K 32, C 2, offset 0, stride 1, 2 groups of 16"):
        ck.awq_dequant(qw, 0, 1, 32, 2, table, 2, 16, 2, out, 0, 32)  # rows closer than their words
    with pytest.raises(ValueError, match=r"3 groups of 16"):
        ck.awq_dequant(qw, 0, 2, 32, 2, table, 3, 16, 2, out, 0, 32)
    with pytest.raises(ValueError, match=r"size 3"):
        ck.awq_dequant(qw, 0, 2, 32, 2, table, 2, 16, 3, out, 0, 32)
    with pytest.raises(ValueError, match=r"rows \[0, 33\)"):
        ck.awq_dequant(qw, 0, 2, 32, 2, table, 2, 16, 2, out, 0, 33)
    if ck.has_direct():
        with pytest.raises(ValueError, match=r"zeros: 31 bytes, needs 32"):
            ck.awq_dequant_direct(qw, 0, 2, 32, 2, z.reshape(-1)[:31], s, 2, 16, 0, out, 0, 32)
        with pytest.raises(ValueError, match=r"scales: 64 bytes, needs 128"):
            ck.awq_dequant_direct(qw, 0, 2, 32, 2, z, s, 2, 16, 1, np.zeros((32, 16), np.uint32), 0, 32)
        with pytest.raises(ValueError, match=r"out: 1024 bytes, needs 2048"):
            ck.awq_dequant_direct(qw, 0, 2, 32, 2, z, s, 2, 16, 2, out, 0, 32)
        with pytest.raises(ValueError, match=r"kind 3"):
            ck.awq_dequant_direct(qw, 0, 2, 32, 2, z, s, 2, 16, 3, out, 0, 32)
    with pytest.raises(ValueError, match=r"dequantize_awq_rows: qweight \(32, 2\), zeros \(2, 8\)"):
        numpy_backend.dequantize_awq_rows(qw, z[:, :8], s.view(np.float16))
    with pytest.raises(ValueError, match=r"out must be C-contiguous float16 \(32, 16\), got float16 \(16, 32\)"):
        numpy_backend.dequantize_awq_rows(qw, z, s.view(np.float16), out=np.zeros((16, 32), np.float16))


def test_sizes_whose_byte_counts_overflow_are_refused():
    """Sizes whose products of bytes wrap past 2**63 (to 0, or to a few bytes) are refused as too large for any
    buffer, not checked against the wrapped count (each of these calls read or wrote outside its buffers)."""
    ck = _ck()
    big = r"needs more bytes than a buffer holds"
    u16, u32 = np.zeros(64, np.uint16), np.zeros(64, np.uint32)
    with pytest.raises(ValueError, match=big):  # 4 K C = 2**68, 32 (c1 - c0) K/8 = 2**64
        ck.awq_to_ct(b"", 2**40, 2**26, 0, 2**22, bytearray(), 0, 1)
    with pytest.raises(ValueError, match=big):
        ck.awq_to_gptq(b"", 2**40, 2**26, bytearray(), 0, 1)
    with pytest.raises(ValueError, match=big):  # 4 n and 8 n: 2**64, 2**65
        ck.awq_unpack_u8(b"", 2**62, bytearray(), 0, 1)
    with pytest.raises(ValueError, match=big):  # every count a multiple of 2**64
        ck.ct_to_gguf(b"", 2**40, 2**26, b"", b"", 2**24, 2**40, b"", 0, bytearray(), 0, 1)
    with pytest.raises(ValueError, match=big):
        ck.awq_to_gguf(b"", 2**40, 2**26, 0, 2**26, b"", b"", b"", 32, 1, bytearray())
    with pytest.raises(ValueError, match=big):  # rows 2**61 + 1 words apart: 4 (2 stride + 1) = 2**64 + 12
        ck.awq_dequant(u32, 0, 2**61 + 1, 3, 1, u16, 1, 3, 2, u16, 0, 3)
    if ck.has_direct():
        with pytest.raises(ValueError, match=big):
            ck.awq_dequant_direct(u32, 0, 2**61 + 1, 3, 1, np.zeros(8, np.uint8), u16, 1, 3, 0, u16, 0, 3)
    with pytest.raises(ValueError, match=big):
        ck.awq_to_ct_mlx(b"", 2**40, 2**27, 0, 2**27, bytearray(), 0, 4, b"", 2**32, 2)
    with pytest.raises(ValueError, match=big):
        ck.mlx_count(b"", 2**40, 2**24, b"", 2**22, 0, 1, 0, 4, 2)
    with pytest.raises(ValueError, match=big):  # 4 * 65536 zn = 2**64: the table indexed by bits * zn
        ck.mlx_masks(np.ones(1, np.uint16), np.zeros(1, np.uint8), 1, 1, b"", 2**46, u32, 0, 1)
    # 2 G N = 2**63 + 4 (negative): the NaN scan read G N = 2**62 + 2 scales of a buffer of 4
    if ck.mlx_scales_biases(np.ones(1, np.uint16), np.zeros(1, np.int16), 1, 1, 0, u16, u16, 0, 1):
        with pytest.raises(ValueError, match=big):
            ck.mlx_scales_biases(u16[:4], np.zeros(4, np.int16), 2**61 + 1, 2, 0, u16, u16, 0, 0)


@given(shape=st.sampled_from(DEQUANT_SHAPES), seed=st.integers(0, 2**30), dtypes=st.sampled_from(DEQUANT_DTYPES[:3]),
       swap=st.sampled_from(["scales", "output", "both"]), direct=st.booleans())
def test_awq_dequant_rows_of_other_byte_orders_equal_plain_core(shape, seed, dtypes, swap, direct):
    """Scales or an output dtype of the other byte order (the direct kernel's dtypes: float16, float32): the plain
    core's values, each in the output's own byte order (the kernels write native bits, so those go through the
    table, whose entries are already the output's bytes)."""
    _ck()
    scale_dtype, out = dtypes
    qw, qz, s = _dequant_case(shape, seed, scale_dtype)
    want = _dequant_want(qw, qz, s, out)
    out_dt = want.dtype
    if swap in ("scales", "both"):
        s = s.astype(s.dtype.newbyteorder())
    if swap in ("output", "both"):
        out_dt = out_dt.newbyteorder()
    z = numpy_backend.unpack_awq_u8(qz)
    with np.errstate(all="ignore"):
        got = numpy_backend.dequantize_awq_rows(qw, z, s, None if out is None and swap == "scales" else out_dt,
                                                direct=direct)
    assert got is not None and got.shape == want.shape
    assert got.astype(want.dtype).tobytes() == want.tobytes()
