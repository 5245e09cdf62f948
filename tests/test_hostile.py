"""Hostile input and faults: every failure is one line and exit 2, with SRC untouched and nothing left behind.

The oracle for headers is the safetensors library itself: a shard it refuses to
open, packq must refuse too; and everything packq writes, it must open and read.
Mutations are drawn by hypothesis over the shard headers, the index and the
config; the classes a hostile study found are listed as explicit cases too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from packq.checkpoint import files as F
from packq.checkpoint.safetensors import MAX_HEADER
from packq.cli import main

REPO = Path(__file__).resolve().parent.parent
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------ a tiny checkpoint
def make_checkpoint(root: Path) -> Path:
    """Two AWQ modules (K=128, N=64, group 64) in two shards, an unquantized bf16 tensor and an extra file."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    tensors = [{}, {}]
    for i, name in enumerate(["model.layers.0.q", "model.layers.0.k"]):
        tensors[i][f"{name}.qweight"] = rng.integers(0, 2**32, (128, 8), dtype=np.uint64).astype(np.uint32).view(np.int32)
        # zero-points 1..15: every engine reads v1 alike, so conversions need no --for (test_engines has those)
        zeros = rng.integers(1, 16, (2, 8, 8), dtype=np.uint32) << (4 * np.arange(8, dtype=np.uint32))
        tensors[i][f"{name}.qzeros"] = np.bitwise_or.reduce(zeros, axis=-1).view(np.int32)
        tensors[i][f"{name}.scales"] = rng.random((2, 64)).astype(np.float16)
    tensors[0]["model.embed.weight"] = rng.integers(0, 2**16, (16, 8), dtype=np.uint64).astype(np.uint16)  # as bf16 below
    weight_map = {}
    for shard, ts in zip(SHARDS, tensors):
        save_file(ts, str(root / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in ts})
    _edit_header(root / SHARDS[0], lambda h: h["model.embed.weight"].update(dtype="BF16"))
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}}))
    (root / "tokenizer.json").write_text("{}")
    return root


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_shard(path: Path, header: object, data: bytes, encoding: str = "utf-8") -> None:
    raw = json.dumps(header).encode(encoding) if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(path: Path, edit) -> None:
    header, data = read_header(path)
    edit(header)
    write_shard(path, header, data)


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def reference_opens(path: Path) -> bool:
    """Whether the safetensors library accepts the file's header (its read_metadata and validate)."""
    try:
        with safe_open(str(path), "np") as f:
            f.keys()
        return True
    except (SafetensorError, OSError, ValueError, TypeError):
        return False


def assert_loads_in_safetensors(folder: Path) -> None:
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "src")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, dst: Path, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("packq: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not os.path.lexists(dst)
    assert not list(dst.parent.glob(".packq-*")), list(dst.parent.glob(".packq-*"))


def convert_and_check(src: Path, dst: Path, capsys, *extra: str) -> tuple[int, str]:
    """Run packq convert; whatever it decides, the guarantees hold. Returns (code, stderr)."""
    before = tree_hash(src)
    code, err = run_cli(["convert", str(src), str(dst), "--verify", *extra], capsys)
    assert tree_hash(src) == before, "SRC was written"
    if code == 0:
        assert_loads_in_safetensors(dst)
        assert not list(dst.parent.glob(".packq-*"))
    else:
        assert_refused(code, err, dst)
    return code, err


# ------------------------------------------------------------------ explicit classes
def _entry(field, value):
    return lambda h: h["model.layers.0.q.qweight"].__setitem__(field, value)


HEADER_CASES = {
    "negative-dim": _entry("shape", [-128, 8]),
    "float-dim": _entry("shape", [128.0, 8]),
    "string-dim": _entry("shape", ["128", 8]),
    "bool-dim": _entry("shape", [True, 8]),
    "huge-dim": _entry("shape", [2**70, 8]),
    "overflowing-shape": _entry("shape", [2**40, 2**40]),
    "shape-not-a-list": _entry("shape", 1024),
    "offsets-strings": _entry("data_offsets", ["0", "4096"]),
    "offsets-null": _entry("data_offsets", None),
    "offsets-three": _entry("data_offsets", [0, 4096, 8192]),
    "offsets-reversed": lambda h: h["model.layers.0.q.qweight"].__setitem__(
        "data_offsets", h["model.layers.0.q.qweight"]["data_offsets"][::-1]),
    "size-disagrees": _entry("shape", [64, 8]),
    "unknown-dtype": _entry("dtype", "I4"),
    "dtype-not-string": _entry("dtype", 32),
    "entry-not-object": lambda h: h.__setitem__("model.layers.0.q.qweight", [1, 2]),
    "metadata-not-strings": lambda h: h.__setitem__("__metadata__", {"format": 1}),
    "metadata-list": lambda h: h.__setitem__("__metadata__", ["pt"]),
    "gap": lambda h: h.pop("model.layers.0.q.qzeros"),
    "overlap": lambda h: h["model.layers.0.q.qzeros"].__setitem__(
        "data_offsets", [o - 4 for o in h["model.layers.0.q.qzeros"]["data_offsets"]]),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_the_reference_refuses_is_refused(ckpt, tmp_path, capsys, case):
    _edit_header(ckpt / SHARDS[0], HEADER_CASES[case])
    assert not reference_opens(ckpt / SHARDS[0]), "the case should be one the reference loader refuses"
    code, err = convert_and_check(ckpt, tmp_path / "dst", capsys)
    assert_refused(code, err, tmp_path / "dst", SHARDS[0])
    code, err = run_cli(["inspect", str(ckpt)], capsys)
    assert code == 2 and err.count("\n") == 1


RAW_CASES = {
    "utf16": lambda h, d: (json.dumps(h).encode("utf-16"), d),
    "latin1-name": lambda h, d: (json.dumps(h, ensure_ascii=False).replace("model.embed", "mod\u00e9l.embed").encode("latin-1"), d),
    "nan": lambda h, d: (json.dumps(h).replace('"format": "pt"', '"format": NaN').encode(), d),
    "duplicate-key": lambda h, d: (json.dumps(h)[:-1].encode() + b', "model.embed.weight": ' +
                                   json.dumps(h["model.embed.weight"]).encode() + b"}", d),
    "deep-nesting": lambda h, d: (b"[" * 100_000 + b"]" * 100_000, d),
    "not-an-object": lambda h, d: (b"[]", d),
    "trailing-bytes": lambda h, d: (json.dumps(h).encode(), d + b"\0" * 8),
    "truncated-data": lambda h, d: (json.dumps(h).encode(), d[:-1]),
    "empty-file": lambda h, d: (b"", b""),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_header_the_reference_refuses_is_refused(ckpt, tmp_path, capsys, case):
    header, data = read_header(ckpt / SHARDS[0])
    raw, data = RAW_CASES[case](header, data)
    if case == "empty-file":
        (ckpt / SHARDS[0]).write_bytes(b"\0" * 4)
    else:
        write_shard(ckpt / SHARDS[0], raw, data)
    # a name given twice is ambiguous: the reference keeps the last, packq refuses (stricter on purpose)
    assert reference_opens(ckpt / SHARDS[0]) == (case == "duplicate-key")
    code, err = convert_and_check(ckpt, tmp_path / "dst", capsys)
    assert_refused(code, err, tmp_path / "dst", SHARDS[0])


def test_header_at_the_limit_is_read_and_past_it_refused(ckpt, tmp_path, capsys):
    header, data = read_header(ckpt / SHARDS[1])
    raw = json.dumps(header).encode()
    write_shard(ckpt / SHARDS[1], raw + b" " * (MAX_HEADER + 8 - len(raw)), data)
    assert not reference_opens(ckpt / SHARDS[1])
    code, err = convert_and_check(ckpt, tmp_path / "dst", capsys)
    assert_refused(code, err, tmp_path / "dst", "larger than the 100000000 bytes")
    write_shard(ckpt / SHARDS[1], raw + b" " * (MAX_HEADER - len(raw)), data)
    assert reference_opens(ckpt / SHARDS[1])
    assert convert_and_check(ckpt, tmp_path / "dst", capsys)[0] == 0


def test_a_header_that_would_grow_past_the_limit_is_refused_before_writing(ckpt, tmp_path, capsys):
    """To GPTQ adds a g_idx entry per module: a source header just under the limit would come out over it."""
    header, data = read_header(ckpt / SHARDS[0])
    header["__metadata__"]["pad"] = ""
    room = MAX_HEADER - len(json.dumps(header, separators=(",", ":")).encode()) - 8
    header["__metadata__"]["pad"] = "x" * room
    raw = json.dumps(header, separators=(",", ":")).encode()
    write_shard(ckpt / SHARDS[0], raw, data)
    assert len(raw) <= MAX_HEADER and reference_opens(ckpt / SHARDS[0])
    code, err = convert_and_check(ckpt, tmp_path / "dst", capsys)
    assert_refused(code, err, tmp_path / "dst", "the converted header would be", "split the source into more shards")


def test_each_header_is_parsed_once(ckpt, tmp_path, monkeypatch):
    from packq.checkpoint import safetensors as S

    parsed: list[str] = []
    real = S.SafetensorsFile.__init__

    def counting(self, path):
        parsed.append(Path(path).name)
        real(self, path)

    monkeypatch.setattr(S.SafetensorsFile, "__init__", counting)
    assert main(["convert", str(ckpt), str(tmp_path / "dst"), "--verify"]) == 0
    # every source shard once, and every output shard once (read back by --verify)
    assert sorted(parsed) == sorted(SHARDS * 2)


def _index(ckpt: Path, edit) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    edit(index)
    (ckpt / INDEX).write_text(json.dumps(index))


def _config(ckpt: Path, edit) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))


def _module_shape(k: int, n: int):
    """Rewrite module q to shape (K, N) with matching tensors, valid as safetensors."""
    def damage(ckpt: Path) -> None:
        header, data = read_header(ckpt / SHARDS[0])
        tensors = {}
        with safe_open(str(ckpt / SHARDS[0]), "np") as f:
            for name in f.keys():
                if header[name]["dtype"] != "BF16":
                    tensors[name] = f.get_tensor(name)
        tensors["model.layers.0.q.qweight"] = np.zeros((k, n // 8), np.int32)
        tensors["model.layers.0.q.qzeros"] = np.zeros((2 if k else 0, n // 8), np.int32)
        tensors["model.layers.0.q.scales"] = np.zeros((2 if k else 0, n), np.float16)
        tensors["model.embed.weight"] = np.zeros((16, 8), np.uint16)
        save_file(tensors, str(ckpt / SHARDS[0]), metadata={"format": "pt"})
    return damage


FOLDER_CASES = {
    "index-weight-map-values-not-strings": (lambda c: _index(c, lambda i: i["weight_map"].update({"x": 3})),
                                            "shard file names must be strings"),
    "index-weight-map-list": (lambda c: _index(c, lambda i: i.update(weight_map=[1])), "no weight_map"),
    "index-metadata-not-object": (lambda c: _index(c, lambda i: i.update(metadata=[1, 2])), "metadata must be an object"),
    "index-deep-nesting": (lambda c: (c / INDEX).write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "index-nul-in-shard-name": (lambda c: _index(c, lambda i: i["weight_map"].update(
        {"model.embed.weight": "model\0.safetensors"})), "is not a file in the folder"),
    "index-shard-outside": (lambda c: _index(c, lambda i: i["weight_map"].update(
        {"model.embed.weight": "../x.safetensors"})), "is not a file in the folder"),
    "config-deep-nesting": (lambda c: (c / "config.json").write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
                            "nested too deeply"),
    "config-not-utf8": (lambda c: (c / "config.json").write_bytes(b'{"a": "\xff"}'), "not UTF-8"),
    "config-desc-act-string": (lambda c: _config(c, lambda q: q["quantization_config"].update(desc_act="false",
                                                                                               quant_method="gptq")),
                               "is AWQ" if False else "desc_act must be true or false"),
    "config-group-size-float": (lambda c: _config(c, lambda q: q["quantization_config"].update(group_size=64.0)),
                                "group_size must be a positive integer"),
    "config-a-folder": (lambda c: ((c / "config.json").unlink(), (c / "config.json").mkdir()), "is a folder"),
    "config-a-fifo": (lambda c: ((c / "config.json").unlink(), os.mkfifo(c / "config.json")), "is a FIFO"),
    "shard-a-fifo": (lambda c: ((c / SHARDS[1]).unlink(), os.mkfifo(c / SHARDS[1])), "is a FIFO"),
    "shard-link-to-dev-zero": (lambda c: ((c / SHARDS[1]).unlink(), (c / SHARDS[1]).symlink_to("/dev/zero")),
                               "not a regular file"),
    "module-k-0": (_module_shape(0, 64), "qweight has no elements"),
    "module-n-0": (_module_shape(128, 0), "qweight has no elements"),
    "extra-fifo": (lambda c: os.mkfifo(c / "pipe"), "not a regular file (a FIFO"),
    "extra-link-to-dev-zero": (lambda c: (c / "zeros.bin").symlink_to("/dev/zero"), "not a regular file"),
    "extra-link-loop": (lambda c: ((c / "a").symlink_to(c / "b"), (c / "b").symlink_to(c / "a")),
                        "Too many levels of symbolic links"),
    "extra-dangling-link": (lambda c: (c / "gone").symlink_to(c / "nowhere"), "No such file or directory"),
    "extra-link-to-folder": (lambda c: (c / "up").symlink_to(c.parent), "is a link to a folder"),
    "extra-fifo-in-subfolder": (lambda c: ((c / "sub").mkdir(), os.mkfifo(c / "sub" / "pipe")), "sub/pipe"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_malformed_folder_is_one_line_exit_2(ckpt, tmp_path, capsys, case):
    damage, fragment = FOLDER_CASES[case]
    damage(ckpt)
    dst = tmp_path / "dst"
    t0 = time.monotonic()
    code, err = run_cli(["convert", str(ckpt), str(dst)], capsys)
    assert time.monotonic() - t0 < 30, "a special file made packq block or run on"
    assert_refused(code, err, dst, fragment)


def test_links_to_regular_files_are_copied_as_files_and_subfolders_walked(ckpt, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("outside")
    (ckpt / "linked.txt").symlink_to(outside)
    (ckpt / "sub" / "deeper").mkdir(parents=True)
    (ckpt / "sub" / "deeper" / "note.md").write_text("note")
    code, _ = convert_and_check(ckpt, tmp_path / "dst", capsys)
    assert code == 0
    copied = tmp_path / "dst" / "linked.txt"
    assert not copied.is_symlink() and copied.read_text() == "outside"
    assert (tmp_path / "dst" / "sub" / "deeper" / "note.md").read_text() == "note"
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == "{}"


# ------------------------------------------------------------------ hypothesis mutations
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every (path, value) inside a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def mutate(tree, data) -> object:
    """Replace, delete or add one node of a JSON tree (a deep copy)."""
    tree = json.loads(json.dumps(tree))
    paths = list(_paths(tree))
    path, _ = data.draw(st.sampled_from(paths))
    if not path:
        return data.draw(JSON)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(JSON)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6))] = data.draw(JSON)
    else:
        parent.append(data.draw(JSON))
    return tree


#: the routes a mutated source is sent down: GPTQ v1 by default, per engine, to AWQ, dequantized
TARGET_ARGS = st.sampled_from([[], ["--for", "exllamav2"], ["--for", "transformers"], ["--to", "awq"],
                               ["--to", "bfloat16"]])
MUTATION = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
_TRIED: dict[str, list[int]] = {}


def _count(kind: str, code: int) -> None:
    _TRIED.setdefault(kind, []).append(code)


@MUTATION
@given(data=st.data())
def test_mutated_shard_header(tmp_path_factory, data, capsys):
    root = tmp_path_factory.mktemp("m")
    src = make_checkpoint(root / "src")
    shard = src / data.draw(st.sampled_from(SHARDS))
    header, body = read_header(shard)
    write_shard(shard, mutate(header, data), body)
    code, _ = convert_and_check(src, root / "dst", capsys, *data.draw(TARGET_ARGS))
    if not reference_opens(shard):
        assert code == 2, "packq accepted a shard the safetensors library refuses"
    _count("shard header", code)


@MUTATION
@given(data=st.data())
def test_mutated_index(tmp_path_factory, data, capsys):
    root = tmp_path_factory.mktemp("m")
    src = make_checkpoint(root / "src")
    (src / INDEX).write_text(json.dumps(mutate(json.loads((src / INDEX).read_text()), data)))
    _count("index", convert_and_check(src, root / "dst", capsys)[0])


@MUTATION
@given(data=st.data())
def test_mutated_config(tmp_path_factory, data, capsys):
    root = tmp_path_factory.mktemp("m")
    src = make_checkpoint(root / "src")
    (src / "config.json").write_text(json.dumps(mutate(json.loads((src / "config.json").read_text()), data)))
    _count("config", convert_and_check(src, root / "dst", capsys, *data.draw(TARGET_ARGS))[0])


@MUTATION
@given(data=st.data(), position=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_flipped_byte_anywhere_in_a_shard(tmp_path_factory, data, position, byte, capsys):
    root = tmp_path_factory.mktemp("m")
    src = make_checkpoint(root / "src")
    shard = src / data.draw(st.sampled_from(SHARDS))
    raw = bytearray(shard.read_bytes())
    raw[position % len(raw)] = byte
    shard.write_bytes(bytes(raw))
    code, _ = convert_and_check(src, root / "dst", capsys)
    if not reference_opens(shard):
        assert code == 2
    _count("flipped byte", code)


def test_zz_report_mutation_counts():
    """Prints how many mutations each property tried and how they ended (-rA shows it)."""
    for kind, codes in sorted(_TRIED.items()):
        print(f"{kind}: {len(codes)} tried, {codes.count(2)} refused (exit 2), {codes.count(0)} converted")
        assert set(codes) <= {0, 2}


# ------------------------------------------------------------------ DST and file-system faults
@pytest.mark.parametrize("name", [".", ".."])
def test_dst_dot_or_dotdot_refused(ckpt, tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path / "src")
    before = tree_hash(tmp_path)
    code, err = run_cli(["convert", str(ckpt), name, "--force"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("packq: error: "), err
    assert tree_hash(tmp_path) == before


def test_dst_names_of_255_bytes_work_and_256_is_one_line(ckpt, tmp_path, capsys):
    dst = tmp_path / ("d" * 255)
    assert convert_and_check(ckpt, dst, capsys)[0] == 0
    assert convert_and_check(ckpt, dst, capsys, "--force")[0] == 0
    code, err = run_cli(["convert", str(ckpt), str(tmp_path / ("d" * 256))], capsys)
    assert_refused(code, err, tmp_path / ("d" * 256), "File name too long")


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path):
    where = tmp_path / "fs"
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(ckpt, small_fs, capsys):
    _mount_tmpfs(small_fs, "size=4k")
    code, err = run_cli(["convert", str(ckpt), str(small_fs / "dst")], capsys)
    assert_refused(code, err, small_fs / "dst", "No space left on device")
    assert os.listdir(small_fs) == []


def test_read_only_parent_is_one_line(ckpt, small_fs, capsys):
    _mount_tmpfs(small_fs, "ro,size=1m")
    code, err = run_cli(["convert", str(ckpt), str(small_fs / "dst")], capsys)
    assert_refused(code, err, small_fs / "dst", "Read-only file system")


def test_disk_full_injected(ckpt, tmp_path, capsys, monkeypatch):
    """The same path without a mount: the config write fails with ENOSPC after every shard was written."""
    real = F.write_durable

    def full(path, data):
        if path.name == "config.json":
            raise F.CheckpointError(F.describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)), path))
        real(path, data)

    monkeypatch.setattr("packq.checkpoint.containers.folder.write_durable", full)
    code, err = run_cli(["convert", str(ckpt), str(tmp_path / "dst")], capsys)
    assert_refused(code, err, tmp_path / "dst", "No space left on device")


def test_file_size_limit_is_one_line(ckpt, tmp_path):
    """ulimit -f: writes past the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    dst = tmp_path / "dst"

    # the limit is set in the child itself (no preexec_fn: forking this JAX-threaded process is unsafe)
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); "
            f"from packq.cli import main; sys.exit(main(['convert', {str(ckpt)!r}, {str(dst)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr
    assert not dst.exists() and not list(tmp_path.glob(".packq-*"))


def test_every_file_and_folder_is_fsynced(ckpt, tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "x.txt").write_text("x")
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    partial = next(p for p in synced if p.endswith(".partial"))
    names = {Path(p).relative_to(partial).as_posix() if p.startswith(partial) else p for p in synced}
    for f in dst.rglob("*"):
        assert f.relative_to(dst).as_posix() in names, f"{f} was not fsynced"
    assert "." in names or partial in synced  # the folder itself
    assert str(tmp_path) in synced, "DST's parent was not fsynced"
    last = max(i for i, p in enumerate(synced) if p == str(tmp_path))
    assert last > max(i for i, p in enumerate(synced) if p.startswith(partial)), "no fsync of the parent after the rename"


# ------------------------------------------------------------------ races and kills
SLOW = """
import os, sys, time
import packq.checkpoint.containers.folder as c
import packq.checkpoint.files as files
real = c._tensor
def slow(*a, **k):
    time.sleep(float(os.environ.get("PACKQ_TEST_DELAY", "0.05")))
    return real(*a, **k)
c._tensor = slow
when = os.environ.get("PACKQ_TEST_KILL")
if when:
    if os.environ.get("PACKQ_TEST_FALLBACK"):
        files.Destination.use_renameat2 = False
    real_rename, real_r2 = os.rename, files._renameat2
    def kill():
        os.kill(os.getpid(), 9)
    def r2(a, b, flags):
        if when == "before-exchange":
            kill()
        ok = real_r2(a, b, flags)
        if when == "after-exchange":
            kill()
        return ok
    calls = []
    def rename(a, b):
        real_rename(a, b)
        calls.append(b)
        if when == "between-renames" and str(b).endswith(".old"):
            kill()
    files._renameat2 = r2
    files.os.rename = rename
from packq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


@pytest.mark.parametrize("trial", range(3))
def test_two_converts_racing_to_one_new_dst_never_both_succeed(ckpt, tmp_path, trial):
    dst = tmp_path / "dst"
    a = _spawn("convert", str(ckpt), str(dst), PACKQ_TEST_DELAY="0.02")
    time.sleep(0.1 * trial)
    b = _spawn("convert", str(ckpt), str(dst), PACKQ_TEST_DELAY="0.02")
    results = [(p.wait(60), p.communicate()[1]) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.count("\n") == 1 and ("another packq conversion is writing it" in loser or "already exists" in loser)
    assert_loads_in_safetensors(dst)
    assert not list(tmp_path.glob(".packq-*"))


def _started(folder: Path, *args: str, **env: str) -> subprocess.Popen:
    """A conversion spawned and seen writing: its hidden partial folder exists in ``folder``."""
    p = _spawn(*args, **env)
    deadline = time.time() + 60
    while not list(folder.glob(".packq-*.partial")) and time.time() < deadline:
        time.sleep(0.01)
    return p


def _fingerprint(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]


@pytest.mark.parametrize("when", ["before-exchange", "after-exchange"])
def test_force_is_atomic_when_killed_around_the_exchange(ckpt, tmp_path, when):
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0  # the old DST: GPTQ
    old = tree_hash(dst)
    again = tmp_path / "again"
    shutil.copytree(ckpt, again)
    # convert the GPTQ result back to AWQ over an existing AWQ-named DST, killed around the exchange
    target = tmp_path / "target"
    assert main(["convert", str(dst), str(target), "--to", "awq"]) == 0
    before = tree_hash(target)
    p = _spawn("convert", str(dst), str(target), "--to", "awq", "--force", "--checkpoint-format", "gptq",
               PACKQ_TEST_KILL=when, PACKQ_TEST_DELAY="0")
    assert p.wait(60) == -9
    assert target.is_dir()
    assert_loads_in_safetensors(target)
    if when == "before-exchange":
        assert tree_hash(target) == before  # the old folder, untouched
    else:
        assert _fingerprint(target) == "awq"  # the new, complete folder (same content by construction)
    assert tree_hash(dst) == old
    # the next run is not blocked, and leaves nothing behind
    assert main(["convert", str(dst), str(target), "--to", "awq", "--force"]) == 0
    assert not list(tmp_path.glob(".packq-*"))


def test_force_fallback_killed_between_renames_is_repaired_by_the_next_run(ckpt, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    old = tree_hash(dst)
    p = _spawn("convert", str(ckpt), str(dst), "--force", "--checkpoint-format", "gptq_v2",
               PACKQ_TEST_KILL="between-renames", PACKQ_TEST_FALLBACK="1", PACKQ_TEST_DELAY="0")
    assert p.wait(60) == -9
    assert not dst.exists() and list(tmp_path.glob(".packq-*.old"))  # the documented window of the fallback
    code, err = run_cli(["convert", str(ckpt), str(dst)], capsys)  # puts the old DST back, then refuses
    assert code == 2 and "already exists" in err
    assert tree_hash(dst) == old
    assert not list(tmp_path.glob(".packq-*"))


def test_fallback_force_replaces_when_not_killed(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(F.Destination, "use_renameat2", False)
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    assert main(["convert", str(ckpt), str(dst), "--force", "--checkpoint-format", "gptq_v2"]) == 0
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["checkpoint_format"] == "gptq_v2" and not list(tmp_path.glob(".packq-*"))


def test_stale_partial_of_a_killed_run_is_cleared_whatever_pid_is_alive(ckpt, tmp_path):
    """The claim is the lock, not a PID: leftovers are cleared once the lock is free."""
    dst = tmp_path / "dst"
    p = _started(tmp_path, "convert", str(ckpt), str(dst), PACKQ_TEST_DELAY="0.2")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(".packq-*.partial")) and not dst.exists()
    # a live, unrelated process (this one) has nothing to do with it
    assert main(["convert", str(ckpt), str(dst)]) == 0
    assert not list(tmp_path.glob(".packq-*"))


def test_a_running_conversion_is_not_disturbed_by_a_second(ckpt, tmp_path):
    dst = tmp_path / "dst"
    a = _started(tmp_path, "convert", str(ckpt), str(dst), PACKQ_TEST_DELAY="0.5")  # slow enough for b to start under load
    b = _spawn("convert", str(ckpt), str(dst), "--force")
    code_b, err_b = b.wait(60), b.communicate()[1]
    assert code_b == 2 and "another packq conversion is writing it" in err_b
    assert a.wait(60) == 0
    assert_loads_in_safetensors(dst)


def test_no_file_descriptor_is_left_open(ckpt, tmp_path):
    """Every read and write closes what it opened: thousands of conversions in one process stay possible."""
    from packq.checkpoint import inspect_checkpoint

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    main(["convert", str(ckpt), str(tmp_path / "warm"), "--verify"])  # imports and thread pools first
    before = open_fds()
    for i in range(3):
        assert main(["convert", str(ckpt), str(tmp_path / f"d{i}"), "--verify"]) == 0
        assert main(["convert", str(tmp_path / f"d{i}"), str(tmp_path / f"a{i}"), "--to", "awq", "--verify"]) == 0
        assert main(["convert", str(ckpt), str(tmp_path / f"f{i}"), "--to", "bfloat16", "--verify"]) == 0
        inspect_checkpoint(tmp_path / f"d{i}")
        assert main(["convert", str(ckpt), str(tmp_path / f"d{i}")]) == 2  # refused: exists
    assert open_fds() == before


# ================================================================== issue 19: hostile input, round 3
def examples(quick: int, thorough: int) -> settings:
    """A property's example count: ``quick`` by default, ``thorough`` under --thorough (whose profile asks
    2000; these properties run whole conversions or processes, so they take fewer)."""
    many = settings.default.max_examples >= 2000
    return settings(MUTATION, max_examples=thorough if many else quick)


def make_gptq(tmp_path: Path, *extra: str) -> Path:
    """The tiny checkpoint converted to GPTQ (v1 unless ``extra`` says otherwise)."""
    src = make_checkpoint(tmp_path / "awq-src")
    out = tmp_path / "gptq-src"
    assert main(["convert", str(src), str(out), *extra]) == 0
    return out


def make_ct(tmp_path: Path) -> Path:
    src = make_checkpoint(tmp_path / "awq-src-ct")
    out = tmp_path / "ct-src"
    assert main(["convert", str(src), str(out), "--to", "compressed-tensors"]) == 0
    return out


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a shard (bf16 as uint16, restored by _save)."""
    header, _ = read_header(path)
    with safe_open(str(path), "np") as f:
        return {k: (f.get_tensor(k) if header[k]["dtype"] != "BF16" else None) for k in f.keys()}


def _rewrite(path: Path, edit) -> None:
    """Rewrite a shard with ``edit(tensors)`` applied; BF16 tensors kept as their raw bits."""
    header, data = read_header(path)
    raw = {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.uint16).reshape(v["shape"])
           for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"}
    tensors = {k: v for k, v in _tensors(path).items() if v is not None}
    tensors.update(raw)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    bf16 = [k for k in raw if k in tensors]
    if bf16:
        _edit_header(path, lambda h: [h[k].update(dtype="BF16") for k in bf16])


def _set_quant(ckpt: Path, **values) -> None:
    _config(ckpt, lambda c: c["quantization_config"].update(values))


# ------------------------------------------------------------------ 8. headers as serde_json reads them
RAW_CASES.update({
    "lone-leading-surrogate-name": lambda h, d: (json.dumps(h).replace('"model.embed.weight"', '"model.embed\\ud800"')
                                                 .encode(), d),
    "lone-trailing-surrogate-name": lambda h, d: (json.dumps(h).replace('"model.embed.weight"', '"\\udc00model.embed"')
                                                  .encode(), d),
    "minus-zero-offset": lambda h, d: (json.dumps(h).replace('"data_offsets": [0, ', '"data_offsets": [-0, ', 1).encode(), d),
    "float-offset": lambda h, d: (json.dumps(h).replace('"data_offsets": [0, ', '"data_offsets": [0.0, ', 1).encode(), d),
})

#: number literals where the reference wants a usize, and how JSON texts them
LITERALS = st.sampled_from(["8", "-0", "0", "-0.0", "8.0", "8e0", "0.8e1", "08", "+8", "8.", "1e400", "-8",
                            str(2**64 - 1), str(2**64), "18446744073709551616e0", " 8", "8 "]) \
    | st.integers(-(2**66), 2**66).map(str)


def _one_tensor_shard(path: Path, header_text: str, nbytes: int = 8) -> None:
    raw = header_text.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * nbytes)


def _packq_opens(path: Path) -> dict | None:
    from packq.checkpoint.safetensors import SafetensorsFile
    from packq.errors import CheckpointError

    try:
        return SafetensorsFile(path).tensors
    except CheckpointError:
        return None


@settings(MUTATION)
@given(dim=LITERALS, begin=LITERALS, end=LITERALS, which=st.sampled_from(["dim", "begin", "end"]))
def test_header_numbers_are_read_as_the_reference_reads_them(tmp_path_factory, dim, begin, end, which):
    """Each number of an entry given as a drawn literal: packq accepts exactly what the safetensors library does."""
    parts = {"dim": "8", "begin": "0", "end": "8"}
    parts[which] = {"dim": dim, "begin": begin, "end": end}[which]
    path = tmp_path_factory.mktemp("lit") / "x.safetensors"
    _one_tensor_shard(path, '{"t":{"dtype":"U8","shape":[' + parts["dim"] + '],"data_offsets":[' + parts["begin"] + ","
                      + parts["end"] + "]}}")
    assert (_packq_opens(path) is not None) == reference_opens(path), parts


@settings(MUTATION)
@given(name=st.text(st.characters(exclude_categories=()), max_size=6), ascii_only=st.booleans())
def test_header_names_are_read_as_the_reference_reads_them(tmp_path_factory, name, ascii_only):
    """Any name (lone surrogates, controls, NUL included), escaped or raw: the same verdict, the same name."""
    path = tmp_path_factory.mktemp("name") / "x.safetensors"
    _one_tensor_shard(path, "{" + json.dumps(name, ensure_ascii=ascii_only) + ':{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}')
    ours = _packq_opens(path)
    assert (ours is not None) == reference_opens(path), repr(name)
    if ours is not None:
        with safe_open(str(path), "np") as f:
            assert list(ours) == list(f.keys())


# ------------------------------------------------------------------ 9. every declared value checked for type
CONFIG_TYPE_CASES = {  # (source kind, quantization_config edit, fragment of the one line)
    "gptq-bits-float": ("gptq", {"bits": 4.0}, "bits must be one of 2, 3, 4, 8, got 4.0"),
    "gptq-bits-true": ("gptq", {"bits": True}, "bits must be one of 2, 3, 4, 8, got true"),
    "gptq-bits-string": ("gptq", {"bits": "4"}, 'got "4"'),
    "gptq-group-size-float": ("gptq", {"group_size": 64.0}, "group_size must be a positive integer or -1, got 64.0"),
    "gptq-desc-act-int": ("gptq", {"desc_act": 0}, "desc_act must be true or false, got 0"),
    "gptq-checkpoint-format-int": ("gptq", {"checkpoint_format": 1}, "checkpoint_format must be a string, got 1"),
    "gptq-lm-head-string": ("gptq", {"lm_head": "false"}, 'lm_head must be true or false, got "false"'),
    "gptq-sym-int": ("gptq", {"sym": 1}, "sym must be true or false, got 1"),
    "gptq-dynamic-list": ("gptq", {"dynamic": []}, "dynamic must be an object, got []"),
    "gptq-dynamic-bits": ("gptq", {"dynamic": {"+:.*q$": {"bits": 8}}}, "sets bits 8 for some modules"),
    "gptq-dynamic-bits-float": ("gptq", {"dynamic": {"+:.*q$": {"bits": 4.0}}}, "sets bits 4.0 for some modules"),
    "gptq-dynamic-bad-regex": ("gptq", {"dynamic": {"-:(": {}}}, "is not a regular expression"),
    "gptq-not-convert-string": ("gptq", {"modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
    "awq-bits-float": ("awq", {"bits": 4.0}, "bits is 4.0; AWQ gemm is 4-bit only"),
    "awq-bits-true": ("awq", {"bits": True}, "bits is true"),
    "awq-zero-point-int": ("awq", {"zero_point": 1}, "zero_point must be true or false, got 1"),
    "awq-version-int": ("awq", {"version": 1}, "version must be a string, got 1"),
    "awq-not-convert-ints": ("awq", {"modules_to_not_convert": [1]}, "modules_to_not_convert must be a list of strings"),
}
CT_TYPE_CASES = {  # compressed-tensors: the weights block of its one config group
    "ct-num-bits-float": ({"num_bits": 4.0}, "weights.num_bits must be an integer, got 4.0"),
    "ct-num-bits-true": ({"num_bits": True}, "weights.num_bits must be an integer, got true"),
    "ct-symmetric-string": ({"symmetric": "false"}, 'weights.symmetric must be true or false, got "false"'),
    "ct-group-size-float": ({"group_size": 64.0}, "with group_size 64.0"),
    "ct-dynamic-int": ({"dynamic": 0}, "weights.dynamic must be true or false or a string, got 0"),
}


def _source(kind: str, tmp_path: Path) -> Path:
    return {"awq": lambda: make_checkpoint(tmp_path / "src"), "gptq": lambda: make_gptq(tmp_path),
            "ct": lambda: make_ct(tmp_path)}[kind]()


@pytest.mark.parametrize("case", sorted(CONFIG_TYPE_CASES) + sorted(CT_TYPE_CASES))
def test_declared_values_of_the_wrong_json_type_are_one_line(tmp_path, capsys, case):
    if case in CT_TYPE_CASES:
        src, (edit, fragment) = make_ct(tmp_path), CT_TYPE_CASES[case]
        _config(src, lambda c: c["quantization_config"]["config_groups"]["config_group_0"]["weights"].update(edit))
    else:
        kind, edit, fragment = CONFIG_TYPE_CASES[case]
        src = _source(kind, tmp_path)
        _set_quant(src, **edit)
    for args in (["convert", str(src), str(tmp_path / "dst"), "--verify", "--to", "float16"], ["inspect", str(src)]):
        code, err = run_cli(args, capsys)
        assert_refused(code, err, tmp_path / "dst", fragment)


#: how a drawn value may stand for a key: exactly these JSON types (bool is not int, float is not int)
_KEY_TYPES = {"awq": {"bits": int, "group_size": int, "zero_point": bool, "version": str},
              "gptq": {"bits": int, "group_size": int, "desc_act": bool, "sym": bool, "lm_head": bool, "checkpoint_format": str}}
_KEYS = sorted({*_KEY_TYPES["awq"], *_KEY_TYPES["gptq"], "true_sequential", "damp_percent"})
SCALARS = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-3, 300) | st.sampled_from([4.0, 64.0, 1.0, 0.0, -1.0]) \
    | st.text(max_size=4) | st.sampled_from(["4", "64", "gptq", "gptq_v2", "gemm", "true"]) | st.lists(st.integers(0, 8), max_size=2)


@examples(quick=15, thorough=300)
@given(data=st.data(), kind=st.sampled_from(["awq", "gptq"]))
def test_declared_json_values_of_every_type(tmp_path_factory, data, kind, capsys):
    """Any JSON value for a config key: converted only where its type is the key's own; else one line, never a traceback."""
    tmp = tmp_path_factory.mktemp("t")
    src = _source(kind, tmp)
    key = data.draw(st.sampled_from(_KEYS))
    value = data.draw(SCALARS)
    _set_quant(src, **{key: value})
    code, err = convert_and_check(src, tmp / "dst", capsys, *(["--to", "float16"] if kind == "gptq" else []))
    want = _KEY_TYPES[kind].get(key, object)  # keys the format does not read may hold anything
    if code == 0 and value is not None and want is not object:
        assert type(value) is want, f"{key}: {value!r} ({type(value).__name__}) was accepted as {want.__name__}"
    code, err = run_cli(["inspect", str(src)], capsys)
    assert code in (0, 2) and (code == 0 or err.count("\n") == 1), err


def test_g_idx_of_floats_or_out_of_range_is_one_line(tmp_path, capsys):
    src = make_gptq(tmp_path)
    shard = src / SHARDS[0]
    good = _tensors(shard)["model.layers.0.q.g_idx"]
    _rewrite(shard, lambda t: t.update({"model.layers.0.q.g_idx": good.astype(np.float32)}))
    for args in (["convert", str(src), str(tmp_path / "dst"), "--verify"], ["inspect", str(src)]):
        assert_refused(*run_cli(args, capsys), tmp_path / "dst", "g_idx must be int32 (or int64) of shape (128,)")
    bad = good.copy()
    bad[5] = 2  # the module has 2 groups: 0 and 1
    _rewrite(shard, lambda t: t.update({"model.layers.0.q.g_idx": bad}))
    for to in ("gptq", "float16", "awq"):
        for verify in ([], ["--verify"]):
            code, err = convert_and_check(src, tmp_path / "dst", capsys, "--to", to, "--checkpoint-format", "gptq_v2",
                                          *verify) if to == "gptq" else convert_and_check(src, tmp_path / "dst", capsys,
                                                                                         "--to", to, *verify)
            assert_refused(code, err, tmp_path / "dst", "'model.layers.0.q.g_idx'[5] is 2; the module has 2 groups")


def test_the_jax_loader_refuses_what_convert_refuses(tmp_path):
    jax_load = pytest.importorskip("packq.jax").load
    from packq.errors import CheckpointError

    src = make_gptq(tmp_path)
    _set_quant(src, bits=4.0)
    with pytest.raises(CheckpointError, match="bits must be one of 2, 3, 4, 8, got 4.0"):
        jax_load(src, layout="gptq")
    _set_quant(src, bits=4)
    shard = src / SHARDS[0]
    _rewrite(shard, lambda t: t.update({"model.layers.0.q.g_idx": t["model.layers.0.q.g_idx"].astype(np.float32)}))
    with pytest.raises(CheckpointError, match="g_idx must be int32"):
        jax_load(src, layout="gptq")
    bad = np.arange(128, dtype=np.int32) // 64
    bad[3] = 7
    _rewrite(shard, lambda t: t.update({"model.layers.0.q.g_idx": bad}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.q.g_idx'\[3\] is 7; the module has 2 groups"):
        jax_load(src, layout="dequantized")


# ------------------------------------------------------------------ 5. an AWQ source with a g_idx
def test_awq_with_a_nontrivial_g_idx_is_refused_and_a_trivial_one_kept(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src")
    trivial = np.arange(128, dtype=np.int32) // 64
    _rewrite(src / SHARDS[0], lambda t: t.update({"model.layers.0.q.g_idx": trivial}))
    _index(src, lambda i: i["weight_map"].update({"model.layers.0.q.g_idx": SHARDS[0]}))
    assert convert_and_check(src, tmp_path / "ok", capsys)[0] == 0
    assert np.array_equal(_tensors(tmp_path / "ok" / SHARDS[0])["model.layers.0.q.g_idx"], trivial)
    _rewrite(src / SHARDS[0], lambda t: t.update({"model.layers.0.q.g_idx": trivial[::-1].copy()}))
    for to in ("gptq", "compressed-tensors", "float16"):
        code, err = convert_and_check(src, tmp_path / "dst", capsys, "--to", to)
        assert_refused(code, err, tmp_path / "dst", "AWQ has no act-order, but 'model.layers.0.q.g_idx' is not arange")


# ------------------------------------------------------------------ 6. configs the output would contradict
def _add_module(root: Path, prefix: str, shard: str = SHARDS[1]) -> None:
    """Another AWQ module (K=128, N=64, group 64) in ``shard``."""
    rng = np.random.default_rng(1)
    zeros = rng.integers(1, 16, (2, 8, 8), dtype=np.uint32) << (4 * np.arange(8, dtype=np.uint32))
    _rewrite(root / shard, lambda t: t.update({
        f"{prefix}.qweight": rng.integers(0, 2**32, (128, 8), dtype=np.uint64).astype(np.uint32).view(np.int32),
        f"{prefix}.qzeros": np.bitwise_or.reduce(zeros, axis=-1).view(np.int32),
        f"{prefix}.scales": rng.random((2, 64)).astype(np.float16)}))
    _index(root, lambda i: i["weight_map"].update({f"{prefix}.{p}": shard for p in ("qweight", "qzeros", "scales")}))


def test_a_quantized_lm_head_is_stated_in_every_target_config(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src")
    _add_module(src, "lm_head")
    assert convert_and_check(src, tmp_path / "g", capsys)[0] == 0
    q = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert q["lm_head"] is True
    assert convert_and_check(src, tmp_path / "c", capsys, "--to", "compressed-tensors")[0] == 0
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in q["ignore"] and "lm_head.weight_packed" in _tensors(tmp_path / "c" / SHARDS[1])
    # GPTQ -> GPTQ keeps it; GPTQ -> AWQ cannot state it
    assert convert_and_check(tmp_path / "g", tmp_path / "g2", capsys, "--checkpoint-format", "gptq_v2")[0] == 0
    assert json.loads((tmp_path / "g2" / "config.json").read_text())["quantization_config"]["lm_head"] is True
    assert_refused(*convert_and_check(tmp_path / "g", tmp_path / "a", capsys, "--to", "awq"), tmp_path / "a",
                   "lm_head is quantized, and AWQ loaders")
    # a GPTQ config contradicting its tensors: lm_head false with lm_head stored quantized, true without
    _set_quant(tmp_path / "g", lm_head=False)
    assert_refused(*run_cli(["inspect", str(tmp_path / "g")], capsys), tmp_path / "a", "says lm_head false, but")
    without = make_gptq(tmp_path / "plain")
    _set_quant(without, lm_head=True)
    assert_refused(*convert_and_check(without, tmp_path / "x", capsys), tmp_path / "x",
                   "says lm_head true, but the checkpoint stores no quantized lm_head")


def test_gptqmodel_dynamic_overrides_are_kept_or_refused(tmp_path, capsys):
    src = make_gptq(tmp_path)
    dynamic = {"-:.*embed.*": {}, "+:.*layers\\.0\\..*": {"bits": 4, "group_size": 64}}
    _set_quant(src, dynamic=dynamic)
    assert convert_and_check(src, tmp_path / "v2", capsys, "--checkpoint-format", "gptq_v2")[0] == 0
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]["dynamic"] == dynamic
    assert convert_and_check(src, tmp_path / "c", capsys, "--to", "compressed-tensors")[0] == 0
    ignore = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "re:.*embed.*" in ignore
    assert_refused(*convert_and_check(src, tmp_path / "a", capsys, "--to", "awq"), tmp_path / "a",
                   "AWQ's modules_to_not_convert cannot state")
    _set_quant(src, dynamic={"-:.*layers\\.0\\.q": {}})  # excludes a module that is stored quantized
    assert_refused(*convert_and_check(src, tmp_path / "d", capsys), tmp_path / "d",
                   "dynamic excludes '-:.*layers\\\\.0\\\\.q' from quantization, but 'model.layers.0.q' is stored quantized")


def test_ignore_and_modules_to_not_convert_must_not_name_a_quantized_module(tmp_path, capsys):
    ct = make_ct(tmp_path)
    _config(ct, lambda c: c["quantization_config"].update(ignore=["lm_head", "re:.*layers.0.k"]))
    assert_refused(*convert_and_check(ct, tmp_path / "d", capsys, "--to", "awq"), tmp_path / "d",
                   "ignores 're:.*layers.0.k', but 'model.layers.0.k' is stored packed")
    src = make_checkpoint(tmp_path / "src")
    _set_quant(src, modules_to_not_convert=["layers.0.q"])
    assert_refused(*convert_and_check(src, tmp_path / "d", capsys, "--to", "compressed-tensors"), tmp_path / "d",
                   "modules_to_not_convert lists 'layers.0.q', but 'model.layers.0.q' is stored quantized")
    _set_quant(src, modules_to_not_convert=["visual"])  # names no quantized module: carried over
    assert convert_and_check(src, tmp_path / "c", capsys, "--to", "compressed-tensors")[0] == 0
    assert "re:.*visual.*" in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["ignore"]


# ------------------------------------------------------------------ 7. float outputs that overflow; no warnings
def _big_scales(src: Path, value: float = 1e5) -> None:
    """bfloat16 scales of ``value`` in module q: its weights overflow float16."""
    bits = (np.float32(value).view(np.uint32) >> 16).astype(np.uint16)
    _rewrite(src / SHARDS[0], lambda t: t.update({"model.layers.0.q.scales": np.full((2, 64), bits, np.uint16)}))
    _edit_header(src / SHARDS[0], lambda h: h["model.layers.0.q.scales"].update(dtype="BF16"))


def test_float_overflow_is_refused_unless_allowed(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src")
    _big_scales(src)
    code, err = convert_and_check(src, tmp_path / "f16", capsys, "--to", "float16")
    assert_refused(code, err, tmp_path / "f16", "dequantized weights are not finite in float16",
                   "'model.layers.0.q'", "the largest magnitude is 1.4976e+06", "--allow-overflow")
    n = int(err.split("': ")[1].split()[0])
    assert 0 < n <= 128 * 64
    assert convert_and_check(src, tmp_path / "f16", capsys, "--to", "float16", "--allow-overflow")[0] == 0
    w = _tensors(tmp_path / "f16" / SHARDS[0])["model.layers.0.q.weight"]
    assert np.count_nonzero(~np.isfinite(w)) == n  # the count is the output's
    for to in ("bfloat16", "float32"):  # wide enough: no refusal
        assert convert_and_check(src, tmp_path / to, capsys, "--to", to)[0] == 0


NO_WARNINGS = """
import sys
from packq.cli import main
src, out = sys.argv[1], sys.argv[2]
for i, args in enumerate([[], ["--to", "float16", "--allow-overflow"], ["--to", "bfloat16"], ["--to", "float32"],
                          ["--to", "compressed-tensors"], ["--for", "exllamav2"], ["--backend", "jax", "--to", "float16",
                          "--allow-overflow"]]):
    assert main(["convert", src, f"{out}/{i}", "--verify", "--no-progress", *args]) == 0, args
assert main(["inspect", src]) == 0
"""


def test_successful_runs_write_nothing_to_stderr(tmp_path):
    """No warning (NumPy's overflow, JAX's, anyone's) reaches stderr when a run succeeds, overflow allowed included."""
    src = make_checkpoint(tmp_path / "src")
    _big_scales(src)
    (tmp_path / "out").mkdir()
    r = subprocess.run([sys.executable, "-c", NO_WARNINGS, str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# ------------------------------------------------------------------ 1, 2. one planner sees every output name
#: (target args, the stray source tensor beside module model.layers.0.q whose name the target writes)
COLLISIONS = [(["--to", "float16"], "weight"), (["--to", "compressed-tensors"], "weight_packed"),
              (["--to", "compressed-tensors"], "weight_scale"), (["--to", "compressed-tensors"], "weight_shape")]


@pytest.mark.parametrize("args, part", COLLISIONS)
def test_an_output_name_a_source_tensor_already_has_is_refused(tmp_path, capsys, args, part):
    src = make_checkpoint(tmp_path / "src")
    stray = f"model.layers.0.q.{part}"
    _rewrite(src / SHARDS[1], lambda t: t.update({stray: np.zeros(4, np.float16)}))
    _index(src, lambda i: i["weight_map"].update({stray: SHARDS[1]}))
    code, err = convert_and_check(src, tmp_path / "dst", capsys, *args)
    assert_refused(code, err, tmp_path / "dst", f"the output tensor {stray!r} would be written twice",
                   "the quantized module 'model.layers.0.q'", f"the source tensor {stray!r} kept as it is")


@pytest.mark.parametrize("layout, part", [("dequantized", "weight"), ("compressed-tensors", "weight_packed"),
                                          ("int4", "zeros")])
def test_the_jax_loader_refuses_a_stored_tensor_named_as_an_output(tmp_path, layout, part):
    """The loader returns one dict by name: a stray tensor named as an array a module becomes is refused before
    any read, naming both, not silently dropped (or silently replacing the module's)."""
    from packq.errors import CheckpointError

    jax_load = pytest.importorskip("packq.jax").load
    src = make_checkpoint(tmp_path / "src")
    stray = f"model.layers.0.q.{part}"
    _rewrite(src / SHARDS[1], lambda t: t.update({stray: np.zeros(4, np.float16)}))
    _index(src, lambda i: i["weight_map"].update({stray: SHARDS[1]}))
    with pytest.raises(CheckpointError, match=f"the output tensor {re.escape(repr(stray))} would be written twice"):
        jax_load(src, layout=layout)
    assert set(jax_load(src, layout="source")) >= {stray, "model.layers.0.q.qweight"}  # as stored: no collision


@examples(quick=10, thorough=200)
@given(data=st.data())
def test_colliding_names_are_refused_and_others_converted(tmp_path_factory, data, capsys):
    """A stray tensor named like anything a target may write for some module: refused exactly when the name collides."""
    tmp = tmp_path_factory.mktemp("c")
    src = make_checkpoint(tmp / "src")
    module = data.draw(st.sampled_from(["model.layers.0.q", "model.layers.0.k", "model.layers.0", "model.embed"]))
    # (qweight, qzeros, scales and g_idx are a module's own parts, read as such: not strays)
    part = data.draw(st.sampled_from(["weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                      "bias", "qweight2"]))
    args = data.draw(st.sampled_from([["--to", "float16"], ["--to", "compressed-tensors"], []]))
    stray = f"{module}.{part}"
    if stray == "model.embed.weight":
        return  # the source's own tensor
    shard = data.draw(st.sampled_from(SHARDS))
    _rewrite(src / shard, lambda t: t.update({stray: np.zeros(4, np.int32)}))
    _index(src, lambda i: i["weight_map"].update({stray: shard}))
    writes = {"--to float16": {"weight"}, "--to compressed-tensors": {"weight_packed", "weight_scale", "weight_zero_point",
                                                                     "weight_shape"}, "": set()}[" ".join(args)]
    collides = module in ("model.layers.0.q", "model.layers.0.k") and part in writes
    code, err = convert_and_check(src, tmp / "dst", capsys, *args)
    assert (code == 2 and "would be written twice" in err) == collides, err
    if code == 0:
        assert_loads_in_safetensors(tmp / "dst")


def test_model_safetensors_beside_an_index_is_refused(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src")
    shutil.copy(src / SHARDS[0], src / "model.safetensors")
    for args in (["convert", str(src), str(tmp_path / "dst")], ["inspect", str(src)]):
        assert_refused(*run_cli(args, capsys), tmp_path / "dst", "holds both model.safetensors and "
                       "model.safetensors.index.json", "which is the model is ambiguous")
    (src / "model.safetensors").rename(src / "extra.safetensors")  # any other top-level weights file, too
    assert_refused(*convert_and_check(src, tmp_path / "dst", capsys), tmp_path / "dst",
                   "extra.safetensors", "not a shard of this checkpoint")
    (src / "extra.safetensors").unlink()
    (src / "sub").mkdir()
    shutil.copy(src / SHARDS[0], src / "sub" / "x.safetensors")  # below the top folder no engine loads it: copied
    assert convert_and_check(src, tmp_path / "dst", capsys)[0] == 0
    assert (tmp_path / "dst" / "sub" / "x.safetensors").read_bytes() == (src / "sub" / "x.safetensors").read_bytes()


# ------------------------------------------------------------------ 3. SRC's links resolved against DST
def _snapshot(src: Path, into: Path) -> Path:
    """``src`` as a Hugging Face cache snapshot: every file a link into ``into``/blobs."""
    snap = src.parent / "snapshot"
    (into / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir()
    for f in sorted(src.iterdir()):
        blob = into / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    return snap


def _read_through_links(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_src_linking_into_dst_is_refused_before_force_replaces_it(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    snap = _snapshot(src, dst)  # DST holds the blobs SRC's files link to
    before, dst_before = _read_through_links(snap), tree_hash(dst)
    code, err = run_cli(["convert", str(snap), str(dst), "--force"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a link to" in err and "inside DST" in err, err
    assert _read_through_links(snap) == before and tree_hash(dst) == dst_before
    assert not list(tmp_path.glob(".packq-*"))


@examples(quick=10, thorough=150)
@given(data=st.data())
def test_link_layouts(tmp_path_factory, data, capsys):
    """Each SRC file a link into DST, into a folder outside, or a plain file: refused exactly when one links into DST."""
    tmp = tmp_path_factory.mktemp("l")
    src = make_checkpoint(tmp / "src")
    dst, outside = tmp / "dst", tmp / "outside"
    dst.mkdir()
    (dst / "old.txt").write_text("old DST")
    outside.mkdir()
    snap = tmp / "snap"
    snap.mkdir()
    into_dst = False
    for f in sorted(src.iterdir()):
        how = data.draw(st.sampled_from(["file", "outside", "dst", "dst-via-outside"]), label=f.name)
        if how == "file":
            shutil.copy(f, snap / f.name)
            continue
        home = dst if how in ("dst", "dst-via-outside") else outside
        shutil.copy(f, home / f.name)
        if how == "dst-via-outside":  # a chain: SRC -> outside -> DST
            (outside / f"via-{f.name}").symlink_to(home / f.name)
            (snap / f.name).symlink_to(outside / f"via-{f.name}")
        else:
            (snap / f.name).symlink_to(home / f.name)
        into_dst = into_dst or home == dst
    before = _read_through_links(snap)
    code, err = run_cli(["convert", str(snap), str(dst), "--force"], capsys)
    assert _read_through_links(snap) == before, "SRC changed"
    assert code == (2 if into_dst else 0), err
    if code == 2:
        assert err.count("\n") == 1 and "inside DST" in err and (dst / "old.txt").exists()
    else:
        assert_loads_in_safetensors(dst)
    assert not list(tmp.glob(".packq-*"))


# ------------------------------------------------------------------ 4. a shard rewritten while it is read
@pytest.mark.parametrize("to", ["gptq", "float16", "compressed-tensors"])
def test_a_shard_rewritten_in_place_during_the_read_is_refused(ckpt, tmp_path, capsys, monkeypatch, to):
    """Same size, same inode, new bytes, mid-conversion: refused, never a torn DST (the old DST stays)."""
    import packq.checkpoint.containers.folder as folder

    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst), "--to", to]) == 0
    old = tree_hash(dst)
    real = folder._write_shard
    done = []

    def rewriting(job, fname, *a, **k):
        if not done:
            time.sleep(0.02)  # past the file system's timestamp granularity
            path = job.ckpt.shards[fname].path
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0xFF
            with open(path, "r+b") as f:  # in place: same inode, same size
                f.write(raw)
            done.append(fname)
        return real(job, fname, *a, **k)

    monkeypatch.setattr(folder, "_write_shard", rewriting)
    code, err = run_cli(["convert", str(ckpt), str(dst), "--to", to, "--force"], capsys)
    assert code == 2 and err.count("\n") == 1 and "changed on disk while packq was reading it" in err, err
    assert tree_hash(dst) == old and not list(tmp_path.glob(".packq-*"))


def test_a_copied_file_rewritten_during_the_copy_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    from packq.checkpoint import files

    real = files.copy_bytes

    def rewriting(src_fd, out, offset, count, where):
        real(src_fd, out, offset, count, where)
        if str(where).endswith("tokenizer.json"):
            time.sleep(0.02)
            with open(where, "r+b") as f:
                f.write(b"[]")
    monkeypatch.setattr(files, "copy_bytes", rewriting)
    assert_refused(*run_cli(["convert", str(ckpt), str(tmp_path / "dst")], capsys), tmp_path / "dst",
                   "tokenizer.json", "changed on disk while packq was copying it")


# ------------------------------------------------------------------ 10. resources that run out
def test_out_of_memory_is_one_line_saying_how_much(ckpt, tmp_path, capsys, monkeypatch):
    import packq.checkpoint.containers.folder as folder

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(folder, "_tensor", no_memory)
    assert_refused(*run_cli(["convert", str(ckpt), str(tmp_path / "dst")], capsys), tmp_path / "dst",
                   "out of memory; the largest tensor, 'model.layers.0.q.qweight', needs 4.1 KB")


def test_no_thread_to_start_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    import threading

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert_refused(*run_cli(["convert", str(ckpt), str(tmp_path / "dst")], capsys), tmp_path / "dst",
                   "cannot start a thread (can't start new thread)")


def test_a_real_memory_limit_is_one_line(ckpt, tmp_path):
    """ulimit -v below what one module needs, set in the child once imported: a 4096 x 4096 module to float32."""
    big = tmp_path / "big"
    shutil.copytree(ckpt, big)
    rng = np.random.default_rng(2)
    _rewrite(big / SHARDS[1], lambda t: t.update({
        "model.big.qweight": rng.integers(-2**31, 2**31, (4096, 512), dtype=np.int64).astype(np.int32),
        "model.big.qzeros": np.full((64, 512), 0x11111111, np.int32),
        "model.big.scales": np.ones((64, 4096), np.float16)}))
    _set_quant(big, group_size=64)
    _index(big, lambda i: i["weight_map"].update({f"model.big.{p}": SHARDS[1] for p in ("qweight", "qzeros", "scales")}))
    code = ("import resource, sys; from packq.cli import main; import packq.checkpoint.convert; "
            "import numpy as np; np.zeros(1) + 1; "
            "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), resource.RLIM_INFINITY)); "
            f"sys.exit(main(['convert', {str(big)!r}, {str(tmp_path / 'dst')!r}, '--to', 'float32']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PACKQ_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "out of memory" in r.stderr or "cannot start a thread" in r.stderr, r.stderr
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".packq-*"))


# ------------------------------------------------------------------ 11. reporting never fails a finished run
def test_a_summary_that_cannot_be_printed_does_not_fail_the_conversion(ckpt, tmp_path):
    dst = tmp_path / "dst"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "packq", "convert", str(ckpt), str(dst)], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "is complete, but its summary could not be printed (No space left" in r.stderr
    assert_loads_in_safetensors(dst)
    odd = tmp_path / "dst-\u00e9\udcff"  # not ASCII, not even UTF-8: printed with escapes, never an error
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(ckpt), os.fsencode(odd), "--json"], capture_output=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert json.loads(r.stdout)["dst"].endswith("dst-\u00e9\udcff")
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(ckpt), os.fsencode(odd), "--force"], capture_output=True,
                       env={**os.environ, "PYTHONIOENCODING": "ascii:strict"})
    assert r.returncode == 0 and b"\\xe9\\udcff" in r.stdout and r.stderr == b"", r


# ------------------------------------------------------------------ 12. signals at every moment
SIGNALLED = """
import os, sys, time
sys.path.insert(0, os.environ["PACKQ_TEST_REPO"])
stage = os.environ.get("PACKQ_TEST_STAGE", "")
if stage == "imports":  # a slow NumPy import, after main() has started
    import importlib.abc
    class Slow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "numpy":
                sys.meta_path.remove(self)
                print("ready", flush=True)
                time.sleep(5)
            return None
    sys.meta_path.insert(0, Slow())
from packq.cli import main
if stage != "imports":
    import packq.checkpoint.folder as folder, packq.checkpoint.containers.folder as cf, packq.checkpoint.files as files
    if stage == "open":
        real_open = folder.open_checkpoint
        def slow_open(*a, **k):
            print("ready", flush=True)
            time.sleep(5)
            return real_open(*a, **k)
        folder.open_checkpoint = slow_open
        import packq.checkpoint.convert as c, packq.checkpoint.inspect as i
        c.open_checkpoint = i.open_checkpoint = slow_open
    delay = float(os.environ.get("PACKQ_TEST_DELAY", "0"))
    real_tensor = cf._tensor
    def slow_tensor(*a, **k):
        time.sleep(delay)
        return real_tensor(*a, **k)
    cf._tensor = slow_tensor
    if stage == "cleanup":  # a slow removal of the hidden folder: the second signal lands in it
        real_remove = files.remove
        def slow_remove(path):
            if str(path).endswith(".partial") and path.exists():
                print("cleaning", flush=True)
                time.sleep(1)
            return real_remove(path)
        files.remove = slow_remove
    if stage == "random":  # the test's clock starts once this harness has imported what it patches
        print("ready", flush=True)
sys.argv[0] = "packq"
sys.exit(main())  # as the program runs it: argv from sys.argv
"""


def _signalled(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SIGNALLED, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PACKQ_TEST_REPO": str(REPO), **env})


@pytest.mark.parametrize("stage, command", [("imports", "convert"), ("open", "convert"), ("open", "inspect"),
                                            ("imports", "inspect")])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_any_write_is_one_line(ckpt, tmp_path, stage, command, sig):
    args = ["convert", str(ckpt), str(tmp_path / "dst")] if command == "convert" else ["inspect", str(ckpt)]
    p = _signalled(*args, PACKQ_TEST_STAGE=stage)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err == "packq: interrupted; nothing was written\n", err
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".packq-*"))


def test_a_second_signal_during_cleanup_leaves_nothing(ckpt, tmp_path):
    p = _signalled("convert", str(ckpt), str(tmp_path / "dst"), PACKQ_TEST_STAGE="cleanup", PACKQ_TEST_DELAY="0.3")
    deadline = time.time() + 60
    while not list(tmp_path.glob(".packq-*.partial")) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    assert p.stdout.readline() == "cleaning\n"
    p.send_signal(signal.SIGINT)  # lands while the hidden folder is being removed
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "packq: interrupted; nothing was written\n", err
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".packq-*"))


@examples(quick=4, thorough=60)
@given(delay=st.floats(0, 2.5), sig=st.sampled_from([signal.SIGINT, signal.SIGTERM]), force=st.booleans())
def test_signals_at_random_moments(tmp_path_factory, delay, sig, force):
    """Whenever the signal lands (imports, analysis, writing, commit, cleanup): exit 0 with DST complete, or 130 with
    one line and DST as it was; never a traceback, never a hidden folder left behind."""
    tmp = tmp_path_factory.mktemp("s")
    src = make_checkpoint(tmp / "src")
    dst = tmp / "dst"
    if force:
        assert main(["convert", str(src), str(dst), "--checkpoint-format", "gptq_v2"]) == 0
    old = tree_hash(dst) if force else None
    p = _signalled("convert", str(src), str(dst), "--force", PACKQ_TEST_DELAY="0.02", PACKQ_TEST_STAGE="random")
    assert p.stdout.readline() == "ready\n"
    time.sleep(delay)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    if p.returncode == -sig:  # only in the harness's own line between printing "ready" and calling main()
        assert "packq/" not in err, err
        assert ((tree_hash(dst) == old) if force else not dst.exists()) and not list(tmp.glob(".packq-*"))
        return
    assert p.returncode in (0, 130), err
    if p.returncode == 130:
        assert err.count("\n") == 1 and err.startswith("packq: interrupted"), err
        if "already complete" in err:  # the signal came while DST was committed: it is the new one
            assert_loads_in_safetensors(dst)
        elif force:
            assert tree_hash(dst) == old
        else:
            assert not dst.exists()
    else:
        assert err == "" and _fingerprint(dst) == "gptq"
        assert_loads_in_safetensors(dst)
    assert not list(tmp.glob(".packq-*"))


# ------------------------------------------------------------------ 13. --force over a DST that cannot be removed
def test_force_over_a_dst_that_cannot_be_removed_fails_before_commit(ckpt, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    stuck = dst / "stuck"  # a read-only mount below DST: nothing under it can be removed, even by root
    _mount_tmpfs(stuck, "size=1m")
    (stuck / "f").write_text("x")
    r = subprocess.run(["mount", "-o", "remount,ro", str(stuck)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    old = tree_hash(dst)
    try:
        code, err = run_cli(["convert", str(ckpt), str(dst), "--force", "--checkpoint-format", "gptq_v2"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"DST {str(dst)!r} cannot be replaced: {str(stuck)} is not writable" in err and "nothing was changed" in err
        assert tree_hash(dst) == old and not list(tmp_path.glob(".packq-*"))
    finally:
        subprocess.run(["umount", str(stuck)], capture_output=True)


def test_force_over_another_users_dst_is_refused_naming_absolute_paths(ckpt, tmp_path, capsys, monkeypatch):
    """As a user without write permission on a sub-folder of DST (simulated: the tests may run as root)."""
    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    (dst / "sub").mkdir()
    (dst / "sub" / "f").write_text("x")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(dst / "sub") else real(p, mode, **k))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["convert", str(ckpt), "dst", "--force"], capsys)  # a relative DST: messages are absolute
    assert code == 2 and f"{str(dst / 'sub')} is not writable by this user" in err and f"DST {str(dst)!r}" in err, err
    assert (dst / "sub" / "f").exists() and not list(tmp_path.glob(".packq-*"))


def test_an_old_dst_that_resists_removal_after_commit_is_an_error_naming_it(ckpt, tmp_path, capsys, monkeypatch):
    from packq.checkpoint import files

    dst = tmp_path / "dst"
    assert main(["convert", str(ckpt), str(dst)]) == 0
    monkeypatch.setattr(files, "unremovable", lambda root: None)  # the check passes, the removal then fails
    real = files.remove

    def failing(path):
        if str(path).endswith(".partial") and path.exists():
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path / "sub"))
        return real(path)

    monkeypatch.setattr(files, "remove", failing)
    code, err = run_cli(["convert", str(ckpt), str(dst), "--force", "--checkpoint-format", "gptq_v2"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is the complete new checkpoint, but the old one could not be fully removed" in err
    assert str(tmp_path) in err and "Permission denied" in err
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    monkeypatch.setattr(files, "remove", real)
    assert main(["convert", str(ckpt), str(dst), "--force"]) == 0  # the next run clears what was left
    assert not list(tmp_path.glob(".packq-*"))


# ------------------------------------------------------------------ 14. names that would split the line
@examples(quick=15, thorough=300)
@given(name=st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), where=st.sampled_from(["tensor", "folder"]))
def test_every_error_is_one_line_whatever_the_names(tmp_path_factory, name, where, capsys):
    """Newlines, carriage returns and other controls in file or tensor names: quoted, so the error stays one line."""
    tmp = tmp_path_factory.mktemp("q")
    if where == "folder":
        if "/" in name or name in (".", "..") or "\0" in name:
            return
        src = make_checkpoint(tmp / name)
        _config(src, lambda c: c["quantization_config"].update(bits=5))  # any refusal names SRC
        fragment = repr(str(src))
    else:
        src = make_checkpoint(tmp / "src")
        stray = f"model.{name}.qweight"  # a module with only a qweight: refused, naming it
        _rewrite(src / SHARDS[1], lambda t: t.update({stray: np.zeros((128, 8), np.int32)}))
        _index(src, lambda i: i["weight_map"].update({stray: SHARDS[1]}))
        fragment = repr(f"model.{name}")
    code, err = run_cli(["convert", str(src), str(tmp / "dst")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.endswith("\n"), err
    shown = fragment.encode("utf-8", "backslashreplace").decode()
    assert shown in err or fragment in err, (fragment, err)


def test_the_documented_guarantees_name_tests_that_exist():
    """Every test the guarantees page cites is defined, so the page cannot cite what was removed."""
    page = (REPO / "docs" / "guide" / "guarantees.md").read_text()
    section = page[page.index("## What `packq convert` guarantees on disk"):page.index("## Memory")]
    cited = set(re.findall(r"`(test_\w+)`", section))
    tests = "".join((REPO / "tests" / f).read_text() for f in ("test_hostile.py", "test_errors.py", "test_checkpoint.py"))
    defined = set(re.findall(r"^def (test_\w+)", tests, re.M))
    assert len(cited) >= 20 and cited <= defined, sorted(cited - defined)
