"""What a checkpoint holds: format, quantized modules, sizes, and zero-points of 0."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.model import open_checkpoint
from packq.core.bits import count_fields

EXLLAMA_NOTE = (
    "upstream exllamav2 adds 1 to stored GPTQ zeros without the modulo, so after conversion these "
    "(group, column) pairs are computed with zero 16 instead of 0; kernels that mask (TGI, LoRAX) are exact"
)



def inspect_checkpoint(src: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a quantized checkpoint folder without changing it.

    Returns a dict with the format, group size, quantized module count, tensor
    counts and bytes by dtype, and the number of (group, column) zero-points
    equal to 0, which upstream exllamav2 mishandles.

    Raises
    ------
    CheckpointError
        If SRC is not a readable AWQ or GPTQ checkpoint.

    Examples
    --------
    >>> import pathlib, packq
    >>> info = inspect_checkpoint(pathlib.Path(packq.__file__).parent.parent / "examples" / "tiny-llama-awq")
    >>> info["format"], info["quantized_modules"], info["zero_point_0"] > 0
    ('AWQ gemm, 4-bit, group size 128', 14, True)
    """
    ckpt = open_checkpoint(Path(src))
    by_dtype: Counter[str] = Counter()
    bytes_by_dtype: Counter[str] = Counter()
    for shard in ckpt.shards.values():
        for t in shard.tensors.values():
            by_dtype[t.dtype] += 1
            bytes_by_dtype[t.dtype] += t.nbytes
    # the stored field that means "zero-point 0": AWQ and GPTQ v2 store z, GPTQ v1 stores z - 1
    stored = 15 if ckpt.format.method == "gptq" and ckpt.format.checkpoint_format == "gptq" else 0
    zero0 = total = 0
    for m in ckpt.modules.values():
        with ckpt.shards[m.files["qzeros"]] as f:
            words = f.array_bits(f"{m.prefix}.qzeros")
        zero0 += int(numpy_backend.run(count_fields, words.view(np.int32), value=stored))
        total += words.size * 8
    return {
        "path": str(src), "format": ckpt.format.name, "method": ckpt.format.method, "bits": ckpt.format.bits,
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "quantized_modules": len(ckpt.modules),
        "tensors": ckpt.tensor_count(), "bytes": ckpt.total_bytes(),
        "tensors_by_dtype": dict(sorted(by_dtype.items())), "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
        "zero_point_0": zero0, "zero_points": total,
        "exllama": EXLLAMA_NOTE if zero0 else "no zero-point is 0: safe for upstream exllamav2",
    }
