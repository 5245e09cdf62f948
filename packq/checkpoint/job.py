"""What one conversion decided before writing anything: the input of every format and container.

The formats (``packq.checkpoint.formats``) and containers (``packq.checkpoint.containers``) take a
:class:`Job`; the conversion (``packq.checkpoint.convert``) makes it. This module sits below both,
so that neither imports the conversion.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq import backends
from packq.checkpoint.model import Checkpoint, Module, module_array, stored_to_canonical
from packq.checkpoint.safetensors import Buffers, Reader
from packq.checkpoint.zeros import Target
from packq.errors import CheckpointError
from packq.formats.engines import FIELD, WORD

if TYPE_CHECKING:  # typing only: the formats import this module, never the other way round
    from packq.checkpoint.formats.base import CheckpointFormat


class Converter:
    """Per-tensor conversions on one backend; NumPy arrays in, NumPy arrays out."""

    def __init__(self, backend: str) -> None:
        if backend == "numpy":
            self.be = backends.for_arrays(x=np.zeros(1))
            self.to_backend: Callable[[np.ndarray], Any] = lambda a: a
        elif backend == "jax":
            try:
                import jax.numpy as jnp
            except ImportError:
                raise CheckpointError("backend 'jax' needs JAX: pip install 'packq[jax]'") from None
            self.be = backends.for_arrays(x=jnp.zeros(1))
            self.to_backend = jnp.asarray
        else:
            raise CheckpointError(f"backend must be 'numpy' or 'jax', got {backend!r}")

    def __call__(self, fn: Callable[..., Any], words: np.ndarray, **static: Any) -> np.ndarray:
        if words.dtype == np.uint32:
            words = words.view(np.int32)
        return np.asarray(self.be.run(fn, self.to_backend(words), **static))

    def over(self, fn: Callable[..., Any], words: np.ndarray, **static: Any) -> np.ndarray:
        """``self(fn, words)``, written over ``words``' own memory where the backend can: the caller gives
        ``words`` up (a read buffer, converted, written out and reused)."""
        if words.dtype == np.uint32:
            words = words.view(np.int32)
        return np.asarray(self.be.run_over(fn, self.to_backend(words), **static))


def _finite_mask(out: np.ndarray, dtype: str) -> np.ndarray:
    """Which elements of a :func:`to_float` result are finite (bfloat16: by its exponent bits)."""
    if dtype == "bfloat16":
        return (out & np.uint16(0x7F80)) != np.uint16(0x7F80)
    return np.isfinite(out)


class Overflow:
    """Dequantized weights that are not finite in the float target: counted per block as they are made,
    the conversion refused (before DST is put in place) unless asked, with the count and the largest
    magnitude, so that a checkpoint of infinities never passes as a conversion."""

    def __init__(self) -> None:
        self.count = 0  # weights not finite in the output
        self.largest = 0.0  # the largest magnitude among the weights as computed (before the cast)
        self.modules: list[str] = []
        self._lock = threading.Lock()

    @staticmethod
    def finite(out: np.ndarray, dtype: str) -> bool:
        """Whether every weight of ``out`` (bfloat16 as its raw bits) is finite."""
        return bool(_finite_mask(out, dtype).all())

    def add(self, prefix: str, computed: np.ndarray, out: np.ndarray, dtype: str) -> None:
        finite = _finite_mask(out, dtype)
        if finite.all():
            return
        bad = int(finite.size - np.count_nonzero(finite))
        with np.errstate(invalid="ignore"):
            wide = np.abs(np.asarray(computed, dtype=np.float64))
        largest = float(np.nanmax(wide)) if np.isfinite(wide).any() or np.isinf(wide).any() else float("nan")
        with self._lock:
            self.count += bad
            self.largest = max(self.largest, largest) if largest == largest else self.largest
            if prefix not in self.modules:
                self.modules.append(prefix)

    def check(self, where: str, target: str, allowed: bool) -> None:
        if not self.count or allowed:
            return
        shown = ", ".join(map(repr, self.modules[:3])) + (f" and {len(self.modules) - 3} more" if len(self.modules) > 3 else "")
        raise CheckpointError(
            f"{where!r}: {self.count} dequantized weights are not finite in {target} (in {len(self.modules)} modules: "
            f"{shown}; the largest magnitude is {self.largest:.6g}); choose a wider float dtype (float32), or pass "
            "--allow-overflow (allow_overflow=True) to write them as infinities")


@dataclass
class Job:
    """What one conversion decided before writing anything."""

    ckpt: Checkpoint
    to: str
    convert: Converter
    target: Target  # to GPTQ: format, v1 convention, rebias; to AWQ: the source's format
    source: CheckpointFormat
    output: CheckpointFormat
    #: opens a written result folder as a checkpoint, to verify it (the folder reader sits above the formats)
    open: Callable[[Path], Checkpoint]
    read_word: bool = False  # to AWQ: the v1 source was written as one 32-bit subtraction
    symmetric: bool = False  # every zero-point is 2**(bits-1): compressed-tensors stores none, GPTQ says sym=True
    #: target-specific options (``--gguf-type``, ``--mlx-scales``, ...), as the target format defines them
    options: dict[str, Any] = field(default_factory=dict)
    #: float targets: weights that came out not finite, counted as they are made, refused before commit
    overflow: Overflow = field(default_factory=lambda: Overflow())
    #: read and output buffers reused from piece to piece (the container gives each written piece back)
    buffers: Buffers = field(default_factory=lambda: Buffers())

    def read(self, m: Module, part: str, f: Reader | None = None) -> np.ndarray:
        """A module's qweight or qzeros in the AWQ or GPTQ layout: from ``f`` (the shard being written) when
        it holds it, else from its own shard; made where the source stores none (symmetric zeros)."""
        if f is not None and part in m.names and f.path == self.ckpt.shards[m.files[part]].path:
            return stored_to_canonical(m, part, f.array(m.names[part]))
        return module_array(self.ckpt, m, part)

    @property
    def gptq_format(self) -> str | None:
        """The checkpoint_format of the GPTQ side: the one written, or the one read; None without one."""
        if self.to == "gptq":
            return self.target.checkpoint_format
        return self.ckpt.format.checkpoint_format if self.ckpt.format.method == "gptq" else None

    @property
    def v1_zeros(self) -> str | None:
        """How the GPTQ side stores v1 zeros ("field" or "word"), written or read; None for v2."""
        if self.gptq_format != "gptq":
            return None
        if self.to == "gptq":
            return self.target.convention
        return WORD if self.read_word else FIELD
