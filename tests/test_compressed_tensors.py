"""packq convert --to compressed-tensors: pack-quantized, checked value by value here, and against the library.

The library checks (compressed-tensors' own AutoAWQConverter, CompressedTensorsDequantizer and
QuantizationConfig) run where compressed-tensors is installed: the test extra installs 0.20.1 (pinned
in constraints.txt), so CI runs them; the value-by-value reference runs everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import EXAMPLE, load, ref_awq_values
from test_engines import gptqmodel_v1
from test_float import _act_order

import packq
from conftest import Lib, assert_same, golden_keys
from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main

CT = "compressed-tensors"
CT_CONFIG = {"config_groups": {"config_group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
    "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}}},
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed"}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def pack_lsb_first(values: np.ndarray, axis: int) -> np.ndarray:
    """4-bit values packed 8 to an int32 along ``axis``, value i at bits [4i, 4i + 4): written here, not packq's."""
    v = np.moveaxis(values, axis, -1).astype(np.uint64)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = np.bitwise_or.reduce(v << (4 * np.arange(8, dtype=np.uint64)), axis=-1).astype(np.uint32)
    return np.moveaxis(words.view(np.int32), -1, axis)


def test_awq_to_compressed_tensors_value_by_value(tmp_path):
    dst = tmp_path / "ct"
    s = convert_checkpoint(EXAMPLE, dst, to=CT, verify=True)
    assert s["verified"] and s["tensors_out"] == 49 + 14  # weight_shape added per module
    a, c = load(EXAMPLE), load(dst)
    group = 128
    for p in sorted(k[: -len(".qweight")] for k in a if k.endswith(".qweight")):
        q = ref_awq_values(a[f"{p}.qweight"].numpy())  # (K, N), logical order
        z = ref_awq_values(a[f"{p}.qzeros"].numpy())  # (G, N)
        k, n = q.shape
        np.testing.assert_array_equal(c[f"{p}.weight_packed"].numpy(), pack_lsb_first(q.T, axis=1))
        np.testing.assert_array_equal(c[f"{p}.weight_zero_point"].numpy(), pack_lsb_first(z.T, axis=0))
        assert same(c[f"{p}.weight_scale"], a[f"{p}.scales"].T.contiguous())
        assert c[f"{p}.weight_shape"].dtype == torch.int64 and c[f"{p}.weight_shape"].tolist() == [n, k]
        assert c[f"{p}.weight_scale"].shape == (n, k // group)
    for name, t in a.items():
        if name.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales"):
            assert same(c[name], t), name
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == CT and q["format"] == "pack-quantized" and q["quantization_status"] == "compressed"
    w = q["config_groups"]["config_group_0"]["weights"]
    assert w == {"num_bits": 4, "type": "int", "symmetric": False, "dynamic": False, "strategy": "group",
                 "group_size": 128}
    assert q["ignore"] == ["lm_head"]


def test_every_source_format_gives_the_same_tensors(tmp_path):
    convert_checkpoint(EXAMPLE, tmp_path / "from-awq", to=CT)
    want = load(tmp_path / "from-awq")
    convert_checkpoint(EXAMPLE, tmp_path / "v2", checkpoint_format="gptq_v2")
    convert_checkpoint(EXAMPLE, tmp_path / "tgi", for_engine="tgi")
    (tmp_path / "g").mkdir()
    for src in (tmp_path / "v2", tmp_path / "tgi", gptqmodel_v1(tmp_path / "g")):
        dst = tmp_path / f"ct-{src.name}"
        assert convert_checkpoint(src, dst, to=CT, verify=True)["verified"]
        got = load(dst)
        assert got.keys() - {k for k in got if k.endswith(".g_idx")} == want.keys(), src.name
        assert all(same(got[k], want[k]) for k in want), src.name


def test_symmetric_sources_store_no_zero_points(tmp_path):
    from test_engines import _rebiasable

    src = _rebiasable(tmp_path)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    t["m.qzeros"] = np.full_like(t["m.qzeros"], np.int32(0x88888888 - 2**32))  # every zero-point 8
    save_file(t, str(src / "model.safetensors"))
    dst = tmp_path / "sym"
    assert convert_checkpoint(src, dst, to=CT, verify=True)["verified"]
    got = load(dst)
    assert "m.weight_zero_point" not in got and "m.weight_packed" in got
    w = json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"]["config_group_0"]
    assert w["weights"]["symmetric"] is True


def test_act_order_is_refused_as_the_library_refuses_it(tmp_path, capsys):
    src, _ = _act_order(tmp_path)
    dst = tmp_path / "ct"
    assert main(["convert", str(src), str(dst), "--to", CT]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "act-order" in err and "removed actorder 'group'" in err and not dst.exists()


@pytest.mark.parametrize("action", ["ct_zeros", "ct_weight", "ct_scale", "ct_shape"])
def test_verify_catches_a_wrong_tensor(tmp_path, monkeypatch, action):
    import packq.checkpoint.containers.folder as c
    from packq.checkpoint.formats import FORMATS

    real, real_pieces = FORMATS[CT].tensor, FORMATS[CT].pieces

    def flip(out):
        out = out.copy()
        out.flat[0] ^= 1
        return out

    def wrong(job, f, m, act):
        out = real(job, f, m, act)
        return flip(out) if act == action and m.prefix.endswith("layers.0.mlp.down_proj") else out

    def wrong_pieces(job, f, m, act):  # the weight is written in pieces: the first one wrong
        pieces = real_pieces(job, f, m, act)
        if pieces and act == action and m.prefix.endswith("layers.0.mlp.down_proj"):
            first = pieces[0]
            pieces[0] = dataclasses.replace(first, make=lambda: flip(first.make()))
        return pieces

    monkeypatch.setattr(FORMATS[CT], "tensor", wrong)
    monkeypatch.setattr(FORMATS[CT], "pieces", wrong_pieces)
    with pytest.raises(c.CheckpointError, match="verification failed: 'model.layers.0.mlp.down_proj"):
        convert_checkpoint(EXAMPLE, tmp_path / "x", to=CT, verify=True)


def test_cli_names_it(tmp_path, capsys):
    assert main(["convert", str(EXAMPLE), str(tmp_path / "ct"), "--to", CT]) == 0
    assert "compressed-tensors pack-quantized" in capsys.readouterr().out
    assert inspect_checkpoint(EXAMPLE)["method"] == "awq"  # the source is untouched


# ------------------------------------------------------------------ the library itself
@pytest.fixture(scope="module")
def library():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")


def test_equals_the_librarys_own_autoawq_converter(library, tmp_path):
    from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    ref = tmp_path / "library"
    ct_convert(str(EXAMPLE), str(ref), AutoAWQConverter.from_pretrained(str(EXAMPLE)), max_workers=1, device="cpu")
    ours = tmp_path / "packq"
    convert_checkpoint(EXAMPLE, ours, to=CT)
    a, b = load(ours), load(ref)
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((ref / "config.json").read_text())["quantization_config"]
    qb.pop("version")  # the library stamps its own version
    assert qa == qb


@pytest.mark.parametrize("source", ["awq", "gptq_v2", "gptqmodel_v1"])
def test_the_librarys_dequantizer_is_bit_exact(library, tmp_path, source):
    from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    if source == "awq":
        src = EXAMPLE
    elif source == "gptq_v2":
        src = tmp_path / "v2"
        convert_checkpoint(EXAMPLE, src, checkpoint_format="gptq_v2")
    else:
        src = gptqmodel_v1(tmp_path)
    ct = tmp_path / "ct"
    convert_checkpoint(src, ct, to=CT)
    QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    floats = tmp_path / "float16"
    convert_checkpoint(src, floats, to="float16")  # packq's own dequantization, checked in test_float
    deq = tmp_path / "dequantized"
    ct_convert(str(ct), str(deq), CompressedTensorsDequantizer(str(ct), dtype=torch.float16),
               max_workers=1, device="cpu")
    a, b = load(floats), load(deq)
    weights = [k for k in a if k.endswith(".weight") and f"{k[:-len('.weight')]}.weight_packed" in load(ct)]
    assert weights and all(same(a[k], b[k]) for k in weights)


def test_the_library_refuses_group_actorder(library):
    """Why act-order is refused: 0.20.1's own QuantizationConfig rejects actorder 'group'."""
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads(json.dumps(CT_CONFIG))
    config["config_groups"]["config_group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        QuantizationConfig.model_validate(config)


# ------------------------------------------------------------------ compressed-tensors as the source
def _bytes_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_awq_to_compressed_tensors_and_back_is_byte_identical(tmp_path):
    ct, back = tmp_path / "ct", tmp_path / "awq"
    convert_checkpoint(EXAMPLE, ct, to=CT)
    info = inspect_checkpoint(ct)
    assert info["method"] == CT and info["zero_point_0"] == inspect_checkpoint(EXAMPLE)["zero_point_0"] == 16
    assert convert_checkpoint(ct, back, to="awq", verify=True)["verified"]
    assert _bytes_equal(load(back), load(EXAMPLE))
    q = json.loads((back / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "awq" and q["version"] == "gemm"


def test_gptq_v2_to_compressed_tensors_and_back_is_byte_identical(tmp_path):
    v2, ct, back = tmp_path / "v2", tmp_path / "ct", tmp_path / "back"
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    convert_checkpoint(v2, ct, to=CT, verify=True)
    assert convert_checkpoint(ct, back, checkpoint_format="gptq_v2", verify=True)["verified"]
    assert _bytes_equal(load(back), load(v2))


def test_compressed_tensors_to_every_target(tmp_path):
    ct = tmp_path / "ct"
    convert_checkpoint(EXAMPLE, ct, to=CT)
    convert_checkpoint(EXAMPLE, tmp_path / "f-awq", to="float16")
    for target, kwargs in {"float16": {}, "gptq": {"for_engine": "tgi"}, "gptq-v2": {"for_engine": "gptqmodel"}}.items():
        dst = tmp_path / target
        s = convert_checkpoint(ct, dst, to=target.split("-")[0], verify=True, **kwargs)
        assert s["verified"], target
    assert _bytes_equal(load(tmp_path / "float16"), load(tmp_path / "f-awq"))
    convert_checkpoint(EXAMPLE, tmp_path / "tgi-awq", for_engine="tgi")
    assert _bytes_equal(load(tmp_path / "gptq"), load(tmp_path / "tgi-awq"))


def test_compressed_tensors_rebiased_for_exllamav2(tmp_path):
    from test_engines import _engine_weights, _rebiasable

    src = _rebiasable(tmp_path)
    ct, exl = tmp_path / "ct", tmp_path / "exl2"
    convert_checkpoint(src, ct, to=CT)
    s = convert_checkpoint(ct, exl, for_engine="exllamav2", verify=True)
    assert s["rebiased"] == inspect_checkpoint(src)["zero_point_0"] > 0
    direct = tmp_path / "direct"
    convert_checkpoint(src, direct, for_engine="exllamav2")
    assert _engine_weights(exl, "m", "unmasked").tobytes() == _engine_weights(direct, "m", "unmasked").tobytes()


def test_symmetric_compressed_tensors_reads_back(tmp_path):
    from safetensors.numpy import load_file, save_file
    from test_engines import _rebiasable

    src = _rebiasable(tmp_path)
    t = load_file(str(src / "model.safetensors"))
    t["m.qzeros"] = np.full_like(t["m.qzeros"], np.int32(0x88888888 - 2**32))
    save_file(t, str(src / "model.safetensors"))
    ct, back = tmp_path / "ct", tmp_path / "awq"
    convert_checkpoint(src, ct, to=CT)
    assert "m.weight_zero_point" not in load(ct)
    assert convert_checkpoint(ct, back, to="awq", verify=True)["verified"]
    assert _bytes_equal(load(back), load(src))


def _ct_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit,fragment", [
    (lambda q: q.update(format="float-quantized"), "packq reads 'pack-quantized'"),
    (lambda q: q["config_groups"].update(g2=q["config_groups"]["config_group_0"]), "exactly one config group"),
    (lambda q: q["config_groups"]["config_group_0"].update(input_activations={"num_bits": 8}), "weight-only"),
    (lambda q: q["config_groups"]["config_group_0"]["weights"].update(num_bits=5), "static 2-, 3-, 4- or 8-bit int"),
    (lambda q: q["config_groups"]["config_group_0"]["weights"].update(num_bits=8), "expected weight_scale"),
    (lambda q: q["config_groups"]["config_group_0"]["weights"].update(actorder="group"), "actorder 'group'"),
    (lambda q: q["config_groups"]["config_group_0"]["weights"].update(strategy="tensor"), "strategy 'tensor'"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen'"),
])
def test_compressed_tensors_configs_packq_cannot_read_are_one_line(tmp_path, capsys, edit, fragment):
    ct = tmp_path / "ct"
    convert_checkpoint(EXAMPLE, ct, to=CT)
    _ct_config(ct, edit)
    dst = tmp_path / "out"
    assert main(["convert", str(ct), str(dst), "--to", "awq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and not dst.exists(), err


def test_same_format_is_refused(tmp_path, capsys):
    ct = tmp_path / "ct"
    convert_checkpoint(EXAMPLE, ct, to=CT)
    assert main(["convert", str(ct), str(tmp_path / "again"), "--to", CT]) == 2
    assert "already" in capsys.readouterr().err
    assert main(["convert", str(EXAMPLE), str(tmp_path / "a"), "--to", "awq"]) == 2
    assert "already" in capsys.readouterr().err


def test_the_librarys_own_output_reads_back_to_the_awq_source(library, tmp_path):
    from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    ref = tmp_path / "library"
    ct_convert(str(EXAMPLE), str(ref), AutoAWQConverter.from_pretrained(str(EXAMPLE)), max_workers=1, device="cpu")
    back = tmp_path / "awq"
    assert convert_checkpoint(ref, back, to="awq", verify=True)["verified"]
    assert _bytes_equal(load(back), load(EXAMPLE))


def test_stacked_moe_experts(tmp_path):
    """Experts stacked as (E, K, N/8): every relayout works on the last two axes, weight_shape holds all three."""
    rng = np.random.default_rng(5)
    e, k, n, g = 3, 128, 64, 64
    words = lambda *shape: rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.int32)  # noqa: E731
    src = tmp_path / "moe"
    src.mkdir()
    from safetensors.numpy import save_file

    save_file({"experts.qweight": words(e, k, n // 8), "experts.qzeros": words(e, k // g, n // 8),
               "experts.scales": (rng.random((e, k // g, n)) * 0.01).astype(np.float16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm", "zero_point": True}}))
    ct, back, f = tmp_path / "ct", tmp_path / "back", tmp_path / "f"
    assert convert_checkpoint(src, ct, to=CT, verify=True)["verified"]
    c = load(ct)
    assert tuple(c["experts.weight_packed"].shape) == (e, n, k // 8) and c["experts.weight_shape"].tolist() == [e, n, k]
    assert convert_checkpoint(ct, back, to="awq", verify=True)["verified"]
    assert _bytes_equal(load(back), load(src))
    assert convert_checkpoint(ct, f, to="float32", verify=True)["verified"]
    assert tuple(load(f)["experts.weight"].shape) == (e, n, k)


# ------------------------------------------------------------------ the array functions, every backend
@pytest.mark.parametrize("case", golden_keys("awq", "qweight"))
def test_gptq_to_compressed_tensors_on_every_backend(lib: Lib, golden, case):
    qw, qz = golden[f"gptq/{case}/qweight"], golden[f"gptq/{case}/qzeros"]  # the seed's own GPTQ output
    scales = np.random.default_rng(0).random((*qz.shape[:-1], qw.shape[-1])).astype(np.float32)
    out = lib.call(packq.gptq_to_compressed_tensors, lib.asarray(qw), lib.asarray(qz), lib.asarray(scales))
    for got, want in zip(out, (qw, qz, scales)):
        assert_same(lib, got, np.ascontiguousarray(np.swapaxes(want, -1, -2)))
    back = lib.call(packq.compressed_tensors_to_gptq, *out)
    for got, want in zip(back, (qw, qz, scales)):
        assert_same(lib, got, want)


def test_array_functions_match_the_checkpoint_converter(tmp_path):
    convert_checkpoint(EXAMPLE, tmp_path / "v2", checkpoint_format="gptq_v2")
    convert_checkpoint(EXAMPLE, tmp_path / "ct", to=CT)
    g, c = load(tmp_path / "v2"), load(tmp_path / "ct")
    p = "model.layers.0.self_attn.q_proj"
    wp, zp, ws = packq.gptq_to_compressed_tensors(g[f"{p}.qweight"].numpy(), g[f"{p}.qzeros"].numpy(),
                                                  g[f"{p}.scales"].numpy())
    assert wp.flags.c_contiguous and zp.flags.c_contiguous and ws.flags.c_contiguous
    for got, name in ((wp, "weight_packed"), (zp, "weight_zero_point"), (ws, "weight_scale")):
        np.testing.assert_array_equal(got, c[f"{p}.{name}"].numpy())
