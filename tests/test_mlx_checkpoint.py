"""packq convert --to mlx: the folder mlx-lm loads, checked tensor by tensor, in MLX itself where installed, and
every refusal (one line, exit 2, nothing written)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_checkpoint import EXAMPLE, load, ref_awq_values
from test_compressed_tensors import same
from test_engines import gptqmodel_v1

import packq
from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main


def _gptq(tmp_path: Path, name: str = "src", *, k: int = 128, n: int = 64, group: int = 64, scales: str = "float16",
          modules: tuple[str, ...] = ("model.layers.0.mlp.up_proj",), model_type: str = "llama",
          shard: str = "model.safetensors", bits: int = 4, seed: int = 0) -> Path:
    """A small GPTQ v2 checkpoint made here (packq's pack), with a float tensor beside the modules."""
    rng = np.random.default_rng(seed)
    groups = 1 if group == -1 else k // group
    t: dict[str, np.ndarray] = {"model.norm.weight": rng.random(k).astype(np.float16)}
    for m in modules:
        t[f"{m}.qweight"] = packq.pack(rng.integers(0, 1 << bits, (k, n)), "row", bits=bits)
        t[f"{m}.qzeros"] = packq.pack(rng.integers(0, 1 << bits, (groups, n)), "column", bits=bits)
        t[f"{m}.scales"] = (rng.random((groups, n)) * 0.01 + 1e-3).astype(scales)
        t[f"{m}.g_idx"] = (np.arange(k) // (k // groups)).astype(np.int32)
    src = tmp_path / name
    src.mkdir()
    save_file(t, str(src / shard), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "torch_dtype": "float16",
                                                 "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2"}}))
    (src / "quantize_config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    return src


def test_example_to_mlx_tensor_by_tensor(tmp_path):
    dst = tmp_path / "mlx"
    s = convert_checkpoint(EXAMPLE, dst, to="mlx", verify=True)
    assert s["verified"] and s["mlx"]["scales"] == "float32" and s["mlx"]["differing"] == {"cpu": 0, "metal": 0}
    a, b = load(EXAMPLE), load(dst)
    prefixes = sorted(k[: -len(".qweight")] for k in a if k.endswith(".qweight"))
    assert len(prefixes) == 14
    for p in prefixes:
        q = ref_awq_values(a[f"{p}.qweight"].numpy())  # (K, N), written in test_checkpoint, not packq
        z = ref_awq_values(a[f"{p}.qzeros"].numpy())
        s16 = a[f"{p}.scales"].numpy()
        w = b[f"{p}.weight"].numpy()
        assert w.dtype == np.uint32 and w.shape == (q.shape[1], q.shape[0] // 8)
        fields = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15  # along K, from the low bits
        np.testing.assert_array_equal(fields.reshape(q.shape[1], -1), q.T)
        np.testing.assert_array_equal(b[f"{p}.scales"].numpy(), s16.T.astype(np.float32))
        np.testing.assert_array_equal(b[f"{p}.biases"].numpy(), -(s16.T.astype(np.float64) * z.T).astype(np.float32))
    for name, t in a.items():
        if name.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales"):
            assert same(t, b[name]), name
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["quantization"] == {"group_size": 128, "bits": 4, "mode": "affine"}
    assert (dst / "tokenizer_config.json").read_bytes() == (EXAMPLE / "tokenizer_config.json").read_bytes()
    assert not (dst / "quantize_config.json").exists()


def test_every_source_gives_the_same_mlx_tensors(tmp_path):
    convert_checkpoint(EXAMPLE, tmp_path / "from-awq", to="mlx")
    want = load(tmp_path / "from-awq")
    convert_checkpoint(EXAMPLE, tmp_path / "v2", checkpoint_format="gptq_v2")
    convert_checkpoint(EXAMPLE, tmp_path / "tgi", for_engine="tgi")
    convert_checkpoint(EXAMPLE, tmp_path / "ct", to="compressed-tensors")
    (tmp_path / "g").mkdir()
    for src in (tmp_path / "v2", tmp_path / "tgi", tmp_path / "ct", gptqmodel_v1(tmp_path / "g")):
        dst = tmp_path / f"mlx-{src.name}"
        assert convert_checkpoint(src, dst, to="mlx", verify=True)["verified"]
        got = load(dst)
        assert got.keys() == want.keys(), src.name
        assert all(same(got[k], want[k]) for k in want), src.name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_faster_forms_report_and_verify(tmp_path, dtype):
    s = convert_checkpoint(EXAMPLE, tmp_path / dtype, to="mlx", mlx_scales=dtype, verify=True)
    x = s["mlx"]
    assert s["verified"] and x["scales"] == dtype and 0 < x["differing"]["metal"] and x["differing"]["cpu"] < x["weights"]
    if dtype == "float16":  # (bfloat16 rounds the float16 scales themselves: most weights differ everywhere)
        assert x["differing"]["metal"] < x["differing"]["cpu"]
    assert load(tmp_path / dtype)["model.layers.0.mlp.up_proj.scales"].dtype.itemsize == 2


def test_symmetric_float16_is_exact_on_metal(tmp_path):
    src = _gptq(tmp_path)
    from safetensors.numpy import load_file
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.qzeros"] = packq.pack(np.full((2, 64), 8), "column")
    save_file(t, str(src / "model.safetensors"))
    x = convert_checkpoint(src, tmp_path / "sym", to="mlx", mlx_scales="float16", verify=True)["mlx"]
    assert x["differing"]["metal"] == 0 and x["differing"]["cpu"] > 0


def test_mlx_computes_the_source_weights(tmp_path):
    """MLX itself (mx.dequantize, CPU): float32 form bit for bit as the source; float16 form exactly packq's count."""
    mx = pytest.importorskip("mlx.core")
    want = load(_f16(tmp_path))
    for dtype in ("float32", "float16"):
        dst = tmp_path / f"mlx-{dtype}"
        s = convert_checkpoint(EXAMPLE, dst, to="mlx", mlx_scales=dtype)
        got = {}
        for f in sorted(dst.glob("*.safetensors")):
            got.update(mx.load(str(f)))
        differing = 0
        for name in want:
            if not name.endswith("proj.weight"):
                continue
            p = name[: -len(".weight")]
            w = mx.dequantize(got[f"{p}.weight"], got[f"{p}.scales"], got[f"{p}.biases"], group_size=128, bits=4)
            w16 = np.array(w.astype(mx.float16))
            differing += int(np.count_nonzero(w16 != want[name].numpy()))
            if dtype == "float32":
                assert np.array(w).dtype == np.float32
        assert differing == s["mlx"]["differing"]["cpu"], dtype
        assert (differing == 0) == (dtype == "float32")


def _f16(tmp_path: Path) -> Path:
    dst = tmp_path / "float16"
    convert_checkpoint(EXAMPLE, dst, to="float16")
    return dst


# ------------------------------------------------------------------ refusals
def _refused(tmp_path, src, *args) -> str:
    dst = tmp_path / "out"
    code = main(["convert", str(src), str(dst), "--to", "mlx", *args])
    return code, dst


@pytest.mark.parametrize("group, said", [(16, "group size 16"), (256, "group size 256"), (-1, "per-channel")])
def test_group_sizes_mlx_lacks_are_refused(tmp_path, capsys, group, said):
    src = _gptq(tmp_path, k=256 if group == 256 else 128, group=group)
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and said in err and "32, 64, 128" in err and not dst.exists()


def test_act_order_is_refused(tmp_path, capsys):
    from test_float import _act_order

    src, _ = _act_order(tmp_path)
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "act-order" in err and "no g_idx" in err and not dst.exists()


def test_moe_families_whose_sanitize_does_not_stack_quantized_experts_are_refused(tmp_path, capsys):
    experts = tuple(f"model.layers.0.mlp.experts.{e}.up_proj" for e in range(2))
    src = _gptq(tmp_path, modules=experts, model_type="qwen3_moe")
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "qwen3_moe" in err and "mixtral" in err and not dst.exists()
    ok = _gptq(tmp_path, "mixtral", modules=tuple(f"model.layers.0.block_sparse_moe.experts.{e}.w1" for e in range(2)),
               model_type="mixtral")
    assert main(["convert", str(ok), str(tmp_path / "m"), "--to", "mlx", "--verify"]) == 0
    assert "model.layers.0.block_sparse_moe.experts.1.w1.biases" in load(tmp_path / "m")  # its sanitize stacks them


def test_shards_mlx_lm_would_not_read_are_refused(tmp_path, capsys):
    src = _gptq(tmp_path, shard="gptq_model-4bit-64g.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "gptq_model-4bit-64g.safetensors" for k in load(src)}}))
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model*.safetensors" in err and not dst.exists()


def test_float32_source_scales_need_allow_inexact(tmp_path, capsys):
    src = _gptq(tmp_path, scales="float32")
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--allow-inexact" in err and not dst.exists()
    s = convert_checkpoint(src, tmp_path / "anyway", to="mlx", allow_inexact=True, verify=True)
    assert s["verified"] and s["mlx"]["differing"]["cpu"] > 0


def test_mlx_scales_belongs_to_mlx(tmp_path, capsys):
    assert main(["convert", str(EXAMPLE), str(tmp_path / "x"), "--to", "gptq", "--mlx-scales", "float16"]) == 2
    assert "--mlx-scales" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["convert", str(EXAMPLE), str(tmp_path / "x"), "--to", "mlx", "--mlx-scales", "float8"])


@pytest.mark.parametrize("action", ["mlx_weight", "mlx_scales", "mlx_biases"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_verify_catches_a_wrong_tensor(tmp_path, monkeypatch, capsys, action, dtype):
    """The negative control of --verify: one flipped bit in one tensor of one module fails it, and nothing is written."""
    from packq.checkpoint.formats import FORMATS

    real, real_pieces = FORMATS["mlx"].tensor, FORMATS["mlx"].pieces

    def flip(out):
        out = out.copy()
        out.view(np.uint8).flat[1] ^= 0x10
        return out

    def wrong(job, f, m, act):
        out = real(job, f, m, act)
        return flip(out) if act == action and m.prefix.endswith("layers.0.mlp.down_proj") else out

    def wrong_pieces(job, f, m, act):  # AWQ's weight is written in pieces: the first one wrong
        pieces = real_pieces(job, f, m, act)
        if pieces and act == action and m.prefix.endswith("layers.0.mlp.down_proj"):
            first = pieces[0]
            pieces[0] = dataclasses.replace(first, make=lambda: flip(first.make()))
        return pieces

    monkeypatch.setattr(FORMATS["mlx"], "tensor", wrong)
    monkeypatch.setattr(FORMATS["mlx"], "pieces", wrong_pieces)
    dst = tmp_path / "out"
    assert main(["convert", str(EXAMPLE), str(dst), "--to", "mlx", "--mlx-scales", dtype, "--verify"]) == 2
    err = capsys.readouterr().err
    assert "verification failed" in err and "down_proj" in err and not dst.exists()


def test_inspect_says_what_each_mlx_form_computes(tmp_path):
    info = inspect_checkpoint(EXAMPLE, mlx=True)
    forms = info["mlx"]
    assert forms["float32"]["differing"] == {"cpu": 0, "metal": 0}
    assert 0 < forms["float16"]["differing"]["metal"] < forms["float16"]["differing"]["cpu"]
    module = forms["float16"]["modules"]["model.layers.0.mlp.down_proj"]
    assert set(module) == {"cpu", "metal"} and module["cpu"] > 0
    s = convert_checkpoint(EXAMPLE, tmp_path / "m", to="mlx", mlx_scales="float16")
    assert s["mlx"]["differing"] == forms["float16"]["differing"]
    assert main(["inspect", str(EXAMPLE), "--mlx"]) == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the source's own inf * 0
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_scales_are_counted_not_assumed_exact(tmp_path, capsys, bad):
    """A corrupt source (an infinite or NaN scale): float32 is no longer exact by construction; packq counts and refuses."""
    from safetensors.numpy import load_file

    src = _gptq(tmp_path)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.scales"][0, 3] = bad
    save_file(t, str(src / "model.safetensors"))
    code, dst = _refused(tmp_path, src, "--verify")
    err = capsys.readouterr().err
    if np.isnan(bad):  # NaN * q + NaN is NaN where the source's (q - z) * NaN is: the same weights
        assert code == 0 and dst.exists()
    else:  # inf * q - inf * z is NaN where the source's (q - z) * inf is +-inf
        assert code == 2 and err.count("\n") == 1 and "would differ" in err and not dst.exists()


def test_scales_of_several_dtypes_are_refused(tmp_path, capsys):
    from safetensors.numpy import load_file

    src = _gptq(tmp_path, modules=("a.up_proj", "b.up_proj"))
    t = load_file(str(src / "model.safetensors"))
    t["b.up_proj.scales"] = t["b.up_proj.scales"].astype(np.float32)
    save_file(t, str(src / "model.safetensors"))
    code, dst = _refused(tmp_path, src)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "several dtypes" in err and not dst.exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_counts_from_gptq_codes_are_the_verified_ones(tmp_path, bits, dtype):
    """From GPTQ's codes, counted by np.bincount (2-4 bits) or weight by weight (8 bits: a group of 64 holds fewer
    weights than codes): --verify recounts every written weight against the source's and agrees."""
    src = _gptq(tmp_path, bits=bits, scales="bfloat16" if dtype == "bfloat16" else "float16")
    x = convert_checkpoint(src, tmp_path / "m", to="mlx", mlx_scales=dtype, verify=True)["mlx"]
    assert x["differing"]["cpu"] > 0
