"""The model of a quantized checkpoint packq computes on: its format, its modules, their arrays.

Formats (``packq.checkpoint.formats``) build it from a folder's headers and JSON
(``packq.checkpoint.folder``); the conversion reads module tensors through it, in the AWQ
or GPTQ layout whatever container stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.safetensors import SafetensorsFile, TensorInfo
from packq.core.bits import layout, pack
from packq.errors import CheckpointError

BITS = (2, 3, 4, 8)


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
    def kind(self) -> str:
        """The registry's name of the format: "awq", "gptq" or "compressed-tensors"."""
        return self.container or self.method

    @property
    def name(self) -> str:
        if self.container == "compressed-tensors":
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
    if part == "g_idx":
        check_g_idx(ckpt, m, a)
    return stored_to_canonical(m, part, a)


def check_g_idx(ckpt: Checkpoint, m: Module, g: np.ndarray) -> None:
    """A g_idx names, for each of the K input rows, one of the module's groups: integers in [0, groups)."""
    if g.dtype.kind not in "iu":  # the header check refuses other dtypes; this guards every other reader
        raise CheckpointError(f"{str(ckpt.root)!r}: {m.prefix + '.g_idx'!r} is {g.dtype}; it must hold integer group numbers")
    if g.size and (int(g.min()) < 0 or int(g.max()) >= m.groups):
        bad = int(np.flatnonzero((g < 0) | (g >= m.groups))[0])
        raise CheckpointError(
            f"{str(ckpt.root)!r}: {m.prefix + '.g_idx'!r}[{bad}] is {int(g[bad])}; the module has {m.groups} groups, so every "
            f"entry must be in [0, {m.groups})")


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
