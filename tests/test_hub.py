"""SRC as a Hugging Face Hub repo id: resolved from a cache laid out here, never from the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama-awq"


def make_cache(root: Path, repo_id: str, revisions: dict[str, Path]) -> Path:
    """huggingface_hub's cache layout: blobs by hash, snapshots of relative symlinks, refs naming commits."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for i, (ref, folder) in enumerate(revisions.items()):
        commit = hashlib.sha1(f"{ref}{i}".encode()).hexdigest()
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(folder.iterdir()):
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        (repo / "refs" / ref).write_text(commit)
    return root


def packq(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "packq", *args], capture_output=True, text=True, env=environment)


@pytest.fixture
def cache(tmp_path):
    v2 = tmp_path / "v2-src"
    r = subprocess.run([sys.executable, "-m", "packq", "convert", str(EXAMPLE), str(v2), "--checkpoint-format",
                        "gptq_v2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return make_cache(tmp_path / "hub", "org/tiny-llama", {"main": EXAMPLE, "gptq": v2})


def test_repo_id_converts_from_the_cache_offline(cache, tmp_path):
    dst = tmp_path / "out"
    r = packq("convert", "org/tiny-llama", str(dst), "--for", "transformers", "--verify", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["src"] == "org/tiny-llama" and "snapshots" in s["resolved"] and s["verified"]
    for f in dst.iterdir():  # the snapshot's symlinks became files
        assert f.is_file() and not f.is_symlink()
    assert (dst / "tokenizer_config.json").read_bytes() == (EXAMPLE / "tokenizer_config.json").read_bytes()


def test_revision_selects_the_snapshot(cache, tmp_path):
    r = packq("inspect", "org/tiny-llama", "--revision", "gptq", "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"].startswith("GPTQ (gptq_v2")
    r = packq("inspect", "org/tiny-llama", "--json", cache=cache)
    assert json.loads(r.stdout)["method"] == "awq"


@pytest.mark.parametrize("args,fragment", [
    (["inspect", "org/absent"], "not in the Hugging Face cache"),
    (["inspect", "org/tiny-llama", "--revision", "nope"], "org/tiny-llama@nope"),
    (["inspect", str(EXAMPLE), "--revision", "main"], "applies to a Hub repo id"),
    (["inspect", "./org/tiny-llama"], "no such folder"),
])
def test_bad_repo_ids_are_one_line(cache, args, fragment):
    r = packq(*args, cache=cache)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
