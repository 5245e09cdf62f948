"""JAX backend: the array-API core under ``jax.jit``, non-array arguments static.

Each (core function, static arguments) pair is compiled once per input shape
and dtype, as ``jax.jit`` does; called inside a caller's own ``jit``, the core
is simply traced into the caller's computation.

Sharded inputs (``jax.Array`` with a ``NamedSharding`` over a mesh of several
devices) run under ``shard_map``: every conversion here is local to a block of
whole packed words and whole quantization groups, so each device converts its
own shard and the compiled program holds no collective at all. The result
keeps the input's sharding (rows stay row-sharded, columns column-sharded).
A split that would cut a packed word or a group is refused before compiling.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from packq.backends import Backend
from packq.core import bits as B
from packq.formats import awq, gptq

try:  # jax >= 0.6
    from jax import shard_map as _shard_map

    _SHARD_KW = {"check_vma": False}
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore[no-redef]

    _SHARD_KW = {"check_rep": False}


def _units(fn: Callable[..., Any], shapes: list[tuple[int, ...]], static: dict[str, Any]) -> list[tuple[int, int, str]]:
    """For each argument, the (rows, columns) a shard must hold a multiple of, and why."""
    bits = static.get("bits", 4)
    n_values, n_words = B.layout(bits)
    if fn is B.pack:
        u = (n_values, 1) if static["direction"] == "row" else (1, n_values)
        return [(*u, f"{n_values} {bits}-bit values fill {n_words} word(s)")]
    if fn is B.unpack_as:
        u = (n_words, 1) if static["direction"] == "row" else (1, n_words)
        return [(*u, f"{bits}-bit values straddle {n_words} words")]
    if fn is B.apply_order:
        u = (8, 1) if static["direction"] == "row" else (1, 8)
        return [(*u, "the order applies to groups of 8")]
    if fn is awq.weight_to_gptq:
        return [(8, 1, "8 rows pack into one GPTQ word")]
    if fn is awq.weight_to_awq:
        return [(1, 8, "8 columns pack into one AWQ word")]
    if fn in (awq.zeros_to_gptq, awq.zeros_to_awq, gptq.zeros_word_add):
        return [(1, 1, "")]
    if fn is gptq.zeros_shift:
        return [(1, n_words, f"{bits}-bit zeros straddle {n_words} words")]
    if fn in (gptq.dequantize_awq, gptq.dequantize_gptq):
        groups = shapes[2][-2]
        rows = shapes[0][-2] // groups  # rows of qweight per group
        why = "a shard must hold whole quantization groups"
        return [(rows, 1, why), (1, 1, why), (1, 1, why)]
    raise NotImplementedError(fn)


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded(x: Any) -> NamedSharding | None:
    s = getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer) or not isinstance(s, NamedSharding) or s.mesh.size == 1:
        return None
    return s


def _spec(s: NamedSharding, ndim: int) -> tuple[Any, ...]:
    spec = tuple(s.spec)
    return spec + (None,) * (ndim - len(spec))


def _check_split(fn, arrays, specs, mesh, static) -> None:
    """Refuse a split that cuts a packed word or a group; all inputs must split rows and columns alike."""
    shapes = [tuple(a.shape) for a in arrays]
    base = specs[0]
    for shape, spec, (ru, cu, why) in zip(shapes, specs, _units(fn, shapes, static)):
        if spec[:-2] != base[:-2] or _axes(spec[-2]) != _axes(base[-2]) or _axes(spec[-1]) != _axes(base[-1]):
            raise ValueError(
                f"all inputs must be sharded alike over the mesh (rows with rows, columns with columns), "
                f"got partition specs {PartitionSpec(*base)} and {PartitionSpec(*spec)}"
            )
        for axis, unit, what in ((-2, ru, "rows"), (-1, cu, "columns")):
            parts = math.prod(mesh.shape[a] for a in _axes(spec[axis]))
            if parts == 1:
                continue
            if shape[axis] % parts or (shape[axis] // parts) % unit:
                local = shape[axis] / parts
                raise ValueError(
                    f"an input of shape {shape} is split over mesh axes {_axes(spec[axis])} into {parts} shards "
                    f"of {local:g} {what}; the shard size must be a multiple of {unit} ({why})"
                )


def _body(fn: Callable[..., Any], static: tuple[tuple[str, Any], ...], absent: tuple[int, ...]) -> Callable[..., Any]:
    """``fn(jnp, *arrays, **static)`` taking only the arrays that are not None."""

    def body(*arrays: Any) -> Any:
        full = list(arrays)
        for i in absent:  # optional arguments given as None (g_idx) stay None inside
            full.insert(i, None)
        return fn(jnp, *full, **dict(static))

    return body


@functools.cache
def _jitted(fn: Callable[..., Any], static: tuple[tuple[str, Any], ...], absent: tuple[int, ...]) -> Callable[..., Any]:
    return jax.jit(_body(fn, static, absent))


@functools.cache
def _sharded_fn(fn, static, mesh, specs, absent: tuple[int, ...]) -> Callable[..., Any]:
    in_specs = tuple(PartitionSpec(*s) for s in specs)
    body = _body(fn, static, absent)
    return jax.jit(_shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=in_specs[0], **_SHARD_KW))  # type: ignore[call-overload]


@functools.cache
def _jitted_all(key: tuple[tuple[Callable[..., Any], tuple[tuple[str, Any], ...], int], ...]) -> Callable[..., Any]:
    def body(*flat: Any) -> tuple[Any, ...]:
        out, i = [], 0
        for fn, static, n in key:
            out.append(fn(jnp, *flat[i : i + n], **dict(static)))
            i += n
        return tuple(out)

    return jax.jit(body)


#: functions whose result is laid out like their first input, so that shard_map applies
_LOCAL = {B.pack, B.unpack_as, B.apply_order, awq.weight_to_gptq, awq.weight_to_awq, awq.zeros_to_gptq,
          awq.zeros_to_awq, gptq.zeros_shift, gptq.zeros_word_add, gptq.dequantize_awq, gptq.dequantize_gptq}


# The weight conversions as XLA likes them on the CPU: every output byte is two
# nibbles of one column from two neighbouring rows, computed straight from the
# input words, so the whole conversion is one vectorised elementwise loop over
# the output bytes (4096 x 11008: 1.5 ms, about one copy of the bytes, against
# 7-14 ms for the nibble transpose and 120 ms for the plain composition; this
# project's 2-core machines, benchmarks/results/cpu.txt). JAX-only: the array
# API has no bit-cast between int32 words and their bytes.


def _shifts(shape: tuple[int, ...], axis: int, slot: bool) -> Any:
    """Nibble shifts along ``axis``: of the AWQ slot holding GPTQ column c (``slot``), else 4 * index."""
    i = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    if slot:  # column c sits in AWQ slot REVERSE_AWQ_PACK_ORDER[c] = (c >> 1) | (c & 1) << 2
        i = (i >> 1) | ((i & 1) << 2)
    return i << 2


def _bytes(lo: Any, hi: Any, shift: Any) -> Any:
    """Bytes of nibble pairs: the nibble at ``shift`` of ``lo`` low, of ``hi`` high."""
    return (((lo >> shift) & 15) | (((hi >> shift) & 15) << 4)).astype(jnp.uint8)


def weight_to_gptq_bytes(_: Any, qweight: Any) -> Any:
    """AWQ (..., K, N/8) -> GPTQ (..., K/8, N): byte b of GPTQ word (g, 8j + c) holds rows 8g + 2b, 8g + 2b + 1."""
    *lead, k, c = qweight.shape
    s = jax.lax.bitcast_convert_type(qweight, jnp.uint32).reshape(*lead, k // 8, 4, 2, c)  # (g, b, row pair, j)
    lo, hi = (jnp.swapaxes(s[..., i, :], -1, -2)[..., :, None, :] for i in (0, 1))  # (g, j, 1, b)
    out = _bytes(lo, hi, _shifts((*lead, k // 8, c, 8, 4), len(lead) + 2, slot=True))  # (g, j, column, b)
    return jax.lax.bitcast_convert_type(out, jnp.int32).reshape(*lead, k // 8, 8 * c)


def weight_to_awq_bytes(_: Any, qweight: Any) -> Any:
    """GPTQ (..., K/8, N) -> AWQ (..., K, N/8): byte b of AWQ word (8g + r, j) holds slots 2b, 2b + 1 of row r."""
    *lead, g, n = qweight.shape
    c = n // 8
    # GPTQ column 4x + 2y + z is AWQ slot 2b + y with b = x + 2z (AWQ_PACK_ORDER)
    s = jax.lax.bitcast_convert_type(qweight, jnp.uint32).reshape(*lead, g, c, 2, 2, 2)
    lo, hi = (jnp.swapaxes(s[..., y, :], -1, -2).reshape(*lead, g, 1, c, 4) for y in (0, 1))
    out = _bytes(lo, hi, _shifts((*lead, g, 8, c, 4), len(lead) + 1, slot=False))  # (g, r, j, b)
    return jax.lax.bitcast_convert_type(out, jnp.int32).reshape(*lead, 8 * g, c)


# Dequantization on GPUs: Pallas kernels (packq.backends.pallas_kernels) where the tiles fit, since XLA's
# fusion of any formulation below writes the float16 output at about 1.6 TB/s on an H200 (8192 x 28672:
# 0.29 ms, 1.3x a device copy of the output, against 0.17 ms for the kernels; every width, with or
# without act-order, stacked experts folded into the rows); elsewhere (ragged shapes, scales of other
# dtypes, other platforms) every field spread by one broadcast shift (the core at 3 bits): q[..., r, 8j + t] is the nibble
# 4 * slot(t) of word (r, j) (AWQ), q[..., 8i + f, n] the field ``bits * f`` of word (i, n) (GPTQ at
# 2, 4 and 8 bits), so the unpack is a single elementwise expression of the output index that XLA
# fuses with the subtraction, the conversion and the product into one loop over the output. The core
# stacks one array per field instead. The arithmetic is the core's (``gptq._scale``), so the bits are.


def _spread(words: Any, axis: int, bits: int, slots: bool) -> Any:
    """Fields of int32 words along ``axis`` (-1: columns, -2: rows), as int32 values, the axis grown by 32 // bits;
    ``slots``: in AWQ's slot order (column t of each 8 in nibble (t >> 1) | (t & 1) << 2)."""
    per = 32 // bits
    f = jnp.arange(per, dtype=jnp.int32)
    if slots:
        f = (f >> 1) | ((f & 1) << 2)
    shift = f * bits
    *lead, r, c = words.shape
    if axis == -1:
        v = (words[..., :, :, None] >> shift) & ((1 << bits) - 1)
        return v.reshape(*lead, r, c * per)
    v = (words[..., :, None, :] >> shift[:, None]) & ((1 << bits) - 1)
    return v.reshape(*lead, r * per, c)


def _merged(x: Any) -> Any:
    """Leading (expert) dimensions folded into the rows: every expert's K is whole groups, so row tile i of the
    merged matrix still takes group i // (tiles per group) of the merged zeros and scales."""
    return x.reshape(-1, x.shape[-1])


def _pallas(scales: Any) -> Any:
    """The Pallas kernels, where they apply (a GPU, 16/32-bit float scales), else None."""
    if jax.default_backend() != "gpu" or scales.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        return None
    try:
        from packq.backends import pallas_kernels
    except ImportError:  # pragma: no cover - a jax without Pallas
        return None
    return pallas_kernels


def dequantize_awq_spread(_: Any, qweight: Any, qzeros: Any, scales: Any) -> Any:
    pk = _pallas(scales)
    *lead, k, c = qweight.shape
    if pk is not None and pk.supported(k, c, qzeros.shape[-2], pk.BJ):
        out = pk.dequantize_awq(_merged(qweight), _merged(qzeros), _merged(scales))
        return out.reshape(*lead, k, c * 8)
    return gptq.dequantize_grouped(jnp, _spread(qweight, -1, 4, True), _spread(qzeros, -1, 4, True), scales)


def dequantize_gptq_spread(_: Any, qweight: Any, qzeros: Any, scales: Any, g_idx: Any, bits: int, zeros: str,
                           pallas: bool = True) -> Any:
    pk = _pallas(scales) if pallas else None
    *lead, kw, n = qweight.shape
    k = kw * 32 // bits
    act_order = g_idx is not None
    if pk is not None and pk.supported(k, n, qzeros.shape[-2], pk.BN, act_order):
        experts = math.prod(lead)
        out = pk.dequantize_gptq(_merged(qweight), _merged(qzeros), _merged(scales), g_idx, bits=bits, zeros=zeros,
                                 experts=experts)
        return out.reshape(*lead, k, n)
    if bits == 3:  # fields straddle words: the core
        return gptq.dequantize_gptq(jnp, qweight, qzeros, scales, g_idx, bits=bits, zeros=zeros)
    q, z = _spread(qweight, -2, bits, False), _spread(qzeros, -1, bits, False)
    if zeros == "v1":
        z = (z + 1) & ((1 << bits) - 1)
    if g_idx is None:
        return gptq.dequantize_grouped(jnp, q, z, scales)
    idx = g_idx.astype(jnp.int32)
    return gptq._scale(jnp, q, jnp.take(z, idx, axis=-2), jnp.take(scales, idx, axis=-2))


#: id of a concrete index array -> (a weak reference to it, its (minimum, maximum)): JAX arrays are immutable, so
#: a g_idx used again (every call of a layer) is not reduced and read back again; the entry goes with the array
_RANGES: dict[int, tuple[Any, tuple[int, int]]] = {}


@jax.jit
def _minmax(x: Any) -> Any:
    return jnp.stack([jnp.min(x), jnp.max(x)])


#: act-order on sharded inputs: XLA's gather, which its partitioner splits (a Pallas call would be gathered whole)
_gptq_spread_xla = functools.partial(dequantize_gptq_spread, pallas=False)


class JaxBackend(Backend):
    name = "jax"
    fast_paths = {awq.weight_to_gptq: weight_to_gptq_bytes, awq.weight_to_awq: weight_to_awq_bytes,
                  gptq.dequantize_awq: dequantize_awq_spread, gptq.dequantize_gptq: dequantize_gptq_spread}
    #: the platforms each fast path is taken on. On an H200 the core composition is the faster weight
    #: conversion (8192 x 28672: 0.072 ms, 94% of a device-to-device copy, against 0.205 ms for the
    #: bytes; benchmarks/results/h200), so GPUs keep it.
    fast_platforms = {awq.weight_to_gptq: ("cpu",), awq.weight_to_awq: ("cpu",),
                      gptq.dequantize_awq: ("gpu",), gptq.dequantize_gptq: ("gpu",)}

    def _impl(self, fn: Callable[..., Any], arrays: list[Any], plain: bool) -> Callable[..., Any]:
        if plain or fn not in self.fast_paths:
            return fn
        concrete = [a for a in arrays if a is not None and not isinstance(a, jax.core.Tracer)]
        platform = next(iter(concrete[0].devices())).platform if concrete else jax.default_backend()
        platform = "gpu" if platform in ("cuda", "rocm") else platform
        return self.fast_paths[fn] if platform in self.fast_platforms[fn] else fn

    def compiled(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Callable[..., Any]:
        """The jitted callable that ``run`` uses for these arguments; it takes the arrays that are not None."""
        key = tuple(sorted(static.items()))
        absent = tuple(i for i, a in enumerate(arrays) if a is None)
        present = [a for a in arrays if a is not None]
        impl = self._impl(fn, present, plain)
        shardings = [_sharded(a) for a in present]
        # an act-order g_idx indexes global groups: leave such a call to XLA's partitioner
        global_gather = fn is gptq.dequantize_gptq and arrays[3] is not None
        local = fn in _LOCAL and not global_gather
        if global_gather and any(shardings) and impl is dequantize_gptq_spread:
            impl = _gptq_spread_xla
        if not any(shardings) or not local:
            return _jitted(impl, key, absent)
        meshes = {s.mesh for s in shardings if s is not None}
        if len(meshes) > 1 or not all(shardings):
            raise ValueError("sharded inputs must all be laid out over the same mesh")
        mesh = meshes.pop()
        specs = tuple(_spec(s, a.ndim) for s, a in zip(shardings, present))  # type: ignore[arg-type]
        _check_split(fn, present, specs, mesh, static)
        return _sharded_fn(impl, key, mesh, specs, absent)

    def run(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Any:
        return self.compiled(fn, *arrays, plain=plain, **static)(*[a for a in arrays if a is not None])

    def run_all(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> tuple[Any, ...]:
        """One compiled call for all of them (weights and zeros together): one dispatch, not one per tensor.

        Sharded inputs and traced ones (inside the caller's jit) go call by call, as ``run`` does them.
        """
        flat = [a for _, arrays, _ in calls for a in arrays]
        if any(a is None or isinstance(a, jax.core.Tracer) or _sharded(a) for a in flat):
            return super().run_all(calls)
        key = tuple((self._impl(fn, list(arrays), False), tuple(sorted(static.items())), len(arrays))
                    for fn, arrays, static in calls)
        return _jitted_all(key)(*flat)

    def minmax_later(self, fn: Callable[..., Any], arrays: Sequence[Any], index: int) -> Callable[[], tuple[int, int]] | None:
        """Every path reads index arrays in bounds (XLA's gather clamps or fills, the Pallas kernels clamp), so the
        reduction is dispatched before the conversion and waited for after it: the device runs both back to back
        instead of idling while the host reads the range and dispatches."""
        x = arrays[index]
        if isinstance(x, jax.core.Tracer):
            return None
        known = _RANGES.get(id(x))
        if known is not None and known[0]() is x:  # a JAX array never changes: its range is read once
            return lambda: known[1]
        both = _minmax(x)
        both.copy_to_host_async()

        def wait() -> tuple[int, int]:
            lo, hi = np.asarray(both).tolist()  # the copy started above (indexing the device array would dispatch)
            key = id(x)
            try:  # (the callback runs as the array goes, before its id can be another's)
                _RANGES[key] = (weakref.ref(x, lambda _: _RANGES.pop(key, None)), (int(lo), int(hi)))
            except TypeError:  # an array type without weak references: read again next time
                pass
            return int(lo), int(hi)

        return wait

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer)

    def as_int32(self, x: Any) -> Any:
        return jax.lax.bitcast_convert_type(x, jnp.int32)


BACKEND = JaxBackend(jnp)
