"""Engines' zero-point conventions: the whole-word v1 of GPTQModel/transformers, reading v1 as its producer
wrote it, refusing a v1 whose convention matters and is unknown, sidecar configs, and inspect's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file as save_torch

import packq
from conftest import Lib, assert_same
from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main
from packq.formats.engines import ENGINES, read_v1

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama-awq"


def _ref_word_add(words: np.ndarray, delta: int, bits: int) -> np.ndarray:
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    return ((words.astype(np.int64) + delta * ones) % 2**32).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_convention_on_every_backend(lib: Lib, bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, (3, 6), dtype=np.uint64).astype(np.uint32).view(np.int32)
    words[0, 0] = -1  # every field at its maximum: carries through the whole word
    up = lib.call(packq.zeros_v1_to_v2, lib.asarray(words), bits=bits, convention="word")
    assert_same(lib, up, _ref_word_add(words, 1, bits))
    down = lib.call(packq.zeros_v2_to_v1, lib.asarray(words), bits=bits, convention="word")
    assert_same(lib, down, _ref_word_add(words, -1, bits))
    back = lib.call(packq.zeros_v2_to_v1, up, bits=bits, convention="word")
    assert_same(lib, back, words)


def test_conventions_agree_without_zero_point_0():
    rng = np.random.default_rng(0)
    z = rng.integers(1, 16, (4, 64))  # no zero-point 0
    v2 = packq.pack(z)
    assert np.array_equal(packq.zeros_v2_to_v1(v2), packq.zeros_v2_to_v1(v2, convention="word"))
    z[0, 3] = 0
    v2 = packq.pack(z)
    assert not np.array_equal(packq.zeros_v2_to_v1(v2), packq.zeros_v2_to_v1(v2, convention="word"))
    for conv in ("field", "word"):  # each convention reads back what it wrote
        v1 = packq.zeros_v2_to_v1(v2, convention=conv)
        fields = packq.unpack(v1).astype(np.int16)
        assert np.array_equal(read_v1(fields, v1.view(np.uint32), conv, 4), z)
    unmasked = read_v1(packq.unpack(packq.zeros_v2_to_v1(v2)), None, "unmasked", 4)
    assert unmasked[0, 3] == 16 and np.array_equal(np.delete(unmasked[0], 3), np.delete(z[0], 3))


def test_every_engine_cites_its_source():
    for e in ENGINES.values():
        assert len(e.source) > 30 and e.name == e.name.lower()
        assert e.reads_v1 in (None, "field", "word", "unmasked", "symmetric")


# ------------------------------------------------------------------ checkpoints in GPTQModel's v1
def _load(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).view(-1).view(torch.uint8).numpy()
    return out


def gptqmodel_v1(tmp_path: Path, meta: bool = True) -> Path:
    """The example as GPTQModel writes v1: v2 zeros minus 0x11111111 as one word, meta.quantizer gptqmodel."""
    v2 = tmp_path / "v2"
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    src = tmp_path / "gptqmodel-v1"
    shutil.copytree(v2, src)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        for k, t in tensors.items():
            if k.endswith(".qzeros"):
                tensors[k] = torch.from_numpy(packq.zeros_v2_to_v1(t.numpy(), convention="word"))
        save_torch(tensors, str(shard), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    q = cfg["quantization_config"]
    q["checkpoint_format"] = "gptq"
    q.pop("meta", None)
    if meta:
        q["meta"] = {"quantizer": ["gptqmodel:7.6.0"]}
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_gptqmodel_v1_to_awq_is_byte_identical_to_the_source(tmp_path):
    src = gptqmodel_v1(tmp_path)
    info = inspect_checkpoint(src)
    awq_info = inspect_checkpoint(EXAMPLE)
    assert info["v1_zeros"] == "word" and info["zero_point_0"] == awq_info["zero_point_0"] == 16
    assert info["engines"]["gptqmodel"]["exact"] and info["engines"]["transformers"]["exact"]
    assert not info["engines"]["tgi"]["exact"]
    back = tmp_path / "awq"
    s = convert_checkpoint(src, back, to="awq", verify=True)
    assert s["verified"] and s["v1_zeros"] == "word"
    a, b = _load(EXAMPLE), _load(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_v1_of_unknown_producer_is_refused_where_it_matters(tmp_path, capsys):
    src = gptqmodel_v1(tmp_path, meta=False)
    info = inspect_checkpoint(src)
    assert info["v1_zeros"] is None and info["v1_ambiguous"]
    assert all(e["exact"] is None for e in info["engines"].values())
    dst = tmp_path / "awq"
    assert main(["convert", str(src), str(dst), "--to", "awq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--v1-zeros word" in err and "--v1-zeros field" in err and not dst.exists()
    assert main(["convert", str(src), str(dst), "--to", "awq", "--v1-zeros", "word", "--verify"]) == 0
    a, b = _load(EXAMPLE), _load(dst)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_packq_v1_says_how_it_was_written_and_reads_back(tmp_path):
    v1 = tmp_path / "v1"
    convert_checkpoint(EXAMPLE, v1, for_engine="tgi")
    info = inspect_checkpoint(v1)
    assert info["v1_zeros"] == "field" and info["zero_point_0"] == 16 and not info["v1_ambiguous"]
    assert info["engines"]["tgi"]["exact"] and not info["engines"]["gptqmodel"]["exact"]
    assert info["engines"]["gptqmodel"]["modules"] == ["model.layers.0.self_attn.q_proj"]
    back = tmp_path / "back"
    convert_checkpoint(v1, back, to="awq", verify=True)


@pytest.mark.parametrize("sidecar", ["quantize_config.json", "quant_config.json"])
def test_sidecar_quantization_files_state_the_new_format(tmp_path, sidecar):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src)
    (src / sidecar).write_text(json.dumps({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}))
    dst = tmp_path / "dst"
    convert_checkpoint(src, dst, checkpoint_format="gptq_v2")
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert json.loads((dst / sidecar).read_text()) == q and q["quant_method"] == "gptq"
    back = tmp_path / "back"
    convert_checkpoint(dst, back, to="awq")
    assert json.loads((back / sidecar).read_text())["quant_method"] == "awq"


def test_inspect_prints_every_engine(capsys):
    assert main(["inspect", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    for name in ENGINES:
        if ENGINES[name].reads_v1 is not None:
            assert name in out
    assert "WRONG in 16 pairs" in out and "exact" in out


# ------------------------------------------------------------------ writing for an engine
def _shard_of(folder: Path, prefix: str) -> Path:
    """The shard that holds a module's qweight."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as h:
            if f"{prefix}.qweight" in h.keys():
                return f
    raise KeyError(prefix)


def _engine_weights(folder: Path, prefix: str, convention: str | None) -> np.ndarray:
    """A module's weights as an engine computes them, from the written tensors (no packq reading code)."""
    t = {}
    with safe_open(str(_shard_of(folder, prefix)), "pt") as h:
        for part in ("qweight", "qzeros", "scales"):
            t[part] = h.get_tensor(f"{prefix}.{part}")
    words = t["qweight"].numpy().astype(np.int64) & 0xFFFFFFFF
    q = np.swapaxes(np.stack([(words >> (4 * i)) & 15 for i in range(8)], -1), 1, 2).reshape(-1, words.shape[1])
    zw = t["qzeros"].numpy().astype(np.int64) & 0xFFFFFFFF
    if convention == "word":
        zw = (zw + 0x11111111) & 0xFFFFFFFF
    z = np.stack([(zw >> (4 * i)) & 15 for i in range(8)], -1).reshape(zw.shape[0], -1)
    if convention == "field":
        z = (z + 1) % 16
    elif convention == "unmasked":
        z = z + 1
    s = t["scales"].float().numpy()
    g = q.shape[0] // z.shape[0]
    return (q - np.repeat(z, g, 0)).astype(np.float32) * np.repeat(s, g, 0)


def _awq_weights(folder: Path, prefix: str) -> np.ndarray:
    with safe_open(str(_shard_of(folder, prefix)), "pt") as h:
        qw, qz, s = (h.get_tensor(f"{prefix}.{p}") for p in ("qweight", "qzeros", "scales"))
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def values(w):
        u = w.numpy().astype(np.int64) & 0xFFFFFFFF
        nib = np.stack([(u >> (4 * i)) & 15 for i in range(8)], -1)
        out = np.empty_like(nib)
        for slot, col in enumerate(order):
            out[..., col] = nib[..., slot]
        return out.reshape(u.shape[0], -1)

    q, z = values(qw), values(qz)
    g = q.shape[0] // z.shape[0]
    return (q - np.repeat(z, g, 0)).astype(np.float32) * np.repeat(s.float().numpy(), g, 0)


@given(nibbles=st.lists(st.sampled_from([0, 8, 1, 15, 7]) | st.integers(0, 15), min_size=8, max_size=64).filter(
    lambda v: len(v) % 8 == 0))
def test_whole_word_zero_point_counts_equal_per_field(nibbles):
    """A conversion counts a 4-bit AWQ source's zero-points on whole words: the same counts, and the same
    symmetric answer, as reading every field (what ``packq inspect`` does)."""
    from packq.checkpoint.zeros import _awq_counts

    v = np.array(nibbles, np.uint32).reshape(-1, 8)
    words = np.bitwise_or.reduce(v << (4 * np.arange(8, dtype=np.uint32)), axis=1).view(np.int32).reshape(1, -1)
    assert _awq_counts(words) == (int(np.count_nonzero(v == 0)), v.size, bool(np.all(v == 8)))


def test_conversion_counts_match_inspect(tmp_path):
    """The conversion's zero-point report (counts only) agrees with inspect's full one, on a checkpoint with zero-points of 0."""
    from packq.checkpoint.folder import open_checkpoint
    from packq.checkpoint.zeros import analyse

    ckpt = open_checkpoint(EXAMPLE)
    full, counts = analyse(ckpt), analyse(ckpt, engines=False)
    assert full.zero0 == counts.zero0 == 16 and full.total == counts.total and full.symmetric == counts.symmetric
    assert full.zero0_modules == counts.zero0_modules and full.engines and not counts.engines


def test_v1_with_zero_point_0_needs_an_engine(tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(EXAMPLE), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "16 (group, column) zero-points of 0" in err and "--for ENGINE" in err
    assert "exact: tgi, lorax" in err and not dst.exists() and not list(tmp_path.glob(".packq-*"))
    assert main(["convert", str(EXAMPLE), str(dst), "--checkpoint-format", "gptq"]) == 2  # explicit v1 too


@pytest.mark.parametrize("engine,fmt,convention", [
    ("transformers", "gptq_v2", None), ("gptqmodel", "gptq_v2", None),
    ("tgi", "gptq", "field"), ("lorax", "gptq", "field"),
])
def test_for_engine_writes_what_it_reads_exactly(tmp_path, engine, fmt, convention):
    dst = tmp_path / engine
    s = convert_checkpoint(EXAMPLE, dst, for_engine=engine, verify=True)
    assert s["checkpoint_format"] == fmt and s["for"] == engine and s["verified"]
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["checkpoint_format"] == fmt
    if fmt == "gptq":
        assert q["meta"]["packq_v1_zeros"] == convention
    prefix = "model.layers.0.self_attn.q_proj"  # the module with zero-points of 0
    read = convention or "v2"
    got = _engine_weights(dst, prefix, None if read == "v2" else read)
    assert got.tobytes() == _awq_weights(EXAMPLE, prefix).tobytes()


def test_explicit_v1_for_transformers_is_written_as_gptqmodel_writes_it(tmp_path):
    dst = tmp_path / "v1-word"
    s = convert_checkpoint(EXAMPLE, dst, for_engine="transformers", checkpoint_format="gptq", verify=True)
    assert s["v1_zeros"] == "word"
    prefix = "model.layers.0.self_attn.q_proj"
    assert _engine_weights(dst, prefix, "word").tobytes() == _awq_weights(EXAMPLE, prefix).tobytes()
    assert _engine_weights(dst, prefix, "field").tobytes() != _awq_weights(EXAMPLE, prefix).tobytes()
    assert inspect_checkpoint(dst)["engines"]["gptqmodel"]["exact"]
    back = tmp_path / "back"
    convert_checkpoint(dst, back, to="awq", verify=True)  # meta says word: read back exactly
    a, b = _load(EXAMPLE), _load(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("engine", ["exllamav2", "llama.cpp"])
def test_unmasked_engines_refuse_what_no_encoding_fixes_unless_asked(tmp_path, capsys, engine):
    dst = tmp_path / "dst"
    assert main(["convert", str(EXAMPLE), str(dst), "--for", engine]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "16 (group, column) pairs with zero-point 0 hold a 15" in err
    assert "model.layers.0.self_attn.q_proj" in err and "--allow-inexact" in err and not dst.exists()
    s = convert_checkpoint(EXAMPLE, dst, for_engine=engine, allow_inexact=True, verify=True)
    assert s["inexact_pairs"] == 16 and s["max_weight_error"] > 0
    prefix = "model.layers.0.self_attn.q_proj"
    diff = np.abs(_engine_weights(dst, prefix, "unmasked").astype(np.float64) - _awq_weights(EXAMPLE, prefix))
    assert np.isclose(diff.max(), s["max_weight_error"], rtol=1e-3)
    other = "model.layers.1.mlp.up_proj"
    assert _engine_weights(dst, other, "unmasked").tobytes() == _awq_weights(EXAMPLE, other).tobytes()


def _rebiasable(tmp_path: Path) -> Path:
    """A one-module AWQ checkpoint with zero-points of 0 whose pairs hold values <= 14 only."""
    rng = np.random.default_rng(7)
    q = rng.integers(0, 15, (128, 64))  # never 15
    z = rng.integers(0, 16, (2, 64))
    z[0, :5] = 0
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack_awq(v):
        v = v.reshape(v.shape[0], -1, 8)[..., order].astype(np.uint32)
        return np.bitwise_or.reduce(v << (4 * np.arange(8, dtype=np.uint32)), axis=-1).view(np.int32)

    src = tmp_path / "rebias"
    src.mkdir()
    from safetensors.numpy import save_file
    save_file({"m.qweight": pack_awq(q), "m.qzeros": pack_awq(z), "m.scales": rng.random((2, 64)).astype(np.float16)},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}}))
    return src


def test_rebias_makes_unmasked_engines_exact(tmp_path):
    src = _rebiasable(tmp_path)
    zero0 = inspect_checkpoint(src)["zero_point_0"]
    assert zero0 >= 5
    dst = tmp_path / "exl2"
    s = convert_checkpoint(src, dst, for_engine="exllamav2", verify=True)
    assert s["rebiased"] == zero0 and s["inexact_pairs"] == 0 and s["checkpoint_format"] == "gptq"
    assert _engine_weights(dst, "m", "unmasked").tobytes() == _awq_weights(src, "m").tobytes()
    info = inspect_checkpoint(dst)
    assert info["zero_point_0"] == 0 and info["engines"]["exllamav2"]["exact"]


def test_for_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(packq.errors.CheckpointError, match="--for must name an engine that loads GPTQ"):
        convert_checkpoint(EXAMPLE, tmp_path / "a", for_engine="autogptq")
    v2 = tmp_path / "v2"
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    with pytest.raises(packq.errors.CheckpointError, match="converting to awq takes none"):
        convert_checkpoint(v2, tmp_path / "b", to="awq", for_engine="tgi")
    with pytest.raises(packq.errors.CheckpointError, match="cannot load checkpoint_format 'gptq_v2'"):
        convert_checkpoint(EXAMPLE, tmp_path / "c", for_engine="tgi", checkpoint_format="gptq_v2")


@pytest.mark.parametrize("engine", ["transformers", "tgi"])
def test_verify_catches_a_wrong_zero_point(tmp_path, monkeypatch, engine):
    import packq.checkpoint.containers.folder as c

    real = c._tensor

    def one_zero_off(job, f, name, action, m):
        out = real(job, f, name, action, m)
        if action == "zeros" and m.prefix.endswith("layers.1.mlp.up_proj"):
            out = out.copy()
            out.flat[3] ^= 1  # one zero-point one off
        return out

    monkeypatch.setattr(c, "_tensor", one_zero_off)
    with pytest.raises(c.CheckpointError, match=r"verification failed: 'model.layers.1.mlp.up_proj' dequantizes"):
        convert_checkpoint(EXAMPLE, tmp_path / "x", for_engine=engine, verify=True)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ GPTQ to GPTQ
def test_gptqmodel_v1_to_v2_and_back_for_an_engine(tmp_path):
    (tmp_path / "g").mkdir()
    src = gptqmodel_v1(tmp_path / "g")  # GPTQModel's whole-word v1, said so in meta.quantizer
    v2, want_v2 = tmp_path / "v2", tmp_path / "want-v2"
    assert convert_checkpoint(src, v2, checkpoint_format="gptq_v2", verify=True)["verified"]
    convert_checkpoint(EXAMPLE, want_v2, checkpoint_format="gptq_v2")
    a, b = _load(v2), _load(want_v2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tgi, want_tgi = tmp_path / "tgi", tmp_path / "want-tgi"
    assert convert_checkpoint(v2, tgi, for_engine="tgi", verify=True)["v1_zeros"] == "field"
    convert_checkpoint(EXAMPLE, want_tgi, for_engine="tgi")
    a, b = _load(tgi), _load(want_tgi)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_act_order_gptq_keeps_its_g_idx(tmp_path, capsys):
    from test_float import _act_order, weights

    src, want = _act_order(tmp_path)
    v1 = tmp_path / "v1"
    assert convert_checkpoint(src, v1, for_engine="tgi", verify=True)["verified"]
    with safe_open(str(v1 / "model.safetensors"), "np") as h, safe_open(str(src / "model.safetensors"), "np") as g:
        assert np.array_equal(h.get_tensor("m.g_idx"), g.get_tensor("m.g_idx"))
    f = tmp_path / "f"
    convert_checkpoint(v1, f, to="float16")
    assert weights(f)["m.weight"].tobytes() == want.tobytes()
    assert inspect_checkpoint(src)["zero_point_0"] > 0  # so exllamav2 would need a rebias, which act-order forbids
    assert main(["convert", str(src), str(tmp_path / "exl"), "--for", "exllamav2"]) == 2
    assert "act-order" in capsys.readouterr().err
