"""Backends: which library runs the core for a given input, found without importing any.

A backend binds the array-API core to one library. ``for_arrays`` looks at the
inputs' types (through ``sys.modules``, so a library the caller never imported
is never imported here) and returns:

- the NumPy backend for ``numpy.ndarray``: the core through array-api-compat,
  with fast paths where measurement showed them worth it;
- the JAX backend for ``jax.Array`` (and tracers): the core under ``jax.jit``,
  with the non-array arguments static;
- the torch backend for ``torch.Tensor``: CPU tensors through the NumPy
  backend's compiled paths (shared memory, no copy), CUDA tensors through
  single-pass Triton kernels, the core eagerly otherwise;
- a generic backend for anything else array-api-compat knows (array_api_strict,
  CuPy, ...): the core run eagerly in that namespace.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any


class Backend:
    """Runs core functions ``fn(xp, *arrays, **static)`` in one namespace."""

    name = "generic"
    #: core function -> faster implementation that must agree with it bit for bit
    fast_paths: dict[Callable[..., Any], Callable[..., Any]] = {}

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def run(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Any:
        """``fn(xp, *arrays, **static)``, or its fast path unless ``plain``."""
        impl = fn if plain else self.fast_paths.get(fn, fn)
        return self.call(impl, *arrays, **static)

    def run_over(self, fn: Callable[..., Any], x: Any, **static: Any) -> Any:
        """``run(fn, x)``, written over ``x``'s own memory where the backend can (the caller gives ``x`` up: a
        buffer that is read, converted and written out, then reused); the others return a new array."""
        return self.run(fn, x, **static)

    def run_all(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> tuple[Any, ...]:
        """Several ``(fn, arrays, static)`` calls of one public function; backends that can fuse them into one
        dispatch (JAX: one compiled call; torch CUDA: one kernel launch) do."""
        return tuple(self.run(fn, *arrays, **static) for fn, arrays, static in calls)

    def call(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        return fn(self.xp, *arrays, **static)

    def minmax_later(self, fn: Callable[..., Any], arrays: Sequence[Any], index: int) -> Callable[[], tuple[int, int]] | None:
        """For a range check of ``arrays[index]`` that may finish after ``run(fn, *arrays)`` is launched: where this
        backend's ``run`` reads that array clamped into range (so that no value can read out of bounds) and its
        device runs asynchronously, start the reduction of its minimum and maximum and their copy to the host now,
        and return the function that waits for that copy alone and returns them. None: check before running."""
        return None

    def run_range_later(self, fn: Callable[..., Any], arrays: Sequence[Any], index: int,
                        **static: Any) -> tuple[Any, Callable[[], tuple[int, int]]] | None:
        """``run(fn, *arrays, **static)`` launched before the range of ``arrays[index]`` is known: the result and the
        function that returns that range, where this backend's ``run`` reads the array clamped (see
        :meth:`minmax_later`); None: check before running."""
        wait = self.minmax_later(fn, arrays, index)
        if wait is None:
            return None
        return self.run(fn, *arrays, **static), wait

    def is_concrete(self, x: Any) -> bool:
        """Whether values of ``x`` can be read now (False for a tracer inside jit)."""
        return True

    def as_int32(self, x: Any) -> Any:
        """Reinterpret uint32 words as int32, bit for bit (no copy where the library allows)."""
        import array_api_compat  # on use: packq's import stays free of it (0.05-0.1 s)

        if array_api_compat.is_torch_array(x):
            import torch

            return x.view(torch.int32)
        # the standard has no bit-cast; out-of-range casts wrap in the libraries we test
        return self.xp.astype(x, self.xp.int32)


def _is_jax(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)


#: array type -> its library's name, as types are seen (the checks cost microseconds a call)
_LIBRARIES: dict[type, str] = {}


def _library(x: Any) -> str:
    library = _LIBRARIES.get(type(x))
    if library is None:
        library = _LIBRARIES[type(x)] = "jax" if _is_jax(x) else type(x).__module__.split(".")[0]
    return library


def for_arrays(**arrays: Any) -> Backend:
    """The backend for these named inputs (None entries ignored); all must share one library."""
    libraries = {name: _library(a) for name, a in arrays.items() if a is not None}
    library = next(iter(libraries.values()))
    if any(lib != library for lib in libraries.values()):
        got = ", ".join(f"{name}: {type(arrays[name]).__name__} ({lib})" for name, lib in libraries.items())
        raise TypeError(f"{' and '.join(libraries)} must come from the same array library, got {got}")
    if len(libraries) > 1 and library in ("jax", "torch"):
        _same_devices({name: arrays[name] for name in libraries}, library)
    backend = _BACKENDS.get(library)
    if backend is None and library in ("jax", "numpy", "torch"):  # imported on first use only
        backend = _BACKENDS[library] = importlib.import_module(f"packq.backends.{library}").BACKEND
    if backend is not None:
        return backend
    import array_api_compat

    return Backend(array_api_compat.array_namespace(*(arrays[name] for name in libraries)))


def _devices(x: Any, library: str) -> Any:
    """Where an array lives: a JAX array's set of devices (None for a tracer: jit places it), a torch tensor's device."""
    if library == "torch":
        return x.device
    try:
        return frozenset(x.devices())
    except Exception:  # a tracer inside jit, or an array without placement: nothing to compare
        return None


def _same_devices(arrays: dict[str, Any], library: str) -> None:
    """Inputs on different devices would fail inside the library (a JAX internal error); refuse them by name."""
    where = {name: _devices(a, library) for name, a in arrays.items()}
    placed = {name: d for name, d in where.items() if d is not None}
    if len(set(placed.values())) > 1:
        def show(d: Any) -> str:
            return str(d) if library == "torch" else ", ".join(sorted(map(str, d)))

        got = ", ".join(f"{name} on {show(d)}" for name, d in placed.items())
        raise ValueError(f"{' and '.join(placed)} must be on the same device(s), got {got}")


#: library name -> its backend, once imported
_BACKENDS: dict[str, Backend] = {}
