"""How converted bytes reach the disk: reused buffers, and direct writes from an aligned staging buffer.

The writer's direct path (``O_DIRECT``) must write exactly the bytes of the buffered one, whatever the sizes of
the pieces and copies, and fall back to buffered writes wherever the file system refuses (at the start, or on
one write, or with a short write), still the same bytes.
"""

from __future__ import annotations

import errno
import os
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import packq.checkpoint.safetensors as S

needs_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


# ------------------------------------------------------------------ Buffers
def test_buffers_are_page_aligned_and_reused():
    b = S.Buffers()
    x = b.take(10_000)
    assert x.nbytes == 10_000 and x.ctypes.data % 4096 == 0
    b.give(x.view(np.int32).reshape(50, 50))  # any view of it
    y = b.take(8_000)  # a smaller request takes the same memory
    assert y.ctypes.data == x.ctypes.data and y.nbytes == 8_000
    z = b.take(8_000)  # that one is out: a new one
    assert not np.shares_memory(y, z)


def test_buffers_ignore_arrays_that_are_not_theirs_and_keep_a_few():
    b = S.Buffers(keep=2)
    b.give(np.empty(100, np.uint8))  # not one of them: ignored
    assert b._free == []
    taken = [b.take(1000 * (i + 1)) for i in range(4)]
    for t in taken:
        b.give(t)
    b.give(taken[0])  # twice: the second is ignored
    assert sorted(f.nbytes for f in b._free) == [3000 + 8192, 4000 + 8192]  # the two largest kept


def _resident(a: np.ndarray) -> int:
    """How many of ``a``'s pages are in memory (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    start = a.ctypes.data // mmap.PAGESIZE * mmap.PAGESIZE
    n = -(-(a.ctypes.data + a.nbytes - start) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * mmap.PAGESIZE), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


def _prefaulting():
    """The C kernels, where they are built and this system populates pages on request (Linux 5.14 and later)."""
    from packq.backends import numpy as numpy_backend

    ck = numpy_backend.c_kernels()
    if ck is None:
        pytest.skip("packq's C extension is not built here")
    if not sys.platform.startswith("linux") or not ck.prefault(bytearray(3 * 4096)):
        pytest.skip("no MADV_POPULATE_WRITE here (Linux 5.14 and later)")
    return ck


def test_prefault_makes_the_pages_present_and_keeps_the_bytes():
    """On a new mapping (no page present yet, whatever the allocator holds): every whole page present after it,
    none before; an array's bytes unchanged; a buffer of no whole page done; read-only buffers refused."""
    import mmap

    ck = _prefaulting()
    m = np.frombuffer(mmap.mmap(-1, 64 * 4096), np.uint8)
    assert _resident(m) == 0  # (the negative control: nothing has touched it)
    assert ck.prefault(m) is True and _resident(m) == 64
    a = np.arange(3 * 4096 + 100, dtype=np.uint32).view(np.uint8)[7:]  # unaligned at both ends
    before = a.copy()
    assert ck.prefault(a) is True and np.array_equal(a, before)
    assert ck.prefault(bytearray(10)) is True  # no whole page: nothing to do
    with pytest.raises(TypeError):
        ck.prefault(b"read only")


def test_fresh_buffers_are_prefaulted_from_prefault_from(monkeypatch):
    """From PREFAULT_FROM bytes a fresh buffer's pages are made present when it is handed out (one madvise call,
    not a fault per page as it is written); smaller ones, and any without the C kernels, are plain arrays."""
    from packq.backends import numpy as numpy_backend

    _prefaulting()
    big = S.fresh(S.PREFAULT_FROM + 12_345)
    assert big.dtype == np.uint8 and big.nbytes == S.PREFAULT_FROM + 12_345
    assert _resident(big) >= -(-big.nbytes // 4096) - 1  # (the first, partial page may be shared with other memory)
    calls: list[int] = []
    monkeypatch.setattr(numpy_backend, "c_kernels", lambda: types.SimpleNamespace(prefault=lambda a: calls.append(a.nbytes)))
    assert S.fresh(S.PREFAULT_FROM - 1).nbytes == S.PREFAULT_FROM - 1 and S.fresh(S.PREFAULT_FROM).nbytes == S.PREFAULT_FROM
    assert calls == [S.PREFAULT_FROM]  # only from PREFAULT_FROM bytes
    monkeypatch.setattr(numpy_backend, "c_kernels", lambda: None)
    assert S.fresh(S.PREFAULT_FROM).nbytes == S.PREFAULT_FROM  # without the kernels: a plain array


# ------------------------------------------------------------------ the writer, direct and buffered
def _source(tmp_path, nbytes: int) -> S.SafetensorsFile:
    data = np.random.default_rng(1).integers(0, 256, nbytes, np.uint8)
    w = S.SafetensorsWriter(tmp_path / "src.safetensors", [("src", "U8", (nbytes,), nbytes)], {})
    w.write("src", data)
    w.close()
    return S.SafetensorsFile(tmp_path / "src.safetensors")


#: a tensor written as parts: ("data", n bytes of values), ("copy", offset, n) from the source file, or ("owned",
#: phased, n): values in a buffer of the writer's, at the file's phase (written from it, uncopied) or not
parts = st.lists(st.one_of(st.tuples(st.just("data"), st.integers(1, 20_000)),
                           st.tuples(st.just("copy"), st.integers(0, 30_000), st.integers(1, 10_000)),
                           st.tuples(st.just("owned"), st.booleans(), st.integers(1, 40_000))),
                 min_size=1, max_size=6)


def _write(path, tensors, src: S.SafetensorsFile, seed: int, direct: bool, wrap=None) -> bool:
    """Write ``tensors`` (lists of parts) to ``path``, directly if ``direct`` (and the file holds a block at least);
    whether it was still writing directly before close. Every buffer the writer was given is back once it is."""
    rng = np.random.default_rng(seed)
    entries = [(f"t{i}", "U8", (n,), n) for i, t in enumerate(tensors) for n in [sum(p[-1] for p in t)]]
    buffers = S.Buffers(keep=64)
    w = S.SafetensorsWriter(path, entries, {"k": "v"}, buffers)
    if wrap is not None:
        w._out.file = wrap(w._out.file)
    size = len(S.header_for(entries, {"k": "v"})) + sum(e[3] for e in entries)
    assert (w._out.stage is not None) == (direct and size >= 4096)
    with src.open() as f:
        for (name, _, _, n), t in zip(entries, tensors):
            w.start(name, n)
            for p in t:
                if p[0] == "data":
                    w.append(rng.integers(0, 256, p[1], np.uint8))
                elif p[0] == "owned":
                    out = buffers.making(w.position + (0 if p[1] else 1), lambda: buffers.output(p[2]))
                    assert (out.ctypes.data - w.position) % 4096 == (0 if p[1] else 1)
                    out[:] = rng.integers(0, 256, p[2], np.uint8)
                    w.append(out.view(np.int8), owned=True)  # (a view of the buffer: the writer finds its root)
                else:
                    w.append_copy(f, "src", p[1], p[2])
            w.end()
    still = w._out.stage is not None
    w.close()
    assert not buffers._out, "a buffer the writer was given is not back"
    return still


@needs_direct
@given(tensors=st.lists(parts, min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1),
       chunk=st.sampled_from([4096, 3 * 4096, 1 << 16]))
def test_direct_writes_equal_buffered_ones(tmp_path_factory, tensors, seed, chunk):
    tmp = tmp_path_factory.mktemp("w")
    src = _source(tmp, 40_000)
    real, uncopied = S.DIRECT_CHUNK, S.UNCOPIED
    S.DIRECT_CHUNK = chunk  # several flushes and a partial last block on these small files
    S.UNCOPIED = 1  # every phased part written from its own memory
    try:
        _write(tmp / "direct", tensors, src, seed, direct=True)
    finally:
        S.DIRECT_CHUNK, S.UNCOPIED = real, uncopied
    o_direct = os.O_DIRECT
    try:
        del os.O_DIRECT  # the buffered path, as on a platform without direct I/O
        assert not _write(tmp / "buffered", tensors, src, seed, direct=False)
    finally:
        os.O_DIRECT = o_direct
    assert (tmp / "direct").read_bytes() == (tmp / "buffered").read_bytes()
    assert S.SafetensorsFile(tmp / "direct").tensors.keys() == {f"t{i}" for i in range(len(tensors))}


class _Refusing:
    """A file whose next direct write fails as a file system that wants another alignment does (EINVAL), or
    writes only part (a size limit reached)."""

    def __init__(self, f, how: str) -> None:
        self.f, self.how, self.done = f, how, False

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()

    def write(self, view):
        import fcntl

        direct = fcntl.fcntl(self.f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        if direct and not self.done and view.nbytes > 4096:
            self.done = True
            if self.how == "einval":
                raise OSError(errno.EINVAL, "Invalid argument")
            return self.f.write(view[:4096 + 100]) if self.how == "short" else self.f.write(view[:4096])
        return self.f.write(view)


@needs_direct
@pytest.mark.parametrize("how", ["einval", "short", "aligned short"])
@pytest.mark.parametrize("uncopied", [False, True])
def test_a_refused_direct_write_goes_on_buffered_with_the_same_bytes(tmp_path, monkeypatch, how, uncopied):
    """Refused in a staging buffer's write, or (``uncopied``) where pieces' own memory is queued to be written
    behind it: the writes queued after a refused one write nothing, and go out buffered in order."""
    monkeypatch.setattr(S, "DIRECT_CHUNK", 3 * 4096)
    src = _source(tmp_path, 40_000)
    tensors = [[("data", 10_000), ("copy", 5, 20_000), ("data", 7)], [("copy", 0, 30_000)]]
    if uncopied:
        monkeypatch.setattr(S, "UNCOPIED", 1)
        tensors = [[("owned", True, 10_000), ("owned", True, 20_000), ("owned", False, 9000), ("owned", True, 7)],
                   [("owned", True, 30_000), ("copy", 0, 30_000), ("owned", True, 12_288)]]
    still = _write(tmp_path / "refused", tensors, src, 3, direct=True, wrap=lambda f: _Refusing(f, how))
    assert still == (how == "aligned short")  # an aligned short write just goes on directly
    assert _write(tmp_path / "plain", tensors, src, 3, direct=True)
    assert (tmp_path / "refused").read_bytes() == (tmp_path / "plain").read_bytes()


@needs_direct
def test_a_file_system_without_direct_io_is_written_buffered(tmp_path, monkeypatch):
    import fcntl

    real = fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    src = _source(tmp_path, 40_000)
    tensors = [[("data", 10_000), ("copy", 5, 20_000)]]
    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    assert not _write(tmp_path / "refused", tensors, src, 3, direct=False)
    monkeypatch.setattr(fcntl, "fcntl", real)
    _write(tmp_path / "plain", tensors, src, 3, direct=True)
    assert (tmp_path / "refused").read_bytes() == (tmp_path / "plain").read_bytes()


@needs_direct
def test_full_stages_are_written_on_the_writer_thread_and_its_errors_reach_the_writer(tmp_path, monkeypatch):
    """A full staging buffer is written on the writer thread while the other fills (the same bytes, checked above);
    an error there (a full disk) is raised by the writer's next step, and abort gives every buffer back."""
    import threading

    monkeypatch.setattr(S, "DIRECT_CHUNK", 3 * 4096)
    src = _source(tmp_path, 40_000)
    tensors = [[("data", 10_000), ("copy", 5, 20_000), ("data", 7)], [("copy", 0, 30_000)]]
    threads: list[str] = []
    real = S.StagedWriter._direct

    def seen(self, view):
        threads.append(threading.current_thread().name)
        return real(self, view)

    monkeypatch.setattr(S.StagedWriter, "_direct", seen)
    _write(tmp_path / "a", tensors, src, 3, direct=True)
    assert any(t.startswith("packq-write") for t in threads) and threads[-1] == threading.current_thread().name

    def full(self, view):
        if threading.current_thread().name.startswith("packq-write"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, view)

    monkeypatch.setattr(S.StagedWriter, "_direct", full)
    buffers = S.Buffers()
    out = S.StagedWriter(open(tmp_path / "b", "xb", buffering=0), 100_000, buffers)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(10):
            out.write(memoryview(bytes(10_000)))
        out.close()
    out.abort()
    out.file.close()
    assert not buffers._out and out._pool is None


@needs_direct
def test_negative_control_a_lost_carry_is_caught(tmp_path, monkeypatch):
    """The comparison above sees a writer that drops the staged bytes after a flush (the partial block that
    the next flush must carry)."""
    monkeypatch.setattr(S, "DIRECT_CHUNK", 3 * 4096)
    src = _source(tmp_path, 40_000)
    tensors = [[("data", 10_000), ("copy", 5, 20_000), ("data", 7)]]
    _write(tmp_path / "plain", tensors, src, 3, direct=True)
    real = S.StagedWriter._flush

    def lossy(self, nbytes):
        real(self, nbytes)
        self.staged = 0  # the carried partial block forgotten

    monkeypatch.setattr(S.StagedWriter, "_flush", lossy)
    _write(tmp_path / "lossy", tensors, src, 3, direct=True)
    assert (tmp_path / "lossy").read_bytes() != (tmp_path / "plain").read_bytes()


# ------------------------------------------------------------------ the GGUF container's tensor data
def _gguf_tensors(sizes: list[list[int]], seed: int, buffers: S.Buffers | None = None):
    """I8 tensors (one byte per element, so any size) whose data come in pieces of the given sizes, some made by
    calls (as the worker threads make a module's pieces), some taken from ``buffers``; and each tensor's bytes."""
    import functools

    from packq.checkpoint.containers.gguf import Tensor
    from packq.checkpoint.formats.base import Piece

    rng = np.random.default_rng(seed)
    tensors, datas = [], []
    for i, pieces in enumerate(sizes):
        data = rng.integers(0, 256, sum(pieces), np.uint8)
        cuts = np.cumsum([0, *pieces])

        def made(a, b, data=data, j=0):
            if buffers is None:
                return data[a:b].copy()
            out = buffers.output(b - a)  # (at the phase of its place in the file where the call's size was known)
            out[:] = data[a:b]
            return out

        def parts(cuts=cuts, made=made):
            for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
                if j % 2:
                    yield made(a, b)
                elif j % 4 == 0:  # a call that says its size (as the module pieces do): made at its file phase
                    yield Piece(b - a, make=functools.partial(made, a, b))
                else:
                    yield lambda a=a, b=b: made(a, b)

        tensors.append(Tensor(f"t{i}", 24, (int(cuts[-1]),), int(cuts[-1]), parts))  # 24: GGML_TYPE_I8
        datas.append(data)
    return tensors, datas


def _gguf_reference(path, name: str, datas) -> None:
    """The same file by gguf-py's own writer, from whole tensors (the independent truth)."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    for i, d in enumerate(datas):
        w.add_tensor(f"t{i}", d.view(np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_write(path, sizes, seed: int, name: str, monkeypatch, wrap=None, buffers=None, spans=None) -> list[bool]:
    """packq's GGUF writer on those tensors; whether its staged writer started, and ended, writing directly (and, to
    ``spans``, the blocks its data start and end in)."""
    spans = [] if spans is None else spans
    import packq.checkpoint.containers.gguf as CG

    seen: list[bool] = []

    class Spy(S.StagedWriter):
        def __init__(self, file, size, buffers=None):
            super().__init__(file, size, buffers)
            seen.append(self.stage is not None)
            spans.append((self.position // 4096, (self.position + size) // 4096))
            if wrap is not None:
                self.file = wrap(self.file)

        def close(self):
            seen.append(self.stage is not None)
            super().close()

    monkeypatch.setattr(CG, "StagedWriter", Spy)
    tensors, _ = _gguf_tensors(sizes, seed, buffers)
    CG.write(path, "llama", [("general.name", name, None)], tensors, buffers=buffers)
    monkeypatch.setattr(CG, "StagedWriter", S.StagedWriter)
    return seen


gguf_sizes = st.lists(st.lists(st.integers(1, 20_000), min_size=1, max_size=5), min_size=1, max_size=4)


@needs_direct
@given(sizes=gguf_sizes, seed=st.integers(0, 2**32 - 1), name=st.text("ab", min_size=1, max_size=6000),  # (gguf-py skips an empty name)
       chunk=st.sampled_from([4096, 3 * 4096, 1 << 16]))
def test_gguf_direct_writes_equal_gguf_pys_own_file(tmp_path_factory, sizes, seed, name, chunk):
    """The data section starts wherever the metadata ends (``name``'s length moves it through a block); direct
    writes, and buffered ones where there is no O_DIRECT, both give the file gguf-py writes from whole tensors."""
    pytest.importorskip("gguf")
    tmp = tmp_path_factory.mktemp("g")
    _, datas = _gguf_tensors(sizes, seed)
    _gguf_reference(tmp / "ref.gguf", name, datas)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "DIRECT_CHUNK", chunk)
        mp.setattr(S, "UNCOPIED", 1)  # every phased piece written from its own memory
        spans: list[tuple[int, int]] = []
        seen = _gguf_write(tmp / "direct.gguf", sizes, seed, name, mp, buffers=S.Buffers(), spans=spans)
        (first, last), = spans
        assert seen == [last > first] * 2  # every flush direct, unless the data end in the block they start in
        mp.delattr(os, "O_DIRECT")
        assert _gguf_write(tmp / "buffered.gguf", sizes, seed, name, mp) == [False, False]
    ref = (tmp / "ref.gguf").read_bytes()
    assert (tmp / "direct.gguf").read_bytes() == ref
    assert (tmp / "buffered.gguf").read_bytes() == ref


@needs_direct
@pytest.mark.parametrize("how", ["einval", "short", "aligned short"])
def test_gguf_a_refused_direct_write_goes_on_buffered_with_the_same_bytes(tmp_path, monkeypatch, how):
    pytest.importorskip("gguf")
    monkeypatch.setattr(S, "DIRECT_CHUNK", 3 * 4096)
    sizes, name = [[10_000, 20_000, 7], [30_000]], "x" * 1234
    seen = _gguf_write(tmp_path / "refused.gguf", sizes, 5, name, monkeypatch, wrap=lambda f: _Refusing(f, how))
    assert seen == [True, how == "aligned short"]
    _, datas = _gguf_tensors(sizes, 5)
    _gguf_reference(tmp_path / "ref.gguf", name, datas)
    assert (tmp_path / "refused.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@needs_direct
def test_gguf_on_a_file_system_without_direct_io_is_written_buffered(tmp_path, monkeypatch):
    import fcntl

    pytest.importorskip("gguf")
    real = fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    sizes, name = [[10_000, 20_000], [5]], "y" * 99
    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    assert _gguf_write(tmp_path / "refused.gguf", sizes, 6, name, monkeypatch) == [False, False]
    monkeypatch.setattr(fcntl, "fcntl", real)
    _, datas = _gguf_tensors(sizes, 6)
    _gguf_reference(tmp_path / "ref.gguf", name, datas)
    assert (tmp_path / "refused.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@needs_direct
def test_gguf_negative_control_a_first_block_not_read_back_is_caught(tmp_path, monkeypatch):
    """The comparison above sees a writer that stages zeros instead of the metadata's bytes in the data's first
    block (which the first direct write rewrites)."""
    pytest.importorskip("gguf")
    sizes, name = [[10_000, 20_000]], "z" * 777
    _, datas = _gguf_tensors(sizes, 7)
    _gguf_reference(tmp_path / "ref.gguf", name, datas)
    real = S.StagedWriter._start_direct

    def forgetful(self, size):
        real(self, size)
        if self.stage is not None:
            self.stage[: self.staged] = 0

    monkeypatch.setattr(S.StagedWriter, "_start_direct", forgetful)
    assert _gguf_write(tmp_path / "lossy.gguf", sizes, 7, name, monkeypatch) == [True, True]
    assert (tmp_path / "lossy.gguf").read_bytes() != (tmp_path / "ref.gguf").read_bytes()


def test_gguf_written_pieces_go_back_to_the_buffers(tmp_path, monkeypatch):
    """Every piece taken from the job's buffers (and the staging buffer) is free again once the file is written."""
    pytest.importorskip("gguf")
    buffers = S.Buffers(keep=64)
    sizes = [[10_000, 20_000, 7, 9000], [30_000, 1]]
    _gguf_write(tmp_path / "m.gguf", sizes, 8, "n", monkeypatch, buffers=buffers)
    assert not buffers._out and len(buffers._free) >= 2


# ------------------------------------------------------------------ converted pieces written from their own memory
@needs_direct
@pytest.mark.parametrize("kw", [{"for_engine": "transformers"}, {"to": "compressed-tensors"}, {"to": "mlx"}],
                         ids=["gptq", "compressed-tensors", "mlx"])
def test_pieces_written_uncopied_give_the_copied_bytes(tmp_path, monkeypatch, kw):
    """Whole checkpoints: each converted piece made at its file offset's phase and written from its own memory
    (every piece here, from one byte on) gives the files that copying every piece into the stage gives; and that path
    did run (a negative control: the pieces' phases shifted by a byte, no buffer's piece goes uncopied; an array of
    fresh memory may still happen to lie at its phase, and is then written uncopied too, rightly)."""
    from pathlib import Path

    from packq.checkpoint import convert_checkpoint

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama-awq"
    uncopied: list[int] = []
    real = S.StagedWriter._write_uncopied

    def counted(self, view, owner):
        root = owner
        while isinstance(root.base, np.ndarray):
            root = root.base
        if self.buffers._out.get(id(root)) is root:  # a piece made in one of the conversion's buffers
            uncopied.append(view.nbytes)
        return real(self, view, owner)

    monkeypatch.setattr(S.StagedWriter, "_write_uncopied", counted)

    def files(out: Path) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(out.iterdir())}

    monkeypatch.setattr(S, "UNCOPIED", 1 << 62)
    convert_checkpoint(example, tmp_path / "copied", **kw)
    assert not uncopied
    monkeypatch.setattr(S, "UNCOPIED", 1)
    convert_checkpoint(example, tmp_path / "uncopied", **kw)
    assert uncopied, "no piece was written from its own memory"
    assert files(tmp_path / "uncopied") == files(tmp_path / "copied")
    uncopied.clear()
    making = S.Buffers.making
    monkeypatch.setattr(S.Buffers, "making", lambda self, position, make: making(self, position + 1, make))
    convert_checkpoint(example, tmp_path / "shifted", **kw)
    assert not uncopied and files(tmp_path / "shifted") == files(tmp_path / "copied")


@needs_direct
def test_gguf_sized_pieces_are_written_uncopied_with_gguf_pys_bytes(tmp_path, monkeypatch):
    """A GGUF piece whose call says its size is made at its place's phase, across tensor boundaries and their padding,
    and written from its own memory; the file is still gguf-py's, and every buffer comes back."""
    pytest.importorskip("gguf")
    monkeypatch.setattr(S, "UNCOPIED", 1)
    uncopied: list[int] = []
    real = S.StagedWriter._write_uncopied

    def counted(self, view, owner):
        uncopied.append(view.nbytes)
        return real(self, view, owner)

    monkeypatch.setattr(S.StagedWriter, "_write_uncopied", counted)
    sizes, name = [[20_000, 5], [9_000, 3], [50_000], [7, 30_001, 11, 40_000]], "q" * 321
    buffers = S.Buffers(keep=64)
    _gguf_write(tmp_path / "u.gguf", sizes, 9, name, monkeypatch, buffers=buffers)
    _, datas = _gguf_tensors(sizes, 9)
    _gguf_reference(tmp_path / "ref.gguf", name, datas)
    assert (tmp_path / "u.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    # the sized calls (the first piece of each tensor), and none after the call that gave no size (of 11 bytes)
    assert sorted(uncopied) == [7, 9_000, 20_000, 50_000]
    assert not buffers._out


@needs_direct
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("part", [None, 4096, 7_001])
def test_gguf_stored_tensors_are_read_straight_into_the_stage(tmp_path, monkeypatch, direct, part):
    """A plain tensor kept as stored (``Stored``) goes from its shard into the writer's stage (or, buffered, by the
    kernel's copy), whole or in parts (``Stored.parts``), between made pieces and across the tensors' padding:
    gguf-py's file from the same bytes."""
    pytest.importorskip("gguf")
    import packq.checkpoint.containers.gguf as CG

    src = _source(tmp_path, 40_000)
    raw = np.fromfile(tmp_path / "src.safetensors", np.uint8)[-40_000:]
    tensors, datas = _gguf_tensors([[10_000, 3], [5]], 4)
    whole = S.Stored(src, "src")
    parts = [whole] if part is None else whole.parts(part)
    if part is not None:
        assert len(parts) == -(-40_000 // part) and sum(p.nbytes for p in parts) == 40_000
        assert [p.offset for p in parts] == list(range(0, 40_000, part))
    tensors.insert(1, CG.Tensor("s", 24, (40_000,), 40_000, lambda: iter(parts)))
    datas.insert(1, raw)
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT")
    CG.write(tmp_path / "s.gguf", "llama", [("general.name", "s", None)], tensors, buffers=S.Buffers())
    import gguf

    w = gguf.GGUFWriter(tmp_path / "ref.gguf", "llama")
    w.add_name("s")
    for t, d in zip(tensors, datas):
        w.add_tensor(t.name, d.view(np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert (tmp_path / "s.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_gguf_reads_two_tensors_ahead(tmp_path):
    """While a tensor's first piece is made, the next two tensors' first steps (their modules' reads) have started:
    the writer never waits at a tensor's start for a read it could have had done. Tensor 0's first piece waits (5 s
    at most) for tensor 2's first step; tensor 0 has more pieces than the writer makes ahead, so with one tensor read
    ahead, tensor 2's would start only once tensor 0's pieces are all taken, after that piece."""
    pytest.importorskip("gguf")
    import threading

    import packq.checkpoint.containers.gguf as CG

    assert CG.READ_AHEAD == 2
    started = [threading.Event() for _ in range(4)]
    seen: list[list[bool]] = []

    def pieces(i):
        def gen():
            started[i].set()
            if i == 0:
                yield lambda: (seen.append([started[2].wait(5), started[3].is_set()]), np.zeros(8, np.uint8))[1]
                for _ in range(CG.LOOKAHEAD + 1):
                    yield np.zeros(8, np.uint8)
            else:
                yield np.full(8, i, np.uint8)
        return gen

    sizes = [8 * (CG.LOOKAHEAD + 2), 8, 8, 8]
    tensors = [CG.Tensor(f"t{i}", 24, (n,), n, pieces(i)) for i, n in enumerate(sizes)]
    CG.write(tmp_path / "r.gguf", "llama", [("general.name", "r", None)], tensors, buffers=S.Buffers())
    assert seen == [[True, False]]  # tensor 2's read had started, tensor 3's not yet (two ahead, not all)
