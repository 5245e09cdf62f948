"""packq convert --to gguf: exact tensors, refusals before any write, the file's guarantees, --verify, inspect."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

import gguf_checkpoints as C  # noqa: E402

from packq.checkpoint import convert_checkpoint, inspect_checkpoint  # noqa: E402
from packq.cli import main  # noqa: E402
from packq.errors import CheckpointError  # noqa: E402
from packq.formats import gguf as G  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"


@pytest.fixture(autouse=True)
def stand_in_describe(monkeypatch):
    """The model planning is gguf_model's (tested with it elsewhere); these tests use a Llama-only stand-in."""
    import types

    module = types.ModuleType("packq.checkpoint.gguf_model")
    module.describe = C.describe
    monkeypatch.setitem(sys.modules, "packq.checkpoint.gguf_model", module)


def read(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: t for t in r.tensors}, r


def weights_of(t) -> np.ndarray:
    name = t.tensor_type.name
    shape = tuple(reversed([int(x) for x in t.shape]))
    return G.dequantize(np.asarray(t.data).reshape(-1).view(np.uint8), name, shape)


def exact(q, z, s, g, perm=None) -> np.ndarray:
    """The source's exact weights (N, K) in fp32, from the independent truth of the fixture."""
    w = (s[g].astype(np.float32) * (q - z[g]).astype(np.float32)).T
    return w if perm is None else w[list(perm)]


@pytest.mark.parametrize("bits,sym,group,fmt,want", [
    (4, True, 32, "gptq_v2", "Q4_0"), (4, False, 64, "gptq_v2", "Q5_0"), (4, False, -1, "gptq", "Q5_0"),
    (2, False, 32, "gptq_v2", "Q4_0"), (3, False, 32, "gptq", "Q4_0"), (8, True, 64, "gptq_v2", "Q8_0"),
    (4, False, 32, "gptq-word", "Q5_0"), (2, False, 32, "gptq-word", "Q4_0"),
])
def test_auto_is_the_smallest_exact_type_and_verifies(tmp_path, bits, sym, group, fmt, want):
    word = fmt == "gptq-word"  # GPTQ v1 as GPTQModel writes it: zero-points of 0 borrow across fields
    truth = C.make_gptq(tmp_path / "src", bits=bits, group=group, sym=sym, fmt="gptq" if word else fmt, word=word)
    if word:
        assert any((z == 0).any() for _, z, _, _ in truth.values())
    dst = tmp_path / "m.gguf"
    s = convert_checkpoint(tmp_path / "src", dst, to="gguf", verify=True)
    assert s["verified"] and s["types"] == {want: 7} and not s["inexact_tensors"]
    assert s["file_bytes"] == dst.stat().st_size > s["bytes_out"]  # tensor data, and the file with its header
    tensors, reader = read(dst)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.file_type"].contents() == {"Q4_0": 2, "Q5_0": 8, "Q8_0": 7}[want]
    for prefix, (q, z, sc, g) in truth.items():
        name = f"blk.0.{C.LLAMA[prefix.split('.', 3)[-1]]}.weight"
        t = tensors[name]
        perm = C.rotary_perm(q.shape[1], C.HEADS) if prefix.endswith(("q_proj", "k_proj")) else None
        assert t.tensor_type.name == want and [int(x) for x in t.shape] == [q.shape[0], q.shape[1]]
        assert weights_of(t).tobytes() == exact(q, z, sc, g, perm).tobytes(), name
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms as llama.cpp wants them
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"  # the rest as stored
    assert s["bits_per_weight_out"] == G.TYPES[want].bits_per_weight


def test_awq_example_as_q5_0_and_forced_q8_0(tmp_path):
    s = convert_checkpoint(EXAMPLE, tmp_path / "a.gguf", to="gguf", verify=True)
    assert s["types"] == {"Q5_0": 14} and s["architecture"] == "llama"
    s8 = convert_checkpoint(EXAMPLE, tmp_path / "b.gguf", to="gguf", gguf_type="q8_0", verify=True)
    assert s8["types"] == {"Q8_0": 14} and s8["bytes_out"] > s["bytes_out"]
    s32 = convert_checkpoint(EXAMPLE, tmp_path / "c.gguf", to="gguf", gguf_type="f32", verify=True)
    assert s32["types"] == {"F32": 14} and not s32["inexact_tensors"]


def test_compressed_tensors_and_bf16_fp32_scales(tmp_path):
    C.make_gptq(tmp_path / "g", bits=4, sym=True, scale_dtype="BF16")
    assert convert_checkpoint(tmp_path / "g", tmp_path / "ct", to="compressed-tensors")["verified"] is None
    s = convert_checkpoint(tmp_path / "ct", tmp_path / "ct.gguf", to="gguf", verify=True)
    assert s["types"] == {"Q4_0": 7}
    C.make_gptq(tmp_path / "f", bits=4, scale_dtype="F32")
    assert convert_checkpoint(tmp_path / "f", tmp_path / "f.gguf", to="gguf", verify=True)["types"] == {"Q5_0": 7}


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["convert", *map(str, args)])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case", ["forced q4_0 on asymmetric", "act-order", "scales not fp16", "forced f16"])
def test_refused_before_writing(tmp_path, capsys, case):
    kw, flags = {}, []
    if case == "act-order":
        kw = {"act_order": True}
    if case == "scales not fp16":  # float32 scales, one of which is no fp16 value

        def edit(t):
            t["model.layers.0.mlp.up_proj.scales"][0, 0] = np.float32(1 / 3)

        kw = {"scale_dtype": "F32", "edit": edit}
    C.make_gptq(tmp_path / "src", **kw)
    if case.startswith("forced"):
        flags = ["--gguf-type", case.split()[1]]
    before = sorted(os.listdir(tmp_path))
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "m.gguf", "--to", "gguf", *flags)
    assert rc == 2 and err.count("\n") == 1 and "--allow-inexact" in err and "--gguf-type f32" in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even a lock or a partial file
    want = {"forced q4_0 on asymmetric": "GGUF Q4_0 does not hold 7 of 7", "act-order": "no GGUF block type",
            "scales not fp16": "blk.0.ffn_up.weight (at most 255 of 256 blocks", "forced f16": "AWQ/GPTQ engines"}[case]
    assert want in err, err
    # with --allow-inexact it is written, and the summary says how far off
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "m.gguf"), "--to", "gguf", *flags, "--allow-inexact",
               "--verify", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["inexact_tensors"] and out["max_weight_error"] > 0
    # and f32 is always exact
    s = convert_checkpoint(tmp_path / "src", tmp_path / "x.gguf", to="gguf", gguf_type="f32", verify=True)
    assert s["types"] == {"F32": 7} and not s["inexact_tensors"]


def test_file_guarantees(tmp_path, capsys):
    C.make_gptq(tmp_path / "src")
    dst = tmp_path / "m.gguf"
    convert_checkpoint(tmp_path / "src", dst, to="gguf")
    old = dst.read_bytes()
    rc, err = _cli(capsys, tmp_path / "src", dst, "--to", "gguf", "--gguf-type", "q8_0")
    assert rc == 2 and "already exists" in err and dst.read_bytes() == old
    assert convert_checkpoint(tmp_path / "src", dst, to="gguf", gguf_type="q8_0", force=True)["types"] == {"Q8_0": 7}
    assert dst.read_bytes() != old and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]
    (tmp_path / "folder").mkdir()
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "folder", "--to", "gguf", "--force")
    assert rc == 2 and "is a folder" in err
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "src" / "in.gguf", "--to", "gguf")
    assert rc == 2 and "inside SRC" in err
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "y", "--to", "gptq", "--gguf-type", "q4_0")
    assert rc == 2 and "--gguf-type is for --to gguf" in err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "n.gguf"), "--json"]) == 0  # .gguf: --to gguf
    assert json.loads(capsys.readouterr().out)["to"] == "gguf" and (tmp_path / "n.gguf").is_file()


def test_verify_catches_a_wrong_block(tmp_path, monkeypatch):
    """A negative control: a writer that flips one bit of one block is caught by --verify, and DST never appears."""
    from packq.checkpoint.formats import gguf as fmt
    from packq.checkpoint.formats.base import Piece

    C.make_gptq(tmp_path / "src", sym=True)
    real = fmt.chunks

    def corrupt(ckpt, p, read_word, buffers=None):
        for i, piece in enumerate(real(ckpt, p, read_word, buffers)):
            piece = piece.make() if isinstance(piece, Piece) else piece  # made on the writer's threads: made here
            if p.name == "blk.0.ffn_down.weight" and i == 0:
                piece = piece.copy()
                piece.reshape(-1)[7] ^= 1
            yield piece

    monkeypatch.setattr(fmt, "chunks", corrupt)
    with pytest.raises(CheckpointError, match="blk.0.ffn_down.weight does not dequantize"):
        convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", to="gguf", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streamed_in_column_blocks(tmp_path, monkeypatch):
    """Encoding a module in blocks of output rows writes the same bytes as whole modules."""
    from packq.checkpoint.formats import gguf as fmt

    C.make_gptq(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "a.gguf", to="gguf")
    monkeypatch.setattr(fmt, "COLUMN_WEIGHTS", 32 * 64)
    assert fmt._columns(C.FFN, C.HIDDEN) == [(0, 32), (32, 64), (64, 96), (96, 128)]  # (every module is split)
    convert_checkpoint(tmp_path / "src", tmp_path / "b.gguf", to="gguf", verify=True)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_inspect_says_which_types_hold_each_module(tmp_path, capsys):
    C.make_gptq(tmp_path / "src", bits=4, sym=True)
    info = inspect_checkpoint(tmp_path / "src")
    g = info["gguf"]
    assert g["Q4_0"]["modules"] == g["Q5_0"]["modules"] == g["Q8_0"]["modules"] == 7 and g["auto"] == {"Q4_0": 7}
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", to="gguf")
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "GGUF" in out and "llama" in out and "Q4_0: 7 tensors" in out
    info = inspect_checkpoint(tmp_path / "m.gguf")
    assert info["architecture"] == "llama" and info["tensors_by_type"]["Q4_0"]["tensors"] == 7
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    assert main(["inspect", str(tmp_path / "bad.gguf")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_experts_stacked_expert_by_expert(tmp_path, monkeypatch):
    """Several modules in one GGUF tensor (MoE experts): ne = [K, N, E], expert e's rows after expert e - 1's."""
    truth = C.make_gptq(tmp_path / "src")

    def stacked(root, config, shapes, modules):
        m = C.describe(root, config, shapes, modules)
        experts = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
        keep = [t for t in m.tensors if t.sources[0] not in experts]
        m.tensors = keep + [C.GGUFTensor("blk.0.ffn_gate_up_exps.weight", experts, True)]
        return m

    monkeypatch.setattr(sys.modules["packq.checkpoint.gguf_model"], "describe", stacked)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", to="gguf", verify=True)
    t = read(tmp_path / "m.gguf")[0]["blk.0.ffn_gate_up_exps.weight"]
    assert [int(x) for x in t.shape] == [C.HIDDEN, C.FFN, 2] and t.tensor_type.name == "Q5_0"
    want = np.stack([exact(*truth[p]) for p in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")])
    assert weights_of(t).tobytes() == want.tobytes()


@pytest.mark.parametrize("bits", [3, 4])
def test_unpacked_in_row_blocks_the_same(tmp_path, monkeypatch, bits):
    """Unpacking qweight in small blocks of rows gives the same integers (3-bit: periods of 3 words kept whole)."""
    from packq.checkpoint.folder import open_checkpoint
    from packq.checkpoint.formats import gguf as fmt

    truth = C.make_gptq(tmp_path / "src", bits=bits)
    ckpt = open_checkpoint(tmp_path / "src")
    monkeypatch.setattr(fmt, "ROW_WORDS", 1)
    for prefix, (q, z, _, _) in truth.items():
        got = fmt.module_integers(ckpt, prefix)
        assert np.array_equal(got[0], q) and np.array_equal(got[1], z), prefix
    awq = fmt.module_integers(open_checkpoint(EXAMPLE), "model.layers.0.mlp.down_proj")[0]
    monkeypatch.setattr(fmt, "ROW_WORDS", 1 << 20)
    assert np.array_equal(awq, fmt.module_integers(open_checkpoint(EXAMPLE), "model.layers.0.mlp.down_proj")[0])


def test_without_the_gguf_package_one_line(tmp_path, capsys, monkeypatch):
    C.make_gptq(tmp_path / "src")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: import raises ImportError
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "m.gguf")
    assert rc == 2 and err.count("\n") == 1 and "pip install 'packq[gguf]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture
def direct_flushes(monkeypatch):
    """The tensor data's direct writes, counted (in blocks of 4096 bytes, so that these small files have several)."""
    import packq.checkpoint.safetensors as S

    monkeypatch.setattr(S, "DIRECT_CHUNK", 4096)
    flushed: list[int] = []
    real = S.StagedWriter._direct

    def counting(self, view):
        flushed.append(view.nbytes)
        return real(self, view)

    monkeypatch.setattr(S.StagedWriter, "_direct", counting)
    return flushed


@pytest.mark.parametrize("how", ["interrupt", "disk full"])
def test_an_interrupted_write_leaves_no_dst(tmp_path, monkeypatch, capsys, direct_flushes, how):
    """Interrupted (Ctrl-C) or failing (a full disk) after some tensor data was written directly: no DST, no hidden
    file, no lock; the failure one line."""
    import errno

    import packq.checkpoint.safetensors as S
    from packq.checkpoint.formats import gguf as fmt

    C.make_gptq(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "whole.gguf", to="gguf")
    assert direct_flushes  # (the direct path is the one interrupted below)
    (tmp_path / "whole.gguf").unlink()
    direct_flushes.clear()
    real_chunks, real_direct = fmt.chunks, S.StagedWriter._direct
    started: list[str] = []

    def interrupted(ckpt, p, read_word, buffers=None):
        if len(started) == 8:  # (the pieces of the tensors before are made a few ahead: some are written by then)
            raise KeyboardInterrupt
        started.append(p.name)
        yield from real_chunks(ckpt, p, read_word, buffers)

    def full(self, view):  # (on the writer thread: the error reaches the conversion at the next handover)
        if len(direct_flushes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_direct(self, view)

    if how == "interrupt":
        monkeypatch.setattr(fmt, "chunks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", to="gguf")
    else:
        monkeypatch.setattr(S.StagedWriter, "_direct", full)
        rc, err = _cli(capsys, tmp_path / "src", tmp_path / "m.gguf", "--to", "gguf")
        assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert direct_flushes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("how", ["more", "less"])
def test_more_or_less_data_than_planned_is_refused(tmp_path, monkeypatch, capsys, how):
    """A tensor whose pieces add up to more or fewer bytes than planned: one line, nothing left behind."""
    from packq.checkpoint.formats import gguf as fmt

    C.make_gptq(tmp_path / "src")
    real = fmt.chunks

    def wrong(ckpt, p, read_word, buffers=None):
        pieces = list(real(ckpt, p, read_word, buffers))
        if p.name == "blk.0.ffn_down.weight":
            pieces = [*pieces, np.zeros(1, np.uint8)] if how == "more" else pieces[:-1]
        yield from pieces

    monkeypatch.setattr(fmt, "chunks", wrong)
    rc, err = _cli(capsys, tmp_path / "src", tmp_path / "m.gguf", "--to", "gguf")
    want = "more data than planned" if how == "more" else "planned"
    assert rc == 2 and err.count("\n") == 1 and "blk.0.ffn_down.weight" in err and want in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_modules_words_go_back_to_the_buffers_only_once_every_piece_is_made():
    """The words every piece of a module reads are given back once, after the last piece is made, whatever the order
    the two workers finish in (a piece made early must not free what the others still read)."""
    import threading
    import time

    from packq.checkpoint.formats.gguf import _Held
    from packq.checkpoint.safetensors import Buffers

    buffers = Buffers()
    words = buffers.take(4096)
    held = _Held(words, 5, buffers)
    seen: list[bool] = []

    def piece(i: int) -> int:
        time.sleep(0.01 * (5 - i))  # the later pieces finish first
        seen.append(buffers.root(words) is not None)  # still handed out while any piece runs
        return i

    threads = [threading.Thread(target=held.run, args=(piece, i)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True] * 5 and buffers.root(words) is None and len(buffers._free) == 1
    with pytest.raises(ZeroDivisionError):  # a piece that fails still counts: the buffer is not held forever
        _Held(buffers.take(4096), 1, buffers).run(lambda: 1 // 0)
    assert not buffers._out


@pytest.mark.parametrize("source", ["example", "symmetric"])
def test_the_plan_keeps_which_awq_modules_are_symmetric(tmp_path, monkeypatch, source):
    """The census reads an AWQ module's zero-points once: the plan keeps whether they are all 8, and the writer's
    choice of kernels (needs_kernels: Q4_0's whole-word path takes only those) reads none again, with the answer it
    gets by reading them."""
    from packq.checkpoint.folder import open_checkpoint
    from packq.checkpoint.formats import gguf as fmt

    if source == "symmetric":
        root = tmp_path / "awq"
        C.make_gptq(tmp_path / "g", bits=4, sym=True)
        convert_checkpoint(tmp_path / "g", root, to="awq")
    else:
        root = EXAMPLE
    ckpt = open_checkpoint(root)
    parts = {name for m in ckpt.modules.values() for name in m.names.values()}
    shapes = {t.name: t.shape for s in ckpt.shards.values() for t in s.tensors.values() if t.name not in parts}
    model = C.describe(ckpt.root, ckpt.config, shapes, {p: (m.k, m.n) for p, m in ckpt.modules.items()})
    gplan = fmt.plan(ckpt, model, "q4_0", True, False)
    truth = {p: bool(np.all(fmt._awq_arrays(ckpt, p)[0] == 8)) for p in ckpt.modules}
    assert gplan.symmetric == truth and set(truth.values()) == {source == "symmetric"}
    reads: list[str] = []
    real = fmt._awq_arrays
    monkeypatch.setattr(fmt, "_awq_arrays", lambda c, p: (reads.append(p), real(c, p))[1])
    kept = fmt.needs_kernels(ckpt, gplan)
    assert reads == [] and kept == (source == "example")  # asymmetric Q4_0 takes numba's kernel
    gplan.symmetric.clear()  # negative control: not kept, they are read, and the answer is the same
    assert fmt.needs_kernels(ckpt, gplan) == kept and reads
