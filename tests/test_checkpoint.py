"""packq convert / inspect on the bundled example, checked against an independent reference."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import packq
from packq.checkpoint import convert_checkpoint, inspect_checkpoint
from packq.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama-awq"
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ----------------------------------------------- independent reference (no packq)
def nibbles(words: np.ndarray) -> np.ndarray:
    """(R, C) words -> (R, C, 8) nibbles, nibble i = bits [4i, 4i+4)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    return np.stack([(u >> (4 * i)) & 15 for i in range(8)], axis=-1)


def ref_awq_values(words: np.ndarray) -> np.ndarray:
    """AWQ column-packed words -> values in logical column order: slot s holds column AWQ_PACK_ORDER[s]."""
    nib = nibbles(words)
    out = np.empty_like(nib)
    for s, col in enumerate(AWQ_PACK_ORDER):
        out[..., col] = nib[..., s]
    return out.reshape(words.shape[0], -1)


def ref_gptq_weight(words: np.ndarray) -> np.ndarray:
    """GPTQ row-packed (K/8, N) -> (K, N): nibble i of word (r, n) is row 8r + i."""
    return np.swapaxes(nibbles(words), 1, 2).reshape(-1, words.shape[1])


def ref_dequant(q, z, s, group):
    return (q - np.repeat(z, group, axis=0)).astype(np.float32) * np.repeat(s.astype(np.float32), group, axis=0)


def load(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, read with the reference safetensors library."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


#: write v1 per field (what TGI and LoRAX read exactly; the example has zero-points of 0), or v2
PER_FIELD = {"gptq": {"for_engine": "tgi"}, "gptq_v2": {"checkpoint_format": "gptq_v2"}}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    shutil.copytree(EXAMPLE, path)
    return path


# ----------------------------------------------------------------- conversion
@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_convert_example_matches_reference(src, tmp_path, backend, fmt):
    before = tree_hash(src)
    dst = tmp_path / "dst"
    summary = convert_checkpoint(src, dst, backend=backend, verify=True, **PER_FIELD[fmt])
    assert summary["modules"] == 14 and summary["verified"] is True
    assert tree_hash(src) == before, "SRC was written"

    a, g = load(src), load(dst)
    cfg = json.loads((src / "config.json").read_text())
    group = cfg["quantization_config"]["group_size"]
    prefixes = sorted(k[: -len(".qweight")] for k in a if k.endswith(".qweight"))
    for p in prefixes:
        q = ref_awq_values(a[f"{p}.qweight"].numpy())
        z = ref_awq_values(a[f"{p}.qzeros"].numpy())
        assert g[f"{p}.qweight"].dtype == torch.int32 and g[f"{p}.qzeros"].dtype == torch.int32
        np.testing.assert_array_equal(ref_gptq_weight(g[f"{p}.qweight"].numpy()), q)
        stored = nibbles(g[f"{p}.qzeros"].numpy()).reshape(z.shape)
        np.testing.assert_array_equal(stored, (z - 1) % 16 if fmt == "gptq" else z)
        k = q.shape[0]
        np.testing.assert_array_equal(g[f"{p}.g_idx"].numpy(), np.arange(k, dtype=np.int32) // group)
        assert torch.equal(g[f"{p}.scales"], a[f"{p}.scales"])
        zero = (stored + 1) % 16 if fmt == "gptq" else stored
        w_src = ref_dequant(q, z, a[f"{p}.scales"].numpy(), group)
        w_dst = ref_dequant(ref_gptq_weight(g[f"{p}.qweight"].numpy()), zero, g[f"{p}.scales"].numpy(), group)
        assert w_src.tobytes() == w_dst.tobytes()
    # everything else byte-exact, bf16 included
    others = [k for k in a if k.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales")]
    assert any(a[k].dtype == torch.bfloat16 for k in others)
    for k in others:
        assert a[k].dtype == g[k].dtype and torch.equal(a[k].view(torch.uint8), g[k].view(torch.uint8)), k

    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    meta = {"meta": {"quantizer": [f"packq:{packq.__version__}"], "packq_v1_zeros": "field"}} if fmt == "gptq" else {}
    assert q == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
                 "checkpoint_format": fmt, "true_sequential": True, **meta}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(g)
    for name, fname in index["weight_map"].items():
        with safe_open(str(dst / fname), "pt") as h:
            assert name in h.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in g.values())
    for extra in ("generation_config.json", "tokenizer_config.json"):
        assert (dst / extra).read_bytes() == (src / extra).read_bytes()
    with safe_open(str(dst / "model-00001-of-00002.safetensors"), "pt") as h:
        assert h.metadata() == {"format": "pt"}


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip_to_awq_is_byte_identical(src, tmp_path, fmt):
    mid, back = tmp_path / "gptq", tmp_path / "awq"
    convert_checkpoint(src, mid, **PER_FIELD[fmt])
    summary = convert_checkpoint(mid, back, to="awq", verify=True)
    assert summary["verified"]
    a, b = load(src), load(back)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert json.loads((back / "config.json").read_text())["quantization_config"]["version"] == "gemm"


def test_single_file_checkpoint_and_uint32_words(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    src = tmp_path / "single"
    src.mkdir()
    qw = rng.integers(0, 2**32, (64, 4), dtype=np.uint64).astype(np.uint32)
    qz = rng.integers(0, 2**32, (2, 4), dtype=np.uint64).astype(np.uint32)
    save_file({"l.qweight": qw, "l.qzeros": qz, "l.scales": np.ones((2, 32), np.float16),
               "l.bias": np.zeros(32, np.float16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4,
                                                                         "group_size": 32, "version": "GEMM"}}))
    summary = convert_checkpoint(src, tmp_path / "out", verify=True, for_engine="tgi")
    assert summary["shards"] == 1 and summary["tensors_out"] == 5
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    out = load(tmp_path / "out")
    np.testing.assert_array_equal(ref_gptq_weight(out["l.qweight"].numpy()), ref_awq_values(qw.view(np.int32)))


def test_force_replaces_only_when_complete(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old").write_text("old")
    assert main(["convert", str(src), str(dst), "--for", "tgi"]) == 2
    assert (dst / "old").exists()
    assert main(["convert", str(src), str(dst), "--force", "--for", "tgi"]) == 0
    assert not (dst / "old").exists() and (dst / "config.json").exists()
    assert not list(tmp_path.glob(".packq-*"))


def test_inspect_reports_zero_points(capsys):
    info = inspect_checkpoint(EXAMPLE)
    assert info["method"] == "awq" and info["quantized_modules"] == 14 and info["group_size"] == 128
    assert info["zero_point_0"] > 0 and info["engines"]["exllamav2"]["exact"] is False
    assert info["engines"]["exllamav2"]["pairs"] == info["zero_point_0"]
    assert main(["inspect", str(EXAMPLE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_point_0"] == info["zero_point_0"]


def test_cli_json_summary(src, tmp_path, capsys):
    assert main(["convert", str(src), str(tmp_path / "o"), "--json", "--verify", "--for", "tgi"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["verified"] is True and s["to"] == "gptq" and s["modules"] == 14


def test_python_m_packq(src, tmp_path):
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(src), str(tmp_path / "o"), "--for", "tgi"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "converted AWQ gemm" in r.stdout and r.stderr == ""  # no progress bar when piped


# ------------------------------------------------------------------ bad input
def _edit_config(src: Path, **q) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(q)
    (src / "config.json").write_text(json.dumps(cfg))


def _shard(src: Path) -> Path:
    return src / "model-00001-of-00002.safetensors"


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _drop_tensor(src: Path, name: str) -> None:
    """Remove a tensor, its bytes too (a header with a gap is refused on its own)."""
    path = _shard(src)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    b, e = header.pop(name)["data_offsets"]
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= e:
            v["data_offsets"] = [o - (e - b) for o in v["data_offsets"]]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[:b] + data[e:])
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


BAD = {
    "src-missing": (lambda s: shutil.rmtree(s), "no such folder"),
    "src-not-folder": (lambda s: (shutil.rmtree(s), s.write_text("x")), "not a folder"),
    "no-config": (lambda s: (s / "config.json").unlink(), "no config.json"),
    "no-quantization-config": (lambda s: (s / "config.json").write_text("{}"), "no quantization_config"),
    "not-awq": (lambda s: _edit_config(s, quant_method="bitsandbytes"), "quant_method is 'bitsandbytes'"),
    "gemv": (lambda s: _edit_config(s, version="gemv"), "AWQ version 'gemv' is not supported"),
    "bits": (lambda s: _edit_config(s, bits=8), "bits is 8"),
    "no-qzeros": (lambda s: _drop_tensor(s, "model.layers.0.mlp.up_proj.qzeros"), "but no qzeros"),
    "no-scales": (lambda s: _drop_tensor(s, "model.layers.0.mlp.up_proj.scales"), "but no scales"),
    "group-size": (lambda s: _edit_config(s, group_size=64), "expected qzeros (..., 12, 32) and scales (..., 12, 256)"),
    "truncated": (lambda s: _shard(s).write_bytes(_shard(s).read_bytes()[:-100]), "truncated"),
    "corrupt-header": (lambda s: _shard(s).write_bytes(_shard(s).read_bytes()[:8] + b"{not json" + b" " * 50),
                       "corrupt"),
    "missing-shard": (lambda s: _shard(s).unlink(), "which does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_source_one_line_exit_2_nothing_written(src, tmp_path, capsys, case):
    damage, message = BAD[case]
    damage(src)
    before = tree_hash(src) if src.is_dir() else None
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packq: error: ") and err.count("\n") == 1 and message in err, err
    assert not dst.exists() and not list(tmp_path.glob(".packq-*"))
    if before is not None:
        assert tree_hash(src) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_dst_in_src_refused(src, capsys, where):
    dst = src if where == "same" else src / "out"
    before = tree_hash(src)
    assert main(["convert", str(src), str(dst), "--force"]) == 2
    assert "DST" in capsys.readouterr().err
    assert tree_hash(src) == before


def test_bad_source_no_traceback_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_act_order_gptq_refused_to_awq(src, tmp_path, capsys):
    mid = tmp_path / "gptq"
    convert_checkpoint(src, mid, for_engine="tgi")
    _edit_config(mid, desc_act=True)
    assert main(["convert", str(mid), str(tmp_path / "awq"), "--to", "awq"]) == 2
    assert "act-order" in capsys.readouterr().err


# ---------------------------------------------------------------- fault test
SLOW = """
import sys, time
import packq.checkpoint.containers.folder as c
real = c._tensor
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
c._tensor = slow
from packq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_leaves_no_dst_and_src_untouched(src, tmp_path):
    before = tree_hash(src)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "convert", str(src), str(dst), "--for", "tgi"])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".packq-*.partial")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the run: 63 tensors at 50 ms each
    assert proc.poll() is None, "the conversion ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    assert tree_hash(src) == before
    # the next run is not blocked by the dead run's partial folder, and cleans it up
    assert main(["convert", str(src), str(dst), "--for", "tgi"]) == 0
    assert not list(tmp_path.glob(".packq-*"))


def test_sigterm_mid_run_cleans_up(src, tmp_path):
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "convert", str(src), str(dst), "--for", "tgi"],
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".packq-*.partial")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err
    assert not dst.exists() and not list(tmp_path.glob(".packq-*"))


def test_readme_formats_table_is_the_registrys(capsys):
    """The README's checkpoint table is generated from the registry: it cannot drift from what convert does."""
    from packq.checkpoint.formats import SOURCES, TARGETS, route, table_markdown

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- formats-table")
    body = readme[readme.index("\n", start) + 1 : readme.index("<!-- end formats-table -->")]
    assert body == table_markdown()
    assert main(["formats"]) == 0 and capsys.readouterr().out == table_markdown()
    # and convert refuses exactly the routes the table leaves out
    assert [(s, t) for s in SOURCES for t in TARGETS if not route(s, t)] == [
        ("awq", "awq"), ("compressed-tensors", "compressed-tensors")]


def test_each_format_reads_back_what_it_writes(tmp_path):
    """Every format lives in one registry entry: the config block it writes is the one it recognises,
    and the folder it writes is read back by it (modules found, shapes checked) as the same format."""
    from packq.checkpoint.folder import open_checkpoint
    from packq.checkpoint.formats import FORMATS, recognise
    from packq.checkpoint.formats.base import CheckpointFormat

    assert all(isinstance(f, CheckpointFormat) and f.name == name for name, f in FORMATS.items())
    v2 = tmp_path / "source"  # GPTQ v2 converts to every target
    convert_checkpoint(EXAMPLE, v2, checkpoint_format="gptq_v2")
    src = open_checkpoint(v2)
    for name, f in FORMATS.items():
        if f.container != "safetensors":  # one GGUF file: read back by tests/test_gguf_convert.py
            continue
        out = tmp_path / name
        convert_checkpoint(v2, out, to=name, checkpoint_format="gptq_v2" if name == "gptq" else None, verify=True)
        config = json.loads((out / "config.json").read_text())
        if not f.read:  # a float checkpoint: no quantization_config left for any format to recognise
            assert "quantization_config" not in config
            continue
        assert recognise(config["quantization_config"]) is f
        back = open_checkpoint(out)
        assert back.format.kind == name and set(back.modules) == set(src.modules)
        assert all((m.k, m.n, m.groups) == (src.modules[p].k, src.modules[p].n, src.modules[p].groups)
                   for p, m in back.modules.items())


def test_small_conversions_do_not_load_numba(tmp_path):
    """Loading numba (0.5 s, 105 MB) costs more than it saves on a small checkpoint: packq convert takes the
    ufunc paths (same bits) and never imports it; a library caller who already has it loaded keeps it."""
    code = ("import sys; from packq.checkpoint import convert_checkpoint; "
            f"convert_checkpoint({str(EXAMPLE)!r}, {str(tmp_path / 'out')!r}, for_engine='tgi', verify=True); "
            "assert 'numba' not in sys.modules, 'numba was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packed_conversions_do_not_import_the_array_api_namespace(tmp_path):
    """AWQ -> GPTQ (v1 and v2) and -> compressed-tensors run only the NumPy backend's fast paths: the CLI's start
    never pays for array_api_compat.numpy (which imports numpy.testing, f2py, random and ma)."""
    code = ("import sys; from packq.checkpoint import convert_checkpoint; "
            f"convert_checkpoint({str(EXAMPLE)!r}, {str(tmp_path / 'a')!r}, for_engine='tgi'); "
            f"convert_checkpoint({str(EXAMPLE)!r}, {str(tmp_path / 'b')!r}, for_engine='transformers'); "
            f"convert_checkpoint({str(EXAMPLE)!r}, {str(tmp_path / 'c')!r}, to='compressed-tensors'); "
            "assert 'array_api_compat.numpy' not in sys.modules, 'array_api_compat.numpy was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("route", ["awq->gptq", "gptq->awq"])
def test_weights_streamed_in_small_blocks_write_the_same_bytes(tmp_path, monkeypatch, route):
    """AWQ <-> GPTQ weights are written block by block (here every block one unit of rows): the bytes
    cannot depend on the block size."""
    from packq.checkpoint.formats import base

    src, to = EXAMPLE, "gptq"
    if route == "gptq->awq":
        src, to = tmp_path / "v2", "awq"
        convert_checkpoint(EXAMPLE, src, checkpoint_format="gptq_v2")
    convert_checkpoint(src, tmp_path / "whole", to=to, checkpoint_format="gptq_v2" if to == "gptq" else None)
    monkeypatch.setattr(base, "CHUNK_BYTES", 1)  # 8 AWQ rows (one GPTQ row), or one GPTQ row, per block
    convert_checkpoint(src, tmp_path / "blocks", to=to, checkpoint_format="gptq_v2" if to == "gptq" else None,
                       verify=True)
    for shard in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "blocks" / shard.name).read_bytes()
