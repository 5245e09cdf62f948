"""What every checkpoint format provides to the conversion: the interface, and what formats share.

A format reads (recognises its config, finds and checks each module's tensors, dequantizes a
module as its producers meant it) and writes (the tensors a module becomes, their headers, the
tensors themselves, the config block, how to read the result back to verify it). The conversion
(``packq.checkpoint.convert``) only asks the source and the target formats, and the target's
container (``packq.checkpoint.containers``: a safetensors folder, a GGUF file) says how the tensors
sit on disk; the tensor relayouts they call live in the array-API core (``packq.formats``). Formats
import neither the containers nor the conversion: what a conversion decided comes in as a
:class:`~packq.checkpoint.job.Job`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.model import Checkpoint, Format, Module, module_array, stored_to_canonical
from packq.checkpoint.safetensors import Buffers, Reader, SafetensorsFile, TensorInfo
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats.gptq import dequantize_grouped

if TYPE_CHECKING:
    from packq.checkpoint.job import Job

#: (stored name, action): one output tensor of a module
Output = tuple[str, str]


#: AWQ <-> GPTQ weights are converted and written in blocks of about this many bytes (whole rows)
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Piece:
    """One piece of an output tensor, written after the piece before it: converted bytes (``make``), or a
    byte range of a stored tensor of the shard being written (``copy``), which the kernel copies."""

    nbytes: int
    make: Callable[[], np.ndarray] | None = None
    copy: tuple[str, int] | None = None  #: (stored tensor, byte offset)


@dataclass(frozen=True)
class Stream:
    """An output tensor made from one stored tensor in blocks of whole rows (leading dimensions flattened into
    the rows), each block's output following the previous one's in the file: AWQ <-> GPTQ weights. Memory
    then holds a few blocks, not whole tensors, and the pages of one block are reused for the next."""

    part: str  #: the module's stored tensor read (never a transposed one)
    #: a block (rows, words) -> its output; None: the bytes as they are. The block is read into a buffer reused
    #: from piece to piece (``Job.buffers``): the converter may write its output over it (``Converter.over``)
    convert: Callable[[np.ndarray], np.ndarray] | None
    unit: int  #: a block holds a multiple of this many rows (8 AWQ rows make one GPTQ row)


class CheckpointFormat:
    """One checkpoint format, in one place: how it is recognised, read and written."""

    name: ClassVar[str]  #: as ``--to`` takes it, or as ``packq inspect`` reports the source
    title: ClassVar[str]
    recognised_by: ClassVar[str]  #: what in config.json's quantization_config makes a folder this format
    module: ClassVar[str]  #: a quantized module's tensors
    read: ClassVar[bool] = True
    written: ClassVar[bool] = True
    act_order: ClassVar[bool] = False  #: can hold GPTQ act-order (a g_idx that is not arange(K) // group_size)
    why_not_act_order: ClassVar[str] = ""
    #: rewrite quantize_config.json / quant_config.json too (engines read them before config.json); else drop them
    sidecars: ClassVar[bool] = False
    #: the container the format is written in (a name in ``packq.checkpoint.containers.CONTAINERS``)
    container: ClassVar[str] = "safetensors"

    # ------------------------------------------------------------ reading
    def recognises(self, q: dict[str, Any]) -> bool:
        """Whether a config's quantization_config is this format's."""
        return False

    def read_config(self, q: dict[str, Any], where: Path) -> Format:
        """The format's parameters from its quantization_config; CheckpointError naming what is wrong."""
        raise NotImplementedError

    def modules(self, root: Path, fmt: Format, shards: dict[str, SafetensorsFile],
                where: dict[str, str]) -> dict[str, Module]:
        """Every quantized module, its tensors' names, shapes and dtypes checked (headers only)."""
        raise NotImplementedError

    def weights(self, job: Job, prefix: str) -> np.ndarray:
        """A source module's weights (..., K, N) in the scales' dtype, as its producer meant them."""
        raise NotImplementedError

    # ------------------------------------------------------------ writing
    def prepare(self, job: Job) -> None:
        """Decide, before anything is written, what only this target decides (into ``job.state``); raise
        CheckpointError to refuse. Most targets decide nothing here."""

    def after_write(self, job: Job) -> None:
        """Once every output tensor is written, before verification and before DST is put in place: finish what the
        writing pass worked out (MLX: the counts it made from the words it converted). Most targets have nothing."""

    def summary(self, job: Job) -> dict[str, Any]:
        """What this target adds to the conversion's summary."""
        return {}

    def outputs(self, job: Job, m: Module, part: str) -> list[Output]:
        """The tensors the source module ``m``'s ``part`` (qweight, qzeros, scales, g_idx, shape) becomes."""
        raise NotImplementedError

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of an output tensor, known before any conversion."""
        raise NotImplementedError

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        """One output tensor; ``f`` reads the shard being written."""
        raise NotImplementedError

    def config(self, job: Job, config: dict[str, Any]) -> None:
        """Put this format's quantization_config (or none) into a copy of the source's config.json."""
        raise NotImplementedError

    def pieces(self, job: Job, f: Reader, m: Module, action: str) -> list[Piece] | None:
        """An output tensor made in pieces written one after another, so that memory holds a few pieces, not
        whole tensors; None: made whole by :meth:`tensor`."""
        return None

    def result_weights(self, job: Job, result: Checkpoint, prefix: str) -> np.ndarray:
        """A written module's weights (..., K, N), read as the engine it was written for reads them."""
        raise NotImplementedError

    def verify(self, job: Job, out: Path, check_each) -> None:
        """Compare every module of the result in ``out`` with the source, bit for bit; raise on the first difference."""
        result = job.open(out)

        def check(prefix: str) -> None:
            got = self.result_weights(job, result, prefix)
            if got.tobytes() != job.source.weights(job, prefix).tobytes() and prefix not in job.target.inexact:
                raise CheckpointError(f"verification failed: {prefix!r} dequantizes differently after conversion")

        check_each(check)


# ---------------------------------------------------------------- shared by the formats
WORDS = ("I32", "U32")
BITS = (2, 3, 4, 8)
FLOATS = ("F16", "BF16", "F32")


def module_arrays(ckpt: Checkpoint, prefix: str) -> dict[str, np.ndarray]:
    """A module's qweight, qzeros, scales (floats) and g_idx in the AWQ or GPTQ layout."""
    m = ckpt.modules[prefix]
    return {part: module_array(ckpt, m, part, floats=part == "scales")
            for part in ("qweight", "qzeros", "scales", "g_idx") if part in m.names or part == "qzeros"}


def fields(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """Packed GPTQ zero-points as one int16 per (group, column)."""
    return np.asarray(numpy_backend.run(B.unpack, qzeros.view(np.int32), direction="column", bits=bits)).astype(np.int16)


def dequantize(q: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None) -> np.ndarray:
    """(q - z) * s in the scales' dtype; with a g_idx, each row in its own group (act-order)."""
    with np.errstate(over="ignore", invalid="ignore"):  # as engines compute it, infinities included (no warning)
        if g_idx is None:
            return np.asarray(dequantize_grouped(numpy_backend.xp, q, z, scales))
        idx = g_idx.astype(np.int64)
        return (q - np.take(z, idx, axis=-2)).astype(scales.dtype) * np.take(scales, idx, axis=-2)


# ---------------------------------------------------------------- what a config declares, checked for type
# JSON's types are not Python's: 4.0 == 4 and True == 1 in Python, but a config that writes "bits": 4.0 or
# "bits": true is not one that says 4 (engines written in other languages, or strict schemas, refuse it or
# read something else). Every value a format reads from a config goes through one of these.
_ABSENT = object()


def is_int(v: Any) -> bool:
    """A JSON integer (not a float such as 4.0, not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool)


def declared(q: dict[str, Any], where: Path, key: str, kind: type | tuple[type, ...], default: Any = _ABSENT,
             *, choices: tuple[Any, ...] | None = None, alias: str | None = None, label: str = "") -> Any:
    """``q[key]`` (or ``q[alias]``) checked to be of JSON type ``kind`` (int excludes booleans and floats) and,
    if given, one of ``choices``; ``default`` where absent (or null); CheckpointError naming it otherwise."""
    value = q.get(key, _ABSENT)
    if value is _ABSENT and alias is not None:
        key, value = alias, q.get(alias, _ABSENT)
    if value is _ABSENT or value is None:
        if default is not _ABSENT:
            return default
        raise CheckpointError(f"{str(where)!r}: {label}{key} is missing")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(is_int(value) if k is int else isinstance(value, k) for k in kinds)
    if not ok or (choices is not None and value not in choices):
        names = {int: "an integer", bool: "true or false", str: "a string", list: "a list", dict: "an object"}
        want = " or ".join(names.get(k, k.__name__) for k in kinds)
        if choices is not None:
            want = "one of " + ", ".join(json_text(c) for c in choices)
        raise CheckpointError(f"{str(where)!r}: {label}{key} must be {want}, got {json_text(value)}")
    return value


def json_text(value: Any) -> str:
    """A value as JSON writes it (4.0, true, "4"), cut to 80 characters: what the file said, not Python's repr."""
    import json

    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 80 else text[:80] + "..."


def strings(q: dict[str, Any], where: Path, key: str, label: str = "") -> list[str]:
    """A list of strings (absent or null: empty)."""
    value = declared(q, where, key, list, [], label=label)
    if not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{str(where)!r}: {label}{key} must be a list of strings, got {json_text(value)}")
    return value


def group_size(q: dict[str, Any], where: Path, *keys: str) -> int:
    """A config's group size (under the first of ``keys`` present): positive, or -1 for one group over K."""
    g: Any = next((q[k] for k in keys if k in q), None)
    if not is_int(g) or (g <= 0 and g != -1):
        raise CheckpointError(f"{str(where)!r}: group_size must be a positive integer or -1, got {json_text(g)}")
    return g


def quantized_lm_head(modules: dict[str, Module]) -> bool:
    """Whether the checkpoint stores its output projection (``lm_head``) quantized."""
    return any(p.rsplit(".", 1)[-1] == "lm_head" for p in modules)


def not_converted(root: Path, fmt: Format, modules: dict[str, Module]) -> None:
    """A ``modules_to_not_convert`` entry names modules left in float (transformers: a substring of the name);
    one that matches a module stored quantized contradicts the tensors, and a target's config written from
    it (compressed-tensors' ``ignore``) would leave that module unquantized."""
    for entry in fmt.raw.get("modules_to_not_convert") or []:
        hit = next((p for p in modules if entry in p), None)
        if hit is not None:
            raise CheckpointError(f"{str(root)!r}: modules_to_not_convert lists {entry!r}, but {hit!r} is stored quantized")


def _matches(pattern: str, name: str) -> bool:
    """GPTQModel's and compressed-tensors' match of a module name against a pattern (``re.match``); a pattern
    that is not a regular expression matches nothing (and is refused where read)."""
    import re

    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False


def exclusions(fmt: Format) -> list[str]:
    """GPTQModel's ``dynamic`` "-:regex" entries: modules it leaves unquantized."""
    dynamic = fmt.raw.get("dynamic") if fmt.container is None else None
    return [p[2:] for p in (dynamic or {}) if p.startswith("-:")]


class QweightFormat(CheckpointFormat):
    """AWQ and GPTQ: every module stores ``qweight``, ``qzeros``, ``scales`` and perhaps ``g_idx``."""

    PARTS = ("qweight", "qzeros", "scales", "g_idx")
    sidecars = True

    def dims(self, qweight: tuple[int, ...], values: int, words: int) -> tuple[int, int]:
        """(K, N) from qweight's last two dimensions."""
        raise NotImplementedError

    def qweight_shape(self, k: int, n: int, values: int, words: int) -> tuple[int, int]:
        raise NotImplementedError

    def modules(self, root: Path, fmt: Format, shards: dict[str, SafetensorsFile],
                where: dict[str, str]) -> dict[str, Module]:
        parts = self.PARTS
        prefixes = sorted({p for p, dot, part in map(lambda t: t.rpartition("."), where) if p and part in parts[:3]})
        modules = {}
        for prefix in prefixes:
            files = {p: where[f"{prefix}.{p}"] for p in parts if f"{prefix}.{p}" in where}
            missing = [p for p in parts[:3] if p not in files]
            if missing:
                raise CheckpointError(f"{str(root)!r}: {prefix!r} has {', '.join(sorted(files))} but no {' or '.join(missing)}")
            infos = {p: shards[f].tensors[f"{prefix}.{p}"] for p, f in files.items()}
            modules[prefix] = self._check_module(root, fmt, prefix, files, infos)
        if not modules:
            raise CheckpointError(f"{str(root)!r}: no quantized modules (no tensors named *.qweight)")
        not_converted(root, fmt, modules)
        if fmt.method == "gptq" and bool(fmt.raw.get("lm_head", False)) != quantized_lm_head(modules):
            stored = "stores lm_head quantized" if quantized_lm_head(modules) else "stores no quantized lm_head"
            raise CheckpointError(f"{str(root)!r}: quantization_config says lm_head {json_text(fmt.raw.get('lm_head', False))}, "
                                  f"but the checkpoint {stored}")
        for pattern in exclusions(fmt):
            hit = next((p for p in modules if _matches(pattern, p)), None)
            if hit is not None:
                raise CheckpointError(f"{str(root)!r}: dynamic excludes {'-:' + pattern!r} from quantization, but {hit!r} "
                                      "is stored quantized")
        return modules

    def _check_module(self, root: Path, fmt: Format, prefix: str, files: dict[str, str],
                      infos: dict[str, TensorInfo]) -> Module:
        w, z, s = infos["qweight"], infos["qzeros"], infos["scales"]

        def bad(why: str) -> CheckpointError:
            shapes = ", ".join(f"{p} {infos[p].shape} {infos[p].dtype}" for p in infos)
            return CheckpointError(f"{str(root)!r}: {prefix!r}: {why} (got {shapes}; bits {fmt.bits}, group size {fmt.group_size})")

        if w.dtype not in WORDS or z.dtype not in WORDS:
            raise bad("qweight and qzeros must be int32 words")
        if s.dtype not in FLOATS:
            raise bad("scales must be float16, bfloat16 or float32")
        if len(w.shape) < 2 or not (w.shape[:-2] == z.shape[:-2] == s.shape[:-2]) or len(z.shape) != len(w.shape):
            raise bad("qweight, qzeros and scales must be matrices with the same leading dimensions")
        values, words = B.layout(fmt.bits)  # 32 // bits values in a word; at 3 bits, 32 values in 3 words
        k, n = self.dims(w.shape, values, words)
        if "g_idx" in infos and (infos["g_idx"].shape != (k,) or infos["g_idx"].dtype not in ("I32", "I64")):
            raise bad(f"g_idx must be int32 (or int64) of shape ({k},)")
        if 0 in w.shape:
            raise bad("qweight has no elements (K, N and every leading dimension must be positive)")
        groups = 1 if fmt.group_size == -1 else k // fmt.group_size
        if k % values or n % values or (fmt.group_size != -1 and k % fmt.group_size):
            raise bad(f"K and N must be multiples of {values}, and K a multiple of the group size")
        if z.shape[-2:] != (groups, n * words // values) or s.shape[-2:] != (groups, n):
            raise bad(f"expected qzeros (..., {groups}, {n * words // values}) and scales (..., {groups}, {n})")
        if w.shape[-2:] != self.qweight_shape(k, n, values, words):
            raise bad("qweight shape does not match")
        return Module(prefix, files, infos, k, n, groups, {p: f"{prefix}.{p}" for p in infos}, bits=fmt.bits)

    # ------------------------------------------------------------ writing (shared by AWQ and GPTQ)
    def outputs(self, job: Job, m: Module, part: str) -> list[Output]:
        if part == "qweight":
            made = [("qzeros", "zeros")] if "qzeros" not in m.names else []  # compressed-tensors' symmetric scheme
            return [("qweight", "weight"), *made, *self.extra(m)]
        if part == "qzeros":
            return [("qzeros", "zeros")]
        if part == "scales":
            return [("scales", "scales" if m.transposed else "copy")]
        return []  # g_idx (to AWQ: checked trivial; to GPTQ: written by extra) and weight_shape (checked)

    def extra(self, m: Module) -> list[Output]:
        """Tensors written after qweight besides the zeros."""
        return []

    def entry(self, job: Job, m: Module, action: str) -> tuple[str, tuple[int, ...]]:
        if action == "scales":
            return m.infos["scales"].dtype, (*m.lead, m.groups, m.n)
        if action == "zeros":
            return "I32", (*m.lead, m.groups, m.words(m.n))
        values, words = B.layout(m.bits)
        return "I32", (*m.lead, *self.qweight_shape(m.k, m.n, values, words))

    def tensor(self, job: Job, f: Reader, m: Module, action: str) -> np.ndarray:
        # stored transposed (compressed-tensors): moved bit for bit
        return stored_to_canonical(m, "scales", f.array_bits(m.names["scales"]))

    def stream(self, job: Job, m: Module, action: str) -> Stream | None:
        """Where an output tensor is made row block by row block from one stored tensor, how; else None."""
        return None

    def pieces(self, job: Job, f: Reader, m: Module, action: str) -> list[Piece] | None:
        stream = self.stream(job, m, action)
        if stream is None:
            return None
        name = m.names[stream.part]
        info = f.tensors[name]
        if stream.convert is None:  # the stored bytes as they are
            return [Piece(info.nbytes, copy=(name, 0))]
        row_bytes = 4 * info.shape[-1]  # packed int32 words
        rows = info.nbytes // row_bytes
        step = max(stream.unit, CHUNK_BYTES // row_bytes // stream.unit * stream.unit)
        return [Piece((min(rows, r0 + step) - r0) * row_bytes,
                      make=functools.partial(_rows, stream.convert, f, name, r0, min(rows, r0 + step), job.buffers))
                for r0 in range(0, rows, step)]


def _rows(convert: Callable[[np.ndarray], np.ndarray], f: Reader, name: str, r0: int, r1: int, buffers: Buffers) -> np.ndarray:
    """A block converted, read into a reused buffer: given back now unless the output is written over it, in which
    case the writer gives it back once written (``Buffers.give``)."""
    words = f.rows(name, r0, r1, buffers, output=True)  # (converted over: the output's memory)
    out = convert(words)
    if not np.may_share_memory(out, words):
        buffers.give(words)
    return out
