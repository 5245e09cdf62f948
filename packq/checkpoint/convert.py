"""Convert a whole checkpoint on disk between AWQ, GPTQ, compressed-tensors and float: streamed, verified, atomic.

The source is opened and checked completely (config, index, every shard
header, every quantized module's shapes), and the target's container plans
the whole output (every name, header and file), before anything is written.
The result is built in a hidden folder (or file) beside DST and renamed into
place only when complete, so DST either does not exist or is a finished
checkpoint. The source and target formats say what tensors mean
(``packq.checkpoint.formats``), the container how they sit on disk
(``packq.checkpoint.containers``); tensors are converted piece by piece and
the others copied by the kernel, so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packq.backends.numpy import deferred_kernels
from packq.checkpoint.containers import CONTAINERS
from packq.checkpoint.files import Destination
from packq.checkpoint.folder import open_checkpoint
from packq.checkpoint.formats import FORMATS, TARGETS, route
from packq.checkpoint.formats.floats import Float
from packq.checkpoint.guards import check_src_against_dst, resources, terminating
from packq.checkpoint.hub import resolve
from packq.checkpoint.job import Converter, Job
from packq.checkpoint.model import act_order_module
from packq.checkpoint.progress import Progress
from packq.checkpoint.zeros import Target, analyse, check_v1_readable, plan_gptq
from packq.errors import CheckpointError
from packq.formats.engines import FIELD, WORD

#: quantized weights from which ``packq convert`` loads numba's kernels (on a thread, the ufuncs converting meanwhile)
KERNELS_FROM_BYTES = 4 << 30
#: float output from which it loads the dequantization kernels (measured: 8 MB of float16 in 8 ms against
#: 90 ms by the ufuncs, so the 0.5 s load is repaid after about 50 MB)
DEQUANT_KERNELS_FROM_BYTES = 128 << 20

def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str = "gptq",
    checkpoint_format: str | None = None,
    backend: str = "numpy",
    verify: bool = False,
    force: bool = False,
    progress: bool | None = None,
    v1_zeros: str | None = None,
    for_engine: str | None = None,
    allow_inexact: bool = False,
    revision: str | None = None,
    allow_overflow: bool = False,
    mlx_scales: str | None = None,
    gguf_type: str | None = None,
) -> dict[str, Any]:
    """Convert a quantized checkpoint folder to another format, bit-exactly (see ``packq formats``).

    Parameters
    ----------
    src, dst : path
        The source model folder (never written) and the folder to create. SRC may also be
        a Hugging Face Hub repo id ("org/name"), read from the local cache (offline) or
        downloaded; this needs ``packq[hub]``.
    to : {"gptq", "awq", "compressed-tensors", "float16", "bfloat16", "float32", "mlx", "gguf"}
        Target format (:data:`packq.checkpoint.formats.TARGETS`); the source is AWQ gemm, GPTQ
        or compressed-tensors pack-quantized. AWQ holds 4-bit weights without act-order, and
        compressed-tensors holds no act-order either; the float targets hold the dequantized
        weights in torch's (N, K) orientation; "mlx" writes MLX's affine layout for mlx-lm
        (``packq.checkpoint.formats.mlx``); "gguf" writes one llama.cpp file (docs/gguf.md).
    checkpoint_format : {"gptq", "gptq_v2"}, optional
        GPTQ zero storage to write when ``to="gptq"``: "gptq" (v1, z - 1) or
        "gptq_v2" (z). Default: what ``for_engine`` loads exactly, else v1.
    for_engine : str, optional
        The engine that will load the GPTQ result (a name in
        :data:`packq.formats.engines.ENGINES`): the format and zero-point
        encoding it computes exactly are written, zero-points of 0 rebiased
        (q + 1, z + 1) for engines that read a stored 15 as 16. Without it, a
        source with zero-points of 0 is refused for v1, which engines read
        differently (``--checkpoint-format gptq_v2`` is unambiguous). GPTQ that
        the engine does not load at all (vLLM 0.32: ``sym=False``, act-order;
        on its CPU path, "vllm-cpu", 8-bit too) is refused, naming the format it
        loads exactly; what another build of it refuses is in ``notes``.
    allow_inexact : bool
        Write for ``for_engine`` even where no encoding is exact in it (a
        zero-point of 0 whose pair holds a 15, in an engine that reads a stored
        15 as 16); the summary reports the pairs and the largest weight error.
        To GGUF: write tensors that no exact type holds (as F16, or as the
        ``gguf_type`` asked for), reporting them and the largest weight error.
    backend : {"numpy", "jax"}
        Which backend converts the tensors.
    verify : bool
        Dequantize every module of the source and of the result as the target
        engine reads it (its zero-point convention; packq's own reading without
        one) and compare bit for bit before DST is put in place.
    force : bool
        Replace an existing DST (only once the new one is complete).
    progress : bool, optional
        Show a progress bar; default: when standard error is a terminal.
    revision : str, optional
        The branch, tag or commit of a Hub repo id.
    allow_overflow : bool
        To a float dtype: write even where dequantized weights do not fit it (they become infinite, or
        stay NaN where the source's scales are); by default such a conversion is refused, with the count
        and the largest magnitude, before DST is put in place.
    mlx_scales : {"float32", "float16", "bfloat16"}, optional
        To MLX: the dtype of the scales and biases. Default float32, exact on every MLX
        backend; float16/bfloat16 are MLX's faster form, where MLX's arithmetic rounds: the
        summary's ``mlx`` counts, per backend, the weights that then differ from the source's.
    gguf_type : {"auto", "q4_0", "q5_0", "q8_0", "f16", "bf16", "f32"}, optional
        With ``to="gguf"`` (DST is then one file, DST.gguf): the type of every quantized tensor;
        "auto" (the default) gives each the smallest of Q4_0, Q5_0, Q8_0 that holds it exactly. A
        type that does not hold a tensor exactly (and a tensor no block type holds: act-order,
        groups of 16) is refused unless ``allow_inexact``; F32 always holds the exact product, F16
        holds what AWQ/GPTQ engines compute (one rounding of (q - z) * s to float16).
    v1_zeros : {"field", "word"}, optional
        How a GPTQ v1 source stored zero-points of 0: "word" as GPTQModel and
        transformers write v1 (one 32-bit subtraction of 0x11111111, borrowing),
        "field" per field. Default: from the producer's metadata
        (``meta.quantizer``); a v1 source where the two readings differ and
        nothing says which applies is refused.

    Returns
    -------
    dict
        A summary: formats, counts of modules and tensors, bytes, seconds, verification.

    Raises
    ------
    CheckpointError
        For anything wrong with SRC, DST or the request; raised before anything is written.

    Examples
    --------
    >>> import tempfile, pathlib, packq
    >>> example = pathlib.Path(packq.__file__).parent.parent / "examples" / "tiny-llama-awq"
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     s = convert_checkpoint(example, pathlib.Path(tmp) / "gptq", for_engine="transformers", verify=True)
    >>> s["modules"], s["tensors_in"], s["tensors_out"], s["checkpoint_format"], s["verified"]
    (14, 49, 63, 'gptq_v2', True)
    """
    with terminating():  # SIGTERM, like Ctrl-C, cleans up and reports, from the first read on
        return _convert(src, dst, to=to, checkpoint_format=checkpoint_format, backend=backend, verify=verify,
                        force=force, progress=progress, v1_zeros=v1_zeros, for_engine=for_engine,
                        allow_inexact=allow_inexact, revision=revision, allow_overflow=allow_overflow,
                        mlx_scales=mlx_scales, gguf_type=gguf_type)


def _largest(ckpt: Any) -> tuple[str, int]:
    t = max((t for s in ckpt.shards.values() for t in s.tensors.values()), key=lambda t: t.nbytes)
    return t.name, t.nbytes


def _convert(src: Any, dst: Any, *, to: str, checkpoint_format: str | None, backend: str, verify: bool, force: bool,
             progress: bool | None, v1_zeros: str | None, for_engine: str | None, allow_inexact: bool,
             revision: str | None, allow_overflow: bool, mlx_scales: str | None,
             gguf_type: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise CheckpointError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    if checkpoint_format not in (None, "gptq", "gptq_v2"):
        raise CheckpointError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    if v1_zeros not in (None, FIELD, WORD):
        raise CheckpointError(f"v1_zeros must be 'field' or 'word', got {v1_zeros!r}")
    given, src = src, resolve(src, revision)
    ckpt = open_checkpoint(src)
    where = str(src)
    with resources(repr(where), _largest(ckpt)):
        if not route(ckpt.format.kind, to):
            raise CheckpointError(f"{where!r}: is {ckpt.format.name} already; choose another --to")
        if to == "awq" and ckpt.format.bits != 4:
            raise CheckpointError(f"{where!r}: is {ckpt.format.name}; AWQ gemm holds 4-bit weights only")
        # every g_idx is read and checked now (integers naming groups), before anything is written
        ordered = act_order_module(ckpt)
        if ordered is not None and ckpt.format.method == "awq":
            raise CheckpointError(
                f"{where!r}: AWQ has no act-order, but {ordered + '.g_idx'!r} is not arange(K) // group_size: AWQ "
                "loaders ignore it, GPTQ ones would honour it, so which weights it holds is ambiguous; remove it")
        if ckpt.format.method == "gptq" and not FORMATS[to].act_order and (ckpt.format.desc_act or ordered):
            raise CheckpointError(
                f"{where!r}: GPTQ act-order (desc_act, or a g_idx that is not arange(K) // group_size) has no "
                f"{FORMATS[to].title} form: {FORMATS[to].why_not_act_order}"
            )
        check_src_against_dst(src, dst, Destination.hidden(dst))  # the folders, then every file, links followed
        convert = Converter(backend)
        if mlx_scales is not None and to != "mlx":
            raise CheckpointError(f"--mlx-scales is the dtype of an MLX result's scales; converting to {to} takes none")
        if to != "gptq" and for_engine is not None:
            raise CheckpointError(f"--for names the engine that loads a GPTQ result; converting to {to} takes none")
        if to != "gguf" and gguf_type is not None:
            raise CheckpointError(f"--gguf-type is for --to gguf; converting to {to} takes none")
        # every zero-point, a v1 source's read as its producer wrote it: counts only, what each engine would
        # compute is worked out only where a refusal names them
        report = analyse(ckpt, v1_zeros, engines=False)
        check_v1_readable(ckpt, report)
        fmt = "awq" if ckpt.format.method == "awq" else ckpt.format.checkpoint_format
        read_word = report.convention == WORD and fmt == "gptq"
        source, output = FORMATS[ckpt.format.kind], FORMATS[to]
        if to == "gptq":
            target = plan_gptq(ckpt, report, for_engine, checkpoint_format, allow_inexact)
        else:  # to AWQ, compressed-tensors or a float dtype
            target = Target(fmt)
        job = Job(ckpt, to, convert, target, source, output, open_checkpoint, read_word, symmetric=report.symmetric,
                  options={"mlx_scales": mlx_scales, "gguf_type": gguf_type, "allow_inexact": allow_inexact})
        output.prepare(job)  # what only the target decides (MLX: its scales' dtype, what each backend computes)
        checkpoint_format = job.gptq_format
        container = CONTAINERS[output.container]
        plan = container.plan(job, dst)  # every output name, header and file decided and checked: nothing written yet

        bar = Progress(plan.nbytes, "converting", progress)
        # numba repays its load (0.5 s) only on large checkpoints (measured: 1.0 against 1.45 s a GB once
        # loaded, 2 cores); until it is loaded, or on small ones, the ufuncs convert
        large = sum(m.infos["qweight"].nbytes for m in ckpt.modules.values()) > KERNELS_FROM_BYTES
        dequant = 0
        if isinstance(output, Float):  # dequantizing costs 10x a relayout per byte: the kernels repay their load sooner
            large, dequant = plan.nbytes > DEQUANT_KERNELS_FROM_BYTES, 4 if output.dtype == "F32" else 2
        elif to == "gguf":  # GGUF blocks (dequant -1) or floats: a transpose and work per weight, like dequantizing
            floats = {"f16": 2, "bf16": 2, "f32": 4}
            large, dequant = plan.nbytes > DEQUANT_KERNELS_FROM_BYTES, floats.get(str(gguf_type).lower(), -1)
            if large and dequant == -1:  # none where the whole-word path makes every block (AWQ 4-bit: no numba)
                from packq.checkpoint.formats import gguf as gguf_format

                large = gguf_format.needs_kernels(ckpt, plan.detail[1])
        try:
            with Destination(dst, force, single_file=container.single_file) as out, deferred_kernels(large, dequant):
                container.write(job, plan, out.tmp, bar)
                output.after_write(job)  # (MLX: the counts made while writing, completed)
                job.overflow.check(where, to, allow_overflow)  # a float target of infinities is no conversion
                bar.close()
                verified: bool | None = None
                if verify:
                    verified = _verify(job, container, plan, out.tmp, progress)
                out.commit()
        finally:
            bar.close()
    return {
        "src": str(given), "resolved": str(src), "dst": str(out.dst), "from": ckpt.format.name, "to": to,
        "checkpoint_format": checkpoint_format if to == "gptq" else None, "backend": backend,
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "modules": len(ckpt.modules),
        "tensors_in": ckpt.tensor_count(), "tensors_out": plan.tensors,
        "bytes_in": ckpt.total_bytes(), "bytes_out": plan.nbytes,
        "for": job.target.engine, "v1_zeros": job.v1_zeros,
        "rebiased": job.target.rebiased, "inexact_pairs": sum(job.target.inexact.values()),
        "max_weight_error": job.target.max_error, "notes": job.target.notes, "verified": verified,
        "seconds": round(time.perf_counter() - t0, 3),
        "overflowed": job.overflow.count,
        **output.summary(job),
        **plan.summary,
    }


# ------------------------------------------------------------------ verify
def _verify(job: Job, container: Any, plan: Any, out: Path, progress: bool | None) -> bool:
    """The target's container reads the result back and compares every module with the source, with a progress bar."""
    bar = Progress(len(job.ckpt.modules), "verifying", progress)

    def each(check: Callable[[str], None]) -> None:
        for prefix in job.ckpt.modules:
            check(prefix)
            bar.update(1)

    container.verify(job, plan, out, each)
    bar.close()
    return True
