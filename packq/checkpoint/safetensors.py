"""Streamed safetensors reading and writing, one tensor at a time, bytes untouched.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and [begin, end) byte offsets in the data that
follows, and an optional "__metadata__" of strings. packq reads it itself
because the safetensors NumPy loader rejects bfloat16 and its writer needs
every tensor in memory at once; here a tensor is a memory map of the source
(or raw bytes passed through), so memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

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

    def __enter__(self) -> "SafetensorsFile":
        self._file: BinaryIO = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.data_start < os.fstat(
            self._file.fileno()).st_size else None
        return self

    def __exit__(self, *exc: Any) -> None:
        # the map is not closed here: arrays handed out may still view it; it
        # closes when the last of them is gone (the file can be closed now)
        self._map = None
        self._file.close()

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, mapped from the file, not copied."""
        t = self.tensors[name]
        if t.nbytes == 0 or self._map is None:
            return memoryview(b"")
        return memoryview(self._map)[self.data_start + t.begin : self.data_start + t.end]

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only NumPy array over the mapped file (not for BF16/F8)."""
        t = self.tensors[name]
        np_dtype = DTYPES[t.dtype][0]
        if np_dtype is None:
            raise CheckpointError(f"{self.path}: {name!r} has dtype {t.dtype}, which packq passes through but does not compute on")
        return np.frombuffer(self.raw(name), dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(t.shape)

    def array_bits(self, name: str) -> np.ndarray:
        """The tensor's elements as unsigned integers of their width (any dtype, bfloat16 included)."""
        t = self.tensors[name]
        return np.frombuffer(self.raw(name), dtype=f"<u{DTYPES[t.dtype][1]}").reshape(t.shape)


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
        self._file = open(path, "wb")
        self._file.write(head)
        self._next = 0

    def write(self, name: str, data: Any) -> None:
        expected_name, _, _, nbytes = self.entries[self._next]
        view = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if name != expected_name or view.nbytes != nbytes:
            raise AssertionError(f"writer expected {expected_name} ({nbytes} bytes), got {name} ({view.nbytes} bytes)")
        self._file.write(view)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - self._next} tensors were not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def dtype_of(array: np.ndarray) -> str:
    return NUMPY_TO_DTYPE[array.dtype.newbyteorder("<").str]
