"""Streamed safetensors reading and writing, one tensor at a time, bytes untouched.

The format: an 8-byte little-endian header length, a UTF-8 JSON header mapping
each tensor name to its dtype, shape and [begin, end) byte offsets in the data
that follows, and an optional "__metadata__" of strings. packq reads it itself
because the safetensors NumPy loader rejects bfloat16 and its writer needs
every tensor in memory at once; here a tensor is read on its own from the source
(or passed through by the kernel), so memory stays bounded by the largest tensor.

Headers are checked as strictly as the reference loader (the safetensors
library's ``read_metadata`` and ``Metadata::validate``) checks them, and each is
parsed once: a :class:`SafetensorsFile` holds the parsed header, and every read
opens its own file handle through it (``with shard.open() as reader``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packq.checkpoint.files import copy_bytes, io_errors, open_regular
from packq.errors import CheckpointError

#: safetensors dtype -> (NumPy dtype for the tensors packq computes on, or None, and bits per element);
#: the reference loader's full list, so that any file it reads passes through packq too
DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8), "U8": ("uint8", 8), "I8": ("int8", 8),
    "F4": (None, 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
    "F8_E5M2": (None, 8), "F8_E4M3": (None, 8), "F8_E8M0": (None, 8), "F8_E4M3FNUZ": (None, 8), "F8_E5M2FNUZ": (None, 8),
    "I16": ("int16", 16), "U16": ("uint16", 16), "F16": ("float16", 16), "BF16": (None, 16),
    "I32": ("int32", 32), "U32": ("uint32", 32), "F32": ("float32", 32),
    "C64": ("complex64", 64), "F64": ("float64", 64), "I64": ("int64", 64), "U64": ("uint64", 64),
}
NUMPY_TO_DTYPE = {np.dtype(v[0]).str: k for k, v in DTYPES.items() if v[0] is not None}
#: the reference loader's limit on the JSON header (safetensors' MAX_HEADER_SIZE), in bytes
MAX_HEADER = 100_000_000
_USIZE = 1 << 64  # shapes and offsets are usize in the reference loader
_ALIGN = 4096  # a page: what direct I/O may ask buffers, offsets and lengths to be multiples of


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _integer(literal: str) -> int | float:
    # serde_json reads "-0" as the float -0.0 (a negative literal whose value is not negative), so the
    # reference refuses it where it wants an integer; Python's json would give the int 0
    return -0.0 if literal == "-0" else int(literal)


#: a \\u escape of a UTF-16 surrogate: only these can leave a lone surrogate in a decoded string
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate(node: Any) -> str | None:
    """The first string (key or value) holding a lone UTF-16 surrogate, which serde_json refuses."""
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if any("\ud800" <= c <= "\udfff" for c in x):
                return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def loads_strict(raw: bytes | str) -> Any:
    """JSON as the reference (serde_json) reads it: UTF-8, no NaN/Infinity, no duplicate keys, no lone
    surrogate escapes (``"\\ud800"``), and ``-0`` a float, not an integer.

    Raises ValueError (also for nesting too deep to parse), never anything else.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_int=_integer)
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):  # a pair decodes to one character; a lone half stays a surrogate
        bad = _lone_surrogate(value)
        if bad is not None:
            raise ValueError(f"the string {bad!r} holds a lone UTF-16 surrogate escape, which is not Unicode text")
    return value


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What must stay the same while a file is read: which file, its size, and its last write."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _is_usize(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _USIZE


@dataclass(frozen=True)
class Stored:
    """A stored tensor's bytes as they are, for a writer to read straight into its staging buffer (no buffer in
    between): bytes [offset, offset + size) of tensor ``name`` of ``file`` (size None: to its end;
    :meth:`StagedWriter.copy`)."""

    file: SafetensorsFile
    name: str
    offset: int = 0
    size: int | None = None

    @property
    def nbytes(self) -> int:
        return self.file.tensors[self.name].nbytes - self.offset if self.size is None else self.size

    def parts(self, nbytes: int) -> list[Stored]:
        """These bytes as consecutive pieces of at most ``nbytes`` each."""
        n = self.nbytes
        return [Stored(self.file, self.name, self.offset + a, min(nbytes, n - a)) for a in range(0, n, nbytes)] or [self]


class SafetensorsFile:
    """A safetensors file whose header is read and checked once, up front; tensors are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            fd = open_regular(self.path)
            try:
                st = os.fstat(fd)
                self._identity = identity(st)
                header_bytes = self._read_header(fd, st.st_size)
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"{str(self.path)!r}: cannot read: {e.strerror or e}") from None
        try:
            header = loads_strict(header_bytes)
        except ValueError as e:
            raise CheckpointError(f"{str(self.path)!r}: corrupt safetensors header (not a JSON object: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{str(self.path)!r}: corrupt safetensors header (not a JSON object: {type(header).__name__})")
        data_size = st.st_size - self.data_start
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{str(self.path)!r}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata: dict[str, str] = meta
        self.tensors: dict[str, TensorInfo] = {name: self._entry(name, entry) for name, entry in header.items()}
        # the reference loader's validate(): sorted by offsets, each starts where the last ended
        pos = 0
        for t in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if t.begin != pos:
                what = "overlaps the tensor before it" if t.begin < pos else f"leaves a gap of {t.begin - pos} bytes before it"
                raise CheckpointError(f"{str(self.path)!r}: corrupt safetensors header: {t.name!r} at [{t.begin}, {t.end}) {what}")
            pos = t.end
        if pos != data_size:
            raise CheckpointError(
                f"{str(self.path)!r}: truncated or padded safetensors file: the header describes "
                f"{pos} data bytes, the file holds {data_size}"
            )

    def _read_header(self, fd: int, size: int) -> bytes:
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{str(self.path)!r}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise CheckpointError(
                f"{str(self.path)!r}: safetensors header of {n} bytes is larger than the {MAX_HEADER} bytes the "
                "safetensors library reads (corrupt, or not a safetensors file)"
            )
        if 8 + n > size:
            raise CheckpointError(f"{str(self.path)!r}: corrupt or truncated safetensors header (length {n}, file of {size} bytes)")
        self.data_start = 8 + n
        header = os.pread(fd, n, 8)
        if len(header) != n:
            raise CheckpointError(f"{str(self.path)!r}: truncated while reading the header")
        return header

    def _entry(self, name: str, entry: Any) -> TensorInfo:
        def bad(why: str) -> CheckpointError:
            text = json.dumps(entry)
            text = text if len(text) <= 200 else text[:200] + "..."
            return CheckpointError(f"{str(self.path)!r}: corrupt safetensors header entry for {name!r}: {why} (got {text})")

        if not isinstance(entry, dict):
            raise bad("expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"dtype must be one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
            raise bad("shape must be a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
            raise bad("data_offsets must be two integers >= 0")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        bits = count * DTYPES[dtype][1]
        if bits >= _USIZE * 8:
            raise bad("its byte size overflows 64 bits")
        if bits % 8:
            raise bad(f"{count} elements of {DTYPES[dtype][1]} bits do not fill whole bytes")
        if end < begin or end - begin != bits // 8:
            raise bad(f"shape {shape} of {dtype} needs {bits // 8} bytes, data_offsets span {end - begin}")
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    def open(self) -> Reader:
        """A handle for reading tensors, with its own descriptor: ``with shard.open() as f``."""
        return Reader(self)


class Reader:
    """An open handle on a parsed :class:`SafetensorsFile`; each has its own descriptor, so threads may share a shard."""

    def __init__(self, file: SafetensorsFile) -> None:
        self.file, self.path, self.tensors, self.metadata = file, file.path, file.tensors, file.metadata
        try:
            self._fd = open_regular(file.path)
        except OSError as e:
            raise CheckpointError(f"{str(file.path)!r}: cannot read: {e.strerror or e}") from None
        try:
            self.check_unchanged()
        except BaseException:
            os.close(self._fd)
            raise

    def check_unchanged(self) -> None:
        """Refuse a file replaced or rewritten since its header was read: same file (device, inode), same
        size, and no write since (modification and change times, in nanoseconds). Checked at every open
        and after the last read, so that bytes read in between come from the file as it was checked."""
        if identity(os.fstat(self._fd)) != self.file._identity:
            raise CheckpointError(f"{str(self.path)!r}: changed on disk while packq was reading it; run again once "
                                  "nothing writes it")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        try:
            if kind is None:  # every read done: were they all of the file as it was checked?
                self.check_unchanged()
        finally:
            os.close(self._fd)

    def _read(self, t: TensorInfo, buffers: Buffers | None = None, output: bool = False) -> np.ndarray:
        """The tensor's bytes, read with positioned reads into fresh memory (or a buffer of ``buffers``; ``output``: one
        for a piece written out from that memory, :meth:`Buffers.output`)."""
        buf = (np.empty(t.nbytes, np.uint8) if buffers is None
               else buffers.output(t.nbytes) if output else buffers.take(t.nbytes))
        self.read_into(t.begin, buf.data, t.name)
        return buf

    def read_into(self, offset: int, view: memoryview, name: str) -> None:
        """Fill ``view`` with the bytes at ``offset`` of the data section (which tensor ``name`` holds)."""
        offset += self.file.data_start
        while view.nbytes:  # pread: no shared file position, so threads may read at once
            with io_errors(self.path):
                got = os.preadv(self._fd, [view], offset)
            if not got:
                raise CheckpointError(f"{str(self.path)!r}: truncated while reading {name!r}")
            view, offset = view[got:], offset + got

    def copy_to(self, name: str, out: Any, offset: int = 0, nbytes: int | None = None) -> None:
        """Append the tensor's bytes (``nbytes`` from ``offset``; all by default) to the unbuffered file ``out``,
        copied by the kernel where it can."""
        t = self.tensors[name]
        nbytes = t.nbytes - offset if nbytes is None else nbytes
        copy_bytes(self._fd, out, self.file.data_start + t.begin + offset, nbytes, self.path)

    def rows(self, name: str, start: int, stop: int, buffers: Buffers | None = None, output: bool = False) -> np.ndarray:
        """Rows [start, stop) of a tensor seen as (rows, last dimension), every leading dimension flattened; read
        into a buffer of ``buffers`` when given (give it back once nothing reads it; ``output``: converted over and
        written out from it, :meth:`Buffers.output`)."""
        t = self.tensors[name]
        width = t.shape[-1] if t.shape else 1
        item = DTYPES[t.dtype][1] // 8
        block = TensorInfo(t.name, t.dtype, (stop - start, width), t.begin + start * width * item,
                           t.begin + stop * width * item)
        np_dtype = DTYPES[t.dtype][0]
        view = np.dtype(np_dtype).newbyteorder("<") if np_dtype else np.dtype(f"<u{item}")
        return self._read(block, buffers, output).view(view).reshape(block.shape)

    def array(self, name: str, buffers: Buffers | None = None) -> np.ndarray:
        """The tensor as a NumPy array (not for BF16/F8: see :meth:`array_bits`); read into a buffer of ``buffers``
        when given (give it back once nothing reads it)."""
        t = self.tensors[name]
        np_dtype = DTYPES[t.dtype][0]
        if np_dtype is None:
            raise CheckpointError(f"{str(self.path)!r}: {name!r} has dtype {t.dtype}, which packq passes through but does not compute on")
        return self._read(t, buffers).view(np.dtype(np_dtype).newbyteorder("<")).reshape(t.shape)

    def floats(self, name: str) -> np.ndarray:
        """A float tensor as NumPy; bfloat16 as float32, which holds it exactly (its bits are float32's top half)."""
        if self.tensors[name].dtype == "BF16":
            return (self.array_bits(name).astype(np.uint32) << 16).view(np.float32)
        return self.array(name)

    def array_bits(self, name: str, buffers: Buffers | None = None) -> np.ndarray:
        """The tensor's elements as unsigned integers of their width (any byte-sized dtype, bfloat16 included); read
        into a buffer of ``buffers`` when given (give it back once nothing reads it)."""
        t = self.tensors[name]
        return self._read(t, buffers).view(f"<u{DTYPES[t.dtype][1] // 8}").reshape(t.shape)


#: fresh buffers of this many bytes or more have their pages made present when allocated (:func:`fresh`)
PREFAULT_FROM = 4 << 20


def fresh(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes``, whose pages, from :data:`PREFAULT_FROM` bytes, are made present
    at once (the C kernels' ``prefault``: one madvise call, without the GIL) rather than page by page as first
    written. NumPy asks for transparent huge pages from 4 MiB, and on this project's VM their first touch was what
    held a GGUF conversion's reader thread (58 MB of read buffers took it 170 ms, by perf, while the workers waited).
    Whole conversions, 9 interleaved runs each (2-core VM, 2026-12-02), medians: GGUF Q4_0 0.99 s faulted as
    written, 1.00 s in small pages, 0.92 s prefaulted; compressed-tensors 0.82, 0.90 and 0.74 s."""
    a = np.empty(nbytes, np.uint8)
    if nbytes >= PREFAULT_FROM:
        from packq.backends.numpy import c_kernels

        if (ck := c_kernels()) is not None:
            ck.prefault(a)
    return a


class Buffers:
    """Byte buffers reused from one piece of a conversion to the next.

    A fresh NumPy array of megabytes is a fresh mapping, whose pages fault and are zeroed on first touch:
    reading 276 MB into fresh 8 MB arrays took 0.10 s of system time, into one reused array 0.02 s (this
    project's 2-core machine, 2026-12-01). ``take`` hands out a free buffer at least as large as asked (or
    a new one); ``give`` takes back any array viewing one of them, once nothing reads or writes it any more
    (an array that views none of them is ignored, so callers need not know where an array came from).
    Thread-safe; at most ``keep`` free buffers are kept, so memory stays bounded by the pieces in flight.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._out: dict[int, np.ndarray] = {}  # id -> buffer handed out (held, so that the id stays its own)
        self._lock = threading.Lock()
        self._local = threading.local()  # the phase of the piece this thread makes (:meth:`making`)

    def take(self, nbytes: int, phase: int = 0) -> np.ndarray:
        """A uint8 array of ``nbytes`` starting ``phase`` bytes past a page boundary (0: on one, as direct I/O wants
        it): from the smallest free buffer that holds it, or a new one."""
        if not 0 <= phase < _ALIGN:
            raise ValueError(f"phase must be in [0, {_ALIGN}), got {phase}")
        with self._lock:  # (by position, not list.remove: arrays compare by value)
            fits = [i for i, b in enumerate(self._free) if b.nbytes - _skip(b) - phase >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if buf is None:  # (made outside the lock: its pages take a while, and the other threads give and take)
            buf = fresh(nbytes + 2 * _ALIGN)
        with self._lock:
            self._out[id(buf)] = buf
        start = _skip(buf) + phase
        return buf[start : start + nbytes]

    def output(self, nbytes: int) -> np.ndarray:
        """:meth:`take` for the bytes of a piece that will be written out as they are: at the phase that
        :meth:`making` set on this thread (where the piece's first byte falls in its file's block), so that the
        writer sends its whole blocks to the disk from this memory, uncopied (:meth:`StagedWriter.write`)."""
        return self.take(nbytes, getattr(self._local, "phase", 0))

    def making(self, position: int, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()``, whose :meth:`output` buffers are phased for a piece written at file offset ``position``."""
        self._local.phase = position % _ALIGN
        try:
            return make()
        finally:
            self._local.phase = 0

    def root(self, a: np.ndarray) -> np.ndarray | None:
        """The buffer handed out that ``a`` views, or None where it views none of these."""
        root = _base(a)
        with self._lock:
            return root if self._out.get(id(root)) is root else None

    def give(self, a: np.ndarray) -> None:
        """Return the buffer ``a`` views (if it is one of these) for reuse."""
        root = _base(a)
        with self._lock:
            if self._out.get(id(root)) is not root:
                return
            del self._out[id(root)]
            self._free.append(root)
            if len(self._free) > self.keep:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].nbytes))


def _base(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (``a`` itself, or the last ndarray of its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _skip(buf: np.ndarray) -> int:
    """Bytes from the start of ``buf`` to its first page boundary."""
    return -buf.ctypes.data % _ALIGN


Entry = tuple[str, str, tuple[int, ...], int]  # (name, dtype, shape, nbytes)


def header_for(entries: Iterable[Entry], metadata: dict[str, str], where: Path | str = "") -> bytes:
    """The header bytes for tensors (name, dtype, shape, nbytes) written in this order.

    Raises CheckpointError where the header would be larger than the reference
    loader (and packq) reads: packq never writes a file it cannot read back.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    if len(raw) > MAX_HEADER:
        raise CheckpointError(
            f"{str(where)!r}: the converted header would be {len(raw)} bytes, more than the {MAX_HEADER} bytes the "
            "safetensors library reads; split the source into more shards first"
        )
    return struct.pack("<Q", len(raw)) + raw


#: the most bytes one write() call passes to the kernel (see SafetensorsWriter._write_all)
WRITE_CHUNK = 128 << 10
#: bytes a writer stages for one direct write (a multiple of every block size direct I/O may ask alignment to)
DIRECT_CHUNK = 8 << 20
#: a piece of converted bytes from this size on is written to the disk from its own memory where that lies at
#: the file's phase (:meth:`Buffers.output`), not copied into the staging buffer first (the main thread's copy of
#: every converted byte: 0.1-0.15 s of CPU a GB on this project's 2-core machine, 2026-12-02). Smaller pieces are
#: copied: each would be a direct write of its own, smaller than a staging buffer's (GGUF's 2.4 MB pieces written
#: so, 431 writes against 125: the same CPU, and Q4_0 1.58 s against 1.38 s, Q5_0 1.29 against 1.20 s, medians of 6)
UNCOPIED = 4 << 20


class StagedWriter:
    """Appends bytes to an open unbuffered file, directly from an aligned staging buffer where the file system takes it.

    Where it does (Linux: ext4, xfs, btrfs...), the bytes go to the disk from an aligned staging buffer
    (``O_DIRECT``), past the page cache: a buffered write costs the kernel a page-cache copy and, at the fsync,
    the writeback, about 0.3 s of system time per GB on this project's 2-core machine against under 0.1 s
    direct (2026-12-01, 512 MB: buffered and fsynced 1.6 GB/s, direct 2.0-2.4 GB/s); the result is then not in
    the page cache, as with any copy tool writing directly. Bytes copied from a source file are read straight
    into the staging buffer. Only the file's last partial block is written buffered (:meth:`close`). Elsewhere,
    or where a direct write is refused (EINVAL, a short write), buffered writes of :data:`WRITE_CHUNK`: the
    same bytes in every case.

    ``file`` (``open(path, "xb", buffering=0)``, or ``"r+b"``) is positioned where the bytes go, which need not be
    on a block boundary: the bytes of that first partial block already in the file are read back into the
    staging buffer, and rewritten with the first direct write, so that every direct write starts and ends on a
    block boundary of the file. ``size``: the bytes that will follow (the staging buffer is no larger). The
    owner fsyncs and closes ``file``; this writer never closes it.
    """

    def __init__(self, file: Any, size: int, buffers: Buffers | None = None) -> None:
        self.file = file
        self.buffers = Buffers() if buffers is None else buffers  # the staging buffer comes from these
        self.stage: np.ndarray | None = None  # the aligned staging buffer while writing directly
        self.staged = 0  # bytes in it, from the file's block boundary at its current position
        self.position = file.tell()  # where the next byte appended goes
        # a full staging buffer (or a piece's own memory, :meth:`write`) is written on a thread of its own while the
        # next one fills: a direct write waits for the disk (0.7 s a GB here), which the copies into the stage and
        # the conversions then overlap. The writes queued, oldest first: (its write, the buffer, its bytes, whether
        # it is a staging buffer); after a refused or short one the thread writes nothing more (``_refused``)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[int], np.ndarray, memoryview, bool]] = deque()
        self._refused = False
        self._spare: np.ndarray | None = None
        self._start_direct(size)

    def _start_direct(self, size: int) -> None:
        direct = getattr(os, "O_DIRECT", 0)
        head = self.position % _ALIGN  # bytes of the first block already written (another writer's header)
        if not direct or head + size < _ALIGN:
            return
        import fcntl

        fd = self.file.fileno()
        try:  # no larger than the data (rounded up to whole blocks)
            stage = self.buffers.take(min(DIRECT_CHUNK, -(-(head + size) // _ALIGN) * _ALIGN))
        except MemoryError:  # buffered writes need no buffer
            return
        try:  # (read back before O_DIRECT, which would want the read aligned too)
            if head and os.preadv(fd, [stage[:head].data], self.position - head) != head:
                raise OSError(errno.EIO, "the first block reads back short")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct)
        except OSError:  # EINVAL: this file system has no direct I/O; EBADF: a file opened write-only
            self.buffers.give(stage)
            return
        if head:
            self.file.seek(self.position - head)
        self.stage, self.staged = stage, head

    def _stop_direct(self, *left: memoryview) -> None:
        """Buffered writes from here on (the last partial block, or a file system that refused a direct write):
        ``left`` (the bytes that refused writes on the writer thread left, in file order), then what is staged."""
        import fcntl

        fd = self.file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        for view in left:
            self._buffered(view)
        stage, n, self.stage, self.staged = self.stage, self.staged, None, 0
        if stage is not None:
            self._buffered(stage[:n].data)
            self.buffers.give(stage)
        if self._spare is not None:
            self.buffers.give(self._spare)
            self._spare = None

    def _flush(self, nbytes: int) -> None:
        """Write the staged bytes' first ``nbytes`` (a multiple of the alignment) directly, on this thread; keep the
        rest staged."""
        assert self.stage is not None and nbytes % _ALIGN == 0
        done = self._direct(self.stage[:nbytes].data)
        if done < nbytes:  # refused or short (a file size limit, a full disk, another alignment): buffered from here
            rest = self.staged - done
            self.stage[:rest] = self.stage[done : self.staged].copy()
            self.staged = rest
            self._stop_direct()
            return
        self.stage[: self.staged - nbytes] = self.stage[nbytes : self.staged].copy()
        self.staged -= nbytes

    def _room(self) -> memoryview:
        """The free part of the staging buffer; a full one is sent to be written first (:meth:`_send`)."""
        assert self.stage is not None
        if self.staged == self.stage.nbytes:
            self._send()
        return self.stage[self.staged :].data if self.stage is not None else memoryview(b"")

    def _send(self) -> None:
        """Write what is staged (whole blocks) directly on the writer thread and go on in another buffer."""
        assert self.stage is not None
        full, n = self.stage, self.staged
        spare = self._spare if self._spare is not None else self.buffers.take(full.nbytes)
        self.stage, self.staged, self._spare = spare, 0, None
        self._queue(full, n, staging=True)

    def _queue(self, buf: np.ndarray, n: int, staging: bool, data: memoryview | None = None) -> None:
        """Write ``data`` (``n`` bytes, whole blocks; default ``buf[:n]``) directly on the writer thread, after the
        writes queued before it (at most two others wait: memory stays bounded); ``buf``: a staging buffer (``staging``),
        reused once written, else the array of a piece's own memory, given back to the buffers once written. Where
        an earlier write was refused, it is written buffered."""
        data = buf[:n].data if data is None else data
        if self.stage is None:  # an earlier write was refused: buffered from now on
            try:
                self._buffered(data)
            finally:
                self.buffers.give(buf)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packq-write")
        # queued first, so that an error met while waiting below leaves it where abort() gives it back
        self._pending.append((self._pool.submit(self._direct, data), buf, data, staging))
        while len(self._pending) > 2:
            self._join()

    def _direct(self, view: memoryview) -> int:
        """Write ``view`` (whole blocks) directly: every direct write goes through here. The bytes written, fewer
        where a write was refused (EINVAL: an alignment this file system wants larger) or short; none once one was
        (the writes queued after it are then written buffered, in order, by :meth:`_join`)."""
        if self._refused:
            return 0
        written = 0
        while view.nbytes:
            try:
                done = self.file.write(view)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    self._refused = True
                    raise
                self._refused = True
                return written
            if done % _ALIGN or not done:
                self._refused = True
                return written + done
            written += done
            view = view[done:]
        return written

    def _join(self) -> None:
        """Wait for the oldest queued write; where it was refused or short, wait for the others, write what they left
        and what is staged since buffered, and stay buffered (the same bytes in the same order)."""
        if not self._pending:
            return
        fut, sent, data, staging = self._pending.popleft()
        try:
            done = fut.result()
        except BaseException:
            self.buffers.give(sent)
            raise
        if done == data.nbytes:
            if staging and self._spare is None:
                self._spare = sent
            else:
                self.buffers.give(sent)
            return
        left, held = [data[done:]], [sent]
        while self._pending:  # written after the refused one: none of their bytes are in the file
            f2, b2, d2, _ = self._pending.popleft()
            try:
                got = f2.result()
            except BaseException:
                for b in (*held, b2):
                    self.buffers.give(b)
                raise
            assert got == 0, "a direct write went on after a refused one"
            left.append(d2)
            held.append(b2)
        try:
            self._stop_direct(*left)
        finally:
            for b in held:
                self.buffers.give(b)

    def _buffered(self, view: memoryview) -> None:
        # in slices of WRITE_CHUNK: one large write() makes the kernel (6.18, ext4 with large folios) allocate
        # page-cache folios as large as the write, and on a machine whose memory is fragmented by its page
        # cache that costs 2 s of system time per GB written from 8 MB writes, 0.3 s from 128 KB ones
        while view.nbytes:
            view = view[self.file.write(view[:WRITE_CHUNK]) :]

    def write(self, view: memoryview, owner: np.ndarray | None = None) -> None:
        """Append the bytes of ``view`` (a byte-format memoryview). ``owner``: the array of :attr:`buffers` that ``view``
        shows, which the writer then owns and gives back once written: where it lies at the file's phase
        (:meth:`Buffers.output`), its whole blocks go to the disk from it, uncopied; else it is copied (below)."""
        if owner is not None and self.stage is not None and view.nbytes >= UNCOPIED and self._phased(view):
            self._write_uncopied(view, owner)
            return
        self._stage(view)
        if owner is not None:
            self.buffers.give(owner)

    def _phased(self, view: memoryview) -> bool:
        """Whether ``view``'s memory is at the phase in its page of the file position it is written at."""
        return (np.frombuffer(view, np.uint8).ctypes.data - self.position) % _ALIGN == 0

    def _write_uncopied(self, view: memoryview, owner: np.ndarray) -> None:
        """The piece's first block begins with bytes already staged: those few are copied into the unused bytes of
        its buffer in front of it (a piece of :meth:`Buffers.output` has them), what is staged before them is sent,
        and the piece's whole blocks are written from its own memory in one write (``owner`` given back once
        written); then its tail is staged. Without such room (memory not of these buffers), or without one whole
        block, it is staged as any bytes are."""
        head = self.position % _ALIGN  # the bytes of its first block staged already
        body = (head + view.nbytes) // _ALIGN * _ALIGN  # written from its buffer, from that block's start
        root = self.buffers.root(owner)
        mem = np.frombuffer(view, np.uint8)
        start = -1 if root is None else mem.ctypes.data - root.ctypes.data  # the piece's offset in its buffer
        if not body or not 0 <= start - head <= start + view.nbytes <= root.nbytes:  # type: ignore[union-attr]
            self._stage(view)
            self.buffers.give(owner)
            return
        assert root is not None and self.stage is not None and self.staged >= head
        block = root[start - head : start - head + body]  # (the first ``head`` bytes: unused, in front of the piece)
        block[:head] = self.stage[self.staged - head : self.staged]
        self.staged -= head
        if self.staged:
            self._send()
        self.position += body - head
        self._queue(owner, body, staging=False, data=block.data)
        self._stage(view[body - head :])

    def _stage(self, view: memoryview) -> None:
        """Copy ``view`` into the stage (sending each full one), or write it buffered where not writing directly."""
        self.position += view.nbytes
        while view.nbytes and self.stage is not None:
            room = self._room()
            if self.stage is None:
                break
            n = min(room.nbytes, view.nbytes)
            # NumPy's copy lets go of the GIL (the worker threads convert meanwhile); a memoryview copy would not
            np.copyto(self.stage[self.staged : self.staged + n], np.frombuffer(view[:n], np.uint8))
            self.staged += n
            view = view[n:]
        self._buffered(view)

    def copy(self, source: Reader, name: str, offset: int, nbytes: int) -> None:
        """Append bytes [offset, offset + nbytes) of ``source``'s tensor ``name``: read straight into the staging
        buffer when writing directly, else copied by the kernel."""
        self.position += nbytes
        begin, end = source.tensors[name].begin + offset, source.tensors[name].begin + offset + nbytes
        while begin < end and self.stage is not None:
            room = self._room()
            if self.stage is None:
                break
            n = min(room.nbytes, end - begin)
            source.read_into(begin, room[:n], name)
            self.staged += n
            begin += n
        source.copy_to(name, self.file, begin - source.tensors[name].begin, end - begin)

    def close(self) -> None:
        """Write what is staged: whole blocks directly, the last partial block buffered. (Not fsync, not close.)"""
        try:
            while self._pending:
                self._join()
            if self.stage is not None:
                self._flush(self.staged // _ALIGN * _ALIGN)
                self._stop_direct()
        finally:
            self._shutdown()

    def abort(self) -> None:
        """Give the staging buffers back, writing nothing more (a write under way is waited for)."""
        try:
            while self._pending:
                fut, sent, _, _ = self._pending.popleft()
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - aborting already: the first error is the one reported
                    pass
                self.buffers.give(sent)
            for b in (self.stage, self._spare):
                if b is not None:
                    self.buffers.give(b)
            self.stage = self._spare = None
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class SafetensorsWriter:
    """Writes a file whose tensors are declared up front and then written one by one, in order, through a
    :class:`StagedWriter` (directly where the file system takes it); fsynced at :meth:`close`."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], buffers: Buffers | None = None):
        self.path = path
        self.entries = entries
        head = header_for(entries, metadata, path)
        with io_errors(path):
            self._file = open(path, "xb", buffering=0)
            self._out = StagedWriter(self._file, len(head) + sum(e[3] for e in entries), buffers)
            self._out.write(memoryview(head))
        self._next = 0
        self._left = 0

    def _expect(self, name: str, nbytes: int) -> None:
        expected_name, _, _, expected = self.entries[self._next]
        if name != expected_name or nbytes != expected:
            raise AssertionError(f"writer expected {expected_name} ({expected} bytes), got {name} ({nbytes} bytes)")
        self._next += 1

    def start(self, name: str, nbytes: int) -> None:
        """Begin the next declared tensor; its bytes follow in parts (``append``, ``append_copy``), then ``end``."""
        self._expect(name, nbytes)
        self._left = nbytes

    @property
    def position(self) -> int:
        """The file offset of the next byte appended."""
        return self._out.position

    def append(self, data: np.ndarray, owned: bool = False) -> None:
        """Append ``data``'s bytes. ``owned``: ``data`` views one of the writer's buffers, which the writer now owns
        and gives back once written (from that memory, uncopied, where it was taken for this file offset:
        :meth:`Buffers.output`)."""
        view = np.ascontiguousarray(data).data.cast("B")
        if view.nbytes > self._left:
            raise AssertionError(f"{str(self.path)!r}: {view.nbytes} bytes given where {self._left} remained")
        with io_errors(self.path):
            self._out.write(view, data if owned else None)
        self._left -= view.nbytes

    def append_copy(self, source: Reader, name: str, offset: int, nbytes: int) -> None:
        """Append bytes [offset, offset + nbytes) of ``source``'s tensor ``name`` (:meth:`StagedWriter.copy`)."""
        if nbytes > self._left:
            raise AssertionError(f"{str(self.path)!r}: {nbytes} bytes given where {self._left} remained")
        with io_errors(self.path):
            self._out.copy(source, name, offset, nbytes)
        self._left -= nbytes

    def end(self) -> None:
        if self._left:
            raise AssertionError(f"{str(self.path)!r}: {self._left} bytes of the tensor were not written")

    def write(self, name: str, data: np.ndarray) -> None:
        self.start(name, np.ascontiguousarray(data).nbytes)
        self.append(data)
        self.end()

    def copy(self, name: str, source: Reader) -> None:
        """Pass a tensor of ``source`` through, byte for byte."""
        self.start(name, source.tensors[name].nbytes)
        self.append_copy(source, name, 0, source.tensors[name].nbytes)
        self.end()

    def finish(self) -> None:
        """Check that every declared tensor was written."""
        if self._next != len(self.entries):
            raise AssertionError(f"{str(self.path)!r}: {len(self.entries) - self._next} tensors were not written")

    def close(self) -> None:
        """Write what is staged, fsync and close the complete file (the file is closed even where that fails)."""
        self.finish()
        try:
            with io_errors(self.path):
                self._out.close()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        self._out.abort()
        self._file.close()


def dtype_of(array: np.ndarray) -> str:
    return NUMPY_TO_DTYPE[array.dtype.newbyteorder("<").str]
