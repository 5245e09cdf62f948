"""The GGUF container: one file DST.gguf, built beside DST, fsynced, renamed into place.

The same guarantees as the safetensors folder (``packq.checkpoint.files``): SRC is never written; DST
is at every moment absent, the old file, or the complete new one (built as a hidden file beside it and
put in place by one ``renameat2``); one conversion per DST (the lock file beside it); every failure one
line. The header, metadata and tensor infos are written by gguf-py's own ``GGUFWriter`` (the ``gguf``
package, llama.cpp's reference writer), from the sizes planned before any conversion; the tensor data
then follows in file order, each tensor in pieces (a module in column blocks, stacked experts expert by
expert), so memory holds one piece, never a whole tensor, let alone the model.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packq.checkpoint.containers.base import Container, Plan
from packq.checkpoint.files import io_errors
from packq.checkpoint.formats.base import Piece
from packq.checkpoint.safetensors import Buffers, StagedWriter, Stored
from packq.errors import CheckpointError

if TYPE_CHECKING:
    from packq.checkpoint.job import Job
    from packq.checkpoint.progress import Progress

#: general.alignment: gguf-py's and llama.cpp's default
ALIGNMENT = 32
#: pieces made on worker threads at once (NumPy releases the GIL: 1.5x on 2 cores, measured), and how many wait
WORKERS, LOOKAHEAD = 2, 3
#: tensors whose first step (reading their module's arrays) runs ahead of the one being written (memory: that many
#: modules' words more, 22 MB each for a 7B's MLP, 117 MB for a 70B's)
READ_AHEAD = 2

#: a tensor's piece: its bytes (made already), a call that makes them (a Piece when it says their size), or a stored
#: tensor's bytes as they are
Part = np.ndarray | Callable[[], np.ndarray] | Piece | Stored


def gguf_package() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("--to gguf needs llama.cpp's gguf-py: pip install 'packq[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: its name, ggml type, shape in NumPy order (ne reversed), size, and its data in pieces."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    nbytes: int
    #: uint8 arrays whose bytes follow each other, or calls that make them (run on worker threads, in order)
    pieces: Callable[[], Iterable[Part]]


class GGUFFile(Container):
    """One llama.cpp GGUF file: the model planned by gguf_model, every tensor's type by the GGUF format."""

    name = "gguf"
    single_file = True

    def plan(self, job: Job, dst: Path) -> Plan:
        """The model (gguf_model.describe: architecture, metadata, tensor names and order), then every tensor's type
        and size (:func:`packq.checkpoint.formats.gguf.plan`, refusing inexact tensors): all before any write."""
        from packq.checkpoint.formats import gguf as fmt
        from packq.formats import gguf as blocks

        if dst.is_dir() and not dst.is_symlink():
            raise CheckpointError(f"DST {dst} is a folder; --to gguf writes one file: name it DST.gguf")
        gguf = gguf_package()
        from packq.checkpoint.gguf_model import describe

        ckpt = job.ckpt
        parts = {name for m in ckpt.modules.values() for name in m.names.values()}
        shapes = {t.name: t.shape for s in ckpt.shards.values() for t in s.tensors.values() if t.name not in parts}
        model = describe(ckpt.root, ckpt.config, shapes, {p: (m.k, m.n) for p, m in ckpt.modules.items()})
        gplan = fmt.plan(ckpt, model, job.options.get("gguf_type") or "auto", bool(job.options.get("allow_inexact")),
                         job.read_word)
        tensors = [Tensor(p.name, blocks.TYPES[p.gguf_type].ggml, p.shape, p.nbytes,
                          functools.partial(fmt.chunks, ckpt, p, job.read_word, job.buffers)) for p in gplan.tensors]
        keys = {k for k, _, _ in model.metadata}
        own = [(k, v, gguf.GGUFValueType.UINT32) for k, v in (("general.file_type", gplan.file_type),
               ("general.quantization_version", gguf.GGML_QUANT_VERSION)) if k not in keys]
        quantized = [p for p in gplan.tensors if p.census is not None]
        weights = sum(p.census.weights for p in quantized if p.census is not None)
        source = sum(i.nbytes for m in ckpt.modules.values() for i in m.infos.values())
        summary = {
            "architecture": model.arch, "gguf_type": job.options.get("gguf_type") or "auto", "types": gplan.types(),
            "dropped": dict(model.dropped),
            "bits_per_weight_in": round(8 * source / weights, 3) if weights else None,
            "bits_per_weight_out": round(8 * sum(p.nbytes for p in quantized) / weights, 3) if weights else None,
            "inexact_tensors": [p.name for p in gplan.inexact],
            "max_weight_error": max((p.max_error for p in gplan.inexact), default=0.0),
        }
        return Plan(len(tensors), sum(t.nbytes for t in tensors), (model, gplan, tensors, [*model.metadata, *own]),
                    summary)

    def write(self, job: Job, plan: Plan, tmp: Path, bar: Progress) -> None:
        model, _, tensors, metadata = plan.detail
        write(tmp, model.arch, metadata, tensors, bar.update, job.buffers)
        plan.summary["file_bytes"] = tmp.stat().st_size  # bytes_out counts tensor data; this, the whole file

    def verify(self, job: Job, plan: Plan, tmp: Path, check_each: Callable[[Callable[[str], None]], None]) -> None:
        """Read the file back and dequantize every tensor as ggml does: the source's exact weights, bit for bit."""
        from packq.checkpoint.formats import gguf as fmt

        _, gplan, _, _ = plan.detail
        fmt.verify(job.ckpt, gplan, tmp, job.read_word, check_each)


def write(path: Path, arch: str, metadata: list[tuple[str, Any, Any]], tensors: list[Tensor],
          progress: Callable[[int], None] | None = None, buffers: Buffers | None = None) -> None:
    """Write the GGUF file ``path`` (which must not exist): header, metadata in order, tensor infos, then every
    tensor's pieces in order, each tensor aligned; fsynced before it returns.

    gguf-py writes the header, metadata and tensor infos; the tensor data (nearly all of the file) then goes
    through a :class:`~packq.checkpoint.safetensors.StagedWriter`, directly to the disk where the file system
    takes it, as the safetensors folder's files do. Each piece, once written, is given back to ``buffers``
    (where it is one of theirs), for the pieces after it.
    """
    gguf = gguf_package()
    writer = gguf.GGUFWriter(None, arch)
    for key, value, vtype in metadata:
        if key == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer's own first key
        if vtype is None:
            vtype = gguf.GGUFValueType.get_type(value)
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType.get_type(value[0]) if len(value) else gguf.GGUFValueType.STRING
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in tensors:
        byte_shape = (*t.shape[:-1], t.nbytes // max(1, int(np.prod(t.shape[:-1]))))
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
        if tuple(writer.tensors[-1][t.name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {t.name}: shape {t.shape} does not fit {t.nbytes} bytes of its type")
    with io_errors(path):
        writer.write_header_to_file(path)
        try:
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            assert writer.fout is not None
            out = writer.fout[0]
            _pad(out, out.tell())
            out.flush()
            made = os.fstat(out.fileno())
            # gguf-py's file is write-only and buffered; the data goes through a descriptor of our own that can
            # read back the first partial block (for direct writes), opened on the same file (checked below)
            data = open(path, "r+b", buffering=0)
        finally:
            writer.close()
        try:
            st = os.fstat(data.fileno())
            if (st.st_dev, st.st_ino, st.st_size) != (made.st_dev, made.st_ino, made.st_size):
                raise CheckpointError(f"{path}: replaced or written by another program while packq wrote it")
            data.seek(0, os.SEEK_END)
            staged = StagedWriter(data, sum(t.nbytes + -t.nbytes % ALIGNMENT for t in tensors), buffers)
            try:
                with (ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="packq-gguf") as pool,
                      ThreadPoolExecutor(max_workers=1, thread_name_prefix="packq-gguf-read") as ahead):
                    _write_tensors(path, staged, tensors, _stream(tensors, ahead), pool, progress, buffers)
                staged.close()
            except BaseException:
                staged.abort()
                raise
            os.fsync(data.fileno())
        finally:
            data.close()


def _begin(t: Tensor) -> Iterator[Part]:
    """The tensor's pieces, the first one already taken (which reads what the tensor is made from)."""
    it = iter(t.pieces())
    first = next(it, None)
    return it if first is None else itertools.chain((first,), it)


def _stream(tensors: list[Tensor], ahead: ThreadPoolExecutor) -> Iterator[tuple[int, Part]]:
    """Every tensor's pieces in file order, each with its tensor's index; the next :data:`READ_AHEAD` tensors' first
    steps (reading their modules' arrays) on the thread ``ahead`` while this one's pieces are made and written (the
    reads and the writes were in turn on one thread, the workers idle meanwhile; with one tensor read ahead, the
    writer still waited at a tensor's start for its read, sampled on the main thread, while the workers idled)."""
    following = deque(ahead.submit(_begin, t) for t in tensors[:READ_AHEAD])
    try:
        for i in range(len(tensors)):
            pieces = following.popleft().result()
            if i + READ_AHEAD < len(tensors):
                following.append(ahead.submit(_begin, tensors[i + READ_AHEAD]))
            for piece in pieces:
                yield i, piece
    finally:  # (a write that failed, or an interrupt: the reads not started yet are not made)
        for f in following:
            f.cancel()


def _write_tensors(path: Path, out: StagedWriter, tensors: list[Tensor], stream: Iterator[tuple[int, Part]],
                   pool: ThreadPoolExecutor, progress: Callable[[int], None] | None, buffers: Buffers | None) -> None:
    """The tensors' pieces in order, each tensor then padded to the alignment; the next few pieces made on the pool
    while one is written, across tensor boundaries (a tensor's last pieces are made while the next one's first are:
    waiting for each tensor to drain left the workers idle between the 75 tensors of a 7B model)."""
    pending: deque[tuple[int, Future[Any]]] = deque()
    # every tensor's data starts where the plan put it (aligned), so a piece's file offset is known before it is made
    # wherever the pieces before it in its tensor said their sizes: it is then made at that offset's phase, and
    # written from its own memory (Buffers.making)
    starts = list(itertools.accumulate((t.nbytes + -t.nbytes % ALIGNMENT for t in tensors), initial=out.position))
    queued: list[int | None] = [0] * len(tensors)  # each tensor's bytes queued so far; None after a call of no size

    def fill() -> None:
        while len(pending) < LOOKAHEAD:
            item = next(stream, None)
            if item is None:
                return
            i, piece = item
            at = queued[i]
            size: int | None = None
            fut: Future[Any]
            if isinstance(piece, Piece):  # a call that says its size
                assert piece.make is not None
                fut = (pool.submit(piece.make) if at is None or buffers is None
                       else pool.submit(buffers.making, starts[i] + at, piece.make))
                size = piece.nbytes
            elif callable(piece):
                fut = pool.submit(piece)
            else:  # made already, or a stored tensor's bytes, read into the stage when its turn comes
                fut = Future()
                fut.set_result(piece)
                size = piece.nbytes
            pending.append((i, fut))
            queued[i] = None if at is None or size is None else at + size

    written = [0] * len(tensors)
    current = 0  # the tensor being written; those before it are complete and padded

    def finish(i: int) -> None:
        if written[i] != tensors[i].nbytes:
            raise CheckpointError(f"{path}: {tensors[i].name}: {written[i]} bytes made, {tensors[i].nbytes} planned")
        _pad(out, out.position)

    try:
        fill()
        while pending:
            i, fut = pending.popleft()
            piece = fut.result()
            fill()  # the next pieces are made while this one is written
            while current < i:
                finish(current)
                current += 1
            data = None if isinstance(piece, Stored) else memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            nbytes = piece.nbytes if data is None else data.nbytes
            written[i] += nbytes
            if written[i] > tensors[i].nbytes:
                raise CheckpointError(f"{path}: {tensors[i].name}: more data than planned ({tensors[i].nbytes} bytes)")
            if data is None:  # a plain tensor's bytes as stored: read from its shard straight into the stage
                with piece.file.open() as f:
                    out.copy(f, piece.name, piece.offset, nbytes)
            else:
                out.write(data, piece if buffers is not None else None)  # (given back to the buffers once written)
            if progress is not None:
                progress(nbytes)
            del data, piece
        while current < len(tensors):
            finish(current)
            current += 1
    finally:
        for _, fut in pending:
            fut.cancel()
        close = getattr(stream, "close", None)
        if close is not None:  # (now, not when the traceback lets go of it: its reads not started are cancelled)
            close()


def _pad(out: Any, position: int) -> None:
    n = -position % ALIGNMENT
    if n:
        out.write(memoryview(b"\0" * n))


def read_summary(path: Path) -> dict[str, Any]:
    """What a .gguf file holds: architecture, its metadata's size, and every tensor's name, type, shape and size."""
    gguf = gguf_package()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a GGUF file packq can read: {e}") from None
    except Exception as e:  # noqa: BLE001 - gguf-py raises what its parser meets in a malformed file
        raise CheckpointError(f"{path}: malformed GGUF file: {type(e).__name__}: {e}") from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # noqa: BLE001
            return None

    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    by_type: dict[str, dict[str, int]] = {}
    for t in tensors:
        entry = by_type.setdefault(t["type"], {"tensors": 0, "bytes": 0, "weights": 0})
        entry["tensors"] += 1
        entry["bytes"] += t["bytes"]
        entry["weights"] += int(np.prod(t["shape"]))
    return {
        "path": str(path), "format": "GGUF", "architecture": value("general.architecture"),
        "name": value("general.name"), "file_type": value("general.file_type"),
        "metadata_keys": len(reader.fields), "tensors": len(tensors), "bytes": os.path.getsize(path),
        "tensors_by_type": by_type, "tensor_list": tensors,
    }
