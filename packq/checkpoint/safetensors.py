"""Streamed safetensors reading and writing, one tensor at a time, bytes untouched.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and [begin, end) byte offsets in the data that
follows, and an optional "__metadata__" of strings. packq reads it itself
because the safetensors NumPy loader rejects bfloat16 and its writer needs
every tensor in memory at once; here a tensor is read on its own from the source
(or passed through by the kernel), so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from packq.errors import CheckpointError

#: safetensors dtype -> (NumPy dtype for the tensors packq computes on, or None, and item size)
DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": (None, 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}
NUMPY_TO_DTYPE = {np.dtype(v[0]).str: k for k, v in DTYPES.items() if v[0] is not None}
MAX_HEADER = 100 * 1024 * 1024


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


class SafetensorsFile:
    """A safetensors file whose header is read and checked up front; tensors are mapped on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors header (length {n}, file of {size} bytes)"
                    )
                header_bytes = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(header_bytes)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object: {e})") from None
        self.data_start = 8 + n
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ is not an object)")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_size)
        ends = sorted((t.begin, t.end) for t in self.tensors.values())
        for (_, e0), (b1, _) in zip(ends, ends[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (tensor data overlaps)")
        if ends and ends[-1][1] != data_size:
            raise CheckpointError(
                f"{self.path}: truncated or padded safetensors file: the header describes "
                f"{ends[-1][1]} data bytes, the file holds {data_size}"
            )

    def _entry(self, name: str, entry: Any, data_size: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            itemsize = DTYPES[dtype][1]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= begin <= end) or end - begin != count * itemsize:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: {name!r} of shape {shape} and dtype {dtype} "
                f"has offsets [{begin}, {end})"
            )
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: {name!r} ends past the end of the file")
        return TensorInfo(name, dtype, shape, int(begin), int(end))

    def __enter__(self) -> SafetensorsFile:
        self._file: BinaryIO = open(self.path, "rb", buffering=0)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def _read(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, read with one system call into fresh memory."""
        buf = np.empty(t.nbytes, np.uint8)
        view, offset = buf.data, self.data_start + t.begin
        while view.nbytes:  # pread: no shared file position, so threads may read at once
            got = os.preadv(self._file.fileno(), [view], offset)
            if not got:
                raise CheckpointError(f"{self.path}: truncated while reading {t.name!r}")
            view, offset = view[got:], offset + got
        return buf

    def copy_to(self, name: str, out: Any) -> None:
        """Append the tensor's bytes to the unbuffered file ``out``, copied by the kernel where it can."""
        t = self.tensors[name]
        offset, left = self.data_start + t.begin, t.nbytes
        copy_range = getattr(os, "copy_file_range", None)
        while left and copy_range is not None:
            try:
                n = copy_range(self._file.fileno(), out.fileno(), left, offset)
            except OSError:  # another file system, an old kernel: fall back to read and write
                break
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
            offset, left = offset + n, left - n
        if left:
            out.write(self._read(TensorInfo(name, t.dtype, (left,), offset - self.data_start, t.end)))

    def array(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array (not for BF16/F8: see :meth:`array_bits`)."""
        t = self.tensors[name]
        np_dtype = DTYPES[t.dtype][0]
        if np_dtype is None:
            raise CheckpointError(f"{self.path}: {name!r} has dtype {t.dtype}, which packq passes through but does not compute on")
        return self._read(t).view(np.dtype(np_dtype).newbyteorder("<")).reshape(t.shape)

    def array_bits(self, name: str) -> np.ndarray:
        """The tensor's elements as unsigned integers of their width (any dtype, bfloat16 included)."""
        t = self.tensors[name]
        return self._read(t).view(f"<u{DTYPES[t.dtype][1]}").reshape(t.shape)


def header_for(entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The header bytes for tensors (name, dtype, shape, nbytes) written in this order, and their offsets."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offsets, pos = [], 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Writes a file whose tensors are declared up front and then written one by one, in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        head, _ = header_for(entries, metadata)
        self._file = open(path, "wb", buffering=0)
        self._write_all(memoryview(head))
        self._next = 0

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            view = view[self._file.write(view) :]

    def _expect(self, name: str, nbytes: int) -> None:
        expected_name, _, _, expected = self.entries[self._next]
        if name != expected_name or nbytes != expected:
            raise AssertionError(f"writer expected {expected_name} ({expected} bytes), got {name} ({nbytes} bytes)")
        self._next += 1

    def write(self, name: str, data: np.ndarray) -> None:
        view = np.ascontiguousarray(data).data.cast("B")
        self._expect(name, view.nbytes)
        self._write_all(view)

    def copy(self, name: str, source: SafetensorsFile) -> None:
        """Pass a tensor of ``source`` through, byte for byte."""
        self._expect(name, source.tensors[name].nbytes)
        source.copy_to(name, self._file)

    def close(self) -> None:
        if self._next != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - self._next} tensors were not written")
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def dtype_of(array: np.ndarray) -> str:
    return NUMPY_TO_DTYPE[array.dtype.newbyteorder("<").str]
