"""One backend fixture for every test, the golden fixtures, and hypothesis profiles.

Backends: numpy; jax (the public call, which jits the core); jax-traced (the
public call inside the caller's own ``jax.jit``, so the core is traced into
it); torch; array_api_strict. Every golden fixture runs on all of them and
must agree bit for bit, with the array type and dtype checked too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures"
# needs JAX started with 8 virtual devices: run in its own process by test_sharding.py
collect_ignore = ["multidevice", "multiprocess", "triton_interpreted"]

settings.register_profile(
    "quick", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--thorough", action="store_true", help="run hypothesis properties with thousands of examples each"
    )
    parser.addoption(
        "--real-loaders", action="store_true",
        help="run the real_loaders tests (GPTQModel and transformers must be installed; minutes on a CPU)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--real-loaders"):
        return
    skip = pytest.mark.skip(reason="opt-in: pytest --real-loaders (needs gptqmodel and transformers)")
    for item in items:
        if "real_loaders" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--thorough"):
        settings.load_profile("thorough")


class Lib:
    """How one backend makes arrays, calls packq, and reads results back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @property
    def module(self) -> Any:
        if self.name == "numpy":
            return np
        if self.name.startswith("jax"):
            import jax.numpy as jnp

            return jnp
        if self.name == "torch":
            import torch

            return torch
        import array_api_strict

        return array_api_strict

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A NumPy array (or raw float bits, with ``dtype``) in this library."""
        a = np.asarray(a)
        if dtype is not None:
            a = float_from_bits(a, dtype)
        if self.name == "numpy":
            return a.copy()
        if self.name.startswith("jax"):
            import jax.numpy as jnp

            return jnp.asarray(a)
        if self.name == "torch":
            import torch

            if dtype == "bfloat16":
                return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
            return torch.from_numpy(a.copy())
        import array_api_strict

        if str(a.dtype) in ("float16", "bfloat16"):
            pytest.skip("array_api_strict has no 16-bit floats")
        return array_api_strict.asarray(a)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.name == "jax-traced":
            # trace only the arrays; directions, orders and widths stay Python values
            return _traced(fn, args, kwargs)
        return fn(*args, **kwargs)

    def is_native(self, x: Any) -> bool:
        if self.name == "numpy":
            return type(x) is np.ndarray
        if self.name.startswith("jax"):
            import jax

            return isinstance(x, jax.Array)
        if self.name == "torch":
            import torch

            return isinstance(x, torch.Tensor)
        import array_api_strict

        return isinstance(x, array_api_strict._array_object.Array)

    def numpy(self, x: Any) -> np.ndarray:
        if self.name == "torch":
            import torch

            if x.dtype == torch.bfloat16:
                return x.view(torch.int16).numpy().view(float_dtype("bfloat16"))
            return x.numpy()
        if self.name == "array_api_strict":
            return np.asarray(x._array)
        return np.asarray(x)


_TRACED: dict[str, Any] = {}


def _traced(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn`` under ``jax.jit`` with its jax.Array arguments traced, compiled once per shape."""
    import jax

    slots = tuple(i for i, a in enumerate(args) if isinstance(a, jax.Array))
    key = repr((fn, slots, [None if i in slots else a for i, a in enumerate(args)], sorted(kwargs.items())))
    if key not in _TRACED:

        def traced(*arrays: Any) -> Any:
            full = list(args)
            for i, a in zip(slots, arrays):
                full[i] = a
            return fn(*full, **kwargs)

        _TRACED[key] = (slots, jax.jit(traced))
    slots, jitted = _TRACED[key]
    return jitted(*[args[i] for i in slots])


BACKENDS = ["numpy", "jax", "jax-traced", "torch", "array_api_strict"]


@pytest.fixture(params=BACKENDS, scope="session")
def lib(request: pytest.FixtureRequest) -> Lib:
    return Lib(request.param)


def float_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def float_from_bits(bits: np.ndarray, name: str) -> np.ndarray:
    return bits.view(float_dtype(name)) if bits.dtype.kind in "iu" and name != str(bits.dtype) else bits


def assert_same(lib: Lib, actual: Any, expected: np.ndarray, dtype: str | None = None) -> None:
    """Same array type as the backend, same dtype name, same shape, same bits."""
    assert lib.is_native(actual), f"{lib}: result is a {type(actual).__name__}"
    got = lib.numpy(actual)
    want = np.asarray(expected)
    if dtype is not None:
        want = float_from_bits(want, dtype)
    assert str(got.dtype) == str(want.dtype), f"{lib}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{lib}: shape {got.shape}, expected {want.shape}"
    if got.dtype.kind == "f" or dtype is not None:  # compare floats by their bits
        got, want = got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}")
    np.testing.assert_array_equal(got, want)


@functools.cache
def _golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "golden.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    return _golden()


def golden_keys(prefix: str, suffix: str) -> list[str]:
    """Fixture case names: keys 'prefix/<case>/suffix'."""
    return sorted(k[len(prefix) + 1 : -len(suffix) - 1] for k in _golden() if k.startswith(prefix + "/") and k.endswith("/" + suffix))
