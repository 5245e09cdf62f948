"""packq convert --to float16|bfloat16|float32: a dequantized checkpoint, checked against independent code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from test_checkpoint import EXAMPLE, load, ref_awq_values, ref_dequant
from test_engines import gptqmodel_v1

from packq.checkpoint import convert_checkpoint
from packq.cli import main

PREFIXES = sorted({k[: -len(".qweight")] for k in load(EXAMPLE) if k.endswith(".qweight")})


def reference(folder: Path, dtype: str) -> dict[str, np.ndarray]:
    """Every module's weight (N, K) from the AWQ source: the float16 product, then the dtype (bits for bfloat16)."""
    a = load(folder)
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["group_size"]
    out = {}
    for p in PREFIXES:
        exact = ref_dequant(ref_awq_values(a[f"{p}.qweight"].numpy()), ref_awq_values(a[f"{p}.qzeros"].numpy()),
                            a[f"{p}.scales"].numpy(), group)  # float32 holds the product exactly
        w16 = exact.astype(np.float16).T  # one rounding: what engines compute with float16 scales
        if dtype == "bfloat16":
            out[p] = np.ascontiguousarray(w16.astype(np.float32).astype(ml_dtypes.bfloat16)).view(np.uint16)
        else:
            out[p] = np.ascontiguousarray(w16.astype(dtype))
    return out


def weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_awq_to_float_is_the_dequantized_source(tmp_path, dtype, backend):
    dst = tmp_path / dtype
    s = convert_checkpoint(EXAMPLE, dst, to=dtype, backend=backend, verify=True)
    assert s["verified"] and s["tensors_out"] == 49 - 3 * 14 + 14
    got, src = weights(dst), load(EXAMPLE)
    for p, want in reference(EXAMPLE, dtype).items():
        assert got[f"{p}.weight"].dtype == want.dtype and got[f"{p}.weight"].tobytes() == want.tobytes(), p
        assert not any(f"{p}.{part}" in got for part in ("qweight", "qzeros", "scales", "g_idx"))
    for k, t in src.items():  # every other tensor, bfloat16 included, byte for byte
        if k.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales"):
            assert got[k].tobytes() == t.view(-1).view(torch.uint8).numpy().tobytes(), k
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == dtype
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)


def test_every_gptq_source_gives_the_same_floats(tmp_path):
    convert_checkpoint(EXAMPLE, tmp_path / "a", to="float16")
    want = weights(tmp_path / "a")
    v2 = tmp_path / "v2"
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    tgi = tmp_path / "tgi"
    convert_checkpoint(EXAMPLE, tgi, for_engine="tgi")  # per-field v1, said so in its meta
    (tmp_path / "g").mkdir()
    for src in (v2, tgi, gptqmodel_v1(tmp_path / "g")):  # ... and GPTQModel's whole-word v1
        dst = tmp_path / f"f-{src.name}"
        convert_checkpoint(src, dst, to="float16", verify=True)
        got = weights(dst)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want), src.name


def _act_order(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A one-module GPTQ v2 checkpoint with an act-order g_idx, and its weights (N, K) in float16."""
    rng = np.random.default_rng(3)
    k, n, g = 128, 64, 32
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // g, n))
    s = (rng.random((k // g, n)) * 0.01).astype(np.float16)
    g_idx = rng.permutation(np.arange(k) // g).astype(np.int32)
    w = ((q - z[g_idx]).astype(np.float32) * s[g_idx].astype(np.float32)).astype(np.float16)
    pack = lambda v, axis: np.bitwise_or.reduce(  # noqa: E731
        np.moveaxis(v.reshape(*v.shape[:axis], -1, 8, *v.shape[axis + 1 :]), axis + 1, -1).astype(np.uint32)
        << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)
    src = tmp_path / "act-order"
    src.mkdir()
    save_file({"m.qweight": pack(q, 0), "m.qzeros": pack(z, 1), "m.scales": s, "m.g_idx": g_idx},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2"}}))
    (src / "quantize_config.json").write_text("{}")
    return src, np.ascontiguousarray(w.T)


def test_act_order_gptq_to_float_follows_g_idx(tmp_path, capsys):
    src, want = _act_order(tmp_path)
    dst = tmp_path / "f"
    assert convert_checkpoint(src, dst, to="float16", verify=True)["verified"]
    assert weights(dst)["m.weight"].tobytes() == want.tobytes()
    assert not (dst / "quantize_config.json").exists()  # a float checkpoint states no quantization
    assert main(["convert", str(src), str(tmp_path / "awq"), "--to", "awq"]) == 2  # AWQ cannot say it
    assert "act-order" in capsys.readouterr().err


def test_float_targets_refuse_what_means_nothing(tmp_path, capsys):
    assert main(["convert", str(EXAMPLE), str(tmp_path / "x"), "--to", "float16", "--for", "tgi"]) == 2
    assert "converting to float16 takes none" in capsys.readouterr().err
    src, _ = _act_order(tmp_path)
    with safe_open(str(src / "model.safetensors"), "np") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    t["m.g_idx"][0] = 99  # a group that does not exist
    save_file(t, str(src / "model.safetensors"))
    dst = tmp_path / "f"
    assert main(["convert", str(src), str(dst), "--to", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'m.g_idx'[0] is 99" in err and not dst.exists()
    shutil.rmtree(src)


def test_verify_catches_a_wrong_float(tmp_path, monkeypatch):
    import packq.checkpoint.containers.folder as c
    from packq.checkpoint.formats.floats import Float

    real = Float._dequantize

    def off_by_one_ulp(self, job, m, arrays):
        w = real(self, job, m, arrays)
        if m.prefix.endswith("layers.1.mlp.up_proj"):
            w = w.copy()
            w.view(np.uint16 if w.itemsize == 2 else np.uint32).flat[7] ^= 1
        return w

    monkeypatch.setattr(Float, "_dequantize", off_by_one_ulp)
    with pytest.raises(c.CheckpointError, match=r"verification failed: 'model.layers.1.mlp.up_proj.weight'"):
        convert_checkpoint(EXAMPLE, tmp_path / "f", to="bfloat16", verify=True)
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("source", ["awq", "gptq-v2"])
def test_float_blocks_of_32_columns_write_the_same_bytes(tmp_path, monkeypatch, source):
    """The float weight is made block by block (32 output rows at the smallest): the bytes cannot depend on it."""
    from packq.checkpoint.formats import floats

    src = EXAMPLE
    if source == "gptq-v2":
        src = tmp_path / "v2"
        convert_checkpoint(EXAMPLE, src, checkpoint_format="gptq_v2")
    convert_checkpoint(src, tmp_path / "whole", to="bfloat16")
    monkeypatch.setattr(floats, "BLOCK_BYTES", 1)  # every block 32 columns
    convert_checkpoint(src, tmp_path / "blocks", to="bfloat16", verify=True)
    for shard in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "blocks" / shard.name).read_bytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_float_kernels_write_the_ufuncs_bytes(tmp_path, monkeypatch, dtype):
    """The compiled float kernels and the ufuncs write the same files, from every source kind: AWQ, GPTQ v2,
    per-field and whole-word v1, act-order; the kernels are checked to have run, and verify passes."""
    from packq.backends import numpy as numpy_backend
    from packq.checkpoint.formats import floats

    pytest.importorskip("numba")
    v2, tgi = tmp_path / "v2", tmp_path / "tgi"
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    convert_checkpoint(EXAMPLE, tgi, for_engine="tgi")
    (tmp_path / "g").mkdir()
    sources = [EXAMPLE, v2, tgi, gptqmodel_v1(tmp_path / "g"), _act_order(tmp_path)[0]]
    for i, src in enumerate(sources):
        with monkeypatch.context() as m:  # the ufuncs: the kernels decline
            m.setattr(floats, "dequantize_awq_t", lambda *a: None)
            m.setattr(floats, "dequantize_gptq_t", lambda *a: None)
            convert_checkpoint(src, tmp_path / f"u{i}", to=dtype)
        calls = []
        with monkeypatch.context() as m:  # the kernels, loaded or not
            m.setattr(numpy_backend, "_kernels_now", lambda wait=False: numpy_backend.numba_kernels())
            for name in ("dequantize_awq_t", "dequantize_gptq_t"):
                real = getattr(floats, name)
                m.setattr(floats, name, lambda *a, real=real: (r := real(*a), calls.append(r is not None))[0])
            assert convert_checkpoint(src, tmp_path / f"k{i}", to=dtype, verify=True)["verified"]
        assert calls and all(calls), src  # every module through a kernel
        shards = sorted((tmp_path / f"u{i}").glob("*.safetensors"))
        assert shards and all(s.read_bytes() == (tmp_path / f"k{i}" / s.name).read_bytes() for s in shards), src
