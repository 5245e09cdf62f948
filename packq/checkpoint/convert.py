"""Convert a whole checkpoint on disk between AWQ, GPTQ, compressed-tensors and float: streamed, verified, atomic.

The source is opened and checked completely (config, index, every shard
header, every quantized module's shapes) before anything is written. The
result is built in a hidden folder beside DST and renamed into place only
when complete, so DST either does not exist or is a finished checkpoint.
Tensors are read and converted one at a time, and the others are copied by
the kernel (copy_file_range): memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packq import __version__, backends
from packq.backends.numpy import BACKEND as numpy_backend
from packq.checkpoint.files import Destination, copy_durable, io_errors, write_durable
from packq.checkpoint.hub import resolve
from packq.checkpoint.model import (
    INDEX,
    SIDECARS,
    Checkpoint,
    Module,
    act_order,
    module_array,
    open_checkpoint,
    stored_to_canonical,
)
from packq.checkpoint.progress import Progress
from packq.checkpoint.registry import FORMATS, TARGETS, route
from packq.checkpoint.safetensors import Reader, SafetensorsFile, SafetensorsWriter, header_for
from packq.checkpoint.zeros import Target, analyse, check_v1_readable, plan_gptq
from packq.core import bits as B
from packq.errors import CheckpointError
from packq.formats import awq, gptq
from packq.formats import compressed_tensors as ct
from packq.formats.engines import ENGINES, FIELD, WORD, read_v1
from packq.formats.gptq import dequantize_grouped

#: dequantized targets: safetensors dtype and item size
FLOATS = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}
CT = "compressed-tensors"


def _check_paths(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise CheckpointError(f"DST {dst} is SRC itself; choose a new folder")
    if s in d.parents:
        raise CheckpointError(f"DST {dst} is inside SRC {src}; choose a folder outside the source")
    if d in s.parents:
        raise CheckpointError(f"SRC {src} is inside DST {dst}; replacing DST would destroy the source")


def _extra_files(ckpt: Checkpoint) -> list[tuple[Path, Path, int]]:
    """Every other file of SRC to copy as it is: (path in DST, path in SRC, size), checked up front.

    Regular files are copied, and symlinks to regular files (anywhere, as in a
    Hugging Face cache snapshot) are copied as the files they point to; real
    sub-folders are walked. A FIFO, device, socket, dangling or looping link,
    or a link to a folder is refused, so a copy can neither block nor run on.
    """
    skip = {"config.json", INDEX, *SIDECARS, *ckpt.shards}
    out: list[tuple[Path, Path, int]] = []

    def walk(folder: Path, rel: Path) -> None:
        with io_errors(folder):
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        for entry in entries:
            if folder == ckpt.root and entry.name in skip:
                continue
            path = Path(entry.path)
            with io_errors(path):
                if entry.is_dir(follow_symlinks=False):
                    walk(path, rel / entry.name)
                    continue
                st = os.stat(path)  # follows links: ENOENT for a dangling one, ELOOP for a loop
            if not stat.S_ISREG(st.st_mode):
                kind = "a link to a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
                raise CheckpointError(f"{path}: is {kind}; packq copies regular files and real folders only")
            out.append((rel / entry.name, path, st.st_size))

    walk(ckpt.root, Path())
    return out


def _target_config(job: _Job) -> dict[str, Any]:
    ckpt = job.ckpt
    config = json.loads(json.dumps(ckpt.config))
    old = ckpt.format.raw
    if job.to == CT:
        config["quantization_config"] = _ct_config(job)
        return config
    if job.to in FLOATS:  # a plain checkpoint: no quantization left to state
        del config["quantization_config"]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = job.to
        return config
    if job.to == "gptq":
        fmt = job.target.checkpoint_format
        q: dict[str, Any] = {
            "quant_method": "gptq", "bits": ckpt.format.bits, "group_size": ckpt.format.group_size,
            "desc_act": act_order(ckpt) if ckpt.format.method == "gptq" else False,
            "sym": False, "checkpoint_format": fmt, "true_sequential": True,
        }
        if fmt == "gptq":  # say how v1 zeros were written, so that any reader can know
            q["meta"] = {"quantizer": [f"packq:{__version__}"], "packq_v1_zeros": job.target.convention}
    else:
        q = {"quant_method": "awq", "bits": 4, "group_size": ckpt.format.group_size, "zero_point": True,
             "version": "gemm"}
    if old.get("modules_to_not_convert"):
        q["modules_to_not_convert"] = old["modules_to_not_convert"]
    config["quantization_config"] = q
    return config


def _ct_config(job: _Job) -> dict[str, Any]:
    """compressed-tensors' quantization_config, as its own AutoAWQConverter writes it (0.20.1)."""
    fmt = job.ckpt.format
    weights: dict[str, Any] = {"num_bits": fmt.bits, "type": "int", "symmetric": job.symmetric, "dynamic": False}
    if fmt.group_size == -1:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=fmt.group_size)
    ignore = ["lm_head"] + [f"re:.*{re.escape(str(m))}.*" for m in fmt.raw.get("modules_to_not_convert") or []]
    return {
        "config_groups": {"config_group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                             "output_activations": None, "format": "pack-quantized"}},
        "quant_method": "compressed-tensors", "kv_cache_scheme": None, "format": "pack-quantized",
        "quantization_status": "compressed", "global_compression_ratio": None, "ignore": ignore,
        "moe_sparsity_config": None,
    }


@dataclass
class _Job:
    """What one conversion decided before writing anything."""

    ckpt: Checkpoint
    to: str
    convert: _Converter
    target: Target  # to GPTQ: format, v1 convention, rebias; to AWQ: the source's format
    read_word: bool = False  # to AWQ: the v1 source was written as one 32-bit subtraction
    symmetric: bool = False  # to compressed-tensors: every zero-point is 2**(bits-1), so none are stored

    @property
    def gptq_format(self) -> str | None:
        """The checkpoint_format of the GPTQ side: the one written, or the one read; None without one."""
        if self.to == "gptq":
            return self.target.checkpoint_format
        return self.ckpt.format.checkpoint_format if self.ckpt.format.method == "gptq" else None

    @property
    def v1_zeros(self) -> str | None:
        """How the GPTQ side stores v1 zeros ("field" or "word"), written or read; None for v2."""
        if self.gptq_format != "gptq":
            return None
        if self.to == "gptq":
            return self.target.convention
        return WORD if self.read_word else FIELD


class _Converter:
    """Per-tensor conversions on one backend; NumPy arrays in, NumPy arrays out."""

    def __init__(self, backend: str) -> None:
        if backend == "numpy":
            self.be = backends.for_arrays(x=np.zeros(1))
            self.to_backend: Callable[[np.ndarray], Any] = lambda a: a
        elif backend == "jax":
            try:
                import jax.numpy as jnp
            except ImportError:
                raise CheckpointError("backend 'jax' needs JAX: pip install 'packq[jax]'") from None
            self.be = backends.for_arrays(x=jnp.zeros(1))
            self.to_backend = jnp.asarray
        else:
            raise CheckpointError(f"backend must be 'numpy' or 'jax', got {backend!r}")

    def __call__(self, fn: Callable[..., Any], words: np.ndarray, **static: Any) -> np.ndarray:
        if words.dtype == np.uint32:
            words = words.view(np.int32)
        return np.asarray(self.be.run(fn, self.to_backend(words), **static))


#: to compressed-tensors: a module's tensor -> the tensors it becomes, and how
CT_PARTS = {"qweight": [("weight_packed", "ct_weight"), ("weight_shape", "ct_shape")],
            "qzeros": [("weight_zero_point", "ct_zeros")], "scales": [("weight_scale", "ct_scale")], "g_idx": []}


#: and back: the module tensor each compressed-tensors tensor is made from
CT_SOURCE = {action: part for part, made in CT_PARTS.items() for _, action in made}


def _plan(job: _Job) -> dict[str, list[tuple[str, str, Any]]]:
    """For every shard, the output tensors in order: (name, action, module or None)."""
    ckpt, to = job.ckpt, job.to
    by_tensor = {name: (m, p) for m in ckpt.modules.values() for p, name in m.names.items()}
    plan: dict[str, list[tuple[str, str, Any]]] = {}
    for fname, shard in ckpt.shards.items():
        out: list[tuple[str, str, Module | None]] = []
        for t in sorted(shard.tensors.values(), key=lambda t: t.begin):
            module, part = by_tensor.get(t.name, (None, None))
            if module is None or part is None:
                out.append((t.name, "copy", None))
                continue
            if to == CT:
                if part == "qzeros" and job.symmetric:
                    continue  # symmetric: no zero-points stored
                out += [(f"{module.prefix}.{name}", action, module) for name, action in CT_PARTS[part]]
                continue
            if to in FLOATS:
                if part == "qweight":  # the module becomes one float tensor, in torch's (N, K) orientation
                    out.append((f"{module.prefix}.weight", "dequant", module))
                continue
            if part == "qweight":
                out.append((f"{module.prefix}.qweight", "weight", module))
                if "qzeros" not in module.names:  # compressed-tensors' symmetric scheme: zero-points are made
                    out.append((f"{module.prefix}.qzeros", "zeros", module))
                if to == "gptq":
                    out.append((f"{module.prefix}.g_idx", "g_idx", module))
            elif part == "qzeros":
                out.append((f"{module.prefix}.qzeros", "zeros", module))
            elif part == "scales":
                out.append((f"{module.prefix}.scales", "scales" if module.transposed else "copy", module))
            # g_idx (to AWQ: checked trivial; to GPTQ: written anew) and weight_shape (checked) are dropped
        plan[fname] = out
    return plan


def _out_entry(ckpt: Checkpoint, to: str, shard: SafetensorsFile, name: str, action: str, m: Module | None):
    """(name, dtype, shape, nbytes) of an output tensor, known before any conversion."""
    if action == "copy":
        t = shard.tensors[name if m is None else m.names[name.rsplit(".", 1)[-1]]]
        return name, t.dtype, t.shape, t.nbytes
    assert m is not None
    lead = m.lead
    if action == "g_idx":
        return name, "I32", (m.k,), 4 * m.k
    if action == "dequant":
        dtype, size = FLOATS[to]
        shape = (*lead, m.n, m.k)
        return name, dtype, shape, size * int(np.prod(shape))
    if action == "ct_shape":
        return name, "I64", (len(lead) + 2,), 8 * (len(lead) + 2)
    if action == "ct_scale":
        s = m.infos["scales"]
        return name, s.dtype, (*lead, m.n, m.groups), s.nbytes
    if action == "ct_weight":
        shape = (*lead, m.n, m.words(m.k))
        return name, "I32", shape, 4 * int(np.prod(shape))
    if action == "ct_zeros":
        shape = (*lead, m.words(m.n), m.groups)
        return name, "I32", shape, 4 * int(np.prod(shape))
    if action == "scales":
        s = m.infos["scales"]
        return name, s.dtype, (*lead, m.groups, m.n), s.nbytes
    if action == "weight":
        shape = (*lead, m.words(m.k), m.n) if to == "gptq" else (*lead, m.k, m.n // 8)
    else:
        shape = (*lead, m.groups, m.words(m.n))
    return name, "I32", shape, 4 * int(np.prod(shape))


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
) -> dict[str, Any]:
    """Convert a quantized checkpoint folder to another format, bit-exactly (see ``packq formats``).

    Parameters
    ----------
    src, dst : path
        The source model folder (never written) and the folder to create. SRC may also be
        a Hugging Face Hub repo id ("org/name"), read from the local cache (offline) or
        downloaded; this needs ``packq[hub]``.
    to : {"gptq", "awq", "compressed-tensors", "float16", "bfloat16", "float32"}
        Target format (:data:`packq.checkpoint.registry.TARGETS`); the source is AWQ gemm, GPTQ
        or compressed-tensors pack-quantized. AWQ holds 4-bit weights without act-order, and
        compressed-tensors holds no act-order either; the float targets hold the dequantized
        weights in torch's (N, K) orientation.
    checkpoint_format : {"gptq", "gptq_v2"}, optional
        GPTQ zero storage to write when ``to="gptq"``: "gptq" (v1, z - 1) or
        "gptq_v2" (z). Default: what ``for_engine`` loads exactly, else v1.
    for_engine : str, optional
        The engine that will load the GPTQ result (a name in
        :data:`packq.formats.engines.ENGINES`): the format and zero-point
        encoding it computes exactly are written, zero-points of 0 rebiased
        (q + 1, z + 1) for engines that read a stored 15 as 16. Without it, a
        source with zero-points of 0 is refused for v1, which engines read
        differently (``--checkpoint-format gptq_v2`` is unambiguous).
    allow_inexact : bool
        Write for ``for_engine`` even where no encoding is exact in it (a
        zero-point of 0 whose pair holds a 15, in an engine that reads a stored
        15 as 16); the summary reports the pairs and the largest weight error.
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
    source = ckpt.format.container or ckpt.format.method
    if not route(source, to):
        raise CheckpointError(f"{src}: is {ckpt.format.name} already; choose another --to")
    if to == "awq" and ckpt.format.bits != 4:
        raise CheckpointError(f"{src}: is {ckpt.format.name}; AWQ gemm holds 4-bit weights only")
    if ckpt.format.method == "gptq" and not FORMATS[to].act_order and act_order(ckpt):
        raise CheckpointError(
            f"{src}: GPTQ act-order (desc_act, or a g_idx that is not arange(K) // group_size) has no "
            f"{FORMATS[to].title} form: {FORMATS[to].why_not_act_order}"
        )
    _check_paths(src, dst)
    convert = _Converter(backend)
    if to != "gptq" and for_engine is not None:
        raise CheckpointError(f"--for names the engine that loads a GPTQ result; converting to {to} takes none")
    report = analyse(ckpt, v1_zeros)  # every zero-point, a v1 source's read as its producer wrote it
    check_v1_readable(ckpt, report)
    fmt = "awq" if ckpt.format.method == "awq" else ckpt.format.checkpoint_format
    read_word = report.convention == WORD and fmt == "gptq"
    if to == "gptq":
        job = _Job(ckpt, to, convert, plan_gptq(ckpt, report, for_engine, checkpoint_format, allow_inexact), read_word)
    else:  # to AWQ, compressed-tensors or a float dtype
        job = _Job(ckpt, to, convert, Target(fmt), read_word, symmetric=report.symmetric)
    checkpoint_format = job.gptq_format
    plan = _plan(job)
    entries = {f: [_out_entry(ckpt, to, ckpt.shards[f], *item) for item in items] for f, items in plan.items()}
    for fname, es in entries.items():  # refuse now, not after writing, a header packq could not read back
        header_for(es, ckpt.shards[fname].metadata, dst / fname)
    extra = _extra_files(ckpt)

    bar = Progress(sum(e[3] for es in entries.values() for e in es), "converting", progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with Destination(dst, force) as out:
            tmp = out.tmp
            for fname, items in plan.items():
                _write_shard(job, fname, items, entries[fname], tmp / fname, bar)
            for rel, path, size in extra:
                if len(rel.parts) > 1:
                    with io_errors(tmp / rel.parent):
                        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
                copy_durable(path, tmp / rel, size)
            config = _target_config(job)
            write_durable(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
            for name in SIDECARS:  # engines read these before config.json: they must state the new format too
                if (ckpt.root / name).exists() and to in ("gptq", "awq"):  # (others drop them)
                    sidecar = json.dumps(config["quantization_config"], indent=2) + "\n"
                    write_durable(tmp / name, sidecar.encode())
            if ckpt.index is not None:
                _write_index(ckpt, tmp, entries)
            bar.close()
            verified: bool | None
            if verify:
                verified = (_verify_float if to in FLOATS else _verify)(job, tmp, progress)
            else:
                verified = None
            out.commit()
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {
        "src": str(given), "resolved": str(src), "dst": str(dst), "from": ckpt.format.name, "to": to,
        "checkpoint_format": checkpoint_format if to == "gptq" else None, "backend": backend,
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "modules": len(ckpt.modules),
        "tensors_in": ckpt.tensor_count(), "tensors_out": sum(len(e) for e in entries.values()),
        "bytes_in": ckpt.total_bytes(), "bytes_out": sum(e[3] for es in entries.values() for e in es),
        "for": job.target.engine, "v1_zeros": job.v1_zeros,
        "rebiased": job.target.rebiased, "inexact_pairs": sum(job.target.inexact.values()),
        "max_weight_error": job.target.max_error, "verified": verified, "seconds": round(time.perf_counter() - t0, 3),
    }


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_shard(job: _Job, fname: str, items, entries, path: Path, bar: Progress) -> None:
    """Write one output shard; the next tensor converts on a worker thread while this one is written."""
    with job.ckpt.shards[fname].open() as f, ThreadPoolExecutor(max_workers=1) as pool:
        pending: dict[int, Future[np.ndarray]] = {}

        def start(i: int) -> None:
            if i < len(items) and items[i][1] != "copy":
                name, action, m = items[i]
                pending[i] = pool.submit(_tensor, job, f, name, action, m)

        writer = SafetensorsWriter(path, entries, f.metadata)
        try:
            start(0)
            for i, ((name, action, _), entry) in enumerate(zip(items, entries)):
                start(i + 1)
                if action == "copy":
                    writer.copy(name, f)
                else:
                    writer.write(name, pending.pop(i).result())
                bar.update(entry[3])
            writer.close()
        except BaseException:
            for fut in pending.values():
                fut.cancel()
            writer.abort()
            raise


def _tensor(job: _Job, f: Reader, name: str, action: str, m: Module) -> np.ndarray:
    convert = job.convert
    if action == "g_idx":  # the source's (act-order kept), else arange(K) // group_size
        if "g_idx" in m.names:
            return module_array(job.ckpt, m, "g_idx").astype("<i4")
        return (np.arange(m.k, dtype=np.int32) // (m.k // m.groups)).astype("<i4")
    if action == "dequant":
        return _float_weight(job, m)
    if action.startswith("ct_"):
        return _ct_tensor(job, f, name, action, m)
    if action == "scales":  # stored transposed (compressed-tensors): moved bit for bit
        return stored_to_canonical(m, "scales", f.array_bits(m.names["scales"]))
    part = "qweight" if action == "weight" else "qzeros"
    if m.bits != 4:  # GPTQ to GPTQ at 2, 3 or 8 bits: weights as they are, zeros re-encoded
        return _other_width(job, m, part, f)
    words = _source(job, m, part, f)
    rebias = job.target.rebias.get(m.prefix) if job.to == "gptq" else None
    if action == "weight":
        if job.to == "awq":
            return convert(awq.weight_to_awq, words)
        if rebias is not None:  # q + 1 wherever the pair's zero-point moved from 0 to 1
            qzeros = _source(job, m, "qzeros")
            words = np.asarray(numpy_backend.run(awq.rebias_zero_points, words.view(np.int32), qzeros.view(np.int32))[0])
        return convert(awq.weight_to_gptq, words)
    # zeros: GPTQ v1 stores z - 1 (per field, or as one word), v2 stores z; AWQ stores z
    if job.to == "gptq":
        return _target_zeros(job, convert(awq.zeros_to_gptq, rebias if rebias is not None else words, offset=0), 4)
    return convert(awq.zeros_to_awq, _v2_zeros(job, words), offset=0)


def _target_zeros(job: _Job, v2: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ v2 qzeros (z) stored as the target writes them: as they are, z - 1 per field, or as GPTQModel does."""
    if job.target.checkpoint_format == "gptq_v2":
        return v2.view(np.int32)
    if job.target.convention == WORD and bits != 3:  # one 32-bit subtraction; 3-bit fields shift one by one
        return job.convert(gptq.zeros_word_add, v2, delta=-1, bits=bits)
    return job.convert(gptq.zeros_shift, v2, delta=-1, bits=bits)


def _other_width(job: _Job, m: Module, part: str, f: Reader) -> np.ndarray:
    """GPTQ (or compressed-tensors) to GPTQ at 2, 3 or 8 bits, where AWQ's 4-bit layout is no way through."""
    words = stored_to_canonical(m, part, f.array(m.names[part])) if part in m.names else module_array(job.ckpt, m, part)
    if part == "qweight":
        return words.view(np.int32)
    return _target_zeros(job, _v2_zeros(job, words), m.bits)


def _source(job: _Job, m: Module, part: str, f: Reader | None = None) -> np.ndarray:
    """A module's qweight or qzeros as the conversion starts from it.

    To GPTQ the conversion starts from AWQ's layout, so a GPTQ-layout source (compressed-tensors,
    read as GPTQ v2) is brought there first; to AWQ it starts from GPTQ's layout, as stored.
    ``f``: the shard's open reader, when the tensor is in the shard being written.
    """
    if f is not None and part in m.names and f.path == job.ckpt.shards[m.files[part]].path:
        words = stored_to_canonical(m, part, f.array(m.names[part]))
    else:
        words = module_array(job.ckpt, m, part)
    if job.to == "gptq" and job.ckpt.format.method != "awq":
        if part == "qweight":
            return job.convert(awq.weight_to_awq, words)
        return job.convert(awq.zeros_to_awq, _v2_zeros(job, words), offset=0)
    return words


def _v2_zeros(job: _Job, words: np.ndarray) -> np.ndarray:
    """A GPTQ source's qzeros as v2 (z itself), read as its producer wrote them."""
    bits = job.ckpt.format.bits
    if job.ckpt.format.checkpoint_format != "gptq":
        return words
    if job.read_word and bits != 3:  # GPTQModel shifts 3-bit fields one by one
        return job.convert(gptq.zeros_word_add, words, delta=1, bits=bits)
    return job.convert(gptq.zeros_shift, words, delta=1, bits=bits)


def _ct_tensor(job: _Job, f: Reader, name: str, action: str, m: Module) -> np.ndarray:
    """One compressed-tensors pack-quantized tensor of module ``m``: GPTQ v2's tensors transposed."""
    awq_source = job.ckpt.format.method == "awq"
    part = f"{m.prefix}.{CT_SOURCE[action]}"
    if action == "ct_shape":
        return np.array([*m.lead, m.n, m.k], dtype="<i8")
    # compressed-tensors stores GPTQ v2's matrices transposed (packq.formats.compressed_tensors)
    if action == "ct_scale":  # any float dtype, bfloat16 included: moved bit for bit
        return job.convert(ct.swap, f.array_bits(part))
    words = f.array(part)
    if action == "ct_weight":
        return job.convert(ct.swap, job.convert(awq.weight_to_gptq, words) if awq_source else words.view(np.int32))
    return job.convert(ct.swap, job.convert(awq.zeros_to_gptq, words, offset=0) if awq_source else _v2_zeros(job, words))


def _float_weight(job: _Job, m: Module) -> np.ndarray:
    """A module's weights as the target float dtype, (..., N, K) as torch stores a Linear's weight.

    Computed in the scales' dtype, as engines compute them: one rounding of the exact (q - z) * s
    (bfloat16 scales are widened to float32, which holds that product exactly); then converted, so
    that bfloat16 output rounds the float16 product, and float32 holds it exactly.
    """
    import packq

    a = {part: job.convert.to_backend(v) for part, v in _module_arrays(job.ckpt, m.prefix)}
    try:
        if job.ckpt.format.method == "awq":
            w = packq.dequantize_awq(a["qweight"], a["qzeros"], a["scales"])
        else:
            zeros, qzeros = ("v1" if job.v1_zeros else "v2"), a["qzeros"]
            if job.v1_zeros == WORD and m.bits != 3:  # as GPTQModel wrote it: one 32-bit add gives v2
                zeros, qzeros = "v2", packq.zeros_v1_to_v2(qzeros, bits=m.bits, convention=WORD)
            w = packq.dequantize_gptq(a["qweight"], qzeros, a["scales"], a.get("g_idx"), bits=m.bits, zeros=zeros)
    except ValueError as e:  # g_idx values out of range, say
        raise CheckpointError(f"{job.ckpt.root}: {m.prefix}: {e}") from None
    return to_float(np.swapaxes(np.asarray(w), -1, -2), job.to)


def to_float(w: np.ndarray, dtype: str) -> np.ndarray:
    """float16/float32 weights as a contiguous ``dtype`` array; bfloat16 as its raw uint16 bits, rounded to nearest even."""
    if dtype != "bfloat16":
        return np.ascontiguousarray(w, dtype=dtype)
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _write_index(ckpt: Checkpoint, tmp: Path, entries: dict[str, list[tuple]]) -> None:
    assert ckpt.index is not None
    index = json.loads(json.dumps(ckpt.index))
    index.setdefault("metadata", {})["total_size"] = sum(e[3] for es in entries.values() for e in es)
    index["weight_map"] = {e[0]: fname for fname, es in entries.items() for e in es}
    write_durable(tmp / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------ verify
def _module_arrays(ckpt: Checkpoint, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    m = ckpt.modules[prefix]
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        if part in m.names or part == "qzeros":
            yield part, module_array(ckpt, m, part, floats=part == "scales")


def _fields(qzeros: np.ndarray, bits: int) -> np.ndarray:
    return np.asarray(numpy_backend.run(B.unpack, qzeros.view(np.int32), direction="column", bits=bits)).astype(np.int16)


def _source_zero_points(job: _Job, qzeros: np.ndarray) -> np.ndarray:
    """A GPTQ source's zero-points, read as its producer wrote them (v2 and compressed-tensors: as stored)."""
    bits = job.ckpt.format.bits
    if job.ckpt.format.checkpoint_format == "gptq_v2":
        return _fields(qzeros, bits)
    return read_v1(_fields(qzeros, bits), qzeros.view(np.uint32), WORD if job.read_word else FIELD, bits)


def _result_zero_points(job: _Job, qzeros: np.ndarray) -> np.ndarray:
    """A GPTQ result's zero-points as the engine it was written for reads them (packq's reading without one)."""
    bits = job.ckpt.format.bits
    if job.target.checkpoint_format == "gptq_v2":
        return _fields(qzeros, bits)
    convention = job.target.convention
    if job.target.engine is not None:
        convention = ENGINES[job.target.engine].v1_convention(bits) or FIELD
    return read_v1(_fields(qzeros, bits), qzeros.view(np.uint32), convention, bits)


def _awq_weights(a: dict[str, np.ndarray]) -> np.ndarray:
    q = np.asarray(numpy_backend.run(awq.unpack_awq, a["qweight"].view(np.int32))).astype(np.int16)
    z = np.asarray(numpy_backend.run(awq.unpack_awq, a["qzeros"].view(np.int32))).astype(np.int16)
    return _dequantize(q, z, a["scales"], None)


def _gptq_weights(a: dict[str, np.ndarray], zero_points: Callable[[np.ndarray], np.ndarray], bits: int) -> np.ndarray:
    q = np.asarray(numpy_backend.run(B.unpack, a["qweight"].view(np.int32), direction="row", bits=bits))
    q = q.astype(np.int16)
    return _dequantize(q, zero_points(a["qzeros"]), a["scales"], a.get("g_idx"))


def _source_weights(job: _Job, prefix: str) -> np.ndarray:
    """A source module's weights (..., K, N) in the scales' dtype, read by the verification readers."""
    a = dict(_module_arrays(job.ckpt, prefix))
    if job.ckpt.format.method == "awq":
        return _awq_weights(a)
    return _gptq_weights(a, lambda z: _source_zero_points(job, z), job.ckpt.format.bits)


def _dequantize(q: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None) -> np.ndarray:
    if g_idx is None:
        return np.asarray(dequantize_grouped(numpy_backend.xp, q, z, scales))
    idx = g_idx.astype(np.int64)  # act-order: each row's own group
    return (q - np.take(z, idx, axis=-2)).astype(scales.dtype) * np.take(scales, idx, axis=-2)


def _verify_each(job: _Job, progress: bool | None, check: Callable[[str], None]) -> bool:
    """Run ``check(prefix)`` on every module, with a progress bar; it raises on the first disagreement."""
    bar = Progress(len(job.ckpt.modules), "verifying", progress)
    for prefix in job.ckpt.modules:
        check(prefix)
        bar.update(1)
    bar.close()
    return True


def _verify(job: _Job, out: Path, progress: bool | None) -> bool:
    """Dequantize every module of the source and of the result, a GPTQ result as its engine reads it.

    A compressed-tensors result is read back as packq reads any compressed-tensors folder (in GPTQ v2's
    layout), with its weight_shape checked. Raises unless they agree bit for bit, except in the pairs
    --allow-inexact accepted.
    """
    result = open_checkpoint(out)

    def check(prefix: str) -> None:
        m, r = job.ckpt.modules[prefix], result.modules[prefix]
        b = dict(_module_arrays(result, prefix))
        if job.to == "gptq":
            want = module_array(job.ckpt, m, "g_idx") if "g_idx" in m.names else np.arange(m.k) // (m.k // m.groups)
            if not np.array_equal(b["g_idx"], want):
                raise CheckpointError(f"verification failed: {prefix}.g_idx is not the source's")
            w_result = _gptq_weights(b, lambda z: _result_zero_points(job, z), m.bits)
        elif job.to == CT:
            shape = module_array(result, r, "shape").tolist()
            if shape != [*m.lead, m.n, m.k]:
                raise CheckpointError(f"verification failed: {prefix}.weight_shape is {shape}")
            w_result = _gptq_weights(b, lambda z: _fields(z, m.bits), m.bits)
        else:
            w_result = _awq_weights(b)
        if w_result.tobytes() != _source_weights(job, prefix).tobytes() and prefix not in job.target.inexact:
            raise CheckpointError(f"verification failed: {prefix} dequantizes differently after conversion")

    return _verify_each(job, progress, check)


def _verify_float(job: _Job, out: Path, progress: bool | None) -> bool:
    """Each module's float weight, read back one at a time, against the source dequantized by the verification readers."""
    where = {name: shard for shard in map(SafetensorsFile, sorted(out.glob("*.safetensors"))) for name in shard.tensors}

    def check(prefix: str) -> None:
        want = to_float(np.swapaxes(_source_weights(job, prefix), -1, -2), job.to)
        shard = where[f"{prefix}.weight"]
        with shard.open() as f:
            name = f"{prefix}.weight"
            got = f.array_bits(name) if shard.tensors[name].dtype == "BF16" else f.array(name)
        if want.shape != got.shape or want.tobytes() != got.tobytes():
            raise CheckpointError(f"verification failed: {prefix}.weight is not the dequantized source")

    return _verify_each(job, progress, check)
