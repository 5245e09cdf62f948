"""What a checkpoint holds: format, quantized modules, sizes, and zero-points of 0."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from packq.checkpoint.files import io_errors
from packq.checkpoint.folder import open_checkpoint
from packq.checkpoint.hub import resolve
from packq.checkpoint.model import Checkpoint
from packq.checkpoint.zeros import analyse
from packq.errors import CheckpointError
from packq.formats.engines import WORD


def inspect_checkpoint(
    src: str | os.PathLike[str], *, v1_zeros: str | None = None, revision: str | None = None, mlx: bool = False
) -> dict[str, Any]:
    """Describe a quantized checkpoint folder without changing it.

    Returns a dict with the format, group size, quantized module count, tensor
    counts and bytes by dtype, the number of (group, column) zero-points equal
    to 0, and ``engines``: for each GPTQ engine (:data:`packq.formats.engines.ENGINES`),
    whether it computes this checkpoint's zero-points exactly (for an AWQ
    source: as GPTQ v1 written per field, packq's default), how many pairs it
    gets wrong and in which modules. A GPTQ v1 source is read in its producer's
    convention (``meta.quantizer``) or ``v1_zeros``; where that is unknown and
    matters, ``v1_ambiguous`` lists the modules. SRC may be a Hub repo id, as for
    :func:`convert_checkpoint`. With ``mlx``, every weight is read (slower) and ``mlx`` says, per
    MLX form (the scales' and biases' dtype) and per module, how many weights MLX's CPU and Metal
    arithmetic compute differently from the source's (what ``--to mlx --mlx-scales`` would write).
    ``gguf`` says which GGUF types hold each module exactly (see
    ``packq.formats.gguf``; this reads every module's tensors). On a ``.gguf`` file it returns its
    architecture, tensor types and sizes instead.

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
    >>> info["engines"]["tgi"]["exact"], info["engines"]["exllamav2"]["exact"]
    (True, False)
    """
    path = Path(src)
    if path.suffix == ".gguf" or (path.is_file() and path.open("rb").read(4) == b"GGUF"):
        from packq.checkpoint.containers.gguf import read_summary

        with io_errors(path):
            open(path, "rb").close()
        return read_summary(path)
    ckpt = open_checkpoint(resolve(src, revision))
    by_dtype: Counter[str] = Counter()
    bytes_by_dtype: Counter[str] = Counter()
    for shard in ckpt.shards.values():
        for t in shard.tensors.values():
            by_dtype[t.dtype] += 1
            bytes_by_dtype[t.dtype] += t.nbytes
    zeros = analyse(ckpt, v1_zeros)
    extra = {"mlx": _mlx_forms(ckpt, zeros)} if mlx else {}
    read_word = zeros.convention == WORD and ckpt.format.method == "gptq" and ckpt.format.checkpoint_format == "gptq"
    return {
        "path": str(src), "format": ckpt.format.name, "method": ckpt.format.container or ckpt.format.method,
        "bits": ckpt.format.bits,
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "quantized_modules": len(ckpt.modules),
        "tensors": ckpt.tensor_count(), "bytes": ckpt.total_bytes(),
        "tensors_by_dtype": dict(sorted(by_dtype.items())), "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
        "zero_point_0": zeros.zero0, "zero_points": zeros.total, "zero_point_0_modules": zeros.zero0_modules,
        "v1_zeros": zeros.convention, "v1_ambiguous": zeros.ambiguous, "engines": zeros.engines, **extra,
        "gguf": None if zeros.ambiguous else gguf_exactness(ckpt, read_word),
    }


def _mlx_forms(ckpt: Any, zeros: Any) -> dict[str, Any]:
    """Per MLX form and module, the weights MLX's CPU and Metal arithmetic compute differently from the source's."""
    from packq.checkpoint.formats import FORMATS
    from packq.checkpoint.formats.mlx import FORMAT, SOURCE_DTYPES, form_note
    from packq.checkpoint.job import Converter, Job
    from packq.checkpoint.model import act_order
    from packq.checkpoint.zeros import Target
    from packq.formats import mlx as M
    from packq.formats.engines import WORD

    if ckpt.format.group_size not in M.GROUP_SIZES:
        return {"refused": f"group size {ckpt.format.group_size}: MLX has {', '.join(map(str, M.GROUP_SIZES))}"}
    if ckpt.format.method == "gptq" and act_order(ckpt):
        return {"refused": "act-order: MLX's affine mode has no g_idx"}
    fmt = "awq" if ckpt.format.method == "awq" else ckpt.format.checkpoint_format
    job = Job(ckpt, "mlx", Converter("numpy"), Target(fmt), FORMATS[ckpt.format.kind], FORMAT, open_checkpoint,
              zeros.convention == WORD and fmt == "gptq")
    source = SOURCE_DTYPES[next(iter(ckpt.modules.values())).infos["scales"].dtype]
    out: dict[str, Any] = {}
    for dtype in M.DTYPES:
        modules = {p: FORMAT.differences(job, m, dtype) for p, m in ckpt.modules.items()}
        out[dtype] = {"differing": {b: sum(c[b] for c in modules.values()) for b in M.ARITHMETIC},
                      "modules": modules, "note": form_note(dtype, source)}
    out["weights"] = sum(m.n * m.k for m in ckpt.modules.values())
    return out


def gguf_exactness(ckpt: Checkpoint, read_word: bool) -> dict[str, Any]:
    """Which GGUF types hold each module exactly: per type, the modules and blocks (F16/BF16: weights) it holds
    exactly; ``auto``, the modules per smallest exact block type; ``none``, the modules no block type holds."""
    from packq.checkpoint.formats.gguf import module_census
    from packq.formats import gguf as G

    out: dict[str, Any] = {t: {"modules": 0, "blocks": 0} for t in G.QUANTIZED}
    out.update({t: {"modules": 0, "weights_rounded": 0} for t in ("F16", "BF16")})
    auto: Counter[str] = Counter()
    none: list[str] = []
    total = G.Census()
    for prefix in ckpt.modules:
        try:
            c = module_census(ckpt, prefix, read_word)
        except CheckpointError:  # K not a multiple of 32, say: no GGUF block holds it
            none.append(prefix)
            continue
        total += c
        for t in G.QUANTIZED:
            out[t]["modules"] += c.holds(t)
            out[t]["blocks"] += c.exact[t]
        for t in ("F16", "BF16"):
            out[t]["modules"] += c.holds(t)
            out[t]["weights_rounded"] += c.rounded[t]
        best = c.smallest()
        if best is None:
            none.append(prefix)
        else:
            auto[best] += 1
    out.update(auto=dict(sorted(auto.items())), none=none, blocks=total.blocks, weights=total.weights,
               modules=len(ckpt.modules))
    return out
