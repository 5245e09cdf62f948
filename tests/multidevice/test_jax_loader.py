"""packq.jax.load on 8 virtual devices: every layout equals the checkpoint's own conversion, shardings
as asked, bad shardings refused before any byte is read. Run by ../test_sharding.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import packq
import packq.jax
from packq.checkpoint import convert_checkpoint
from packq.checkpoint.folder import open_checkpoint
from packq.checkpoint.jax_loader import _Loader
from packq.errors import CheckpointError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama-awq"
WEIGHTS = r".*_proj\.(qweight|weight_packed|weight)"


def stored(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder as NumPy, read with packq's own reader (bfloat16 as its bits)."""
    ckpt = open_checkpoint(folder)
    out = {}
    for shard in ckpt.shards.values():
        with shard.open() as f:
            for name, info in shard.tensors.items():
                out[name] = f.array_bits(name) if info.dtype == "BF16" else f.array(name)
    return out


def host(a: jax.Array) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == jnp.bfloat16 else a


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    out = {}
    for name, kw in {"gptq": {"checkpoint_format": "gptq_v2"}, "compressed-tensors": {"to": "compressed-tensors"}}.items():
        convert_checkpoint(EXAMPLE, tmp / name, **kw)
        out[name] = tmp / name
    return out


@pytest.mark.parametrize("layout", ["source", "gptq", "compressed-tensors"])
def test_layouts_equal_the_converted_checkpoint(mesh, converted, layout):
    spec = P("y", "x") if layout == "compressed-tensors" else P("x", "y")
    got = packq.jax.load(EXAMPLE, layout=layout, shardings={WEIGHTS: NamedSharding(mesh, spec)})
    want = stored(EXAMPLE if layout == "source" else converted[layout])
    assert set(got) == set(want)
    for name, w in want.items():
        g = host(got[name])
        assert g.shape == w.shape, name
        if name.endswith("weight_shape"):  # int32 in JAX (no 64-bit integers by default)
            assert g.tolist() == w.tolist()
            continue
        assert g.dtype == w.dtype and np.array_equal(g, w), name
    for name, a in got.items():  # a module's tensors take its weight's sharding; the rest replicated
        if a.ndim == 2 and any(name.endswith(p) for p in ("qweight", "weight_packed")):
            assert a.sharding.spec == spec and len(a.addressable_shards) == 8


def test_awq_from_gptq_is_the_original(mesh, converted):
    got = packq.jax.load(converted["gptq"], layout="awq",
                         shardings=lambda name, shape: NamedSharding(mesh, P(None, "y")) if len(shape) == 2 else None)
    want = stored(EXAMPLE)
    for name, w in want.items():
        assert np.array_equal(host(got[name]), w), name


def test_int4_and_dequantized_are_the_unpacked_and_dequantized_source(mesh):
    s = {WEIGHTS: NamedSharding(mesh, P("x", "y"))}
    int4 = packq.jax.load(EXAMPLE, layout="int4", shardings=s)
    deq = packq.jax.load(EXAMPLE, layout="dequantized", shardings=s, dtype=jnp.float32)
    src = stored(EXAMPLE)
    prefix = "model.layers.1.mlp.down_proj"
    w, z, sc = src[f"{prefix}.qweight"], src[f"{prefix}.qzeros"], src[f"{prefix}.scales"]
    gw, gz = packq.fast_awq_to_gptq(w, z)
    assert int4[f"{prefix}.weight"].dtype == jnp.uint4
    assert np.array_equal(np.asarray(int4[f"{prefix}.weight"]).astype(np.int32), packq.unpack(gw, "row", dtype=np.int32))
    assert np.array_equal(np.asarray(int4[f"{prefix}.zeros"]).astype(np.int32),
                          packq.unpack(packq.zeros_v1_to_v2(gz), dtype=np.int32))
    want = packq.dequantize_awq(w, z, sc).astype(np.float32)
    got = deq[f"{prefix}.weight"]
    assert got.dtype == jnp.float32 and got.sharding.spec == P("x", "y") and np.array_equal(np.asarray(got), want)
    assert "model.embed_tokens.weight" in deq and f"{prefix}.qweight" not in deq


def _experts(folder: Path, extra: dict[str, tuple[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """A stacked-experts AWQ checkpoint (4 experts, K 256, N 64, 2 groups), plus ``extra`` (name: (dtype, bytes))."""
    from packq.checkpoint.safetensors import SafetensorsWriter

    rng = np.random.default_rng(0)
    e, k, n, g = 4, 256, 64, 2
    t = {"m.experts.qweight": rng.integers(-(2**31), 2**31, (e, k, n // 8), dtype=np.int64).astype(np.int32),
         "m.experts.qzeros": rng.integers(-(2**31), 2**31, (e, g, n // 8), dtype=np.int64).astype(np.int32),
         "m.experts.scales": rng.random((e, g, n)).astype(np.float16)}
    folder.joinpath("config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": k // g, "version": "gemm"}}))
    entries = [(n_, {np.int32: "I32", np.float16: "F16"}[a.dtype.type], a.shape, a.nbytes) for n_, a in t.items()]
    entries += [(n_, dtype, a.shape, a.nbytes) for n_, (dtype, a) in (extra or {}).items()]
    w = SafetensorsWriter(folder / "model.safetensors", entries, {})
    for name, a in [*t.items(), *((n_, a) for n_, (_, a) in (extra or {}).items())]:
        w.write(name, a)
    w.close()
    return t


def test_stacked_experts_shard_along_the_expert_axis(tmp_path, mesh):
    t = _experts(tmp_path)
    got = packq.jax.load(tmp_path, layout="gptq", shardings={r".*": NamedSharding(mesh, P("y", None, "x"))})
    qw = got["m.experts.qweight"]
    assert qw.sharding.spec == P("y", None, "x") and {s.data.shape for s in qw.addressable_shards} == {(1, 32, 32)}
    want_w, want_z = packq.fast_awq_to_gptq(t["m.experts.qweight"], t["m.experts.qzeros"])
    assert np.array_equal(np.asarray(qw), want_w)
    assert np.array_equal(np.asarray(got["m.experts.qzeros"]), packq.zeros_v1_to_v2(want_z))


# ------------------------------------------------------------------ refused before any read
@pytest.fixture
def no_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a byte was read")

    monkeypatch.setattr(_Loader, "_pread", boom)


def test_a_sharding_that_cuts_a_group_is_refused_naming_the_tensor(mesh, no_reads):
    # down_proj has K = 768: 6 groups of 128, which 4 devices cannot share
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.qzeros: shape \(6, 32\) .* 4 shards of 1.5"):
        packq.jax.load(EXAMPLE, layout="gptq", shardings={WEIGHTS: NamedSharding(mesh, P("y", None))})


def test_a_sharding_that_cuts_a_packed_word_is_refused(mesh, no_reads):
    # GPTQ's 768 columns over 8 devices are 96 each, but AWQ's 96 words over 8 are 12: fine; 3 devices are not
    three = Mesh(np.array(jax.devices()[:3]), ("z",))
    with pytest.raises(ValueError, match=r"qweight: shape .* into 3 shards"):
        packq.jax.load(EXAMPLE, layout="gptq", shardings={WEIGHTS: NamedSharding(three, P(None, "z"))})


def test_wrong_layout_and_bad_rules_are_one_clear_error(tmp_path, no_reads):
    with pytest.raises(ValueError, match=r"layout must be one of source, gptq, .* got 'int3'"):
        packq.jax.load(EXAMPLE, layout="int3")
    with pytest.raises(TypeError, match=r"must give a jax.sharding.Sharding for '.*', got str"):
        packq.jax.load(EXAMPLE, shardings=lambda name, shape: "rows")
    with pytest.raises(ValueError, match="dtype applies to layout 'dequantized'"):
        packq.jax.load(EXAMPLE, layout="gptq", dtype=jnp.float32)


def test_a_dtype_jax_cannot_hold_is_refused_before_reading(tmp_path, no_reads):
    _experts(tmp_path, {"m.router.scale": ("F8_E8M0", np.zeros(4, np.uint8))})
    with pytest.raises(CheckpointError, match=r"'m.router.scale' has dtype F8_E8M0, which packq does not load into JAX"):
        packq.jax.load(tmp_path)


def test_missing_tensor_and_corrupt_shard_are_refused_before_reading(tmp_path, no_reads):
    broken = tmp_path / "missing"
    shutil.copytree(EXAMPLE, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.qzeros_typo"] = index["weight_map"].pop(
        "model.layers.0.mlp.up_proj.qzeros")
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError):
        packq.jax.load(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(EXAMPLE, corrupt)
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated: the header promises more bytes than there are
    with pytest.raises(CheckpointError):
        packq.jax.load(corrupt)


def test_the_llama_example_on_8_devices():
    """examples/jax_llama.py: logits from packq-loaded, column-sharded weights equal the NumPy float32 reference."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jax_llama", EXAMPLE.parent / "jax_llama.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    params = example.load_jax(EXAMPLE)
    assert params["model.layers.0.mlp.down_proj.weight"].sharding.spec == P(None, "model")
    assert example.main(EXAMPLE) <= example.TOLERANCE


# ------------------------------------------------------------------ cost: reads, compiles
def test_gptq_layout_reads_each_g_idx_once(converted, monkeypatch):
    """Issue 19 item 15: whether the checkpoint is act-order is decided once, not per module (that read every
    module's g_idx for every module: quadratic). Counted: each g_idx is read at most twice in all (the
    act-order check, then the load), whatever the number of modules."""
    from packq.checkpoint import model

    ckpt = open_checkpoint(converted["gptq"])
    n_modules = sum("g_idx" in m.names for m in ckpt.modules.values())
    assert n_modules == 14
    checked, loaded = [], []
    real_array, real_pread = model.module_array, _Loader._pread
    monkeypatch.setattr(model, "module_array", lambda c, m, part: checked.append((m.prefix, part)) or real_array(c, m, part))
    monkeypatch.setattr(_Loader, "_pread", lambda self, f, info, off, view: loaded.append(info.name) or
                        real_pread(self, f, info, off, view))
    for layout in ("gptq", "int4", "dequantized"):
        checked.clear(), loaded.clear()
        packq.jax.load(converted["gptq"], layout=layout)
        g_checked = [p for p, part in checked if part == "g_idx"]
        g_loaded = [n for n in loaded if n.endswith(".g_idx")]
        assert len(g_checked) == len(set(g_checked)) <= n_modules, layout  # was n_modules ** 2 = 196
        assert len(g_loaded) == len(set(g_loaded)) == n_modules, layout


def _compiles() -> list[float]:
    from jax import monitoring

    seen: list[float] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    return seen


def test_one_compile_per_distinct_module_signature(mesh):
    """The tiny Llama's 14 modules have 3 shapes (q/k/v/o, gate/up, down): a converting layout compiles one
    function per shape, reused by every module of it; a second load in the same process compiles nothing."""
    from packq.checkpoint import jax_loader

    jax.clear_caches()
    jax_loader._compiled.cache_clear()
    jax_loader._EXECUTABLES.clear()
    seen = _compiles()
    for layout in ("gptq", "int4", "dequantized", "awq", "compressed-tensors"):
        s = {WEIGHTS: NamedSharding(mesh, P("y", None) if layout == "compressed-tensors" else P(None, "y"))}  # columns
        before = len(seen)
        packq.jax.load(EXAMPLE, layout=layout, shardings=s)
        first = len(seen) - before
        # "awq" from AWQ keeps every tensor as stored: nothing to compile
        assert first == (0 if layout == "awq" else 3), (layout, first)
        before = len(seen)
        packq.jax.load(EXAMPLE, layout=layout, shardings=s)
        assert len(seen) == before, layout


def test_a_second_process_takes_the_compiles_from_the_persistent_cache(tmp_path):
    """With jax_compilation_cache_dir set (and jax_persistent_cache_min_compile_time_secs at 0: these compiles
    take milliseconds), a second load in a new process reads every compiled conversion from the cache."""
    import subprocess
    import sys

    worker = """
import json, sys
import jax
from jax import monitoring
import packq.jax
events = {"hits": 0}
monitoring.register_event_listener(lambda e, **kw: events.__setitem__("hits", events["hits"] + (e == "/jax/compilation_cache/cache_hits")))
for layout in ("gptq", "dequantized"):
    packq.jax.load(sys.argv[1], layout=layout)
print(json.dumps(events))
"""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", worker, str(EXAMPLE)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[0]["hits"] == 0 and any((tmp_path / "cache").iterdir())
    assert runs[1]["hits"] >= 6  # 3 shapes x 2 layouts, every one from the cache


# ------------------------------------------------------------------ issue 19 item 16
def test_a_partition_spec_longer_than_the_tensor_is_refused(mesh, no_reads):
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.\w+\.\w+_proj\.qweight: the sharding's partition spec "
                                         r"\w+\('x', 'y', None\) has more entries than the tensor's 2 dimensions"):
        packq.jax.load(EXAMPLE, layout="gptq", shardings={WEIGHTS: NamedSharding(mesh, P("x", "y", None))})
    with pytest.raises(ValueError, match=r"model\.norm\.weight: the sharding's partition spec \w+\(None, 'x'\) has more "
                                         r"entries than the tensor's 1 dimensions"):
        packq.jax.load(EXAMPLE, shardings={r"model\.norm\.weight": NamedSharding(mesh, P(None, "x"))})


def test_a_bad_regular_expression_is_a_value_error_naming_it(no_reads):
    import re

    with pytest.raises(ValueError, match=r"shardings: the pattern '\.\*_proj\(' is not a valid regular expression") as e:
        packq.jax.load(EXAMPLE, shardings={r".*_proj(": NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P())})
    assert not isinstance(e.value, re.error)
    with pytest.raises(TypeError, match="pattern must be a regular expression"):
        packq.jax.load(EXAMPLE, shardings=[(3, None)])
