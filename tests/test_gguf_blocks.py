"""GGUF block types at the array level (packq.formats.gguf): golden blocks on every backend, gguf-py and ggml
as independent readers, and hypothesis properties of exactness and refusal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURES, assert_same
from packq import backends
from packq.formats import gguf as G

GOLDEN = dict(np.load(FIXTURES / "gguf_golden.npz"))


def _core(q, z, g, gguf_type):
    be = backends.for_arrays(q=q)
    return be.run(G.block_integers, be.run(G.differences, q, z, g), gguf_type=gguf_type)


@pytest.mark.parametrize("gguf_type", G.QUANTIZED)
def test_golden_blocks_every_backend(lib, gguf_type):
    """The integer bytes of gguf-py's own quantizer (scripts/make_gguf_golden.py), from the core on every backend."""
    q, z, s, blocks = (GOLDEN[f"{gguf_type}_{p}"] for p in ("q", "z", "s", "blocks"))
    g = (np.arange(q.shape[0]) // (q.shape[0] // z.shape[0])).astype(np.int32)
    qi, zi = q.astype(np.int16), z.astype(np.int16)
    got = lib.call(_core, lib.asarray(qi), lib.asarray(zi), lib.asarray(g), gguf_type)
    want = blocks.reshape(q.shape[1], -1, G.TYPES[gguf_type].nbytes)[..., 2:]
    assert_same(lib, got, want)


@pytest.mark.parametrize("gguf_type", G.QUANTIZED)
def test_golden_whole_blocks(gguf_type):
    q, z, s, blocks = (GOLDEN[f"{gguf_type}_{p}"] for p in ("q", "z", "s", "blocks"))
    assert G.encode(q, z, s, gguf_type).tobytes() == blocks.tobytes()
    assert G.census(q, z, s).holds(gguf_type)
    assert G.dequantize(blocks, gguf_type, (q.shape[1], q.shape[0])).tobytes() == G.product(q, z, s).tobytes()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_encode_on_other_backends(backend):
    be = backends.for_arrays(x=pytest.importorskip(backend).zeros(1) if backend == "torch"
                             else pytest.importorskip("jax.numpy").zeros(1))
    for t in G.QUANTIZED:
        q, z, s = (GOLDEN[f"{t}_{p}"] for p in ("q", "z", "s"))
        assert G.encode(q, z, s, t, backend=be).tobytes() == GOLDEN[f"{t}_blocks"].tobytes()


# ---------------------------------------------------------------- independent readers
gguf = pytest.importorskip("gguf")


def _gguf_py(data: np.ndarray, gguf_type: str, shape) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    t = getattr(GGMLQuantizationType, gguf_type)
    return quants.dequantize(data.reshape(shape[0], -1), t).astype(np.float32).reshape(shape)


def _module(rng, bits, k=128, n=16, group=32, sym=False, scale_dtype=np.float16):
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.int32)
    groups = 1 if group == -1 else k // group
    z = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (groups, n))
    s = rng.uniform(1e-3, 2e-2, (groups, n)).astype(scale_dtype)
    return q, z.astype(np.int32), s


@pytest.mark.parametrize("bits,sym,group,want", [
    (2, False, 32, "Q4_0"), (3, False, 64, "Q4_0"), (4, True, 128, "Q4_0"), (4, False, 128, "Q5_0"),
    (4, False, -1, "Q5_0"), (8, True, 32, "Q8_0"), (8, False, 32, None),
])
def test_smallest_exact_type_and_both_readers(bits, sym, group, want):
    """The exactness table of the issue, and gguf-py's dequantize reading packq's blocks as the exact product."""
    rng = np.random.default_rng(bits * 100 + group)
    q, z, s = _module(rng, bits, group=group, sym=sym)
    c = G.census(q, z, s)
    assert c.smallest() == want
    w = G.product(q, z, s)
    for t in G.TYPES:
        data = G.encode(q, z, s, t)
        ours, theirs = G.dequantize(data, t, w.shape), _gguf_py(data, t, w.shape)
        assert ours.tobytes() == theirs.tobytes(), t  # packq's reading is gguf-py's (and ggml's, below)
        assert (ours.tobytes() == w.tobytes()) == c.holds(t), t


def test_fp16_rounding_is_what_engines_compute():
    """F16 holds fp16((q - z) * s), what AWQ/GPTQ engines compute; it changes many weights, F32 none."""
    rng = np.random.default_rng(1)
    q, z, s = _module(rng, 4)
    engine = ((q - np.repeat(z, 32, axis=0)).astype(np.float16) * np.repeat(s, 32, axis=0)).T  # fp16 arithmetic
    got = G.dequantize(G.encode(q, z, s, "F16"), "F16", engine.shape)
    assert got.tobytes() == engine.astype(np.float32).tobytes()
    c = G.census(q, z, s)
    assert 0.2 < c.rounded["F16"] / c.weights < 0.7 and not c.holds("F16") and c.holds("F32")


def test_compressed_tensors_scales_checked_value_by_value():
    """bf16/fp32 scales: Q types hold exactly the blocks whose scale is an fp16 value."""
    rng = np.random.default_rng(2)
    q, z, s = _module(rng, 4, sym=True)
    s = s.astype(np.float32)  # as a bf16/fp32 compressed-tensors checkpoint might hold them: fp16 values...
    s[0, 0] = np.float32(1 / 3)  # not fp16: the first block of row 0
    s[1, 3] = np.float32(2.0**-30)  # ...but two: below fp16's subnormals: row 3's second block
    c = G.census(q, z, s)
    assert c.exact["Q4_0"] == c.blocks - 2 and c.smallest() is None
    s2 = s.copy()
    s2[0, 0], s2[1, 3] = 0.25, 2.0**-24  # an fp16 subnormal is fine
    assert G.census(q, z, s2).smallest() == "Q4_0"


def test_act_order_and_small_groups_refused():
    rng = np.random.default_rng(3)
    q, z, s = _module(rng, 4, group=16)
    assert G.census(q, z, s).exact == {"Q4_0": 0, "Q5_0": 0, "Q8_0": 0}
    q, z, s = _module(rng, 4, group=32)
    g_idx = rng.permutation(128) // 32
    assert G.census(q, z, s, g_idx).smallest() is None
    # a g_idx that is arange(K) // 32 after all is no act-order
    assert G.census(q, z, s, np.arange(128) // 32).smallest() == "Q5_0"


def test_bad_arguments():
    q, z, s = _module(np.random.default_rng(4), 4)
    with pytest.raises(TypeError, match="scales must be float16 or float32"):
        G.encode(q, z, s.astype(np.float64), "Q8_0")
    with pytest.raises(TypeError, match="q must hold integers"):
        G.encode(q.astype(np.float32), z, s, "Q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        G.encode(q[:48], z[:1], s[:1], "Q8_0")
    with pytest.raises(ValueError, match="gguf_type must be one of"):
        G.encode(q, z, s, "Q4_1")
    with pytest.raises(ValueError, match="g_idx must hold groups"):
        G.census(q, z, s, np.full(128, 7))
    with pytest.raises(ValueError, match="takes"):
        G.dequantize(np.zeros(17, np.uint8), "Q4_0", (32,))


# ---------------------------------------------------------------- hypothesis
SHAPES = [(32, 8, 32), (64, 8, 32), (128, 4, 64), (96, 8, -1)]


@st.composite
def modules(draw):
    k, n, group = draw(st.sampled_from(SHAPES))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    groups = 1 if group == -1 else k // group
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.int32)
    zmode = draw(st.sampled_from(["sym", "any", "near"]))
    mid = 1 << (bits - 1)
    z = {"sym": np.full((groups, n), mid), "any": rng.integers(0, 1 << bits, (groups, n)),
         "near": np.clip(mid + rng.integers(-1, 2, (groups, n)), 0, (1 << bits) - 1)}[zmode].astype(np.int32)
    sdtype = draw(st.sampled_from([np.float16, np.float32]))
    s = (rng.uniform(-0.05, 0.05, (groups, n))).astype(sdtype)
    if sdtype == np.float32 and draw(st.booleans()):
        s = s.astype(np.float16).astype(np.float32)  # bf16/fp32 scales that happen to be fp16 values
    return q, z, s


def _rule(q, z, s, g, t):
    """The exactness rule, written plainly block by block: one fp16 scale, every q - z in the type's range."""
    k, n = q.shape
    out = np.zeros((n, k // 32), dtype=bool)
    for col in range(n):
        for b in range(k // 32):
            rows = range(32 * b, 32 * b + 32)
            scales = {np.float32(s[g[r], col]).tobytes() for r in rows}
            one = next(iter(scales))
            v = [int(q[r, col]) - int(z[g[r], col]) for r in rows]
            fp16 = np.float32(np.float16(np.frombuffer(one, np.float32)[0])).tobytes() == one
            lo, hi = G.TYPES[t].lo, G.TYPES[t].hi
            out[col, b] = len(scales) == 1 and fp16 and lo <= min(v) and max(v) <= hi
    return out


@given(modules())
def test_exact_types_reproduce_the_product(m):
    """Every type census says holds a module dequantizes (packq's reader and gguf-py's) to s * (q - z) in fp32, bit for bit."""
    q, z, s = m
    w = G.product(q, z, s)
    c = G.census(q, z, s)
    for t in G.TYPES:
        data = G.encode(q, z, s, t)
        got = G.dequantize(data, t, w.shape)
        assert got.tobytes() == _gguf_py(data, t, w.shape).tobytes()
        if c.holds(t):
            assert got.tobytes() == w.tobytes(), t


@given(modules(), st.booleans())
def test_refusal_exactly_where_a_block_breaks_the_rule(m, shuffle):
    """census counts as exact exactly the blocks the plain rule admits; a block it refuses whose product is
    nonzero somewhere the rule breaks does not survive the encoding (so the refusal is needed)."""
    q, z, s = m
    k = q.shape[0]
    g = np.arange(k) // (k // z.shape[0])
    if shuffle:
        g = np.random.default_rng(k).permutation(g)  # act-order
    c = G.census(q, z, s, g)
    w = G.product(q, z, s, g)
    for t in G.QUANTIZED:
        rule = _rule(q, z, s, g, t)
        assert c.exact[t] == int(rule.sum()), t
        back = G.dequantize(G.encode(q, z, s, t, g), t, w.shape).reshape(rule.shape + (32,))
        same = (back.view(np.uint32) == w.reshape(back.shape).view(np.uint32)).all(axis=-1)
        assert (same | ~rule).all(), t  # sound
        zero = (w.reshape(back.shape) == 0).all(axis=-1)
        assert (rule | ~same | zero | _invisible(q, z, s, g, t)).all(), t  # the refused blocks really change


def _invisible(q, z, s, g, t):
    """Blocks where breaking the rule changes no product: every weight with another scale, or a scale that is
    not fp16, or q - z out of range, has q - z = 0 (and the same sign of scale), so the encoding may still hold it."""
    k, n = q.shape
    out = np.zeros((n, k // 32), dtype=bool)
    for col in range(n):
        for b in range(k // 32):
            rows = list(range(32 * b, 32 * b + 32))
            first = np.float32(s[g[rows[0]], col])
            d = np.float32(np.float16(first))
            ok = True
            for r in rows:
                v = int(q[r, col]) - int(z[g[r], col])
                sw = np.float32(s[g[r], col])
                c = min(max(v, G.TYPES[t].lo), G.TYPES[t].hi)
                ok &= (np.float32(c) * d).tobytes() == (np.float32(v) * sw).tobytes()
            out[col, b] = ok
    return out


# ---------------------------------------------------------------- ggml itself (llama-cpp-py-sync's libggml-base)
@pytest.fixture(scope="session")
def ggml(tmp_path_factory):
    from ggml_lib import GGML, library_dir

    folder = library_dir(tmp_path_factory.mktemp("ggml"))
    if folder is None:
        pytest.skip("llama-cpp-py-sync is not installed (pip install -e '.[test]')")
    return GGML(folder)


def _ggml_reads(ggml, data, t, shape):
    info = G.TYPES[t]
    return ggml.to_float(data, info.ggml, t, info.weights, info.nbytes, int(np.prod(shape))).reshape(shape)


@pytest.mark.parametrize("bits,sym,group", [(2, False, 32), (3, False, 64), (4, True, 128), (4, False, 128),
                                            (4, False, -1), (8, True, 32), (8, False, 64)])
def test_ggml_dequantizes_to_the_exact_weights(ggml, bits, sym, group):
    """ggml's own to_float of every type packq writes equals packq's reading of it; exact types give s * (q - z)."""
    rng = np.random.default_rng(bits + group)
    q, z, s = _module(rng, bits, k=256, n=24, group=group, sym=sym)
    w, c = G.product(q, z, s), G.census(q, z, s)
    for t in G.TYPES:
        data = G.encode(q, z, s, t)
        got = _ggml_reads(ggml, data, t, w.shape)
        assert got.tobytes() == G.dequantize(data, t, w.shape).tobytes(), t
        assert (got.tobytes() == w.tobytes()) == c.holds(t), t


def test_ggml_negative_control(ggml):
    """One flipped bit in one block's integers: ggml's reading no longer equals the exact weights."""
    q, z, s = _module(np.random.default_rng(9), 4, sym=True)
    data = G.encode(q, z, s, "Q4_0")
    data[3, 5] ^= 0x10
    assert _ggml_reads(ggml, data, "Q4_0", (16, 128)).tobytes() != G.product(q, z, s).tobytes()
