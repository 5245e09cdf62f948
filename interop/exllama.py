"""AWQ tensors of any backend to the GPTQ tensors ExLlama's kernels take, as torch tensors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from packq.interop.dlpack import _torch, to_torch

import packq
from packq import _api, backends
from packq import _validate as V
from packq.core import bits as B
from packq.formats import awq


@dataclass
class ExllamaTensors:
    """What ExLlama's GPTQ path takes, plus what was found about zero-points of 0."""

    qweight: Any  # torch int32 (..., K/8, N), row-packed
    qzeros: Any  # torch int32 (..., groups, N/8), GPTQ v1 (z - 1)
    scales: Any  # torch float16 (..., groups, N)
    g_idx: Any  # torch int32 (K,) on the CPU, or None
    zero_point_0: int  # (group, column) pairs whose AWQ zero-point is 0
    rebiased: int  # of those, moved losslessly to zero-point 1
    unfixable: int  # of those, left as they are (a value of 15 in the group)

    def as_dict(self) -> dict[str, Any]:
        """The tensors by the names ``exllamav2.ext.make_q_matrix`` expects (g_idx left out when None)."""
        d = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.g_idx is not None:
            d["g_idx"] = self.g_idx
        return d


def exllama_tensors(
    qweight: Any,
    qzeros: Any,
    scales: Any,
    *,
    device: Any = None,
    allow_copy: bool = False,
    zero_points: str = "keep",
    unfixable: str = "error",
    with_g_idx: bool = False,
) -> ExllamaTensors:
    """Convert AWQ qweight/qzeros/scales to ExLlama's GPTQ tensors and hand them to torch.

    The conversion runs where the data is: NumPy on the CPU, JAX under
    ``jax.jit`` on its device (a GPU's arrays never visit host memory), torch
    through the generic core. The results reach torch through DLPack without a
    copy.

    Parameters
    ----------
    qweight, qzeros, scales : arrays of one library
        AWQ gemm tensors: int32 (..., K, N/8), int32 (..., groups, N/8), float (..., groups, N).
    device : torch device, optional
        Where the tensors must be; a different device needs ``allow_copy=True``.
    allow_copy : bool
        Allow copies to reach ``device``, or to cast scales to float16.
    zero_points : {"keep", "rebias"}
        Upstream exllamav2 (0.3.2) reads a stored v1 zero of 15 as 16, so a
        group whose AWQ zero-point is 0 is computed wrongly there. "keep" hands
        the tensors over exactly (right for kernels that mask: TGI's, LoRAX's);
        "rebias" moves every such (group, column) pair whose values are all at
        most 14 to q + 1, z + 1, which dequantizes to identical weights.
    unfixable : {"error", "warn"}
        With "rebias": what to do about pairs that hold a 15 and cannot move.
    with_g_idx : bool
        Also return ``g_idx = arange(K) // group_size`` as int32 on the CPU.

    Returns
    -------
    ExllamaTensors

    Raises
    ------
    TypeError, ValueError
        For bad tensors (as :func:`packq.fast_awq_to_gptq` and :func:`packq.dequantize_awq`),
        an unknown option, float scales that are not float16 without ``allow_copy``,
        a device mismatch without ``allow_copy``, or (``unfixable="error"``) zero-points
        of 0 that cannot be rebiased.

    Examples
    --------
    >>> import numpy as np
    >>> from packq.interop import exllama_tensors
    >>> qweight = np.full((128, 1), 0x75316420, dtype=np.int32)   # q = column index 0..7
    >>> qzeros = np.zeros((1, 1), dtype=np.int32)                 # every zero-point 0
    >>> t = exllama_tensors(qweight, qzeros, np.ones((1, 8), np.float16), zero_points="rebias")
    >>> t.qweight.shape, t.zero_point_0, t.rebiased, t.unfixable
    (torch.Size([16, 8]), 8, 8, 0)
    """
    torch = _torch()
    if zero_points not in ("keep", "rebias"):
        raise ValueError(f"zero_points must be 'keep' or 'rebias', got {zero_points!r}")
    if unfixable not in ("error", "warn"):
        raise ValueError(f"unfixable must be 'error' or 'warn', got {unfixable!r}")
    _api._check_awq_pair(qweight, qzeros, 4)
    w, z = V.shape_of(qweight), V.shape_of(qzeros)
    _api._check_scales(scales, z[-2], w[-1] * 8, qweight, "qweight")
    if V.dtype_name(scales.dtype) != "float16" and not allow_copy:
        raise TypeError(
            f"scales must be float16 for ExLlama, got dtype {V.dtype_name(scales.dtype)}; pass allow_copy=True to cast"
        )
    be = backends.for_arrays(qweight=qweight, qzeros=qzeros, scales=scales)
    qw, qz = _api._words_in(be, qweight), _api._words_in(be, qzeros)
    if zero_points == "rebias":
        qw, qz, n0, nfix = be.run(awq.rebias_zero_points, qw, qz)
        zero0, fixed = int(n0), int(nfix)
        left = zero0 - fixed
    else:  # the interleave does not change how many fields are 0
        zero0, fixed, left = int(be.run(B.count_fields, qz, value=0)), 0, 0
    if left:
        msg = (f"{left} of {zero0} (group, column) zero-points of 0 cannot be rebiased (their group holds a 15); "
               "upstream exllamav2 computes them with zero 16")
        if unfixable == "error":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    gw, gz = packq.fast_awq_to_gptq(qw, qz)
    out_w = to_torch(gw, device=device, allow_copy=allow_copy)
    out_z = to_torch(gz, device=device, allow_copy=allow_copy)
    out_s = to_torch(scales, device=device, allow_copy=allow_copy)
    if out_s.dtype != torch.float16:
        out_s = out_s.to(torch.float16)
    g_idx = None
    if with_g_idx:
        k = w[-2]
        g_idx = torch.arange(k, dtype=torch.int32) // (k // z[-2])
    return ExllamaTensors(out_w, out_z, out_s, g_idx, zero0, fixed, left)

