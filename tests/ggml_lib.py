"""llama.cpp's own libraries (the ``llama-cpp-py-sync`` CPU wheel) for the tests: ggml's dequantization, and llama.

The wheel (b11739) is built against glibc 2.38 for four C23 entry points only (``__isoc23_strtol``,
``strtoul``, ``strtoull``, ``sscanf``: number parsing, which C23 extends with "0b" prefixes); on an
older glibc (Debian 12 has 2.36, and CI runs there) its libraries do not load at all. There the
tests load copies whose need of the version GLIBC_2.38 is marked weak (a flag in the ELF
version-needs table: a missing weak version is no error), with those four functions supplied by
a shim compiled here that forwards to the C library's own. Nothing of ggml's or llama's code
changes. Where glibc is 2.38 or newer the wheel's files are used as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r; }
"""
LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0", "libllama.so.0")
_VER_FLG_WEAK = 0x2
_SHT_GNU_VERNEED = 0x6FFFFFFE


def wheel_dir() -> Path | None:
    try:
        import llama_cpp_py_sync
    except ImportError:
        return None
    return Path(llama_cpp_py_sync.__file__).parent


def _glibc() -> tuple[int, ...]:
    lib, version = platform.libc_ver()
    return tuple(int(p) for p in version.split(".")) if lib == "glibc" and version else (0,)


def weaken(path: Path, version: bytes = b"GLIBC_2.38") -> int:
    """Mark ``version`` weak in every version need of the ELF64 file ``path``; how many entries changed."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a little-endian ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = 0
    for sh in sections:
        if sh[1] != _SHT_GNU_VERNEED:
            continue
        strtab = sections[sh[6]][4]  # sh_link: the string table; [4] is its sh_offset
        need = sh[4]
        while True:
            _, cnt, _, aux, nxt = struct.unpack_from("<HHIII", data, need)
            a = need + aux
            for _ in range(cnt):
                _, flags, _, name, anext = struct.unpack_from("<IHHII", data, a)
                if bytes(data[strtab + name: strtab + name + len(version) + 1]) == version + b"\0":
                    struct.pack_into("<H", data, a + 4, flags | _VER_FLG_WEAK)
                    changed += 1
                a += anext
            if not nxt:
                break
            need += nxt
    path.write_bytes(bytes(data))
    return changed


_LOADED: dict[str, Path] = {}


def library_dir(cache: Path) -> Path | None:
    """A folder with the wheel's libraries, loadable in this process (None without the wheel); preloads the shim."""
    if "dir" in _LOADED:
        return _LOADED["dir"]
    src = wheel_dir()
    if src is None:
        return None
    if _glibc() >= (2, 38):
        _LOADED["dir"] = src
        return src
    out = cache / "ggml-glibc236"
    out.mkdir(parents=True, exist_ok=True)
    shim = out / "libpackq_c23_shim.so"
    if not shim.exists():
        (out / "shim.c").write_text(SHIM)
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-shared", "-fPIC", "-o", str(shim), str(out / "shim.c")],
                       check=True, capture_output=True)
    for name in LIBS:
        if not (out / name).exists():
            shutil.copy2(src / name, out / name)
            weaken(out / name)
    if not (out / "libllama.so").exists():
        shutil.copy2(out / "libllama.so.0", out / "libllama.so")
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)  # its four functions resolve the weakened needs
    _LOADED["dir"] = out
    return out


class _Traits(ctypes.Structure):
    # ggml.h (b11739) struct ggml_type_traits; checked against the type's name and sizes on every use
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGML:
    """ggml's own ``to_float`` of each type (libggml-base's type traits), on NumPy bytes."""

    def __init__(self, folder: Path) -> None:
        self.lib = ctypes.CDLL(str(folder / "libggml-base.so.0"))
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    def to_float(self, data, ggml_type: int, name: str, block: int, nbytes: int, count: int):
        import numpy as np

        t = self.lib.ggml_get_type_traits(ggml_type).contents
        assert (t.type_name.decode(), t.blck_size, t.type_size) == (name.lower(), block, nbytes), "ggml's type traits moved"
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # the bytes, whatever dtype the reader gave
        assert raw.size == count // block * nbytes
        if not t.to_float:  # F32: the bytes are the floats
            return raw.view("<f4").copy()
        out = np.empty(count, dtype=np.float32)
        _TO_FLOAT(t.to_float)(raw.ctypes.data, out.ctypes.data, count)
        return out
