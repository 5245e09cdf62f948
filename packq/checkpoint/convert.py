"""Convert a whole checkpoint on disk: AWQ (gemm) <-> GPTQ, streamed, verified, atomic.

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
import signal
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from packq import __version__, backends
from packq.checkpoint.files import Destination, copy_durable, io_errors, write_durable
from packq.checkpoint.model import INDEX, SIDECARS, Checkpoint, Module, open_checkpoint
from packq.checkpoint.progress import Progress
from packq.checkpoint.safetensors import SafetensorsFile, SafetensorsWriter, header_for
from packq.checkpoint.zeros import analyse, check_v1_readable
from packq.errors import CheckpointError
from packq.formats import awq, gptq
from packq.formats.engines import FIELD, WORD


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


def _target_config(ckpt: Checkpoint, to: str, checkpoint_format: str) -> dict[str, Any]:
    config = json.loads(json.dumps(ckpt.config))
    old = ckpt.format.raw
    if to == "gptq":
        q: dict[str, Any] = {
            "quant_method": "gptq", "bits": 4, "group_size": ckpt.format.group_size, "desc_act": False,
            "sym": False, "checkpoint_format": checkpoint_format, "true_sequential": True,
        }
        if checkpoint_format == "gptq":  # say how v1 zeros were written, so that any reader can know
            q["meta"] = {"quantizer": [f"packq:{__version__}"], "packq_v1_zeros": FIELD}
    else:
        q = {"quant_method": "awq", "bits": 4, "group_size": ckpt.format.group_size, "zero_point": True,
             "version": "gemm"}
    if old.get("modules_to_not_convert"):
        q["modules_to_not_convert"] = old["modules_to_not_convert"]
    config["quantization_config"] = q
    return config


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


def _plan(ckpt: Checkpoint, to: str, checkpoint_format: str) -> dict[str, list[tuple[str, str, Any]]]:
    """For every shard, the output tensors in order: (name, action, module or None)."""
    by_tensor = {f"{m.prefix}.{p}": (m, p) for m in ckpt.modules.values() for p in m.infos}
    plan: dict[str, list[tuple[str, str, Any]]] = {}
    for fname, shard in ckpt.shards.items():
        out = []
        for t in sorted(shard.tensors.values(), key=lambda t: t.begin):
            module, part = by_tensor.get(t.name, (None, None))
            if part == "qweight":
                out.append((t.name, "weight", module))
                if to == "gptq":
                    assert module is not None
                    out.append((f"{module.prefix}.g_idx", "g_idx", module))
            elif part == "qzeros":
                out.append((t.name, "zeros", module))
            elif part == "g_idx":
                continue  # to AWQ: checked trivial, then dropped
            else:
                out.append((t.name, "copy", None))
        plan[fname] = out
    return plan


def _out_entry(ckpt: Checkpoint, shard: SafetensorsFile, name: str, action: str, m: Module | None):
    """(name, dtype, shape, nbytes) of an output tensor, known before any conversion."""
    if action == "copy":
        t = shard.tensors[name]
        return name, t.dtype, t.shape, t.nbytes
    assert m is not None
    lead = m.infos["qweight"].shape[:-2]
    if action == "g_idx":
        return name, "I32", (m.k,), 4 * m.k
    if action == "weight":
        shape = (*lead, m.k // 8, m.n) if ckpt.format.method == "awq" else (*lead, m.k, m.n // 8)
    else:
        shape = m.infos["qzeros"].shape
    return name, "I32", shape, 4 * int(np.prod(shape))


def _check_gptq_source(ckpt: Checkpoint) -> None:
    """To AWQ, GPTQ must not be act-order: refuse by config, then by the g_idx values themselves."""
    if ckpt.format.desc_act:
        raise CheckpointError(
            f"{ckpt.root}: GPTQ with desc_act (act-order) cannot become AWQ without permuting input features"
        )
    for m in ckpt.modules.values():
        if "g_idx" in m.files:
            with ckpt.shards[m.files["g_idx"]] as f:
                g = f.array(f"{m.prefix}.g_idx")
            if not np.array_equal(g, np.arange(m.k) // (m.k // m.groups)):
                raise CheckpointError(
                    f"{ckpt.root}: {m.prefix}.g_idx is not arange(K) // group_size (act-order); "
                    "it cannot become AWQ without permuting input features"
                )


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str = "gptq",
    checkpoint_format: str = "gptq",
    backend: str = "numpy",
    verify: bool = False,
    force: bool = False,
    progress: bool | None = None,
    v1_zeros: str | None = None,
) -> dict[str, Any]:
    """Convert an AWQ (gemm) checkpoint folder to GPTQ, or GPTQ to AWQ, bit-exactly.

    Parameters
    ----------
    src, dst : path
        The source model folder (never written) and the folder to create.
    to : {"gptq", "awq"}
        Target format. "gptq" needs an AWQ source, "awq" a 4-bit GPTQ source without act-order.
    checkpoint_format : {"gptq", "gptq_v2"}
        GPTQ zero storage to write ("gptq": z - 1, the usual) when ``to="gptq"``.
    backend : {"numpy", "jax"}
        Which backend converts the tensors.
    verify : bool
        Dequantize every module of source and result and compare bit for bit
        before DST is put in place.
    force : bool
        Replace an existing DST (only once the new one is complete).
    progress : bool, optional
        Show a progress bar; default: when standard error is a terminal.
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
    ...     s = convert_checkpoint(example, pathlib.Path(tmp) / "gptq", verify=True)
    >>> s["modules"], s["tensors_in"], s["tensors_out"], s["verified"]
    (14, 49, 63, True)
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if to not in ("gptq", "awq"):
        raise CheckpointError(f"to must be 'gptq' or 'awq', got {to!r}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    if v1_zeros not in (None, FIELD, WORD):
        raise CheckpointError(f"v1_zeros must be 'field' or 'word', got {v1_zeros!r}")
    ckpt = open_checkpoint(src)
    want = "awq" if to == "gptq" else "gptq"
    if ckpt.format.method != want:
        raise CheckpointError(f"{src}: is {ckpt.format.name}; converting to {to} needs {'an AWQ' if want == 'awq' else 'a GPTQ'} source")
    _check_paths(src, dst)
    convert = _Converter(backend)
    read_word = False
    if to == "awq":
        _check_gptq_source(ckpt)
        if ckpt.format.checkpoint_format == "gptq":
            report = analyse(ckpt, v1_zeros)
            check_v1_readable(ckpt, report)
            read_word = report.convention == WORD and ckpt.format.bits != 3
    plan = _plan(ckpt, to, checkpoint_format)
    entries = {f: [_out_entry(ckpt, ckpt.shards[f], *item) for item in items] for f, items in plan.items()}
    for fname, es in entries.items():  # refuse now, not after writing, a header packq could not read back
        header_for(es, ckpt.shards[fname].metadata, dst / fname)
    extra = _extra_files(ckpt)

    bar = Progress(sum(e[3] for es in entries.values() for e in es), "converting", progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with Destination(dst, force) as out:
            tmp = out.tmp
            for fname, items in plan.items():
                _write_shard(ckpt, fname, items, entries[fname], tmp / fname, convert, to, checkpoint_format, bar,
                             read_word)
            for rel, path, size in extra:
                if len(rel.parts) > 1:
                    with io_errors(tmp / rel.parent):
                        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
                copy_durable(path, tmp / rel, size)
            config = _target_config(ckpt, to, checkpoint_format)
            write_durable(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
            for name in SIDECARS:  # engines read these before config.json: they must state the new format too
                if (ckpt.root / name).exists():
                    sidecar = json.dumps(config["quantization_config"], indent=2) + "\n"
                    write_durable(tmp / name, sidecar.encode())
            if ckpt.index is not None:
                _write_index(ckpt, tmp, entries)
            bar.close()
            verified = _verify(ckpt, tmp, to, checkpoint_format, progress, read_word) if verify else None
            out.commit()
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {
        "src": str(src), "dst": str(dst), "from": ckpt.format.name, "to": to,
        "checkpoint_format": checkpoint_format if to == "gptq" else None, "backend": backend,
        "group_size": ckpt.format.group_size, "shards": len(ckpt.shards), "modules": len(ckpt.modules),
        "tensors_in": ckpt.tensor_count(), "tensors_out": sum(len(e) for e in entries.values()),
        "bytes_in": ckpt.total_bytes(), "bytes_out": sum(e[3] for es in entries.values() for e in es),
        "verified": verified, "seconds": round(time.perf_counter() - t0, 3),
    }


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_shard(ckpt, fname, items, entries, path, convert, to, checkpoint_format, bar, read_word) -> None:
    """Write one output shard; the next tensor converts on a worker thread while this one is written."""
    with ckpt.shards[fname] as f, ThreadPoolExecutor(max_workers=1) as pool:
        pending: dict[int, Future[np.ndarray]] = {}

        def start(i: int) -> None:
            if i < len(items) and items[i][1] != "copy":
                name, action, m = items[i]
                pending[i] = pool.submit(_tensor, f, ckpt, name, action, m, convert, to, checkpoint_format, read_word)

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


def _tensor(f, ckpt, name, action, m, convert, to, checkpoint_format, read_word=False):
    if action == "g_idx":
        return (np.arange(m.k, dtype=np.int32) // (m.k // m.groups)).astype("<i4")
    if action == "weight":
        fn = awq.weight_to_gptq if to == "gptq" else awq.weight_to_awq
        return convert(fn, f.array(name))
    # zeros: GPTQ v1 stores z - 1, v2 stores z; AWQ stores z
    v1 = _gptq_format(ckpt, to, checkpoint_format) == "gptq"
    if to == "gptq":
        return convert(awq.zeros_to_gptq, f.array(name), offset=-1 if v1 else 0)
    if read_word:  # v1 written as one 32-bit subtraction: add the word back, then it is v2
        return convert(awq.zeros_to_awq, convert(gptq.zeros_word_add, f.array(name), delta=1, bits=4), offset=0)
    return convert(awq.zeros_to_awq, f.array(name), offset=1 if v1 else 0)


def _gptq_format(ckpt: Checkpoint, to: str, checkpoint_format: str) -> str:
    """The checkpoint_format of the GPTQ side of a conversion: the one written, or the one read."""
    return checkpoint_format if to == "gptq" else ckpt.format.checkpoint_format


def _write_index(ckpt: Checkpoint, tmp: Path, entries: dict[str, list[tuple]]) -> None:
    assert ckpt.index is not None
    index = json.loads(json.dumps(ckpt.index))
    index.setdefault("metadata", {})["total_size"] = sum(e[3] for es in entries.values() for e in es)
    index["weight_map"] = {e[0]: fname for fname, es in entries.items() for e in es}
    write_durable(tmp / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------ verify
def _module_arrays(ckpt: Checkpoint, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    for part, fname in ckpt.modules[prefix].files.items():
        with ckpt.shards[fname] as f:
            t = f.tensors[f"{prefix}.{part}"]
            if t.dtype == "BF16":  # bfloat16 -> float32 is exact: its bits are float32's top half
                a = (f.array_bits(f"{prefix}.{part}").astype(np.uint32) << 16).view(np.float32)
            else:
                a = f.array(f"{prefix}.{part}")
            yield part, a


def _verify(ckpt: Checkpoint, out: Path, to: str, checkpoint_format: str, progress: bool | None,
            read_word: bool = False) -> bool:
    """Dequantize every module of the source and of the result; raise unless they agree bit for bit."""
    import packq

    result = open_checkpoint(out)
    bar = Progress(len(ckpt.modules), "verifying", progress)
    for prefix in ckpt.modules:
        a = dict(_module_arrays(ckpt, prefix))
        b = dict(_module_arrays(result, prefix))
        awq_side, gptq_side = (a, b) if to == "gptq" else (b, a)
        zeros = "v2" if _gptq_format(ckpt, to, checkpoint_format) == "gptq_v2" else "v1"
        if read_word:  # read the source as its producer wrote it
            gptq_side["qzeros"], zeros = packq.zeros_v1_to_v2(gptq_side["qzeros"], convention=WORD), "v2"
        w_awq = packq.dequantize_awq(awq_side["qweight"], awq_side["qzeros"], awq_side["scales"])
        w_gptq = packq.dequantize_gptq(
            gptq_side["qweight"], gptq_side["qzeros"], gptq_side["scales"], gptq_side.get("g_idx"), zeros=zeros
        )
        if w_awq.tobytes() != w_gptq.tobytes():
            raise CheckpointError(f"verification failed: {prefix} dequantizes differently after conversion")
        bar.update(1)
    bar.close()
    return True
