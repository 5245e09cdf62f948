"""torch backend: CPU tensors through the NumPy backend's compiled paths, CUDA tensors through Triton.

The array-API core runs eagerly on torch one kernel per operation: 2.7 s on a 4096 x 11008
layer on a 2-core CPU, where the seed takes 0.5 s. So torch is a backend of its own:

- CPU tensors share their memory with NumPy (``Tensor.numpy()``, no copy, strides kept), run
  through the NumPy backend (its numba kernels, else its blocked ufuncs, for every core
  function), and come back with ``torch.from_numpy`` (no copy);
- CUDA tensors run the weight and zero-point conversions as single-pass Triton kernels
  (:mod:`packq.backends.triton_kernels`; Triton ships with CUDA builds of torch), both of a
  public call in one launch, and AWQ and GPTQ dequantization (every width, g_idx, stacked
  experts; float16, bfloat16 and float32 scales) as one kernel each;
- anything else (bfloat16 on the CPU, which NumPy lacks; other devices; CUDA without Triton;
  the other functions on CUDA) runs the core eagerly, as before.

Hypothesis properties check every path bit for bit against the core on torch itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat.torch as xp
import numpy as np
import torch

from packq.backends import Backend
from packq.backends import numpy as numpy_backend

#: torch dtypes NumPy shares memory with
_NUMPY = {torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
          torch.int64: np.int64, torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
          torch.bool: np.bool_, torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}


def _numpy_static(static: dict[str, Any]) -> dict[str, Any] | None:
    """Static arguments for NumPy: a torch dtype becomes NumPy's (None where NumPy has none)."""
    out = {}
    for k, v in static.items():
        if isinstance(v, torch.dtype):
            if v not in _NUMPY:
                return None
            v = np.dtype(_NUMPY[v])
        out[k] = v
    return out


def _to_torch(a: Any, inputs: Sequence[np.ndarray]) -> Any:
    """A NumPy result as a tensor without a copy, unless it views an input (then a copy: results never alias)."""
    if isinstance(a, tuple):
        return tuple(_to_torch(x, inputs) for x in a)
    if not isinstance(a, np.ndarray):
        return a
    if not a.flags.writeable or any(s < 0 for s in a.strides) or any(np.may_share_memory(a, x) for x in inputs):
        a = np.array(a)
    return torch.from_numpy(a)


@functools.cache
def triton_kernels() -> Any:
    """The Triton kernels, or None where Triton is missing."""
    try:
        from packq.backends import triton_kernels as kernels
    except ImportError:
        return None
    return kernels


class TorchBackend(Backend):
    name = "torch"
    #: devices whose tensors take the Triton kernels (tests add "cpu" to run them in Triton's interpreter)
    kernel_devices: tuple[str, ...] = ("cuda",)

    def run(self, fn: Callable[..., Any], *arrays: Any, plain: bool = False, **static: Any) -> Any:
        if plain:
            return self.call(fn, *arrays, **static)
        present = [a for a in arrays if a is not None]
        device = present[0].device.type if present else "cpu"
        if device in self.kernel_devices:
            kernels = triton_kernels()
            if kernels is not None and fn in kernels.DEQUANT:
                out = kernels.DEQUANT[fn](*arrays, **static)
                if out is not None:
                    return out
            kernel = self._cuda_kernel(fn, present)
            if kernel is not None:
                return kernel(*present, **static)
        elif device == "cpu":
            return self._on_cpu(fn, arrays, static)
        return self.call(fn, *arrays, **static)

    def minmax_later(self, fn: Callable[..., Any], arrays: Sequence[Any], index: int) -> Callable[[], tuple[int, int]] | None:
        """On CUDA, where the Triton kernel that clamps the index array will run: its minimum and maximum reduced and
        copied to the host without waiting (see ``triton_kernels.minmax_later``): the older path, taken where
        :data:`CHECK_IN_KERNEL` is False (:meth:`run_range_later` takes the range from the kernel itself)."""
        x = arrays[index]
        kernels = triton_kernels()
        if (kernels is None or x.device.type not in self.kernel_devices or fn not in kernels.CLAMPED
                or not kernels.takes(arrays)):
            return None
        return kernels.minmax_later(x)

    def run_range_later(self, fn: Callable[..., Any], arrays: Sequence[Any], index: int,
                        **static: Any) -> tuple[Any, Callable[[], tuple[int, int]]] | None:
        """On CUDA, where the Triton kernel that clamps g_idx runs: that kernel also writes g_idx's range into pinned
        host memory, which the function returned reads (see ``triton_kernels.dequantize_gptq_checked``); no
        reduction or copy of its own."""
        kernels = triton_kernels()
        x = arrays[index]
        if (kernels is not None and x.device.type in self.kernel_devices and fn in kernels.CLAMPED and index == 3
                and CHECK_IN_KERNEL):
            got = kernels.dequantize_gptq_checked(*arrays, **static)
            if got is not None:
                return got
        return super().run_range_later(fn, arrays, index, **static)

    def run_all(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]) -> tuple[Any, ...]:
        """Several core calls; on CUDA, the weight and zero conversions of one public call in one launch."""
        present = [a for _, arrays, _ in calls for a in arrays if a is not None]
        kernels = triton_kernels()
        if kernels is not None and present and all(a.device.type in self.kernel_devices for a in present):
            fused = kernels.fused(calls)
            if fused is not None:
                return fused
        return super().run_all(calls)

    def _on_cpu(self, fn: Callable[..., Any], arrays: tuple[Any, ...], static: dict[str, Any]) -> Any:
        np_static = _numpy_static(static)
        if np_static is None or any(a is not None and a.dtype not in _NUMPY for a in arrays):
            return self.call(fn, *arrays, **static)  # bfloat16, say: NumPy has no such dtype
        inputs = [None if a is None else a.detach().resolve_conj().resolve_neg().numpy() for a in arrays]
        out = numpy_backend.BACKEND.run(fn, *inputs, **np_static)
        return _to_torch(out, [x for x in inputs if x is not None])

    @staticmethod
    def _cuda_kernel(fn: Callable[..., Any], present: list[Any]) -> Callable[..., Any] | None:
        kernels = triton_kernels()
        if kernels is None or any(a.dtype != torch.int32 for a in present):
            return None
        return kernels.KERNELS.get(fn)

    def as_int32(self, x: Any) -> Any:
        return x.view(torch.int32)


#: act-order on CUDA: g_idx's range from the kernel itself (False: a reduction and a copy of its own before the
#: launch, ``triton_kernels.minmax_later``; the benchmark measures both)
CHECK_IN_KERNEL = True

BACKEND = TorchBackend(xp)
