"""Sharded jax.Arrays: results equal the unsharded conversion, keep the expected sharding, and the
compiled programs hold no collective. Run by ../test_sharding.py in a process with 8 devices."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _words import raw_words  # noqa: E402

import packq  # noqa: E402
from packq.backends import for_arrays  # noqa: E402
from packq.core import bits as B  # noqa: E402
from packq.formats import awq, gptq  # noqa: E402

COLLECTIVES = re.compile(r"all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter")
K, N, G = 512, 256, 64  # qweight (512, 32), qzeros (8, 32), scales (8, 256)


@pytest.fixture(scope="module")
def devices():
    devs = jax.devices()
    if len(devs) < 2:
        pytest.skip("needs several devices")
    return devs


def meshes(devices):
    n = len(devices)
    two = np.array(devices[: 2 * (n // 2)]).reshape(2, n // 2)
    return {
        "rows": (Mesh(np.array(devices), ("x",)), P("x", None)),
        "columns": (Mesh(np.array(devices), ("x",)), P(None, "x")),
        "2d": (Mesh(two, ("x", "y")), P("x", "y")),
    }


def put(a, mesh, spec):
    return jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))


def assert_no_collectives(fn, *arrays, **static):
    be = for_arrays(x=arrays[0])
    text = be.compiled(fn, *arrays, **static).lower(*[a for a in arrays if a is not None]).compile().as_text()
    found = COLLECTIVES.findall(text)
    assert not found, f"{fn.__name__} compiles to collectives: {sorted(set(found))}"


@pytest.mark.parametrize("layout", ["rows", "columns", "2d"])
def test_awq_to_gptq_and_back_sharded(devices, layout):
    mesh, spec = meshes(devices)[layout]
    qw, qz = raw_words(1, (K, N // 8)), raw_words(2, (K // G, N // 8))
    s = np.random.default_rng(0).random((K // G, N)).astype(np.float32)
    ref_w, ref_z = packq.fast_awq_to_gptq(qw, qz)
    x, z, sc = put(qw, mesh, spec), put(qz, mesh, spec), put(s, mesh, spec)
    gw, gz = packq.fast_awq_to_gptq(x, z)
    np.testing.assert_array_equal(np.asarray(gw), ref_w)
    np.testing.assert_array_equal(np.asarray(gz), ref_z)
    assert gw.sharding == NamedSharding(mesh, spec) and gz.sharding == NamedSharding(mesh, spec)
    aw, az = packq.gptq_to_awq(gw, gz)
    np.testing.assert_array_equal(np.asarray(aw), qw)
    assert aw.sharding == NamedSharding(mesh, spec)
    w = packq.dequantize_awq(x, z, sc)
    np.testing.assert_array_equal(np.asarray(w), packq.dequantize_awq(qw, qz, s))
    assert w.sharding == NamedSharding(mesh, spec)
    np.testing.assert_array_equal(np.asarray(packq.dequantize_gptq(gw, gz, sc)), np.asarray(w))
    for fn, args in ((awq.weight_to_gptq, (x,)), (awq.zeros_to_gptq, (z,)), (awq.weight_to_awq, (gw,)),
                     (gptq.dequantize_awq, (x, z, sc))):
        assert_no_collectives(fn, *args)
    assert_no_collectives(gptq.dequantize_gptq, gw, gz, sc, None, bits=4, zeros="v1")


@pytest.mark.parametrize("layout", ["rows", "columns", "2d"])
def test_pack_unpack_order_sharded(devices, layout):
    mesh, spec = meshes(devices)[layout]
    qw = raw_words(3, (K, N // 8))
    x = put(qw, mesh, spec)
    for direction in ("column", "row"):
        v = packq.unpack(x, direction)
        np.testing.assert_array_equal(np.asarray(v), packq.unpack(qw, direction))
        assert v.sharding == NamedSharding(mesh, spec)
        o = packq.apply_order(v, direction)
        np.testing.assert_array_equal(np.asarray(o), packq.apply_order(np.asarray(v), direction))
        back = packq.pack(v, direction)
        np.testing.assert_array_equal(np.asarray(back), qw)
        assert back.sharding == NamedSharding(mesh, spec)
        assert_no_collectives(B.unpack_as, x, direction=direction, bits=4, dtype=jnp.int8, wrap=False)
        assert_no_collectives(B.pack, v, direction=direction, bits=4)
    z2 = packq.zeros_v1_to_v2(x)
    np.testing.assert_array_equal(np.asarray(z2), packq.zeros_v1_to_v2(qw))


def test_batched_experts_sharded_over_the_expert_axis(devices):
    mesh = Mesh(np.array(devices), ("e",))
    qw, qz = raw_words(4, (len(devices), 64, 16)), raw_words(5, (len(devices), 2, 16))
    x, z = put(qw, mesh, P("e")), put(qz, mesh, P("e"))
    gw, gz = packq.fast_awq_to_gptq(x, z)
    ref = packq.fast_awq_to_gptq(qw, qz)
    np.testing.assert_array_equal(np.asarray(gw), ref[0])
    np.testing.assert_array_equal(np.asarray(gz), ref[1])
    assert gw.sharding.spec[0] == "e"
    assert_no_collectives(awq.weight_to_gptq, x)


def test_split_that_cuts_a_word_or_a_group_is_refused(devices):
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    qw = put(raw_words(6, (4 * n, 4)), mesh, P("x", None))  # 4 rows a shard: half a GPTQ word
    qz = put(raw_words(7, (1, 4)), mesh, P())
    with pytest.raises(ValueError, match=rf"split over mesh axes \('x',\) into {n} shards of 4 rows; the shard "
                                         r"size must be a multiple of 8 \(8 rows pack into one GPTQ word\)"):
        packq.fast_awq_to_gptq(qw, qz)
    # one quantization group of 64 rows (qzeros replicated) cut by 8-row shards
    qw = put(raw_words(8, (8 * n, 4)), mesh, P("x", None))
    with pytest.raises(ValueError, match=rf"into {n} shards of 8 rows; the shard size must be a multiple of "
                                         rf"{8 * n} \(a shard must hold whole quantization groups\)"):
        packq.dequantize_awq(qw, qz, put(np.ones((1, 32), np.float32), mesh, P()))
    # whole groups, but scales split unlike qweight: every shard would read the wrong scales
    qz = put(raw_words(9, (n, 4)), mesh, P("x", None))
    with pytest.raises(ValueError, match="all inputs must be sharded alike over the mesh"):
        packq.dequantize_awq(qw, qz, put(np.ones((n, 32), np.float32), mesh, P()))
