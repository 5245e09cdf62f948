"""GPTQ at 2, 3, 4 and 8 bits through packq convert: v1 <-> v2, compressed-tensors, float; AWQ stays 4-bit.

Checkpoints are built here with an independent bit-stream packer (value i of a column at bits
[b*i, b*i + b) of one little-endian stream, 3-bit values straddling words), not with packq.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main

K, N, G = 128, 64, 32


def stream_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack each row of ``values`` (R, L) as one bit stream into int32 words (R, L*bits/32)."""
    out = []
    for row in values:
        acc = 0
        for i, v in enumerate(row.tolist()):
            acc |= int(v) << (bits * i)
        n_words = len(row) * bits // 32
        out.append([(acc >> (32 * j)) & 0xFFFFFFFF for j in range(n_words)])
    return np.array(out, dtype=np.uint64).astype(np.uint32).view(np.int32)


def make(root: Path, bits: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A one-module GPTQ v2 checkpoint at ``bits``, and its float16 weights (N, K)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, (K, N))
    z = rng.integers(0, 1 << bits, (K // G, N))
    s = (rng.random((K // G, N)) * 0.01).astype(np.float16)
    w = ((q - np.repeat(z, G, 0)).astype(np.float32) * np.repeat(s, G, 0).astype(np.float32)).astype(np.float16)
    root.mkdir(parents=True)
    save_file({"m.qweight": stream_pack(q.T, bits).T.copy(), "m.qzeros": stream_pack(z, bits), "m.scales": s,
               "m.g_idx": (np.arange(K) // G).astype(np.int32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": G, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2"}}))
    return root, np.ascontiguousarray(w.T)


def tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        for k in h.keys():
            t = h.get_tensor(k)
            out[k] = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_width_to_float_v1_and_compressed_tensors(tmp_path, bits):
    src, w = make(tmp_path / "src", bits)
    assert inspect_checkpoint(src)["bits"] == bits
    f = tmp_path / "f"
    assert convert_checkpoint(src, f, to="float16", verify=True)["verified"]
    assert tensors(f)["m.weight"].tobytes() == w.tobytes()
    # v2 -> v1 (per field, for TGI) -> v2: byte for byte
    v1, back = tmp_path / "v1", tmp_path / "back"
    assert convert_checkpoint(src, v1, for_engine="tgi", verify=True)["checkpoint_format"] == "gptq"
    assert convert_checkpoint(v1, back, checkpoint_format="gptq_v2", verify=True)["verified"]
    assert same(tensors(back), tensors(src))
    # v2 -> v1 as GPTQModel writes it (one word add at 2/4/8 bits, field by field at 3) -> v2
    word, back2 = tmp_path / "word", tmp_path / "back2"
    s = convert_checkpoint(src, word, for_engine="transformers", checkpoint_format="gptq", verify=True)
    assert s["v1_zeros"] == ("field" if bits == 3 else "word")  # GPTQModel shifts 3-bit fields one by one
    convert_checkpoint(word, back2, checkpoint_format="gptq_v2", verify=True)
    assert same(tensors(back2), tensors(src))
    # compressed-tensors: GPTQ's streams transposed; and back
    ct, back3 = tmp_path / "ct", tmp_path / "back3"
    assert convert_checkpoint(src, ct, to="compressed-tensors", verify=True)["verified"]
    c, g = tensors(ct), tensors(src)
    np.testing.assert_array_equal(c["m.weight_packed"], g["m.qweight"].T)
    np.testing.assert_array_equal(c["m.weight_zero_point"], g["m.qzeros"].T)
    weights = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]
    assert weights["config_group_0"]["weights"]["num_bits"] == bits
    assert convert_checkpoint(ct, back3, checkpoint_format="gptq_v2", verify=True)["verified"]
    assert same(tensors(back3), tensors(src))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_awq_and_rebias_stay_4_bit(tmp_path, capsys, bits):
    src, _ = make(tmp_path / "src", bits)
    assert main(["convert", str(src), str(tmp_path / "awq"), "--to", "awq"]) == 2
    assert "4-bit weights only" in capsys.readouterr().err
    assert inspect_checkpoint(src)["zero_point_0"] > 0
    assert main(["convert", str(src), str(tmp_path / "exl"), "--for", "exllamav2"]) == 2
    assert f"this checkpoint is {bits}-bit" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_the_librarys_dequantizer_at_every_width(tmp_path, bits):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import convert_checkpoint as ct_convert
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    src, w = make(tmp_path / "src", bits)
    ct = tmp_path / "ct"
    convert_checkpoint(src, ct, to="compressed-tensors")
    QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    deq = tmp_path / "deq"
    ct_convert(str(ct), str(deq), CompressedTensorsDequantizer(str(ct), dtype=torch.float16), max_workers=1, device="cpu")
    assert tensors(deq)["m.weight"].tobytes() == w.tobytes()
