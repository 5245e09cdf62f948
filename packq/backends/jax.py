"""JAX backend: the array-API core under ``jax.jit``, non-array arguments static.

Each (core function, static arguments) pair is compiled once per input shape
and dtype, as ``jax.jit`` does; called inside a caller's own ``jit``, the core
is simply traced into the caller's computation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from packq.backends import Backend
from packq.formats import awq


@functools.cache
def _jitted(fn: Callable[..., Any], static: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    return jax.jit(functools.partial(fn, jnp, **dict(static)))


class JaxBackend(Backend):
    name = "jax"
    # XLA fuses the nibble transpose into one pass; the plain composition
    # materialises the unpacked values.
    fast_paths = {
        awq.weight_to_gptq: awq.weight_to_gptq_transposed,
        awq.weight_to_awq: awq.weight_to_awq_transposed,
    }

    def call(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        return _jitted(fn, tuple(sorted(static.items())))(*arrays)

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer)

    def as_int32(self, x: Any) -> Any:
        return jax.lax.bitcast_convert_type(x, jnp.int32)


BACKEND = JaxBackend(jnp)
