"""A Hugging Face model folder: config, index and shard headers, read and checked whole.

Everything here reads headers and JSON only, never tensor data, and checks the whole
checkpoint before anything is converted or written; what a format's config and tensors
must be is each format's own (``packq.checkpoint.formats``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from packq.checkpoint.files import read_regular
from packq.checkpoint.formats import FORMATS, recognise
from packq.checkpoint.model import Checkpoint, Format
from packq.checkpoint.safetensors import SafetensorsFile, loads_strict
from packq.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_JSON = 100_000_000  # bytes of a config.json or index that packq reads
#: files beside config.json that state the quantization too; GPTQModel reads quantize_config.json first
SIDECARS = ("quantize_config.json", "quant_config.json")


def read_format(config: dict[str, Any], where: Path) -> Format:
    """The quantization format config.json declares, checked by the format that recognises it."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        raise CheckpointError(f"{str(where)!r}: config.json has no quantization_config: not a quantized checkpoint")
    fmt = recognise(q)
    if fmt is None:
        readable = ", ".join(repr(f.name) for f in FORMATS.values() if f.read)
        raise CheckpointError(f"{str(where)!r}: quant_method is {q.get('quant_method')!r}; packq converts {readable}")
    return fmt.read_config(q, where)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{str(path.parent)!r}: no {path.name}: not a Hugging Face model folder")
    try:
        data = loads_strict(read_regular(path, MAX_JSON))
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r}: {what} is not a JSON object")
    return data


def _check_index(path: Path, index: dict[str, Any]) -> list[str]:
    """The shard file names an index names, after checking its shape."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(path)!r}: no weight_map (an object from tensor names to shard files)")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{str(path)!r}: weight_map maps {bad[0]!r} to {bad[1]!r}; shard file names must be strings")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{str(path)!r}: metadata must be an object, got {type(index['metadata']).__name__}")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            raise CheckpointError(f"{str(path)!r}: shard name {name!r} is not a file in the folder")
    return names


def open_checkpoint(root: Path) -> Checkpoint:
    """Read and check a model folder's config, index, shard headers and quantized modules."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"{str(root)!r}: no such folder")
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r}: not a folder (a Hugging Face model folder is expected)")
    config = _load_json(root / "config.json", "config.json")
    fmt = read_format(config, root)
    index = None
    if (root / INDEX).exists():
        index = _load_json(root / INDEX, "the shard index")
        names = _check_index(root / INDEX, index)
        if os.path.lexists(root / SINGLE) and SINGLE not in names:
            # transformers loads model.safetensors first, other loaders the index's shards: two checkpoints
            raise CheckpointError(
                f"{str(root)!r}: holds both {SINGLE} and {INDEX}, which names other shards; transformers reads "
                f"{SINGLE} and other engines the index, so which is the model is ambiguous: remove one")
    elif (root / SINGLE).exists():
        names = [SINGLE]
    else:
        raise CheckpointError(f"{str(root)!r}: no {SINGLE} and no {INDEX}")
    shards = {}
    for name in names:
        path = root / name
        if not path.exists():
            raise CheckpointError(f"{str(root / INDEX)!r}: names shard {name!r}, which does not exist")
        shards[name] = SafetensorsFile(path)
    where: dict[str, str] = {}
    for name, shard in shards.items():
        for t in shard.tensors:
            if t in where:
                raise CheckpointError(f"{str(root)!r}: tensor {t!r} is in both {where[t]!r} and {name!r}")
            where[t] = name
    if index is not None:
        for t, name in index["weight_map"].items():
            if where.get(t) != name:
                raise CheckpointError(f"{str(root / INDEX)!r}: maps {t!r} to {name!r}, which does not hold it")
    sidecar = next((_load_json(root / n, n) for n in SIDECARS if (root / n).exists() or (root / n).is_symlink()), None)
    modules = FORMATS[fmt.kind].modules(root, fmt, shards, where)
    return Checkpoint(root, config, fmt, shards, index, modules, sidecar)
