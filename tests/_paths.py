"""Switch packq's C kernels on or off inside a test, so that one property checks both routes to the same bytes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

#: the routes a property runs: the C kernels (packq/backends/_ckernels.c), and the NumPy/numba paths without them
ROUTES = ("C", "no C")


@contextlib.contextmanager
def route(name: str) -> Iterator[None]:
    """Within: packq's C kernels on ("C": where the extension was built, which
    tests/test_ckernels.py::test_the_c_extension_is_built requires wherever a C compiler exists) or off ("no C")."""
    from packq.backends import numpy as numpy_backend

    if name == "C":
        yield
        return
    with pytest.MonkeyPatch.context() as m:
        m.setattr(numpy_backend, "c_kernels", lambda: None)
        yield
