"""Zero-copy hand-off between NumPy/JAX arrays and torch tensors, through DLPack."""

from __future__ import annotations

from typing import Any

from packq import _validate as V

#: dtypes torch takes through DLPack (ml_dtypes' bfloat16, int4, uint4, float8 are not among them for NumPy)
TORCH_DTYPES = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("packq.interop needs torch: pip install 'packq[torch]'") from None
    return torch


def _check_device(t: Any, device: Any, allow_copy: bool, name: str) -> Any:
    if device is None:
        return t
    torch = _torch()
    want = torch.device(device)
    same = t.device.type == want.type and (want.index is None or t.device.index == want.index)
    if same:
        return t
    if not allow_copy:
        raise ValueError(
            f"{name} is on {t.device}, not on the requested device {want}; pass allow_copy=True to copy it there"
        )
    return t.to(want)


def to_torch(x: Any, *, device: Any = None, allow_copy: bool = False) -> Any:
    """A NumPy or JAX array (CPU or GPU) as a torch tensor sharing its buffer.

    Parameters
    ----------
    x : numpy.ndarray or jax.Array
    device : torch device, optional
        Where the tensor must be. If the data lives elsewhere, a ``ValueError``
        is raised unless ``allow_copy`` is true.
    allow_copy : bool
        Allow a copy where sharing is impossible (another device; a read-only or
        negatively strided NumPy array).

    Returns
    -------
    torch.Tensor
        On the data's device, viewing the same memory (unless a copy was allowed and needed).

    Raises
    ------
    TypeError
        If ``x`` is not an array, or its dtype cannot travel to torch (e.g. bfloat16 or int4 NumPy arrays).
    ValueError
        If the buffer cannot be shared (read-only, negative strides) or is on
        another device than ``device``, and ``allow_copy`` is false.

    Examples
    --------
    >>> import numpy as np
    >>> from packq.interop import to_torch
    >>> a = np.arange(4, dtype=np.int32)
    >>> t = to_torch(a)
    >>> t[0] = 7
    >>> int(a[0]), t.data_ptr() == a.ctypes.data
    (7, True)
    """
    torch = _torch()
    V.array(x, "x", min_ndim=0)
    name = V.dtype_name(x.dtype)
    if name not in TORCH_DTYPES and not (name == "bfloat16" and type(x).__module__.startswith("jax")):
        raise TypeError(f"x has dtype {name}, which torch cannot take through DLPack; cast it first")
    if type(x).__module__ == "numpy":
        if not x.flags.writeable or any(s < 0 for s in x.strides):
            if not allow_copy:
                why = "read-only" if not x.flags.writeable else "negatively strided"
                raise ValueError(f"x is {why}, so its buffer cannot be shared with torch; pass allow_copy=True")
            import numpy as np

            x = np.array(x)
    try:
        t = torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError) as e:
        raise ValueError(f"x cannot be shared with torch through DLPack: {e}") from None
    return _check_device(t, device, allow_copy, "x")


def from_torch(t: Any, like: Any = "numpy") -> Any:
    """A torch tensor as a NumPy or JAX array sharing its buffer (the reverse of :func:`to_torch`).

    Parameters
    ----------
    t : torch.Tensor
    like : "numpy", "jax", or an array of either library
        The library to hand the tensor to. NumPy takes CPU tensors only.

    Returns
    -------
    numpy.ndarray or jax.Array

    Raises
    ------
    TypeError
        If ``t`` is not a torch tensor, or ``like`` names no supported library.
    ValueError
        If the tensor cannot be shared (a CUDA tensor to NumPy, say).

    Examples
    --------
    >>> import torch
    >>> from packq.interop import from_torch
    >>> t = torch.arange(3, dtype=torch.int32)
    >>> a = from_torch(t)
    >>> a.ctypes.data == t.data_ptr()
    True
    """
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    lib = like if isinstance(like, str) else ("jax" if type(like).__module__.startswith("jax") else
                                              type(like).__module__.split(".")[0])
    try:
        if lib == "numpy":
            import numpy as np

            if t.device.type != "cpu":
                raise ValueError(f"t is on {t.device}; NumPy takes CPU tensors only (use like='jax' or t.cpu())")
            return np.from_dlpack(t.detach())
        if lib == "jax":
            import jax.numpy as jnp

            return jnp.from_dlpack(t.detach())
    except (BufferError, RuntimeError) as e:
        raise ValueError(f"t cannot be shared through DLPack: {e}") from None
    raise TypeError(f"like must be 'numpy', 'jax' or an array of either, got {like!r}")
