"""The Hugging Face layout: a folder of safetensors shards, config.json, the index and every other file kept.

The output mirrors the source: each source shard becomes one output shard holding, in the source's
order, the tensors its modules become in the target format and every other tensor as it is; the
index, config.json (the target format's quantization block), the sidecar quantization files and
every other file of SRC follow. Untouched bytes are copied by the kernel; converted tensors are
written piece by piece, the next converting on a worker thread while one is written.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packq.checkpoint.containers.base import Container, Plan, unique_outputs
from packq.checkpoint.files import copy_durable, io_errors, write_durable
from packq.checkpoint.folder import INDEX, SIDECARS
from packq.checkpoint.formats.base import Piece
from packq.checkpoint.job import Job
from packq.checkpoint.model import Checkpoint, Module
from packq.checkpoint.progress import Progress
from packq.checkpoint.safetensors import Reader, SafetensorsFile, SafetensorsWriter, header_for
from packq.errors import CheckpointError

#: converted pieces may wait to be written up to this many times the largest piece (a block, or a whole
#: tensor where the target does not stream): at least one converts ahead of the one being written
LOOKAHEAD = 2

#: bytes per element of the dtypes packq writes
ITEMSIZE = {"I32": 4, "U32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}

#: one output tensor: (name, action, the module it comes from or None)
Item = tuple[str, str, "Module | None"]
#: its header entry: (name, dtype, shape, nbytes)
Entry = tuple[str, str, tuple[int, ...], int]


@dataclass
class FolderPlan:
    items: dict[str, list[Item]]  #: shard file name -> its output tensors in file order
    entries: dict[str, list[Entry]]  #: shard file name -> their header entries
    extra: list[tuple[Path, Path, int]]  #: other files: (path in DST, path in SRC, size)
    config: dict  #: config.json as written, its quantization_config the target's (made, or refused, up front)


def _origin(name: str, action: str, m: Module | None) -> str:
    if m is None:
        return f"the source tensor {name!r} kept as it is"
    return f"the {action} tensor of the quantized module {m.prefix!r}"


def extra_files(ckpt: Checkpoint) -> list[tuple[Path, Path, int]]:
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
            if folder == ckpt.root and entry.name.endswith(".safetensors"):
                # engines load weights from the top folder (transformers model.safetensors first, vLLM every
                # *.safetensors without an index): copied unconverted, it would be read under the new config
                raise CheckpointError(
                    f"{str(path)!r}: a safetensors file that is not a shard of this checkpoint (not in the index); "
                    "packq would copy it unconverted beside the converted shards, where engines may load it; "
                    "move or remove it")
            with io_errors(path):
                if entry.is_dir(follow_symlinks=False):
                    walk(path, rel / entry.name)
                    continue
                st = os.stat(path)  # follows links: ENOENT for a dangling one, ELOOP for a loop
            if not stat.S_ISREG(st.st_mode):
                kind = "a link to a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
                raise CheckpointError(f"{str(path)!r}: is {kind}; packq copies regular files and real folders only")
            out.append((rel / entry.name, path, st.st_size))

    walk(ckpt.root, Path())
    return out


class SafetensorsFolder(Container):
    name = "safetensors"

    # ------------------------------------------------------------ planning
    def plan(self, job: Job, dst: Path) -> Plan:
        items = self._items(job)
        unique_outputs(job.ckpt.root, ((name, _origin(name, action, m)) for its in items.values()
                                       for name, action, m in its))
        entries = {f: [self._entry(job, job.ckpt.shards[f], *item) for item in its] for f, its in items.items()}
        for fname, es in entries.items():  # refuse now, not after writing, a header packq could not read back
            header_for(es, job.ckpt.shards[fname].metadata, dst / fname)
        extra = extra_files(job.ckpt)
        config = json.loads(json.dumps(job.ckpt.config))
        job.output.config(job, config)  # a config the target cannot state is refused here, not after the shards
        detail = FolderPlan(items, entries, extra, config)
        return Plan(sum(len(e) for e in entries.values()), sum(e[3] for es in entries.values() for e in es), detail)

    @staticmethod
    def _items(job: Job) -> dict[str, list[Item]]:
        """For every shard, the output tensors in order, as the target format makes them."""
        by_tensor = {name: (m, p) for m in job.ckpt.modules.values() for p, name in m.names.items()}
        plan: dict[str, list[Item]] = {}
        for fname, shard in job.ckpt.shards.items():
            out: list[Item] = []
            for t in sorted(shard.tensors.values(), key=lambda t: t.begin):
                module, part = by_tensor.get(t.name, (None, None))
                if module is None or part is None:
                    out.append((t.name, "copy", None))
                    continue
                out += [(f"{module.prefix}.{name}", action, module) for name, action in job.output.outputs(job, module, part)]
            plan[fname] = out
        return plan

    @staticmethod
    def _entry(job: Job, shard: SafetensorsFile, name: str, action: str, m: Module | None) -> Entry:
        """(name, dtype, shape, nbytes) of an output tensor, known before any conversion."""
        if action == "copy":  # a tensor kept as it is: not a module's, or a module's part under the same name
            t = shard.tensors[name if m is None else m.names[name.rsplit(".", 1)[-1]]]
            return name, t.dtype, t.shape, t.nbytes
        assert m is not None
        dtype, shape = job.output.entry(job, m, action)
        return name, dtype, shape, ITEMSIZE[dtype] * int(np.prod(shape))

    # ------------------------------------------------------------ writing
    def write(self, job: Job, plan: Plan, tmp: Path, bar: Progress) -> None:
        p: FolderPlan = plan.detail
        # each shard is fsynced on a thread of its own while the next one is written
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="packq-fsync") as syncer:
            synced = []
            try:
                for fname, items in p.items.items():
                    writer = _write_shard(job, fname, items, p.entries[fname], tmp / fname, bar)
                    synced.append(syncer.submit(writer.close))
            finally:  # every file closed before DST is committed or cleared; the first error raised
                for fut in synced:
                    fut.exception()
            for fut in synced:
                fut.result()
        for rel, path, size in p.extra:
            if len(rel.parts) > 1:
                with io_errors(tmp / rel.parent):
                    (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
            copy_durable(path, tmp / rel, size)
        ckpt = job.ckpt
        config = p.config
        write_durable(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        for name in SIDECARS:  # engines read these before config.json: they must state the new format too
            if (ckpt.root / name).exists() and job.output.sidecars:  # (others drop them)
                sidecar = json.dumps(config["quantization_config"], indent=2) + "\n"
                write_durable(tmp / name, sidecar.encode())
        if ckpt.index is not None:
            index = json.loads(json.dumps(ckpt.index))
            index.setdefault("metadata", {})["total_size"] = plan.nbytes
            index["weight_map"] = {e[0]: fname for fname, es in p.entries.items() for e in es}
            write_durable(tmp / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def _units(job: Job, f: Reader, items: list[Item], entries: list[Entry]) -> list[tuple[int, Piece]]:
    """The pieces of a shard's output tensors in file order, each with its output tensor's index in the shard."""
    units: list[tuple[int, Piece]] = []
    for i, ((name, action, m), entry) in enumerate(zip(items, entries)):
        if action == "copy":  # not a module's tensor, or a module's part kept under its name
            stored = name if m is None else m.names[name.rsplit(".", 1)[-1]]
            pieces = [Piece(entry[3], copy=(stored, 0))]
        else:
            assert m is not None
            pieces = job.output.pieces(job, f, m, action) or [
                Piece(entry[3], make=functools.partial(_tensor, job, f, name, action, m))]
        units += [(i, piece) for piece in pieces]
    return units


def _tensor(job: Job, f: Reader, name: str, action: str, m: Module) -> np.ndarray:
    """The output tensor ``name``, made whole by the target format (one place that tests can intercept)."""
    return job.output.tensor(job, f, m, action)


def _write_shard(job: Job, fname: str, items: list[Item], entries: list[Entry], path: Path, bar: Progress) -> SafetensorsWriter:
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
                    # made for its place in the file, so that its memory goes to the disk uncopied (Buffers.output)
                    pending[nxt] = pool.submit(job.buffers.making, offsets[nxt], piece.make)
                nxt += 1

        writer = SafetensorsWriter(path, entries, f.metadata, job.buffers)
        offsets = list(itertools.accumulate((p.nbytes for _, p in units), initial=writer.position))
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
                    writer.append(data, owned=True)  # (where it is a reused buffer, given back once written)
                    del data
                if k + 1 == len(units) or units[k + 1][0] != i:
                    writer.end()
                bar.update(piece.nbytes)
            writer.finish()
            f.check_unchanged()  # every byte read came from the shard as its header was checked
            return writer
        except BaseException:
            for fut in pending.values():
                fut.cancel()
            writer.abort()
            raise
