"""packq.interop: the torch side of packq, through DLPack.

``to_torch`` and ``from_torch`` share buffers between NumPy or JAX and torch
without copying (CPU and CUDA alike); ``exllama_tensors`` turns AWQ tensors of
any backend into the GPTQ tensors that ExLlama's kernels take, converting on
the data's own device (under ``jax.jit`` for JAX arrays) and handing the
result over zero-copy. torch is imported only when these functions run.
"""

from __future__ import annotations

from packq.interop.dlpack import from_torch, to_torch
from packq.interop.exllama import ExllamaTensors, exllama_tensors

__all__ = ["ExllamaTensors", "exllama_tensors", "from_torch", "to_torch"]
