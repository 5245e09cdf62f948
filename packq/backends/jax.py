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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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
    if fn in (awq.zeros_to_gptq, awq.zeros_to_awq):
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


#: functions whose result is laid out like their first input, so that shard_map applies
_LOCAL = {B.pack, B.unpack_as, B.apply_order, awq.weight_to_gptq, awq.weight_to_awq, awq.zeros_to_gptq,
          awq.zeros_to_awq, gptq.zeros_shift, gptq.dequantize_awq, gptq.dequantize_gptq}


class JaxBackend(Backend):
    name = "jax"
    # On the CPU, XLA runs the nibble transpose 11x faster than the plain
    # composition (4096 x 11008: 11 ms against 122 ms, this project's 2-core
    # machines). On an H200 the plain composition is the faster one (8192 x 28672:
    # 0.084 ms against 0.133 ms; benchmarks/results/h200), so GPUs keep it.
    fast_paths = {
        awq.weight_to_gptq: awq.weight_to_gptq_transposed,
        awq.weight_to_awq: awq.weight_to_awq_transposed,
    }
    fast_platforms = ("cpu",)

    def _impl(self, fn: Callable[..., Any], arrays: list[Any], plain: bool) -> Callable[..., Any]:
        if plain or fn not in self.fast_paths:
            return fn
        concrete = [a for a in arrays if not isinstance(a, jax.core.Tracer)]
        platform = next(iter(concrete[0].devices())).platform if concrete else jax.default_backend()
        return self.fast_paths[fn] if platform in self.fast_platforms else fn

    def compiled(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Callable[..., Any]:
        """The jitted callable that ``run`` uses for these arguments; it takes the arrays that are not None."""
        key = tuple(sorted(static.items()))
        absent = tuple(i for i, a in enumerate(arrays) if a is None)
        present = [a for a in arrays if a is not None]
        impl = self._impl(fn, present, plain)
        shardings = [_sharded(a) for a in present]
        # an act-order g_idx indexes global groups: leave such a call to XLA's partitioner
        local = fn in _LOCAL and not (fn is gptq.dequantize_gptq and arrays[3] is not None)
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

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer)

    def as_int32(self, x: Any) -> Any:
        return jax.lax.bitcast_convert_type(x, jnp.int32)


BACKEND = JaxBackend(jnp)
