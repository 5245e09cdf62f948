"""Load a quantized checkpoint straight into (sharded) jax.Arrays, each process reading only its own bytes.

The whole checkpoint is opened and checked first (``open_checkpoint``: config, index, every shard
header, every module's shapes), then every sharding against every tensor it splits; only then is
anything read. Each array is made by ``jax.make_array_from_callback``: the callback reads, for one
device's shard, just that block's bytes from the file (whole rows with one read, or each row's
segment where columns are split), so a process reads the shards of its own devices and no more.
Layout conversions run afterwards on the devices: each module's whole conversion (weights, zero-points,
scales, the cast) is one compiled function, made once per distinct signature (layout, format, shapes,
dtypes, shardings) and reused by every module that shares it, so a Llama-shaped checkpoint compiles
three or four functions per layout, not one per module and step. They are compiled on threads from the
headers while the bytes are read, and a module whose compile is still running is set aside while the next
modules are read (up to one shard's bytes), then converted in order. Sharded modules convert under
``shard_map``, each device its own block (every conversion is local to whole words and groups), with
no collective. Tensors a layout keeps as stored pass through without a copy. With JAX's persistent
compilation cache enabled (``jax_compilation_cache_dir``, and ``jax_persistent_cache_min_compile_time_secs``
at 0, since these compiles take well under its default second), a second load in a new process reads
the compiled functions from the cache instead of compiling them.

On CPU devices (every sharding's devices) the host path takes over instead: each device's block is read
into 64-byte-aligned memory, converted there by packq's NumPy backend, and handed to PJRT, whose CPU
client uses aligned host memory in place rather than copying it (a replicated tensor is then one buffer
that all the devices share); 4-bit arrays PJRT always copies into packed memory of its own, which the
conversion threads do, each its own blocks. Nothing is compiled: layout "dequantized" of 4-bit AWQ is
computed by packq's C kernel (8 values at a time where the CPU has AVX2 and F16C, else by look-ups in a
table of the core's products); of other sources its float products are XLA's, about 10x faster than
NumPy's ufuncs (their stored blocks still come by the host path). Same arrays, same shardings, bit for
bit. ``PACKQ_JAX_HOST=0`` selects the XLA path on CPU devices too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import mmap
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

import packq
from packq.checkpoint.containers.base import unique_outputs
from packq.checkpoint.folder import open_checkpoint
from packq.checkpoint.hub import resolve
from packq.checkpoint.model import Checkpoint, Module, act_order
from packq.checkpoint.safetensors import DTYPES, Reader, TensorInfo
from packq.checkpoint.zeros import analyse, check_v1_readable
from packq.core.bits import layout as word_layout
from packq.errors import CheckpointError
from packq.formats import awq as awq_format
from packq.formats import compressed_tensors as ct_format
from packq.formats.engines import FIELD, WORD, producer_convention

LAYOUTS = ("source", "gptq", "awq", "compressed-tensors", "int4", "dequantized")
#: what each layout names a module's tensors, the first one the tensor whose sharding the module takes
OUTPUTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
           "compressed-tensors": ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"),
           "int4": ("weight", "zeros", "scales", "g_idx"), "dequantized": ("weight",)}
#: safetensors dtypes NumPy lacks, as JAX (ml_dtypes) holds them
_JAX_DTYPES = {"BF16": jnp.bfloat16, "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}

ShardingRule = Callable[[str, tuple[int, ...]], Sharding | None] | Mapping[str, Sharding] | Sequence[tuple[str, Sharding]]


def load(
    src: str | os.PathLike[str],
    *,
    layout: str = "source",
    shardings: ShardingRule | None = None,
    dtype: Any = None,
    v1_zeros: str | None = None,
    revision: str | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """A quantized checkpoint's tensors as jax.Arrays, sharded as asked, in the layout asked.

    Parameters
    ----------
    src : path or Hub repo id
        An AWQ, GPTQ (v1/v2) or compressed-tensors checkpoint folder.
    layout : {"source", "gptq", "awq", "compressed-tensors", "int4", "dequantized"}
        "source": every tensor as stored. "gptq": qweight, qzeros (v2: z itself), scales, g_idx (the
        source's, else arange(K) // group_size). "awq": AWQ gemm (4-bit, no act-order). "compressed-tensors":
        weight_packed, weight_zero_point, weight_scale, weight_shape (int32). "int4": ``weight``
        (..., K, N) and ``zeros`` (..., G, N) as unpacked ``jnp.uint4`` with ``scales`` (4-bit
        checkpoints), what an XLA int4 matmul takes. "dequantized": ``weight`` (..., K, N), (q - z) * s
        in the scales' dtype, then ``dtype``. Tensors of no quantized module load as stored.
    shardings : callable, mapping or sequence of (pattern, sharding), optional
        Where each output tensor goes: ``shardings(name, shape)`` returning a ``jax.sharding.Sharding``
        (None: the default), or rules whose regular expression must match the whole name (the first
        that matches wins). Default: replicated over every device. A quantized module's tensors take
        the sharding of its first output (qweight, weight_packed or weight), rows with rows and
        columns with columns (transposed for compressed-tensors), since packq converts them shard by
        shard; a ``NamedSharding`` is needed to split them.
    dtype : optional
        For "dequantized": the weights' dtype (default: the scales').
    v1_zeros : {"field", "word"}, optional
        How a GPTQ v1 source stored zero-points of 0, where its metadata does not say (as for convert).
    stats : dict, optional
        Filled with ``bytes_read``: the bytes this process read from the shards.

    Raises
    ------
    ValueError
        For an unknown layout, a layout the checkpoint cannot take, or a sharding that splits a
        tensor unevenly, cuts a packed word or a quantization group; before anything is read.
    CheckpointError
        For anything wrong with the checkpoint (missing tensors, corrupt headers, a dtype JAX cannot
        hold), before anything is read.

    Examples
    --------
    >>> import pathlib, jax.numpy as jnp, packq, packq.jax
    >>> example = pathlib.Path(packq.__file__).parent.parent / "examples" / "tiny-llama-awq"
    >>> stats = {}
    >>> w = packq.jax.load(example, layout="int4", stats=stats)
    >>> up = "model.layers.0.mlp.up_proj"
    >>> w[f"{up}.weight"].shape, w[f"{up}.weight"].dtype == jnp.uint4, w[f"{up}.zeros"].shape
    ((256, 768), True, (2, 768))
    >>> from packq.checkpoint.folder import open_checkpoint
    >>> stats["bytes_read"] == open_checkpoint(example).total_bytes()  # every tensor's bytes, read once
    True
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    ckpt = open_checkpoint(resolve(src, revision))
    fmt = ckpt.format
    if layout in ("awq", "int4") and fmt.bits != 4:
        raise ValueError(f"layout {layout!r} holds 4-bit weights; {ckpt.root} is {fmt.name}")
    if layout in ("awq", "compressed-tensors") and fmt.method == "gptq" and act_order(ckpt):
        raise ValueError(f"layout {layout!r} cannot hold GPTQ act-order; {ckpt.root} is act-order (load it as 'gptq')")
    if dtype is not None and layout != "dequantized":
        raise ValueError(f"dtype applies to layout 'dequantized', got layout {layout!r}")
    loader = _Loader(ckpt, layout, _rule(shardings), dtype, _v1_convention(ckpt, v1_zeros))
    if layout in ("awq", "compressed-tensors") and fmt.method == "gptq":
        loader._act_order = False  # checked above: each g_idx read once, not again per module
    loader.check()  # every sharding against every tensor, before any read
    out = loader.run()
    if stats is not None:
        stats["bytes_read"] = loader.bytes_read
    return out


def _v1_convention(ckpt: Checkpoint, v1_zeros: str | None) -> str:
    """How a GPTQ v1 source's zeros are read ("field" or "word"); refused where that is unknown and matters."""
    if ckpt.format.method != "gptq" or ckpt.format.checkpoint_format != "gptq":
        return FIELD
    if v1_zeros not in (None, FIELD, WORD):
        raise ValueError(f"v1_zeros must be 'field' or 'word', got {v1_zeros!r}")
    convention = v1_zeros or producer_convention(ckpt.format.raw, ckpt.sidecar)
    if convention in (FIELD, WORD):
        return convention
    report = analyse(ckpt, v1_zeros)  # reads every qzeros (small): only where the producer is unknown
    check_v1_readable(ckpt, report)
    return FIELD


def _default() -> Sharding:
    return NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), PartitionSpec())


def _rule(shardings: ShardingRule | None) -> Callable[[str, tuple[int, ...]], Sharding]:
    if shardings is None:
        default = _default()
        return lambda name, shape: default
    if callable(shardings):
        fn = shardings
    else:
        rules = list(shardings.items() if isinstance(shardings, Mapping) else shardings)
        compiled = []
        for p, s in rules:
            if not isinstance(p, str):
                raise TypeError(f"shardings: each rule's pattern must be a regular expression (str), got {type(p).__name__}")
            try:
                compiled.append((re.compile(p), s))
            except re.error as e:
                raise ValueError(f"shardings: the pattern {p!r} is not a valid regular expression ({e})") from None

        def fn(name: str, shape: tuple[int, ...]) -> Sharding | None:
            return next((s for p, s in compiled if p.fullmatch(name)), None)

    default = _default()

    def rule(name: str, shape: tuple[int, ...]) -> Sharding:
        s = fn(name, shape)
        if s is None:
            return default
        if not isinstance(s, Sharding):
            raise TypeError(f"shardings must give a jax.sharding.Sharding for {name!r}, got {type(s).__name__}")
        return s
    return rule


def _like(s: Sharding, ndim: int, transpose: bool = False) -> Sharding:
    """A module's sharding for one of its tensors of ``ndim`` dimensions (its last two transposed if asked);
    vectors (g_idx, weight_shape) are replicated over the module's mesh."""
    if not isinstance(s, NamedSharding):
        return s
    full = tuple(s.spec) + (None,) * max(0, ndim - len(tuple(s.spec)))
    if ndim < 2:
        return NamedSharding(s.mesh, PartitionSpec())
    lead, rows, cols = full[: ndim - 2], full[ndim - 2], full[ndim - 1]
    return NamedSharding(s.mesh, PartitionSpec(*lead, *((cols, rows) if transpose else (rows, cols))))


class _Loader:
    def __init__(self, ckpt: Checkpoint, layout: str, rule, dtype: Any, convention: str) -> None:
        self.ckpt, self.layout, self.rule, self.dtype, self.convention = ckpt, layout, rule, dtype, convention
        self.bytes_read = 0
        #: stored tensor -> (its module, its part)
        self.module_of = {name: (m, part) for m in ckpt.modules.values() for part, name in m.names.items()}
        self.where = {name: shard for shard in ckpt.shards.values() for name in shard.tensors}
        self._act_order: bool | None = None

    @property
    def act_order(self) -> bool:
        """Whether the checkpoint is act-order, decided once: it reads every module's g_idx (until one is not
        trivial), so asking it per module made loading quadratic in the modules."""
        if self._act_order is None:
            self._act_order = act_order(self.ckpt)
        return self._act_order

    # ------------------------------------------------------------------ plan and checks
    def _module_sharding(self, m: Module) -> Sharding:
        """The module's sharding, as given for its first output (in the output's orientation)."""
        first = OUTPUTS[self.layout][0]
        return self.rule(f"{m.prefix}.{first}", self._output_shape(m, first))

    def _output_shape(self, m: Module, part: str) -> tuple[int, ...]:
        lead, k, n, g = m.lead, m.k, m.n, m.groups
        if self.layout in ("int4", "dequantized"):
            return {"weight": (*lead, k, n), "zeros": (*lead, g, n), "scales": (*lead, g, n)}.get(part, (k,))
        if self.layout == "compressed-tensors":
            return {"weight_packed": (*lead, n, m.words(k)), "weight_zero_point": (*lead, m.words(n), g),
                    "weight_scale": (*lead, n, g)}.get(part, (len(lead) + 2,))
        if self.layout == "awq":
            return {"qweight": (*lead, k, n // 8), "qzeros": (*lead, g, n // 8), "scales": (*lead, g, n)}[part]
        return {"qweight": (*lead, m.words(k), n), "qzeros": (*lead, g, m.words(n)), "scales": (*lead, g, n)}.get(part, (k,))

    def _reads(self) -> list[tuple[str, TensorInfo, Sharding, tuple[int, int]]]:
        """Every stored tensor to read: (name, header entry, sharding, (row unit, column unit) of whole words)."""
        reads = []
        for shard in self.ckpt.shards.values():
            for name, info in shard.tensors.items():
                if name not in self.module_of or self.layout == "source":
                    reads.append((name, info, self.rule(name, info.shape), (1, 1)))
                    continue
                m, part = self.module_of[name]
                if part == "shape":
                    continue
                s = self._module_sharding(m)
                units = (1, 1)
                _, words = word_layout(m.bits)
                if part == "qweight" and m.infos["qweight"].shape[-2] != m.k:  # GPTQ-packed rows (K*b/32)
                    units = (words, 1)
                elif part in ("qweight", "qzeros"):
                    units = (1, words)  # values packed along the columns
                if m.transposed:
                    units = units[::-1]
                # the module's sharding is in its outputs' orientation; the stored tensor may be transposed
                transposed = self.layout == "compressed-tensors"  # outputs transposed from GPTQ's layout
                reads.append((name, info, _like(s, len(info.shape), transposed != m.transposed), units))
        return reads

    def check(self) -> None:
        """Refuse, before any read, a sharding that splits a tensor unevenly or cuts a word or a group."""
        self.plan = self._reads()
        for name, info, s, units in self.plan:
            if DTYPES[info.dtype][0] is None and info.dtype not in _JAX_DTYPES:
                raise CheckpointError(f"{self.where[name].path}: {name!r} has dtype {info.dtype}, which packq does "
                                      "not load into JAX")
            _check_split(name, info.shape, s, units)
        if self.layout != "source":
            # every array returned, planned by name: a stored tensor named as one a module becomes (a stray
            # `<module>.weight` beside a quantized module, loaded "dequantized") is refused, not dropped
            plain = ((name, "a stored tensor") for name, *_ in self.plan if name not in self.module_of)
            made = ((f"{m.prefix}.{part}", f"a part of the quantized module {m.prefix!r}")
                    for m in self.ckpt.modules.values() for part in OUTPUTS[self.layout])
            unique_outputs(self.ckpt.root, [*plain, *made])
            first = OUTPUTS[self.layout][0]
            for m in self.ckpt.modules.values():
                s = self._module_sharding(m)
                # the rule as given, against the tensor it was given for (the module's other tensors take it
                # adapted to their rank, which would hide a spec longer than the tensor's)
                _check_rank(f"{m.prefix}.{first}", self._output_shape(m, first), s)
                for part in OUTPUTS[self.layout]:
                    shape = self._output_shape(m, part)
                    _check_split(f"{m.prefix}.{part}", shape, _like(s, len(shape)), (1, 1))

    # ------------------------------------------------------------------ reading
    def _array(self, name: str, info: TensorInfo, sharding: Sharding) -> jax.Array:
        """The tensor on its devices. This process reads once the smallest box holding every block its own
        devices take (one contiguous run per row block, or each row's segment where columns are split) and
        hands each device its block from it: replicated devices share one read, and no process reads
        another's share."""
        shard = self.where[name]
        np_name = DTYPES[info.dtype][0]  # (a dtype JAX cannot take was refused by check())
        dt = np.dtype(np_name).newbyteorder("<") if np_name else np.dtype(_JAX_DTYPES[info.dtype])
        shape = info.shape

        def bounds(index: tuple[slice, ...] | None) -> tuple[tuple[int, int], ...]:
            return tuple(s.indices(d)[:2] for s, d in zip(index, shape)) if index else ()

        local = [bounds(ix) for ix in sharding.addressable_devices_indices_map(shape).values()]
        box = tuple((min(b[d][0] for b in local), max(b[d][1] for b in local)) for d in range(len(shape)))
        with shard.open() as f:
            data = self._read_block(f, info, dt, box) if local else None

            def block(index: tuple[slice, ...] | None) -> np.ndarray:
                assert data is not None
                return data[tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(bounds(index), box))]

            return jax.make_array_from_callback(shape, sharding, block)

    def _read_block(self, f: Reader, info: TensorInfo, dt: np.dtype, key: tuple[tuple[int, int], ...],
                    out: np.ndarray | None = None) -> np.ndarray:
        """The block ``key`` ((start, stop) per dimension) of a stored tensor (into ``out``, C-contiguous, if given):
        whole rows in one read each run of rows, else each row's segment; only these bytes are read."""
        shape, item = info.shape, dt.itemsize
        out = np.empty([b - a for a, b in key], dt) if out is None else out
        if out.size == 0:
            return out
        if not shape:
            self._pread(f, info, info.begin, out.reshape(-1).view(np.uint8).data)
            return out
        strides = [math.prod(shape[i + 1 :]) * item for i in range(len(shape))]
        # the innermost dimensions read whole make one contiguous run per outer index
        inner = len(shape)
        while inner > 1 and key[inner - 1] == (0, shape[inner - 1]):
            inner -= 1
        run_len = (key[inner - 1][1] - key[inner - 1][0]) * strides[inner - 1]
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        for outer in itertools.product(*(range(a, b) for a, b in key[: inner - 1])):
            offset = info.begin + sum(i * s for i, s in zip(outer, strides)) + key[inner - 1][0] * strides[inner - 1]
            self._pread(f, info, offset, flat[pos : pos + run_len].data)
            pos += run_len
        return out

    def _pread(self, f: Reader, info: TensorInfo, offset: int, view: memoryview) -> None:
        f.read_into(offset, view, info.name)
        self.bytes_read += view.nbytes

    # ------------------------------------------------------------------ the host path (CPU devices)
    # On CPU devices XLA's conversions are fast, but each of their programs costs 0.1-0.7 s to compile (13 s under
    # load for a Llama's three shapes), and its uint4 code runs 10x slower than NumPy. Here every device's block is
    # read, converted by packq's NumPy backend (its C kernels, or numba's where loaded) and handed to PJRT in host
    # memory aligned to 64 bytes, which the CPU client then uses in place (zero-copy) instead of copying: a
    # replicated tensor is one host buffer shared by every device, as immutable as any jax.Array. 4-bit arrays are
    # the exception: PJRT packs them into memory of its own before device_put returns, so their values are unpacked
    # into a buffer each conversion thread reuses, and put by that thread. Same bytes, same shardings as the XLA path
    # (tests/multidevice/test_jax_loader.py compares the two).
    def _host_converts(self, m: Module) -> bool:
        """Whether the host path converts this module: every layout ("dequantized" where packq's C kernel covers it,
        :meth:`_host_dequantizes`), wherever each device's block converts on its own: a NamedSharding (the shard_map
        case) or a sharding every device holds whole."""
        s = self._module_sharding(m)
        # (a module none of whose blocks are this process's takes the XLA path, which needs none of its bytes)
        return ((self.layout != "dequantized" or self._host_dequantizes(m))
                and (isinstance(s, NamedSharding) or s.is_fully_replicated) and bool(s.addressable_devices))

    def _host_dequantizes(self, m: Module) -> bool:
        """Whether "dequantized" converts this module on the host: 4-bit AWQ by packq's C kernels
        (:func:`packq.backends.numpy.dequantize_awq_rows`: the core's products, bit for bit), into outputs of 2 or 4
        bytes; XLA computes the rest (GPTQ and compressed-tensors sources, act-order, 3-bit), which NumPy's
        ufuncs would do 10x slower, and any module where the table would not pay (groups of fewer than 16 rows)."""
        from packq.backends.numpy import c_kernels

        scales = m.infos["scales"].dtype
        out = _np_dtype(m.infos["scales"]) if self.dtype is None else np.dtype(jnp.dtype(self.dtype))
        return (self.ckpt.format.method == "awq" and m.bits == 4 and not m.transposed and sys.byteorder == "little"
                and c_kernels() is not None and scales in ("F16", "BF16", "F32") and out.itemsize in (2, 4)
                and 16 * m.groups <= m.k)

    def _host_blocks(self, name: str, info: TensorInfo, sharding: Sharding, scratch: str | None
                     ) -> tuple[dict[Any, tuple[tuple[int, int], ...]], dict[tuple[tuple[int, int], ...], np.ndarray]]:
        """This process's devices' blocks of a stored tensor: (device -> block bounds, bounds -> block), each
        distinct block read once. A block that is one run of the file is read straight into 64-byte-aligned memory
        of its own; otherwise (columns split) the smallest box holding them is read once into the reusable buffer
        ``scratch`` and the blocks are views of it (``scratch`` None: copied out into aligned memory)."""
        shape, dt = info.shape, _np_dtype(info)
        where = {d: _bounds(ix, shape) for d, ix in sharding.addressable_devices_indices_map(shape).items()}
        keys = list(dict.fromkeys(where.values()))
        blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
        with self.where[name].open() as f:
            if all(_one_run(k, shape) for k in keys):
                for k in keys:
                    blocks[k] = self._read_block(f, info, dt, k, _aligned([b - a for a, b in k], dt))
                return where, blocks
            box = tuple((min(k[d][0] for k in keys), max(k[d][1] for k in keys)) for d in range(len(shape)))
            data = self._read_block(f, info, dt, box, self._scratch(scratch or "", [b - a for a, b in box], dt))
        for k in keys:
            view = data[tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(k, box))]
            blocks[k] = view if scratch is not None else _owned(view)
        return where, blocks

    def _scratch(self, key: str, shape: list[int], dt: np.dtype) -> np.ndarray:
        """A reusable buffer for a box that is read and then copied or converted (fresh memory costs a page fault
        each 4 KiB, which on this path cost more than the copy); at most the largest tensor of each part."""
        pool = self.__dict__.setdefault("_scratch_pool", {})
        n = math.prod(shape) * dt.itemsize
        if key not in pool or pool[key].nbytes < n:
            pool[key] = np.empty(n, np.uint8)
        return pool[key][:n].view(dt).reshape(shape)

    def _pool(self) -> ThreadPoolExecutor:
        if "_host_pool" not in self.__dict__:
            from packq.backends.numpy import threads

            self._host_pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="packq-host")
        return self._host_pool

    def _host_array(self, name: str, info: TensorInfo, sharding: Sharding) -> jax.Array:
        """The tensor on its (CPU) devices, each device's block in aligned host memory that PJRT keeps as is."""
        where, blocks = self._host_blocks(name, info, sharding, None)
        return _put(info.shape, sharding, {d: blocks[k] for d, k in where.items()})

    def _host_module(self, m: Module, planned: dict[str, tuple[TensorInfo, Sharding]], slot: int = 0) -> _HostJob:
        """A module converted on the host: each distinct set of device blocks (replicas share one) by
        ``_conversion`` on NumPy, each output block put on its devices with the module's sharding, as the XLA
        path's shard_map gives it (every conversion is local to a device's block). Its blocks are read here, into
        the reusable buffers of ``slot``, and converted on the pool's threads, while the caller reads the next module
        into the other slot's; :meth:`_host_finish` waits for them and makes the arrays."""
        parts = {part: n for part, n in m.names.items() if n in planned}
        read = {part: self._host_blocks(n, *planned[n], scratch=f"{part}/{slot}") for part, n in parts.items()}
        st = self._static(m)
        devices = list(read[next(iter(read))][0])
        scratch = list(getattr(self, "_scratch_pool", {}).values())
        keys = {d: tuple(read[part][0][d] for part in parts) for d in devices}
        holders: dict[tuple[Any, ...], list[Any]] = {}
        for d, k in keys.items():
            holders.setdefault(k, []).append(d)

        def convert(key: tuple[Any, ...]) -> dict[str, np.ndarray | dict[Any, jax.Array]]:
            res = _conversion(st, {part: read[part][1][k] for part, k in zip(parts, key)}, self._unpack_scratch)
            out: dict[str, np.ndarray | dict[Any, jax.Array]] = {}
            for name, x in res.items():
                x = np.asarray(x)
                if x.dtype.name in _PACKED:
                    # PJRT packs 4-bit arrays into memory of its own (a copy per value, whatever the alignment) before
                    # device_put returns: done here, each thread its own blocks, rather than one after another on the
                    # main thread (1.5 of int4's 2.7 s, measured); the unpacked values may then sit in this thread's
                    # reused buffer (fresh memory costs a page fault each 4 KiB, more than the unpacking itself)
                    out[name] = {d: jax.device_put(x, d) for d in holders[key]}
                else:
                    out[name] = _owned(x, scratch)
            return out

        # the blocks on threads: NumPy's ufuncs, packq's C kernels and PJRT's copies release the GIL
        return _HostJob(m, keys, {k: self._pool().submit(convert, k) for k in holders}, "g_idx" in parts)

    def _host_finish(self, job: _HostJob) -> dict[str, jax.Array]:
        """The arrays of a module that :meth:`_host_module` started."""
        m, s = job.module, self._module_sharding(job.module)
        done = {k: f.result() for k, f in job.futures.items()}
        per_device = {d: done[k] for d, k in job.keys.items()}
        first = next(iter(per_device.values()))
        out: dict[str, jax.Array] = {}
        for name in first:
            shape = self._output_shape(m, name)
            sh = _like(s, len(shape))
            if isinstance(first[name], dict):  # put on the threads already
                placed = [res[name][d] for d, res in per_device.items()]  # type: ignore[index]
                out[name] = _assemble(shape, sh, placed)
            else:
                out[name] = _put(shape, sh, {d: res[name] for d, res in per_device.items()})  # type: ignore[misc]
        return self._named(m, s, out, job.has_g_idx)

    def _unpack_scratch(self, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
        """This thread's reusable buffer for a block that PJRT copies before its put returns (4-bit values)."""
        tls = self.__dict__.setdefault("_tls", threading.local())
        n = math.prod(shape) * dt.itemsize
        buf = getattr(tls, "buf", None)
        if buf is None or buf.nbytes < n:
            tls.buf = buf = np.empty(n, np.uint8)
        return buf[:n].view(dt).reshape(shape)

    # ------------------------------------------------------------------ converting
    def run(self) -> dict[str, jax.Array]:
        planned = {name: (info, s) for name, info, s, _ in self.plan}
        # on CPU devices the host path (below) reads and converts with NumPy instead of compiling XLA programs
        self.host = _host_path() and all(_on_cpu(s) for _, s in planned.values())
        make = self._host_array if self.host else self._array
        if self.layout == "source":
            return {name: make(name, info, s) for name, (info, s) in planned.items()}
        on_host = {m.prefix for m in self.ckpt.modules.values() if self.host and self._host_converts(m)}
        # every module's conversion is known from the headers alone: compile the distinct ones on threads (XLA
        # releases the GIL) while the bytes are read, rather than one after another at each new shape
        jobs: dict[Any, Any] = {}
        for m in self.ckpt.modules.values():
            if m.prefix in on_host:
                continue
            st, s = self._static(m), self._module_sharding(m)
            sig = tuple(sorted((part, planned[n][0].shape, _dtype_name(planned[n][0].dtype), planned[n][1])
                               for part, n in m.names.items() if n in planned))
            jobs.setdefault((st, sig, s), None)
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(jobs))), thread_name_prefix="packq-compile") as pool, \
                _host_kernels(bool(on_host), sum(self.ckpt.modules[p].infos["qweight"].nbytes for p in on_host)):
            self.executables = {key: pool.submit(_executable, *key) for key in jobs}
            out = {name: make(name, info, s) for name, (info, s) in planned.items() if name not in self.module_of}
            # a module whose conversion is still compiling is read and set aside, and the next ones are read
            # meanwhile (its compile off the critical path: the first compressed-tensors module waited 1 s for
            # its compile on an H200, benchmarks/results/h200/load_gpu_profile.txt), up to one shard's bytes of
            # stored arrays set aside; they are converted, in order, as their compiles finish
            by_module: dict[str, dict[str, jax.Array]] = {}
            waiting: list[tuple[Module, dict[str, jax.Array], Any]] = []
            limit = max((sum(i.nbytes for i in sh.tensors.values()) for sh in self.ckpt.shards.values()), default=0)
            # the host path: module i + 1 read (into the other slot's buffers) while module i converts on threads
            started: _HostJob | None = None
            for i, m in enumerate(self.ckpt.modules.values()):  # one module at a time: stored arrays dropped once converted
                if m.prefix in on_host:
                    job = self._host_module(m, planned, i % 2)
                    if started is not None:
                        by_module[started.module.prefix] = self._host_finish(started)
                    started = job
                    continue
                stored = {n: make(n, *planned[n]) for n in m.names.values() if n in planned}
                waiting.append((m, stored, self._job(m, stored)))
                while waiting and (_ready(waiting[0][2]) or sum(_nbytes(w[1]) for w in waiting) > limit):
                    wm, wstored, _ = waiting.pop(0)
                    by_module[wm.prefix] = self._module(wm, wstored)
                del stored
            if started is not None:
                by_module[started.module.prefix] = self._host_finish(started)
            for wm, wstored, _ in waiting:
                by_module[wm.prefix] = self._module(wm, wstored)
            del waiting
            for m in self.ckpt.modules.values():  # the modules' outputs in the checkpoint's order, as before
                out.update(by_module.pop(m.prefix))
        return out

    def _job(self, m: Module, stored: dict[str, jax.Array]) -> Future | None:
        """The compile started ahead for this module's conversion, if any."""
        a = {part: stored[name] for part, name in m.names.items() if name in stored}
        return getattr(self, "executables", {}).get((self._static(m), _signature(a), self._module_sharding(m)))

    def _static(self, m: Module) -> _Static:
        fmt = self.ckpt.format
        trivial_g = "g_idx" not in m.names or not self.act_order
        return _Static(self.layout, fmt.method, fmt.checkpoint_format, m.bits, self.convention, m.transposed,
                       trivial_g, None if self.dtype is None else jnp.dtype(self.dtype).name)

    def _module(self, m: Module, stored: dict[str, jax.Array]) -> dict[str, jax.Array]:
        s = self._module_sharding(m)
        a = {part: stored[name] for part, name in m.names.items() if name in stored}
        res = _convert_module(self._static(m), a, s, self._job(m, stored))
        return self._named(m, s, res, "g_idx" in a)

    def _named(self, m: Module, s: Sharding, res: dict[str, jax.Array], has_g_idx: bool) -> dict[str, jax.Array]:
        """A module's outputs by their full names, with the constants made on the host (a default g_idx, weight_shape)."""
        if self.layout == "gptq" and not has_g_idx:  # as GPTQ checkpoints hold it: arange(K) // group_size
            res["g_idx"] = jax.device_put(np.arange(m.k, dtype=np.int32) // (m.k // m.groups), _like(s, 1))
        if self.layout == "compressed-tensors":
            res["weight_shape"] = jax.device_put(np.array([*m.lead, m.n, m.k], np.int32), _like(s, 1))
        return {f"{m.prefix}.{part}": x for part, x in res.items()}


class _HostJob(NamedTuple):
    """A module the host path has read and is converting: its devices' block keys, each distinct key's conversion."""

    module: Module
    keys: dict[Any, tuple[Any, ...]]
    futures: dict[tuple[Any, ...], Future]
    has_g_idx: bool


class _Static(NamedTuple):
    """What a module's conversion depends on besides its arrays (hashable: it keys the compiled functions)."""

    layout: str
    method: str
    checkpoint_format: str
    bits: int
    convention: str
    transposed: bool
    trivial_g: bool
    dtype: str | None


def _conversion(st: _Static, a: dict[str, Any], scratch: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None
                ) -> dict[str, Any]:
    """A module's conversion from its stored arrays (parts qweight, qzeros, scales, g_idx) to the layout's
    outputs (without the constants made on the host: a default g_idx, weight_shape). Written with shapes
    read off the arrays, so that it runs on a device's block as well as on the whole tensor. ``scratch(shape,
    dtype)``: where the host path may unpack 4-bit values that PJRT copies before anything else uses it."""
    xp: Any = np if all(isinstance(x, np.ndarray) for x in a.values()) else jnp  # NumPy: the host path's blocks
    if st.transposed:  # compressed-tensors: GPTQ v2's tensors transposed
        a = {part: (xp.swapaxes(x, -1, -2) if x.ndim >= 2 else x) for part, x in a.items()}
    if "qzeros" not in a:  # compressed-tensors' symmetric scheme: every zero-point 2**(bits-1)
        a["qzeros"] = packq.pack(xp.full(a["scales"].shape, 1 << (st.bits - 1), xp.int32), bits=st.bits)
    w, z, scales, g_idx = a["qweight"], a["qzeros"], a["scales"], a.get("g_idx")
    if st.method == "awq":
        if st.layout == "awq":
            return {"qweight": w, "qzeros": z, "scales": scales}
        if st.layout == "dequantized":
            host = _awq_dequant_on_host(w, z, scales, st.dtype) if xp is np else None
            return {"weight": _cast(packq.dequantize_awq(w, z, scales), st.dtype) if host is None else host}
        if xp is np and (st.layout == "compressed-tensors" or (st.layout == "int4" and sys.byteorder == "little")):
            return _awq_on_host(st.layout, w, z, scales, scratch)  # the host path: no GPTQ words in between
        w, z = packq.fast_awq_to_gptq(w, z)
        z = packq.zeros_v1_to_v2(z)
    elif st.checkpoint_format == "gptq":  # v1: to v2, as its producer wrote it
        z = packq.zeros_v1_to_v2(z, bits=st.bits, convention=st.convention if st.bits != 3 else FIELD)
    bits = st.bits
    if st.layout == "gptq":
        out = {"qweight": w, "qzeros": z, "scales": scales}
        if g_idx is not None:
            out["g_idx"] = g_idx
        return out
    if st.layout == "awq":
        qw, qz = packq.gptq_to_awq(w, packq.zeros_v2_to_v1(z))
        return {"qweight": qw, "qzeros": qz, "scales": scales}
    if st.layout == "compressed-tensors":
        wp, zp, ws = packq.gptq_to_compressed_tensors(w, z, scales, bits=bits)
        return {"weight_packed": wp, "weight_zero_point": zp, "weight_scale": ws}
    if st.layout == "int4":
        res = {"weight": packq.unpack(w, "row", bits=4, dtype=jnp.uint4),
               "zeros": packq.unpack(z, "column", bits=4, dtype=jnp.uint4), "scales": scales}
        if not st.trivial_g:
            res["g_idx"] = g_idx
        return res
    weight = packq.dequantize_gptq(w, z, scales, None if st.trivial_g else g_idx, bits=bits, zeros="v2")
    return {"weight": _cast(weight, st.dtype)}


def _awq_on_host(layout: str, w: np.ndarray, z: np.ndarray, scales: np.ndarray,
                 scratch: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """AWQ blocks to "int4" or "compressed-tensors" on NumPy as ``packq convert`` writes them, each weight in one
    pass: uint4 values from the words' bytes (2.4x the route through GPTQ's words), or weight_packed by
    the backend's transposing AWQ -> compressed-tensors (a transposed copy of GPTQ's words costs 5-40x a copy);
    the zero-points as fast_awq_to_gptq's, then v2. The same bytes as ``_conversion``'s route (the multidevice
    tests compare them with the XLA path's)."""
    from packq.backends.numpy import BACKEND

    w, z = BACKEND.as_int32(w), BACKEND.as_int32(z)
    v2 = BACKEND.run(awq_format.zeros_to_gptq, z, offset=0)  # (-1 to GPTQ v1, +1 to v2: 0 in all)
    if layout == "int4":
        out = None if scratch is None else scratch((*w.shape[:-1], 8 * w.shape[-1]), np.dtype(np.uint8))
        return {"weight": _awq_uint4(w, out), "zeros": packq.unpack(v2, "column", bits=4, dtype=jnp.uint4), "scales": scales}
    return {"weight_packed": BACKEND.run(ct_format.weight_from_awq, w), "weight_zero_point": BACKEND.run(ct_format.swap, v2),
            "weight_scale": BACKEND.run(ct_format.swap, scales)}


def _awq_dequant_on_host(w: np.ndarray, z: np.ndarray, scales: np.ndarray, dtype: str | None) -> np.ndarray | None:
    """AWQ blocks dequantized on NumPy by packq's C kernels, into aligned memory that PJRT keeps: (q - z) * s rounded
    to the scales' dtype, then ``dtype``, as the core computes them (and the XLA path: the multidevice tests compare
    the two); None where the kernels do not cover the block (the caller then takes the core)."""
    from packq.backends import numpy as numpy_backend

    out_dt = np.dtype(scales.dtype if dtype is None else jnp.dtype(dtype))
    zeros = numpy_backend.unpack_awq_u8(z)
    *lead, k, c = w.shape
    out = _aligned((*lead, k, 8 * c), out_dt)
    with np.errstate(over="ignore", invalid="ignore"):  # (the table's NumPy products: XLA's overflow silently too)
        for i in np.ndindex(*lead):
            if numpy_backend.dequantize_awq_rows(w[i], zeros[i], scales[i], out_dt, out=out[i]) is None:
                return None
    return out


def _awq_uint4(qweight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """An AWQ qweight (..., K, N/8) as JAX's uint4 values (..., K, N) on NumPy, each nibble written straight to its
    column (:func:`packq.backends.numpy.unpack_awq_u8`): 2.4x faster than through GPTQ's words and unpacking them,
    for the same bytes (tests/multidevice/test_jax_loader.py compares them with the XLA path's)."""
    from packq.backends import numpy as numpy_backend

    # into a conversion thread's buffer (``out``: the host path, whose pool already shares the blocks over the cores)
    # on that thread, not handed to the backend's threads
    return numpy_backend.unpack_awq_u8(qweight, out, split=out is None).view(jnp.uint4)


def _signature(a: dict[str, jax.Array]) -> tuple[Any, ...]:
    return tuple((part, x.shape, x.dtype.name, x.sharding) for part, x in sorted(a.items()))


def _convert_module(st: _Static, a: dict[str, jax.Array], s: Sharding, job: Future | None = None) -> dict[str, jax.Array]:
    """``_conversion`` through one compiled function for this signature (``job``: its executable, compiled ahead);
    outputs that are inputs unchanged are handed on as they are."""
    fn, passthrough = _compiled(st, _signature(a), s)
    out = {name: a[part] for name, part in passthrough.items()}
    if fn is None:
        return out
    args = [x for _, x in sorted(a.items())]
    exe = None
    if job is not None:
        try:
            exe = job.result()
        except Exception:  # noqa: BLE001  compiled ahead or not, the jitted function gives the same result (or error)
            exe = None
    if exe is not None:
        try:
            out.update(exe(*args))
            return out
        except (TypeError, ValueError):  # arrays laid out unlike the signature it was compiled for
            pass
    out.update(fn(*args))
    return out


def _ready(job: Future | None) -> bool:
    """Whether a module's conversion can run without waiting for its compile (none started, or done)."""
    return job is None or job.done()


def _nbytes(arrays: dict[str, jax.Array]) -> int:
    return sum(x.nbytes for x in arrays.values())


def _dtype_name(safetensors_dtype: str) -> str:
    np_name = DTYPES[safetensors_dtype][0]
    return np.dtype(np_name).name if np_name else jnp.dtype(_JAX_DTYPES[safetensors_dtype]).name


#: (static, signature, sharding) -> the compiled executable, for every load in this process
_EXECUTABLES: dict[tuple[Any, ...], Any] = {}


def _executable(st: _Static, signature: tuple[Any, ...], s: Sharding) -> Any:
    """The conversion of one signature compiled ahead of its arrays (from shapes, dtypes and shardings), or None
    where nothing is computed. JAX's persistent compilation cache serves it where enabled."""
    key = (st, signature, s)
    if key not in _EXECUTABLES:
        fn, _ = _compiled(st, signature, s)
        specs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=sh) for _, shape, dt, sh in signature]
        _EXECUTABLES[key] = None if fn is None else fn.lower(*specs).compile()  # type: ignore[attr-defined]
    return _EXECUTABLES[key]


@functools.lru_cache(maxsize=256)
def _compiled(st: _Static, signature: tuple[Any, ...], s: Sharding) -> tuple[Callable[..., Any] | None, dict[str, str]]:
    """The jitted conversion of one signature, and which outputs are just inputs (part names). One per distinct
    signature: the modules of one shape share it, and jit's own cache keeps it from retracing."""
    parts = [part for part, *_ in signature]
    avals = [jax.ShapeDtypeStruct(shape, jnp.dtype(dt)) for _, shape, dt, _ in signature]

    def full(*arrays: Any) -> dict[str, Any]:
        return _conversion(st, dict(zip(parts, arrays)))

    jaxpr, shapes = jax.make_jaxpr(full, return_shape=True)(*avals)  # a trace on shapes alone: no device work
    names = sorted(shapes)  # the order jax flattens a dict in
    invars = list(jaxpr.jaxpr.invars)
    passthrough = {name: parts[next(j for j, i in enumerate(invars) if i is v)] for name, v in zip(names, jaxpr.jaxpr.outvars)
                   if any(v is i for i in invars)}
    computed = [name for name in names if name not in passthrough]
    if not computed:
        return None, passthrough

    def body(*arrays: Any) -> dict[str, Any]:
        out = full(*arrays)
        return {name: out[name] for name in computed}

    shardings = [sh for *_, sh in signature]
    out_shardings = {name: _like(s, len(shapes[name].shape)) for name in computed}
    mesh = s.mesh if isinstance(s, NamedSharding) else None
    # an act-order g_idx indexes groups across the whole matrix: that one is left to XLA's partitioner
    local = mesh is not None and mesh.size > 1 and all(isinstance(sh, NamedSharding) and sh.mesh == mesh for sh in shardings)
    if local and not (st.layout == "dequantized" and not st.trivial_g):
        from packq.backends.jax import _SHARD_KW, _shard_map

        in_specs = tuple(_full_spec(sh, len(shape)) for (_, shape, _, sh) in signature)
        out_specs = {name: out_shardings[name].spec for name in computed}  # type: ignore[attr-defined]
        mapped = _shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_SHARD_KW)  # type: ignore[call-overload]
        return jax.jit(mapped), passthrough
    if mesh is None or mesh.size == 1:
        return jax.jit(body), passthrough
    return jax.jit(body, out_shardings=out_shardings), passthrough


#: PJRT's CPU client uses host memory aligned to this many bytes in place, rather than copying it
_ALIGN = 64


def _host_path() -> bool:
    """The host path is on unless ``PACKQ_JAX_HOST=0`` (read at each load: the XLA path, for comparison)."""
    return os.environ.get("PACKQ_JAX_HOST", "1") != "0"


def _on_cpu(s: Sharding) -> bool:
    return all(getattr(d, "platform", None) == "cpu" for d in s.device_set)


@contextlib.contextmanager
def _host_kernels(converting: bool, nbytes: int) -> Iterator[None]:
    """While the host path converts, as ``packq convert`` does: never waiting for numba's kernels (0.7-1 s to
    import and load from its cache, more than the ufuncs take for a few GB); loading them on a thread, the
    ufuncs converting meanwhile (the same bits), only for quantized weights of ``KERNELS_FROM_BYTES`` or more."""
    if not converting:
        yield
        return
    from packq.backends.numpy import deferred_kernels
    from packq.checkpoint.convert import KERNELS_FROM_BYTES

    with deferred_kernels(load=nbytes >= KERNELS_FROM_BYTES):
        yield


def _np_dtype(info: TensorInfo) -> np.dtype:
    np_name = DTYPES[info.dtype][0]  # (a dtype JAX cannot take was refused by check())
    return np.dtype(np_name).newbyteorder("<") if np_name else np.dtype(_JAX_DTYPES[info.dtype])


def _bounds(index: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape)) if index else tuple((0, d) for d in shape)


def _one_run(key: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> bool:
    """Whether a block is one contiguous run of its tensor's bytes: whole in every dimension after the first
    it does not take whole, and a single index before it."""
    partial = [d for d, ((a, b), n) in enumerate(zip(key, shape)) if (a, b) != (0, n)]
    return not partial or all(b - a == 1 for a, b in key[: partial[0]]) and all(
        (a, b) == (0, n) for (a, b), n in zip(key[partial[0] + 1 :], shape[partial[0] + 1 :]))


#: blocks of this many bytes or more are private anonymous memory mapped for each (NumPy's allocator advises the kernel
#: to back its arrays from 4 MiB with huge pages)
_MAPPED_FROM = 4 << 20
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def _aligned(shape: Sequence[int], dt: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ``_ALIGN`` bytes.

    From ``_MAPPED_FROM`` bytes, private anonymous memory mapped for it alone (page-aligned), without the huge pages
    NumPy asks for: these blocks are written once, and with transparent huge pages on ``madvise`` a huge page's first
    touch costs 4x what its 512 small pages cost where the machine has not used that memory since it started (1 GB:
    1.16 s against 0.27-0.31 s in small pages, measured on this project's 2-core VM, whose dequantized loads took 4.3
    s so), and a shared mapping's pages (Python's default) 1.6x a private one's."""
    n = math.prod(shape) * dt.itemsize
    if n >= _MAPPED_FROM and _MAP_FLAGS:
        return np.frombuffer(mmap.mmap(-1, n, flags=_MAP_FLAGS), dt, count=math.prod(shape)).reshape(tuple(shape))
    raw = np.empty(n + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + n].view(dt).reshape(tuple(shape))


def _owned(x: np.ndarray, scratch: Sequence[np.ndarray] = ()) -> np.ndarray:
    """``x`` as a block PJRT may keep: C-contiguous, aligned, not in a reused buffer, and not a view that would
    keep a larger array alive; else an aligned copy."""
    if x.dtype.name in ("int4", "uint4") and x.flags.c_contiguous and not any(np.may_share_memory(x, b) for b in scratch):
        return x  # PJRT copies 4-bit arrays whatever their alignment: a copy here would be a second one
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    if (x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0 and root.nbytes <= x.nbytes + _ALIGN
            and not any(np.may_share_memory(x, b) for b in scratch)):
        return x
    out = _aligned(x.shape, x.dtype)
    np.copyto(out, x)
    return out


#: dtypes PJRT's CPU client holds packed, two or more values a byte: it always copies them from host memory
_PACKED = ("int4", "uint4", "int2", "uint2")


def _assemble(shape: tuple[int, ...], sharding: Sharding, placed: list[jax.Array]) -> jax.Array:
    """One jax.Array from its addressable devices' single-device arrays (already put), checked against its plan."""
    for x in placed:
        if x.shape != sharding.shard_shape(shape):
            raise AssertionError(f"packq: a block of shape {x.shape}, where {sharding} of {shape} takes {sharding.shard_shape(shape)}")
    return jax.make_array_from_single_device_arrays(shape, sharding, placed)


def _put(shape: tuple[int, ...], sharding: Sharding, blocks: dict[Any, np.ndarray]) -> jax.Array:
    """One jax.Array from each addressable device's block (devices that share a block share its memory)."""
    for d, b in blocks.items():
        if b.shape != sharding.shard_shape(shape):  # a conversion unlike its plan: never a silently wrong array
            raise AssertionError(f"packq: a block of shape {b.shape} for {d}, where {sharding} of {shape} takes "
                                 f"{sharding.shard_shape(shape)}")
    by_index: dict[tuple[tuple[int, int], ...], np.ndarray] = {}
    for d, ix in sharding.addressable_devices_indices_map(shape).items():
        if by_index.setdefault(_bounds(ix, shape), blocks[d]) is not blocks[d]:
            raise AssertionError(f"packq: two blocks for the index {ix} of {sharding}")
    return jax.make_array_from_callback(shape, sharding, lambda ix: by_index[_bounds(ix, shape)])


def _full_spec(s: NamedSharding, ndim: int) -> PartitionSpec:
    spec = tuple(s.spec)
    return PartitionSpec(*(spec + (None,) * (ndim - len(spec))))


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    return x if dtype is None else x.astype(dtype)


def _check_rank(name: str, shape: tuple[int, ...], s: Sharding) -> None:
    """A partition spec with more entries than the tensor has dimensions is refused, not truncated."""
    if isinstance(s, NamedSharding) and len(tuple(s.spec)) > len(shape):
        raise ValueError(f"{name}: the sharding's partition spec {s.spec} has more entries than the tensor's "
                         f"{len(shape)} dimensions (shape {shape})")


def _check_split(name: str, shape: tuple[int, ...], s: Sharding, units: tuple[int, int]) -> None:
    """Each split dimension must divide evenly, into whole packed words (``units``) and whole groups."""
    if not isinstance(s, NamedSharding):
        return
    _check_rank(name, shape, s)
    spec = tuple(s.spec) + (None,) * max(0, len(shape) - len(tuple(s.spec)))
    for d, entry in enumerate(spec[: len(shape)]):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        parts = math.prod(s.mesh.shape[a] for a in axes)
        if parts == 1:
            continue
        unit = units[0] if d == len(shape) - 2 else units[1] if d == len(shape) - 1 else 1
        size = shape[d] / parts
        if shape[d] % parts or (shape[d] // parts) % unit:
            why = (f"a shard must hold whole groups of {unit} packed words (values straddle words)" if unit > 1
                   else "packed words and quantization groups cannot be cut")
            raise ValueError(f"{name}: shape {shape} split over mesh axes {axes} into {parts} shards of {size:g} "
                             f"along dimension {d}; the shard size must be a whole number ({why})")


__all__ = ["LAYOUTS", "load"]
