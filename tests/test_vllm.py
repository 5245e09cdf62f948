"""vLLM 0.32's rules for GPTQ in packq: ``--for vllm`` (CUDA), ``--for vllm-cpu``, and what ``inspect`` says.

vLLM 0.32 loads GPTQ ``sym=True`` only (4 or 8 bits; 4 on its CPU path) and no act-order, reading no
qzeros at all (packq/formats/engines.py cites the code; scripts/real_loaders_vllm.py measured it on the
CPU). packq refuses, before writing, to write GPTQ for it that it would refuse, naming the format it loads
exactly; a symmetric source is written as v1 ``sym=True``, which it loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from test_widths import stream_pack

from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main
from packq.formats.engines import ENGINES

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama-awq"
K, N, G = 128, 64, 32


def symmetric_gptq(root: Path, bits: int, act_order: bool = False) -> tuple[Path, np.ndarray]:
    """A one-module GPTQ v2 checkpoint whose every zero-point is 2**(bits-1), and its float weights (K, N)."""
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (K, N))
    z = np.full((K // G, N), 1 << (bits - 1))
    s = (rng.random((K // G, N)) * 0.01).astype(np.float16)
    g_idx = (rng.permutation(K) % (K // G)) if act_order else np.arange(K) // G
    w = (q - z[g_idx]).astype(np.float32) * s[g_idx].astype(np.float32)
    root.mkdir(parents=True)
    save_file({"m.qweight": stream_pack(q.T, bits).T.copy(), "m.qzeros": stream_pack(z, bits), "m.scales": s,
               "m.g_idx": g_idx.astype(np.int32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "gptq", "bits": bits, "group_size": G, "desc_act": act_order, "sym": False,
        "checkpoint_format": "gptq_v2"}}))
    return root, w


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("packq: error: "), err
    return err


@pytest.mark.parametrize("engine", ["vllm", "vllm-cpu"])
def test_sym_false_is_refused_before_writing_naming_compressed_tensors(tmp_path, capsys, engine):
    dst = tmp_path / "dst"
    assert main(["convert", str(EXAMPLE), str(dst), "--for", engine]) == 2
    err = _err(capsys)
    assert "does not load GPTQ sym=False" in err and "not all 8 (16 of them 0)" in err
    assert "--to compressed-tensors (or --to awq) is what it loads exactly" in err and "vLLM 0.32" in err
    assert not dst.exists() and not list(tmp_path.glob(".packq-*"))
    # what it names is what packq writes: the same source goes to compressed-tensors and to AWQ
    assert convert_checkpoint(EXAMPLE, tmp_path / "ct", to="compressed-tensors", verify=True)["verified"]


@pytest.mark.parametrize("engine", ["vllm", "vllm-cpu"])
def test_symmetric_source_is_written_as_v1_sym_true(tmp_path, engine):
    src, _ = symmetric_gptq(tmp_path / "src", 4)
    dst = tmp_path / engine
    s = convert_checkpoint(src, dst, for_engine=engine, verify=True)
    assert s["verified"] and s["checkpoint_format"] == "gptq" and s["notes"] == []
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["sym"] is True and q["checkpoint_format"] == "gptq" and q["bits"] == 4 and q["desc_act"] is False
    with safe_open(str(dst / "model.safetensors"), "np") as h:  # v1: z - 1 = 7 in every field
        assert np.all(h.get_tensor("m.qzeros").view(np.uint32) == 0x77777777)


def test_8_bit_loads_on_cuda_and_is_refused_on_the_cpu(tmp_path, capsys):
    src, _ = symmetric_gptq(tmp_path / "src", 8)
    s = convert_checkpoint(src, tmp_path / "cuda", for_engine="vllm", verify=True)
    assert s["verified"] and json.loads((tmp_path / "cuda" / "config.json").read_text())["quantization_config"]["sym"]
    assert len(s["notes"]) == 1 and "on the CPU" in s["notes"][0] and "8-bit" in s["notes"][0]
    assert main(["convert", str(src), str(tmp_path / "cuda2"), "--for", "vllm", "--no-progress"]) == 0
    assert "note: vLLM 0.32 on the CPU" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "cpu"), "--for", "vllm-cpu"]) == 2
    err = _err(capsys)
    assert "does not load GPTQ 8-bit" in err and "4-bit weights only" in err and "--for vllm" in err
    assert not (tmp_path / "cpu").exists()


@pytest.mark.parametrize("engine", ["vllm", "vllm-cpu"])
def test_act_order_is_refused(tmp_path, capsys, engine):
    src, _ = symmetric_gptq(tmp_path / "src", 4, act_order=True)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--for", engine]) == 2
    err = _err(capsys)
    assert "does not load GPTQ desc_act=True" in err and "it is act-order" in err and "no format" in err
    assert convert_checkpoint(src, tmp_path / "tgi", for_engine="tgi", verify=True)["verified"]  # others load it


def test_inspect_says_which_vllm_path_refuses_what(tmp_path, capsys):
    info = inspect_checkpoint(EXAMPLE)
    for name in ("vllm", "vllm-cpu"):
        e = info["engines"][name]
        assert e["refused"] == "sym=False" and e["exact"] is False and "compressed-tensors" in e["note"]
    assert main(["inspect", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "vllm-cpu      REFUSED: does not load GPTQ sym=False" in out
    src, _ = symmetric_gptq(tmp_path / "sym8", 8)
    engines = inspect_checkpoint(src)["engines"]
    assert engines["vllm"]["exact"] and engines["vllm-cpu"]["refused"] == "8-bit"
    assert "refused" not in engines["tgi"]


def test_the_table_says_it_per_path():
    cuda, cpu = ENGINES["vllm"], ENGINES["vllm-cpu"]
    assert cuda.reads_v1 == cpu.reads_v1 == "symmetric" and cuda.gptq_bits == (4, 8) and cpu.gptq_bits == (4,)
    assert not cuda.gptq_act_order and not cpu.gptq_act_order
    assert "auto_gptq.py" in cuda.source and "real_loaders_vllm.json" in cpu.source
    assert cuda.target(4) == cpu.target(4) == ("gptq", "field")


def test_symmetric_sources_say_sym_true_without_an_engine_too(tmp_path):
    src, _ = symmetric_gptq(tmp_path / "src", 4)
    for fmt in ("gptq", "gptq_v2"):
        convert_checkpoint(src, tmp_path / fmt, checkpoint_format=fmt, verify=True)
        assert json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]["sym"] is True
    convert_checkpoint(EXAMPLE, tmp_path / "asym", checkpoint_format="gptq_v2")
    assert json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]["sym"] is False
