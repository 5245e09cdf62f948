"""Argument checks shared by the public functions, run before any work.

Messages are one sentence naming the argument, what was expected and what
came, and they are the same for every backend (shapes as tuples of ints,
dtypes by their bare names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DIRECTIONS = ("column", "row")
BITS = (2, 3, 4, 8)


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(map(int, x.shape))


def dtype_name(dtype: Any) -> str:
    key = (type(dtype), dtype)  # the type first: dtypes of different libraries are never compared
    try:
        return _NAMES[key]
    except (KeyError, TypeError):  # not seen yet, or unhashable
        name = _dtype_name(dtype)
    try:
        _NAMES[key] = name
    except TypeError:
        pass
    return name


#: (type, dtype) -> bare name, filled as dtypes are seen (NumPy's own name lookup costs microseconds a call)
_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    if type(dtype).__module__.startswith("numpy"):  # a NumPy dtype, either byte order: ">i4" is int32
        return str(dtype.name)
    if isinstance(dtype, type):  # a Python or NumPy scalar type: bool, int, np.int32
        return dtype.__name__
    # numpy scalar types: "<class 'numpy.int32'>"; torch: "torch.int32"; array_api_strict: "array_api_strict.int32"
    return str(dtype).rsplit(".", 1)[-1].strip("'<>")


#: array type -> whether it is an array (array-api-compat asks every library it knows: microseconds a call)
_ARRAY_TYPES: dict[type, bool] = {}


def _is_array(x: Any) -> bool:
    known = _ARRAY_TYPES.get(type(x))
    if known is None:
        import array_api_compat  # here, not at import: 0.05-0.1 s of every CLI start, for calls on arrays only

        known = _ARRAY_TYPES[type(x)] = bool(array_api_compat.is_array_api_obj(x)) and hasattr(x, "ndim")
    return known


def array(x: Any, name: str, min_ndim: int = 2) -> None:
    if not _is_array(x):
        raise TypeError(f"{name} must be an array (NumPy, JAX, torch or another array API library), got {type(x).__name__}")
    # torch: sparse layouts have no strided memory to read. Only torch's: JAX 0.11's tracers have a layout too
    # (AutoLayout inside jit), which says nothing of the kind
    layout = getattr(x, "layout", None) if type(x).__module__.split(".")[0] == "torch" else None
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"{name} must be a dense array (a strided torch tensor), got layout {layout}; call .to_dense() first")
    if x.ndim < min_ndim:
        what = "(..., rows, columns)" if min_ndim == 2 else f"{min_ndim}"
        raise ValueError(f"{name} must have at least {min_ndim} dimensions {what}, got shape {shape_of(x)!r}")


def integer(x: Any, name: str) -> None:
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    if not _is_integral(xp, x.dtype):
        raise TypeError(f"{name} must have an integer dtype, got dtype {dtype_name(x.dtype)}")


def _is_integral(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "integral"))
    except (TypeError, ValueError):  # dtypes outside the standard, e.g. ml_dtypes' int4
        import numpy as np

        return np.issubdtype(np.dtype(dtype), np.integer) or dtype_name(dtype) in ("int4", "uint4", "int2", "uint2")


def words(x: Any, name: str) -> None:
    """Packed 32-bit words: int32 (what checkpoints store) or uint32."""
    array(x, name)
    if dtype_name(x.dtype) not in ("int32", "uint32"):
        raise TypeError(f"{name} must hold packed 32-bit words (dtype int32 or uint32), got dtype {dtype_name(x.dtype)}")


def floating(x: Any, name: str) -> None:
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    if dtype_name(x.dtype) != "bfloat16" and not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16 or float32), got dtype {dtype_name(x.dtype)}")


def direction(value: Any) -> str:
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be 'column' or 'row', got {value!r}")
    return str(value)


def bits(value: Any, allowed: Sequence[int] = BITS, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise ValueError(f"bits must be one of {choices}{why}, got {value!r}")
    return value


def order(value: Any) -> tuple[int, ...]:
    try:
        perm = tuple(int(i) for i in value)
    except (TypeError, ValueError):
        perm = ()
    if sorted(perm) != list(range(8)) or any(isinstance(i, bool) for i in value):
        raise ValueError(f"order must be a permutation of range(8), got {value!r}")
    return perm


def multiple(x: Any, name: str, axis: int, n: int, why: str) -> None:
    length = shape_of(x)[axis]
    if length % n:
        which = "columns" if axis == -1 else "rows"
        raise ValueError(
            f"{name} must have a number of {which} that is a multiple of {n} ({why}), got shape {shape_of(x)!r}"
        )


def same_batch(a: Any, a_name: str, b: Any, b_name: str) -> None:
    if shape_of(a)[:-2] != shape_of(b)[:-2]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same leading (batch) dimensions, "
            f"got shapes {shape_of(a)!r} and {shape_of(b)!r}"
        )
