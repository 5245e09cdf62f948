"""Convert a whole checkpoint on disk between AWQ, GPTQ, compressed-tensors and float: streamed, verified, atomic.

The source is opened and checked completely (config, index, every shard
header, every quantized module's shapes) before anything is written. The
result is built in a hidden folder beside DST and renamed into place only
when complete, so DST either does not exist or is a finished checkpoint.
Tensors are read and converted one at a time, and the others are copied by
the kernel (copy_file_range): memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packq import backends
from packq.backends.numpy import deferred_kernels
from packq.checkpoint.files import Destination, copy_durable, io_errors, write_durable
from packq.checkpoint.folder import INDEX, SIDECARS, open_checkpoint
from packq.checkpoint.formats import FORMATS, TARGETS, route
from packq.checkpoint.formats.base import CheckpointFormat, Piece
from packq.checkpoint.hub import resolve
from packq.checkpoint.model import Checkpoint, Module, act_order, module_array, stored_to_canonical
from packq.checkpoint.progress import Progress
from packq.checkpoint.safetensors import Reader, SafetensorsFile, SafetensorsWriter, header_for
from packq.checkpoint.zeros import Target, analyse, check_v1_readable, plan_gptq
from packq.errors import CheckpointError
from packq.formats.engines import FIELD, WORD

#: quantized weights from which ``packq convert`` loads numba's kernels (on a thread, the ufuncs converting meanwhile)
KERNELS_FROM_BYTES = 4 << 30
#: converted pieces may wait to be written up to this many times the largest piece (a block, or a whole
#: tensor where the target does not stream): at least one converts ahead of the one being written
LOOKAHEAD = 2

#: bytes per element of the dtypes packq writes
ITEMSIZE = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}


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


@dataclass
class Job:
    """What one conversion decided before writing anything."""

    ckpt: Checkpoint
    to: str
    convert: Converter
    target: Target  # to GPTQ: format, v1 convention, rebias; to AWQ: the source's format
    read_word: bool = False  # to AWQ: the v1 source was written as one 32-bit subtraction
    symmetric: bool = False  # to compressed-tensors: every zero-point is 2**(bits-1), so none are stored

    @property
    def source(self) -> CheckpointFormat:
        return FORMATS[self.ckpt.format.kind]

    @property
    def output(self) -> CheckpointFormat:
        return FORMATS[self.to]

    def read(self, m: Module, part: str, f: Reader | None = None) -> np.ndarray:
        """A module's qweight or qzeros in the AWQ or GPTQ layout: from ``f`` (the shard being written) when
        it holds it, else from its own shard; made where the source stores none (symmetric zeros)."""
        if f is not None and part in m.names and f.path == self.ckpt.shards[m.files[part]].path:
            return stored_to_canonical(m, part, f.array(m.names[part]))
        return module_array(self.ckpt, m, part)

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


class Converter:
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


def _plan(job: Job) -> dict[str, list[tuple[str, str, Module | None]]]:
    """For every shard, the output tensors in order: (name, action, module or None), as the target format makes them."""
    by_tensor = {name: (m, p) for m in job.ckpt.modules.values() for p, name in m.names.items()}
    plan: dict[str, list[tuple[str, str, Module | None]]] = {}
    for fname, shard in job.ckpt.shards.items():
        out: list[tuple[str, str, Module | None]] = []
        for t in sorted(shard.tensors.values(), key=lambda t: t.begin):
            module, part = by_tensor.get(t.name, (None, None))
            if module is None or part is None:
                out.append((t.name, "copy", None))
                continue
            out += [(f"{module.prefix}.{name}", action, module) for name, action in job.output.outputs(job, module, part)]
        plan[fname] = out
    return plan


def _out_entry(job: Job, shard: SafetensorsFile, name: str, action: str, m: Module | None):
    """(name, dtype, shape, nbytes) of an output tensor, known before any conversion."""
    if action == "copy":  # a tensor kept as it is: not a module's, or a module's part under the same name
        t = shard.tensors[name if m is None else m.names[name.rsplit(".", 1)[-1]]]
        return name, t.dtype, t.shape, t.nbytes
    assert m is not None
    dtype, shape = job.output.entry(job, m, action)
    return name, dtype, shape, ITEMSIZE[dtype] * int(np.prod(shape))


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
    gguf_type: str | None = None,
) -> dict[str, Any]:
    """Convert a quantized checkpoint folder to another format, bit-exactly (see ``packq formats``).

    Parameters
    ----------
    src, dst : path
        The source model folder (never written) and the folder to create. SRC may also be
        a Hugging Face Hub repo id ("org/name"), read from the local cache (offline) or
        downloaded; this needs ``packq[hub]``.
    to : {"gptq", "awq", "compressed-tensors", "float16", "bfloat16", "float32"}
        Target format (:data:`packq.checkpoint.formats.TARGETS`); the source is AWQ gemm, GPTQ
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
    gguf_type : {"auto", "q4_0", "q5_0", "q8_0", "f16", "bf16", "f32"}, optional
        With ``to="gguf"`` (DST is then one file, DST.gguf): the type of every quantized tensor;
        "auto" (the default) gives each the smallest of Q4_0, Q5_0, Q8_0 that holds it exactly. A
        type that does not hold a tensor exactly is refused unless ``allow_inexact``; F32 is always
        exact, F16 is what AWQ/GPTQ engines compute (one rounding of (q - z) * s).
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
    if not route(ckpt.format.kind, to):
        raise CheckpointError(f"{src}: is {ckpt.format.name} already; choose another --to")
    if to == "awq" and ckpt.format.bits != 4:
        raise CheckpointError(f"{src}: is {ckpt.format.name}; AWQ gemm holds 4-bit weights only")
    if ckpt.format.method == "gptq" and not FORMATS[to].act_order and act_order(ckpt):
        raise CheckpointError(
            f"{src}: GPTQ act-order (desc_act, or a g_idx that is not arange(K) // group_size) has no "
            f"{FORMATS[to].title} form: {FORMATS[to].why_not_act_order}"
        )
    _check_paths(src, dst)
    convert = Converter(backend)
    if to != "gptq" and for_engine is not None:
        raise CheckpointError(f"--for names the engine that loads a GPTQ result; converting to {to} takes none")
    if to != "gguf" and gguf_type is not None:
        raise CheckpointError(f"--gguf-type is for --to gguf; converting to {to} takes none")
    report = analyse(ckpt, v1_zeros)  # every zero-point, a v1 source's read as its producer wrote it
    check_v1_readable(ckpt, report)
    fmt = "awq" if ckpt.format.method == "awq" else ckpt.format.checkpoint_format
    read_word = report.convention == WORD and fmt == "gptq"
    if FORMATS[to].container == "gguf":
        return _convert_gguf(ckpt, given, dst, gguf_type or "auto", allow_inexact, read_word, verify, force, progress, t0)
    if to == "gptq":
        job = Job(ckpt, to, convert, plan_gptq(ckpt, report, for_engine, checkpoint_format, allow_inexact), read_word)
    else:  # to AWQ, compressed-tensors or a float dtype
        job = Job(ckpt, to, convert, Target(fmt), read_word, symmetric=report.symmetric)
    checkpoint_format = job.gptq_format
    plan = _plan(job)
    entries = {f: [_out_entry(job, ckpt.shards[f], *item) for item in items] for f, items in plan.items()}
    for fname, es in entries.items():  # refuse now, not after writing, a header packq could not read back
        header_for(es, ckpt.shards[fname].metadata, dst / fname)
    extra = _extra_files(ckpt)

    bar = Progress(sum(e[3] for es in entries.values() for e in es), "converting", progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    # numba repays its load (0.5 s) only on large checkpoints (measured: 1.0 against 1.45 s a GB once
    # loaded, 2 cores); until it is loaded, or on small ones, the ufuncs convert
    large = sum(m.infos["qweight"].nbytes for m in ckpt.modules.values()) > KERNELS_FROM_BYTES
    try:
        with Destination(dst, force) as out, deferred_kernels(load=large):
            tmp = out.tmp
            # each shard is fsynced on a thread of its own while the next one is written
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="packq-fsync") as syncer:
                synced = []
                try:
                    for fname, items in plan.items():
                        writer = _write_shard(job, fname, items, entries[fname], tmp / fname, bar)
                        synced.append(syncer.submit(writer.close))
                finally:  # every file closed before DST is committed or cleared; the first error raised
                    for fut in synced:
                        fut.exception()
                for fut in synced:
                    fut.result()
            for rel, path, size in extra:
                if len(rel.parts) > 1:
                    with io_errors(tmp / rel.parent):
                        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
                copy_durable(path, tmp / rel, size)
            config = json.loads(json.dumps(ckpt.config))
            job.output.config(job, config)
            write_durable(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
            for name in SIDECARS:  # engines read these before config.json: they must state the new format too
                if (ckpt.root / name).exists() and job.output.sidecars:  # (others drop them)
                    sidecar = json.dumps(config["quantization_config"], indent=2) + "\n"
                    write_durable(tmp / name, sidecar.encode())
            if ckpt.index is not None:
                _write_index(ckpt, tmp, entries)
            bar.close()
            verified: bool | None
            if verify:
                verified = _verify(job, tmp, progress)
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


def _convert_gguf(ckpt: Checkpoint, given: Path, dst: Path, gguf_type: str, allow_inexact: bool, read_word: bool,
                  verify: bool, force: bool, progress: bool | None, t0: float) -> dict[str, Any]:
    """To one GGUF file: the model planned (gguf_model), every tensor's type decided (refusing inexact ones)
    before any write, then the file written by the GGUF container and verified before it is put in place."""
    from packq.checkpoint.containers import gguf as container
    from packq.checkpoint.formats import gguf as fmt
    from packq.formats import gguf as blocks

    gguf = container.gguf_package()
    from packq.checkpoint.gguf_model import describe

    parts = {name for m in ckpt.modules.values() for name in m.names.values()}
    shapes = {t.name: t.shape for s in ckpt.shards.values() for t in s.tensors.values() if t.name not in parts}
    model = describe(ckpt.root, ckpt.config, shapes, {p: (m.k, m.n) for p, m in ckpt.modules.items()})
    gplan = fmt.plan(ckpt, model, gguf_type, allow_inexact, read_word)
    tensors = [container.Tensor(p.name, blocks.TYPES[p.gguf_type].ggml, p.shape, p.nbytes,
                                functools.partial(fmt.chunks, ckpt, p, read_word)) for p in gplan.tensors]
    keys = {k for k, _, _ in model.metadata}
    own = [(k, v, gguf.GGUFValueType.UINT32) for k, v in
           (("general.file_type", gplan.file_type), ("general.quantization_version", gguf.GGML_QUANT_VERSION)) if k not in keys]
    bar = Progress(sum(t.nbytes for t in tensors), "converting", progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with container.FileDestination(dst, force) as out:
            container.write(out.tmp, model.arch, [*model.metadata, *own], tensors, bar.update)
            bar.close()
            if verify:
                vbar = Progress(len(gplan.tensors), "verifying", progress)
                fmt.verify(ckpt, gplan, out.tmp, read_word, lambda p: vbar.update(1))
                vbar.close()
            out.commit()
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    quantized = [p for p in gplan.tensors if p.census is not None]
    weights = sum(p.census.weights for p in quantized if p.census is not None)
    source_bytes = sum(i.nbytes for m in ckpt.modules.values() for i in m.infos.values())
    return {
        "src": str(given), "resolved": str(ckpt.root), "dst": str(dst), "from": ckpt.format.name, "to": "gguf",
        "architecture": model.arch, "gguf_type": gguf_type, "types": gplan.types(),
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "modules": len(ckpt.modules),
        "tensors_in": ckpt.tensor_count(), "tensors_out": len(tensors), "dropped": dict(model.dropped),
        "bytes_in": ckpt.total_bytes(), "bytes_out": os.path.getsize(dst),
        "bits_per_weight_in": round(8 * source_bytes / weights, 3) if weights else None,
        "bits_per_weight_out": round(8 * sum(p.nbytes for p in quantized) / weights, 3) if weights else None,
        "inexact_tensors": [p.name for p in gplan.inexact],
        "max_weight_error": max((p.max_error for p in gplan.inexact), default=0.0),
        "verified": True if verify else None, "seconds": round(time.perf_counter() - t0, 3),
    }


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _units(job: Job, f: Reader, items, entries) -> list[tuple[int, Piece]]:
    """The pieces of a shard's output tensors in file order, each with its output tensor's index in the shard."""
    units: list[tuple[int, Piece]] = []
    for i, ((name, action, m), entry) in enumerate(zip(items, entries)):
        if action == "copy":  # not a module's tensor, or a module's part kept under its name
            stored = name if m is None else m.names[name.rsplit(".", 1)[-1]]
            pieces = [Piece(entry[3], copy=(stored, 0))]
        else:
            pieces = job.output.pieces(job, f, m, action) or [
                Piece(entry[3], make=functools.partial(_tensor, job, f, name, action, m))]
        units += [(i, piece) for piece in pieces]
    return units


def _write_shard(job: Job, fname: str, items, entries, path: Path, bar: Progress) -> SafetensorsWriter:
    """Write one output shard, piece by piece; later pieces convert on a worker thread while earlier ones are written.

    Returns the writer with every tensor written and the file not yet fsynced: the caller syncs it
    while the next shard is written (``SafetensorsWriter.close``), or aborts it.
    """
    with job.ckpt.shards[fname].open() as f, ThreadPoolExecutor(max_workers=1) as pool:
        units = _units(job, f, items, entries)
        pending: dict[int, Future[np.ndarray]] = {}
        # converted pieces waiting to be written take at most LOOKAHEAD times the largest piece, so that
        # the next large one converts while smaller ones are written, and memory stays bounded
        budget, nxt = LOOKAHEAD * max((p.nbytes for _, p in units if p.make is not None), default=0), 0

        def fill() -> None:
            nonlocal nxt
            while nxt < len(units):
                piece = units[nxt][1]
                if piece.make is not None:
                    if pending and sum(units[j][1].nbytes for j in pending) + piece.nbytes > budget:
                        return
                    pending[nxt] = pool.submit(piece.make)
                nxt += 1

        writer = SafetensorsWriter(path, entries, f.metadata)
        try:
            fill()
            for k, (i, piece) in enumerate(units):
                if k == 0 or units[k - 1][0] != i:
                    writer.start(entries[i][0], entries[i][3])
                if piece.copy is not None:
                    writer.append_copy(f, piece.copy[0], piece.copy[1], piece.nbytes)
                else:
                    data = pending.pop(k).result()
                    fill()  # the next pieces convert while this one is written
                    writer.append(data)
                    del data
                if k + 1 == len(units) or units[k + 1][0] != i:
                    writer.end()
                bar.update(piece.nbytes)
            writer.finish()
            return writer
        except BaseException:
            for fut in pending.values():
                fut.cancel()
            writer.abort()
            raise


def _tensor(job: Job, f: Reader, name: str, action: str, m: Module) -> np.ndarray:
    """The output tensor ``name``, made by the target format."""
    return job.output.tensor(job, f, m, action)


def _write_index(ckpt: Checkpoint, tmp: Path, entries: dict[str, list[tuple]]) -> None:
    assert ckpt.index is not None
    index = json.loads(json.dumps(ckpt.index))
    index.setdefault("metadata", {})["total_size"] = sum(e[3] for es in entries.values() for e in es)
    index["weight_map"] = {e[0]: fname for fname, es in entries.items() for e in es}
    write_durable(tmp / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------ verify
def _verify(job: Job, out: Path, progress: bool | None) -> bool:
    """The target format compares every module of the result with the source, with a progress bar."""
    bar = Progress(len(job.ckpt.modules), "verifying", progress)

    def each(check: Callable[[str], None]) -> None:
        for prefix in job.ckpt.modules:
            check(prefix)
            bar.update(1)

    job.output.verify(job, out, each)
    bar.close()
    return True
