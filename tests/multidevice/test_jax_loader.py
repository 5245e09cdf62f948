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


def test_one_compile_per_distinct_module_signature(mesh, monkeypatch):
    """The tiny Llama's 14 modules have 3 shapes (q/k/v/o, gate/up, down): a converting layout compiles one
    function per shape, reused by every module of it; a second load in the same process compiles nothing.
    (The XLA path, which GPUs take: on CPU devices it is PACKQ_JAX_HOST=0.)"""
    from packq.checkpoint import jax_loader

    monkeypatch.setenv("PACKQ_JAX_HOST", "0")

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


def test_modules_are_read_on_while_their_compile_runs(mesh, monkeypatch):
    """A module whose conversion is still compiling is set aside and the next modules are read meanwhile; it is
    converted once its compile is done: the same arrays, names, order and shardings as a load that waits. (The XLA
    path, as on GPUs; compiles slowed by 0.3 s each so that they are still running when the first modules are read.)"""
    import time

    from packq.checkpoint import jax_loader

    monkeypatch.setenv("PACKQ_JAX_HOST", "0")
    quantized = set(open_checkpoint(EXAMPLE).modules)
    events: list[str] = []
    real_exe, real_module, real_array = jax_loader._executable, _Loader._module, _Loader._array

    def slow(*key):
        time.sleep(0.3)
        return real_exe(*key)

    monkeypatch.setattr(jax_loader, "_executable", slow)
    monkeypatch.setattr(_Loader, "_module", lambda self, m, stored: events.append(f"convert {m.prefix}")
                        or real_module(self, m, stored))
    monkeypatch.setattr(_Loader, "_array", lambda self, name, info, sh: events.append(f"read {name}")
                        or real_array(self, name, info, sh))
    for layout in ("compressed-tensors", "dequantized"):
        s = {WEIGHTS: NamedSharding(mesh, P("y", None) if layout == "compressed-tensors" else P(None, "y"))}  # columns
        jax_loader._compiled.cache_clear()
        jax_loader._EXECUTABLES.clear()
        events.clear()
        got = packq.jax.load(EXAMPLE, layout=layout, shardings=s)
        first = events.index(next(e for e in events if e.startswith("convert")))
        modules_read = {p for p in quantized if any(e.startswith(f"read {p}.") for e in events[:first])}
        assert len(modules_read) > 1, (layout, events[: first + 1])  # read on before the first conversion
        monkeypatch.setattr(jax_loader, "_executable", real_exe)
        waited = packq.jax.load(EXAMPLE, layout=layout, shardings=s)
        monkeypatch.setattr(jax_loader, "_executable", slow)
        assert list(got) == list(waited), layout
        for name, x in waited.items():
            assert got[name].sharding == x.sharding and np.asarray(got[name]).tobytes() == np.asarray(x).tobytes(), name


@pytest.mark.parametrize("host, compiled", [("0", 6), ("1", 0)])
def test_a_second_process_takes_the_compiles_from_the_persistent_cache(tmp_path, host, compiled):
    """With jax_compilation_cache_dir set (and jax_persistent_cache_min_compile_time_secs at 0: these compiles
    take milliseconds), a second load in a new process reads every compiled conversion from the cache: 3 shapes x
    2 layouts by the XLA path (PACKQ_JAX_HOST=0, as on GPUs). CPU devices' host path compiles nothing for this
    AWQ checkpoint, "dequantized" included (packq's C kernel), in either process."""
    import subprocess
    import sys

    worker = """
import json, sys
import jax
from jax import monitoring
import packq.jax
events = {"hits": 0, "compiles": 0}
monitoring.register_event_listener(lambda e, **kw: events.__setitem__("hits", events["hits"] + (e == "/jax/compilation_cache/cache_hits")))
monitoring.register_event_duration_secs_listener(lambda e, d, **kw: events.__setitem__(
    "compiles", events["compiles"] + (e == "/jax/core/compile/backend_compile_duration")))
for layout in ("gptq", "dequantized"):
    packq.jax.load(sys.argv[1], layout=layout)
print(json.dumps(events))
"""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu", "PACKQ_JAX_HOST": host}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", worker, str(EXAMPLE)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if not compiled:
        assert runs[0] == runs[1] == {"hits": 0, "compiles": 0}
        return
    assert runs[0]["hits"] == 0 and runs[0]["compiles"] == compiled and any((tmp_path / "cache").iterdir())
    assert runs[1]["hits"] == runs[1]["compiles"] == compiled  # every one from the cache


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


# ------------------------------------------------------------------ the host path on CPU devices
def _both_paths(monkeypatch, src, **kw) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The same load by the host path (the default on CPU devices) and by XLA (PACKQ_JAX_HOST=0)."""
    monkeypatch.delenv("PACKQ_JAX_HOST", raising=False)
    host = packq.jax.load(src, **kw)
    monkeypatch.setenv("PACKQ_JAX_HOST", "0")
    xla = packq.jax.load(src, **kw)
    monkeypatch.delenv("PACKQ_JAX_HOST")
    return host, xla


def _assert_identical(host: dict[str, jax.Array], xla: dict[str, jax.Array]) -> None:
    """Every array: same name, shape, dtype, an equivalent sharding of the same kind and mesh, and on every device
    the same block (index and bytes). Specs are compared padded to the rank: jit writes some computed outputs'
    specs without their trailing Nones (P(('x', 'y'),) for P(('x', 'y'), None)), the host path as the rule gave them."""
    assert set(host) == set(xla)
    for name, h in host.items():
        x = xla[name]
        assert (h.shape, h.dtype) == (x.shape, x.dtype), name
        assert h.sharding.is_equivalent_to(x.sharding, h.ndim), (name, h.sharding, x.sharding)
        assert h.sharding.device_set == x.sharding.device_set, name
        if isinstance(x.sharding, NamedSharding):
            assert isinstance(h.sharding, NamedSharding) and h.sharding.mesh == x.sharding.mesh, name
            assert _full_spec(h.sharding.spec, h.ndim) == _full_spec(x.sharding.spec, h.ndim), name
        hs = {s.device: s for s in h.addressable_shards}
        xs = {s.device: s for s in x.addressable_shards}
        assert set(hs) == set(xs), name
        for d, s in xs.items():
            assert hs[d].index == s.index, (name, d)
            assert np.asarray(hs[d].data).tobytes() == np.asarray(s.data).tobytes(), (name, d)


def _full_spec(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


SPLITS = {"replicated": None, "columns": P(None, ("x", "y")), "rows": P("x", None), "2-D": P("x", "y"),
          "columns over x, replicated over y": P(None, "x")}


@pytest.mark.parametrize("layout", ["source", "gptq", "awq", "compressed-tensors", "int4", "dequantized"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_the_host_path_gives_the_xla_paths_arrays_and_shardings(monkeypatch, mesh, layout, split):
    """On CPU devices packq converts on the host (NumPy) instead of compiling XLA programs: every array the same,
    bit for bit, on the same devices with the same sharding and the same block on each, whatever the split."""
    spec = SPLITS[split]
    if spec is not None and layout == "compressed-tensors":
        spec = P(*tuple(spec)[::-1])  # (N, K): the same split of the same matrix
    kw = {} if spec is None else {"shardings": {WEIGHTS: NamedSharding(mesh, spec)}}
    _assert_identical(*_both_paths(monkeypatch, EXAMPLE, layout=layout, **kw))


@pytest.mark.parametrize("layout", ["source", "gptq", "awq", "compressed-tensors", "int4", "dequantized"])
def test_the_host_path_from_gptq_and_compressed_tensors_sources(monkeypatch, mesh, converted, layout):
    for src in converted.values():
        spec = P("y", "x") if layout == "compressed-tensors" else P("x", "y")
        s = {WEIGHTS: NamedSharding(mesh, spec)}
        _assert_identical(*_both_paths(monkeypatch, src, layout=layout, shardings=s))


@pytest.mark.parametrize("case", [dict(bits=2), dict(bits=3), dict(bits=8, fmt="gptq"), dict(bits=4, fmt="gptq"),
                                  dict(bits=4, act_order=True), dict(bits=4, sym=True, scale_dtype="BF16"),
                                  dict(bits=4, fmt="gptq", word=True)])
def test_the_host_path_at_every_width_v1_and_act_order(monkeypatch, tmp_path, mesh, case):
    """GPTQ sources at 2, 3, 4 and 8 bits, v1 (field and word conventions) and v2, act-order, symmetric, bfloat16
    scales: every layout the checkpoint takes, split by columns over "x" (3-bit words in whole groups of 3), replicated
    over "y" (rows are split by the tests above)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gguf_checkpoints import make_gptq

    make_gptq(tmp_path / "src", **case)
    layouts = ["source", "gptq", "dequantized"]
    if case["bits"] == 4:
        layouts.append("int4")
        if not case.get("act_order"):
            layouts += ["awq", "compressed-tensors"]
    elif not case.get("act_order"):
        layouts.append("compressed-tensors")
    for layout in layouts:
        spec = P("x", None) if layout == "compressed-tensors" else P(None, "x")
        s = {r".*_proj\.(qweight|weight_packed|weight)": NamedSharding(mesh, spec)}
        _assert_identical(*_both_paths(monkeypatch, tmp_path / "src", layout=layout, shardings=s))


def test_the_host_path_for_stacked_experts_and_single_devices(monkeypatch, tmp_path, mesh):
    _experts(tmp_path)
    for layout in ("gptq", "int4", "compressed-tensors", "dequantized"):
        spec = P("y", "x", None) if layout == "compressed-tensors" else P("y", None, "x")
        _assert_identical(*_both_paths(monkeypatch, tmp_path, layout=layout, shardings={r".*": NamedSharding(mesh, spec)}))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[5])
    for layout in ("source", "gptq", "int4"):
        host, xla = _both_paths(monkeypatch, tmp_path, layout=layout, shardings=lambda name, shape: one)
        _assert_identical(host, xla)
        assert all(a.sharding.device_set == {jax.devices()[5]} for a in host.values())


def test_the_host_path_compiles_nothing_and_holds_a_replicated_tensor_once(mesh):
    """No XLA program for any layout of an AWQ checkpoint ("dequantized" by packq's C kernel), and a tensor
    replicated over the 8 devices is one host buffer that all of them use (PJRT's zero-copy of aligned memory)."""
    seen = _compiles()
    outs = {}
    for layout in ("source", "gptq", "awq", "compressed-tensors", "int4", "dequantized"):
        before = len(seen)
        s = {WEIGHTS: NamedSharding(mesh, P("y", None) if layout == "compressed-tensors" else P(None, "y"))}
        outs[layout] = packq.jax.load(EXAMPLE, layout=layout, shardings=s)
        jax.block_until_ready(outs[layout])
        assert len(seen) == before, layout
    for out in outs.values():
        embed = out["model.embed_tokens.weight"]
        assert len(embed.addressable_shards) == 8
        assert len({s.data.unsafe_buffer_pointer() for s in embed.addressable_shards}) == 1
    split = outs["gptq"]["model.layers.0.mlp.up_proj.qweight"]  # 4 column blocks, each shared by the 2 "x" devices
    assert len({s.data.unsafe_buffer_pointer() for s in split.addressable_shards}) == 4


def test_the_host_paths_arrays_survive_donation_and_later_loads(mesh):
    """A host buffer PJRT uses in place is never written: donating a replicated array to a jitted function leaves
    every other device's copy (the same memory) and a later load's arrays as they were."""
    s = {WEIGHTS: NamedSharding(mesh, P(None, "y"))}
    first = packq.jax.load(EXAMPLE, layout="gptq", shardings=s)
    want = {n: np.asarray(a).tobytes() for n, a in first.items()}
    name = "model.embed_tokens.weight"
    doubled = jax.jit(lambda x: x * 2, donate_argnums=0)(first.pop(name))
    jax.block_until_ready(doubled)
    second = packq.jax.load(EXAMPLE, layout="gptq", shardings=s)  # the loader's reused buffers, refilled
    for n, a in first.items():
        assert np.asarray(a).tobytes() == want[n], n
    assert np.asarray(second[name]).tobytes() == want[name]


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("kernel", ["direct", "table", "no C"])
def test_the_host_paths_dequantization_is_the_xla_paths(monkeypatch, mesh, dtype, kernel):
    """AWQ "dequantized" on the host, by the direct kernel (AVX2 + F16C), by the table's look-ups (the direct kernel
    switched off) or, without packq's C kernels, by XLA as before: the XLA path's arrays bit for bit, in every
    output dtype, split by columns, by rows, both ways or replicated, stacked experts too."""
    from packq.backends import numpy as numpy_backend

    if kernel == "no C":
        monkeypatch.setattr(numpy_backend, "c_kernels", lambda: None)
    elif numpy_backend.c_kernels() is None:
        pytest.skip("packq's C extension is not built here")
    elif kernel == "table":
        monkeypatch.setattr(numpy_backend.c_kernels(), "has_direct", lambda: False)
    for split in ("replicated", "columns", "rows", "2-D"):
        spec = SPLITS[split]
        kw = {} if spec is None else {"shardings": {WEIGHTS: NamedSharding(mesh, spec)}}
        _assert_identical(*_both_paths(monkeypatch, EXAMPLE, layout="dequantized", dtype=dtype, **kw))


def test_the_host_paths_dequantization_of_stacked_experts_compiles_nothing(monkeypatch, tmp_path, mesh):
    _experts(tmp_path)
    seen = _compiles()
    s = {r".*": NamedSharding(mesh, P("y", None, "x"))}
    host = packq.jax.load(tmp_path, layout="dequantized", shardings=s)
    jax.block_until_ready(host)
    assert not seen
    monkeypatch.setenv("PACKQ_JAX_HOST", "0")
    _assert_identical(host, packq.jax.load(tmp_path, layout="dequantized", shardings=s))


def test_pjrt_copies_4_bit_arrays_before_device_put_returns():
    """The host path unpacks int4's values into a buffer each conversion thread reuses for the next block, which is
    right only while PJRT copies (packs) 4-bit host arrays before device_put returns, as jax 0.10's CPU client does:
    overwritten right after the put, the arrays keep the values put, whatever their size."""
    for n in (1 << 10, 1 << 16, 1 << 22):
        values = (np.arange(n) % 16).astype(np.uint8)
        host = values.copy()
        put = [jax.device_put(host.view(jnp.uint4), d) for d in jax.devices()[:3]]
        host[:] = 15 - host
        for x in put:
            assert np.asarray(x).astype(np.uint8).tobytes() == values.tobytes(), n


@pytest.mark.parametrize("kernels", ["C", "no C"])
def test_the_host_paths_int4_with_and_without_the_c_kernels(monkeypatch, mesh, tmp_path, kernels):
    """int4's values unpacked into each conversion thread's reused buffer (C kernel on that thread) or by the
    ufuncs, put by that thread: the XLA path's arrays, split or replicated, stacked experts too."""
    from packq.backends import numpy as numpy_backend

    if kernels == "no C":
        monkeypatch.setattr(numpy_backend, "c_kernels", lambda: None)
    for split in ("replicated", "columns", "rows"):
        spec = SPLITS[split]
        kw = {} if spec is None else {"shardings": {WEIGHTS: NamedSharding(mesh, spec)}}
        _assert_identical(*_both_paths(monkeypatch, EXAMPLE, layout="int4", **kw))
    _experts(tmp_path)
    s = {r".*": NamedSharding(mesh, P("y", None, "x"))}
    _assert_identical(*_both_paths(monkeypatch, tmp_path, layout="int4", shardings=s))
