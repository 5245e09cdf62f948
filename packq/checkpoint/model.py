"""A Hugging Face model folder: config, quantization format, shards and quantized modules.

Everything here reads headers and JSON only, never tensor data, and checks the
whole checkpoint before anything is converted or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.files import read_regular
from packq.checkpoint.safetensors import SafetensorsFile, TensorInfo, loads_strict
from packq.core.bits import layout, pack
from packq.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_JSON = 100_000_000  # bytes of a config.json or index that packq reads
#: files beside config.json that state the quantization too; GPTQModel reads quantize_config.json first
SIDECARS = ("quantize_config.json", "quant_config.json")
PARTS = ("qweight", "qzeros", "scales", "g_idx")
CT = "compressed-tensors"
#: compressed-tensors pack-quantized tensor -> the GPTQ part it holds (transposed); weight_shape is checked
CT_NAMES = {"weight_packed": "qweight", "weight_zero_point": "qzeros", "weight_scale": "scales",
            "weight_shape": "shape"}
WORDS = ("I32", "U32")
BITS = (2, 3, 4, 8)
FLOATS = ("F16", "BF16", "F32")


@dataclass
class Format:
    """The quantization format a folder declares, as packq understands it."""

    method: str  # "awq" or "gptq"
    bits: int
    group_size: int  # -1: one group over all of K
    checkpoint_format: str = "gptq"  # GPTQ zeros: "gptq" (v1) or "gptq_v2"
    desc_act: bool = False
    raw: dict[str, Any] = field(default_factory=dict)
    #: "compressed-tensors": pack-quantized, GPTQ v2's tensors transposed and renamed; read as GPTQ v2
    container: str | None = None
    symmetric: bool = False  # compressed-tensors symmetric: no zero-points stored, every one 2**(bits-1)

    @property
    def name(self) -> str:
        if self.container == CT:
            sym = ", symmetric" if self.symmetric else ""
            return f"compressed-tensors pack-quantized, {self.bits}-bit, group size {self.group_size}{sym}"
        if self.method == "awq":
            return f"AWQ gemm, {self.bits}-bit, group size {self.group_size}"
        zeros = "v2 zeros" if self.checkpoint_format == "gptq_v2" else "v1 zeros"
        act = ", act-order" if self.desc_act else ""
        return f"GPTQ ({self.checkpoint_format}: {zeros}), {self.bits}-bit, group size {self.group_size}{act}"


@dataclass
class Module:
    """One quantized linear layer: where its tensors live and its shape."""

    prefix: str
    files: dict[str, str]  # part -> shard file name
    infos: dict[str, TensorInfo]  # part -> the stored tensor's header entry
    k: int
    n: int
    groups: int
    names: dict[str, str] = field(default_factory=dict)  # part -> stored tensor name
    transposed: bool = False  # compressed-tensors: qweight, qzeros and scales are stored transposed
    bits: int = 4

    def words(self, values: int) -> int:
        """How many 32-bit words ``values`` packed values take at this module's width."""
        per, words = layout(self.bits)
        return values * words // per

    @property
    def lead(self) -> tuple[int, ...]:
        """Leading (batch, expert) dimensions."""
        return self.infos["qweight"].shape[:-2]


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    format: Format
    shards: dict[str, SafetensorsFile]  # file name -> opened header
    index: dict[str, Any] | None
    modules: dict[str, Module]
    sidecar: dict[str, Any] | None = None  # the first of SIDECARS present, parsed

    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards.values())

    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards.values() for t in s.tensors.values())


def _read_ct(q: dict[str, Any], where: Path) -> Format:
    """compressed-tensors pack-quantized, weight-only int, one config group: read as GPTQ v2."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: compressed-tensors config: {why}")

    if q.get("format") != "pack-quantized":
        raise bad(f"format {q.get('format')!r}; packq reads 'pack-quantized'")
    if q.get("quantization_status", "compressed") != "compressed":
        raise bad(f"quantization_status {q.get('quantization_status')!r}; packq reads 'compressed' checkpoints")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise bad("packq reads exactly one config group (every quantized Linear alike)")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(w, dict):
        raise bad("the config group has no weights")
    if scheme.get("input_activations") is not None or scheme.get("output_activations") is not None:
        raise bad("activations are quantized too; packq reads weight-only schemes")
    if w.get("type", "int") != "int" or w.get("dynamic", False) or isinstance(w.get("num_bits"), bool) \
            or w.get("num_bits") not in BITS:
        raise bad(f"weights {w!r}; packq reads static 2-, 3-, 4- or 8-bit int weights")
    if w.get("actorder") not in (None, "weight", "static"):
        raise bad(f"actorder {w.get('actorder')!r}")
    strategy = w.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group" and isinstance(w.get("group_size"), int) and not isinstance(w["group_size"], bool) \
            and w["group_size"] > 0:
        group_size = w["group_size"]
    else:
        raise bad(f"strategy {strategy!r} with group_size {w.get('group_size')!r}; packq reads group and channel")
    symmetric = w.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise bad(f"symmetric must be true or false, got {symmetric!r}")
    return Format("gptq", w["num_bits"], group_size, "gptq_v2", raw=q, container=CT, symmetric=symmetric)


def read_format(config: dict[str, Any], where: Path) -> Format:
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: config.json has no quantization_config: not a quantized checkpoint")
    if str(q.get("quant_method", "")).lower() == CT:
        return _read_ct(q, where)
    method = str(q.get("quant_method", "")).lower()
    bits = q.get("bits", q.get("w_bit"))
    group_size = q.get("group_size", q.get("q_group_size"))
    if method not in ("awq", "gptq"):
        raise CheckpointError(
            f"{where}: quant_method is {q.get('quant_method')!r}; packq converts 'awq', 'gptq' and 'compressed-tensors'"
        )
    if method == "awq" and bits != 4:
        raise CheckpointError(f"{where}: bits is {bits!r}; AWQ gemm is 4-bit only")
    if method == "gptq" and (isinstance(bits, bool) or bits not in BITS):
        raise CheckpointError(f"{where}: bits is {bits!r}; GPTQ packs 2, 3, 4 or 8 bits")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"{where}: group_size must be a positive integer or -1, got {group_size!r}")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(
                f"{where}: AWQ version {version!r} is not supported; packq converts the 'gemm' layout "
                f"(qweight (K, N/8) packed along N)"
            )
        if q.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: AWQ with zero_point false (no qzeros) is not supported")
        return Format("awq", 4, group_size, raw=q)
    if not isinstance(q.get("desc_act", False), bool):
        raise CheckpointError(f"{where}: desc_act must be true or false, got {q['desc_act']!r}")
    fmt = str(q.get("checkpoint_format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
    assert isinstance(bits, int)  # checked above
    return Format("gptq", bits, group_size, fmt, bool(q.get("desc_act", False)), raw=q)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path.parent}: no {path.name}: not a Hugging Face model folder")
    try:
        data = loads_strict(read_regular(path, MAX_JSON))
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _check_index(path: Path, index: dict[str, Any]) -> list[str]:
    """The shard file names an index names, after checking its shape."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no weight_map (an object from tensor names to shard files)")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: weight_map maps {bad[0]!r} to {bad[1]!r}; shard file names must be strings")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{path}: metadata must be an object, got {type(index['metadata']).__name__}")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            raise CheckpointError(f"{path}: shard name {name!r} is not a file in the folder")
    return names


def open_checkpoint(root: Path) -> Checkpoint:
    """Read and check a model folder's config, index, shard headers and quantized modules."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"{root}: no such folder")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder (a Hugging Face model folder is expected)")
    config = _load_json(root / "config.json", "config.json")
    fmt = read_format(config, root)
    index = None
    if (root / INDEX).exists():
        index = _load_json(root / INDEX, "the shard index")
        names = _check_index(root / INDEX, index)
    elif (root / SINGLE).exists():
        names = [SINGLE]
    else:
        raise CheckpointError(f"{root}: no {SINGLE} and no {INDEX}")
    shards = {}
    for name in names:
        path = root / name
        if not path.exists():
            raise CheckpointError(f"{root / INDEX}: names shard {name!r}, which does not exist")
        shards[name] = SafetensorsFile(path)
    where: dict[str, str] = {}
    for name, shard in shards.items():
        for t in shard.tensors:
            if t in where:
                raise CheckpointError(f"{root}: tensor {t!r} is in both {where[t]} and {name}")
            where[t] = name
    if index is not None:
        for t, name in index["weight_map"].items():
            if where.get(t) != name:
                raise CheckpointError(f"{root / INDEX}: maps {t!r} to {name}, which does not hold it")
    sidecar = next((_load_json(root / n, n) for n in SIDECARS if (root / n).exists() or (root / n).is_symlink()), None)
    return Checkpoint(root, config, fmt, shards, index, _modules(root, fmt, shards, where), sidecar)


def _modules(root: Path, fmt: Format, shards: dict[str, SafetensorsFile], where: dict[str, str]) -> dict[str, Module]:
    if fmt.container == CT:
        return _ct_modules(root, fmt, shards, where)
    prefixes = sorted({p for p, dot, part in map(lambda t: t.rpartition("."), where) if p and part in PARTS[:3]})
    modules = {}
    for prefix in prefixes:
        files = {p: where[f"{prefix}.{p}"] for p in PARTS if f"{prefix}.{p}" in where}
        missing = [p for p in PARTS[:3] if p not in files]
        if missing:
            raise CheckpointError(f"{root}: {prefix} has {', '.join(sorted(files))} but no {' or '.join(missing)}")
        infos = {p: shards[f].tensors[f"{prefix}.{p}"] for p, f in files.items()}
        modules[prefix] = _check_module(root, fmt, prefix, files, infos)
    if not modules:
        raise CheckpointError(f"{root}: no quantized modules (no tensors named *.qweight)")
    return modules


def _ct_modules(root: Path, fmt: Format, shards: dict[str, SafetensorsFile], where: dict[str, str]) -> dict[str, Module]:
    prefixes = sorted({p for p, dot, part in map(lambda t: t.rpartition("."), where) if p and part == "weight_packed"})
    modules = {}
    for prefix in prefixes:
        names = {part: f"{prefix}.{stored}" for stored, part in CT_NAMES.items() if f"{prefix}.{stored}" in where}
        need = ["qweight", "scales", "shape"] + ([] if fmt.symmetric else ["qzeros"])
        missing = [stored for stored, part in CT_NAMES.items() if part in need and part not in names]
        if missing:
            raise CheckpointError(f"{root}: {prefix} has weight_packed but no {' or '.join(missing)}")
        files = {part: where[name] for part, name in names.items()}
        infos = {part: shards[files[part]].tensors[name] for part, name in names.items()}
        w, s, shape = infos["qweight"], infos["scales"], infos["shape"]

        def bad(why: str) -> CheckpointError:
            got = ", ".join(f"{n.rsplit('.', 1)[-1]} {i.shape} {i.dtype}" for n, i in zip(names.values(), infos.values()))
            return CheckpointError(f"{root}: {prefix}: {why} (got {got}; {fmt.bits}-bit, group size {fmt.group_size})")

        values, words = layout(fmt.bits)
        if w.dtype not in WORDS or s.dtype not in FLOATS or shape.dtype not in ("I64", "I32"):
            raise bad("weight_packed must be int32 words, weight_scale floats, weight_shape integers")
        if len(w.shape) < 2 or w.shape[:-2] != s.shape[:-2] or 0 in w.shape or w.shape[-1] % words:
            raise bad("weight_packed and weight_scale must be non-empty matrices with the same leading dimensions")
        n, k = w.shape[-2], w.shape[-1] * values // words
        groups = 1 if fmt.group_size == -1 else k // fmt.group_size
        if n % values or (fmt.group_size != -1 and k % fmt.group_size) or s.shape[-2:] != (n, groups):
            raise bad(f"expected weight_scale (..., {n}, {groups}) and N a multiple of {values}")
        if shape.shape != (len(w.shape),):
            raise bad(f"weight_shape must hold {len(w.shape)} sizes")
        zp = (*w.shape[:-2], n * words // values, groups)
        if "qzeros" in infos and (infos["qzeros"].dtype not in WORDS or infos["qzeros"].shape != zp):
            raise bad(f"expected weight_zero_point {zp} int32")
        modules[prefix] = Module(prefix, files, infos, k, n, groups, names, transposed=True, bits=fmt.bits)
    if not modules:
        raise CheckpointError(f"{root}: no quantized modules (no tensors named *.weight_packed)")
    return modules


def _check_module(root: Path, fmt: Format, prefix: str, files: dict[str, str], infos: dict[str, TensorInfo]) -> Module:
    w, z, s = infos["qweight"], infos["qzeros"], infos["scales"]

    def bad(why: str) -> CheckpointError:
        shapes = ", ".join(f"{p} {infos[p].shape} {infos[p].dtype}" for p in infos)
        return CheckpointError(f"{root}: {prefix}: {why} (got {shapes}; bits {fmt.bits}, group size {fmt.group_size})")

    if w.dtype not in WORDS or z.dtype not in WORDS:
        raise bad("qweight and qzeros must be int32 words")
    if s.dtype not in FLOATS:
        raise bad("scales must be float16, bfloat16 or float32")
    if len(w.shape) < 2 or not (w.shape[:-2] == z.shape[:-2] == s.shape[:-2]) or len(z.shape) != len(w.shape):
        raise bad("qweight, qzeros and scales must be matrices with the same leading dimensions")
    values, words = layout(fmt.bits)  # 32 // bits values in a word; at 3 bits, 32 values in 3 words
    if fmt.method == "awq":
        k, n = w.shape[-2], w.shape[-1] * 8
    else:
        k, n = w.shape[-2] * values // words, w.shape[-1]
        if "g_idx" in infos and infos["g_idx"].shape != (k,):
            raise bad(f"g_idx must have shape ({k},)")
    if 0 in w.shape:
        raise bad("qweight has no elements (K, N and every leading dimension must be positive)")
    groups = 1 if fmt.group_size == -1 else k // fmt.group_size
    if k % values or n % values or (fmt.group_size != -1 and k % fmt.group_size):
        raise bad(f"K and N must be multiples of {values}, and K a multiple of the group size")
    if z.shape[-2:] != (groups, n * words // values) or s.shape[-2:] != (groups, n):
        raise bad(f"expected qzeros (..., {groups}, {n * words // values}) and scales (..., {groups}, {n})")
    if fmt.method == "awq" and w.shape[-2:] != (k, n // 8) or fmt.method == "gptq" and w.shape[-2:] != (k * words // values, n):
        raise bad("qweight shape does not match")
    return Module(prefix, files, infos, k, n, groups, {p: f"{prefix}.{p}" for p in infos}, bits=fmt.bits)


def module_array(ckpt: Checkpoint, m: Module, part: str, *, floats: bool = False) -> np.ndarray:
    """A module's qweight, qzeros, scales or g_idx in its AWQ or GPTQ layout, whatever container stores it.

    compressed-tensors' tensors are transposed back; its symmetric scheme's zero-points (none stored)
    are made: 2**(bits-1) in every field. ``floats``: bfloat16 as float32, which holds it exactly.
    """
    if part == "qzeros" and part not in m.names:
        half = np.full((*m.lead, m.groups, m.n), 1 << (m.bits - 1), dtype=np.int32)
        return np.asarray(numpy_backend.run(pack, half, direction="column", bits=m.bits))
    with ckpt.shards[m.files[part]].open() as f:
        a = f.floats(m.names[part]) if floats else f.array(m.names[part])
    return stored_to_canonical(m, part, a)


def stored_to_canonical(m: Module, part: str, a: np.ndarray) -> np.ndarray:
    """A tensor as read from the file, in the AWQ or GPTQ layout the rest of packq computes on."""
    if m.transposed and part in ("qweight", "qzeros", "scales"):
        return np.ascontiguousarray(np.swapaxes(a, -1, -2))
    return a


def act_order_module(ckpt: Checkpoint) -> str | None:
    """The first module whose g_idx is not arange(K) // group_size, if any."""
    for m in ckpt.modules.values():
        if "g_idx" in m.names:
            g = module_array(ckpt, m, "g_idx")
            if not np.array_equal(g, np.arange(m.k) // (m.k // m.groups)):
                return m.prefix
    return None


def act_order(ckpt: Checkpoint) -> bool:
    """Whether a GPTQ checkpoint is act-order: by its config, or by the g_idx values themselves."""
    return ckpt.format.desc_act or act_order_module(ckpt) is not None
