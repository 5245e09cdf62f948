"""Files and folders for a conversion: safe reads, durable writes, and an exclusive, atomic DST.

The guarantees ``packq convert`` publishes rest here:

- Reads follow symlinks but accept only regular files (a FIFO, a device, a
  socket, a dangling link or a loop is refused before anything is written),
  and a copy never reads more than the size ``stat`` gave when it was checked.
- Every file written is fsynced, then the folder that holds it, before DST is
  put in place, and DST's parent after.
- :class:`Destination` claims DST exclusively with a lock file beside it
  (``flock``, released by the kernel when the process dies, so a killed run
  never blocks the next): a second conversion to the same DST fails at once.
  The result is built in a hidden folder beside DST and put in place by one
  ``renameat2`` (``RENAME_NOREPLACE`` for a new DST, ``RENAME_EXCHANGE`` for
  ``--force``), so DST is at every moment absent, the old folder, or the
  complete new one. Where the kernel or file system lacks ``renameat2``, two
  renames are used; a run killed between them leaves the old folder under the
  hidden ``.old`` name, and the next run for the same DST puts it back first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from packq.checkpoint.guards import Interrupted, deferred_signals, record_commit
from packq.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def describe(e: OSError, where: Path | str) -> str:
    """One line for an OSError: the file it concerns and the cause."""
    name = e.filename if e.filename is not None else where
    return f"{str(name)!r}: {e.strerror or e}"


@contextlib.contextmanager
def io_errors(where: Path | str) -> Iterator[None]:
    """Turn any OSError inside into a one-line CheckpointError naming the file."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(describe(e, where)) from None


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path`` (symlinks followed), refusing anything but a regular file.

    Opened non-blocking, so a FIFO is refused instead of blocking the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise CheckpointError(f"{str(path)!r}: is {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    with io_errors(path):
        fd = open_regular(path)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise CheckpointError(f"{str(path)!r}: {size} bytes, more than the {limit} packq reads for a JSON file")
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)


def copy_bytes(src_fd: int, out: BinaryIO, offset: int, count: int, where: Path | str) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to the unbuffered file ``out``.

    The kernel copies them where it can (copy_file_range); never more than ``count``.
    """
    copy_range = getattr(os, "copy_file_range", None)
    while count and copy_range is not None:
        try:
            n = copy_range(src_fd, out.fileno(), min(count, 1 << 30), offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            break  # another file system, an old kernel: read and write instead
        if n == 0:
            raise CheckpointError(f"{str(where)!r}: truncated while reading (ended {count} bytes early)")
        offset, count = offset + n, count - n
    while count:
        data = os.pread(src_fd, min(count, 1 << 24), offset)
        if not data:
            raise CheckpointError(f"{str(where)!r}: truncated while reading (ended {count} bytes early)")
        view = memoryview(data)
        while view.nbytes:
            view = view[out.write(view) :]
        offset, count = offset + len(data), count - len(data)


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it."""
    with io_errors(path), open(path, "xb", buffering=0) as f:
        view = memoryview(data)
        while view.nbytes:
            view = view[f.write(view) :]
        os.fsync(f.fileno())


def copy_durable(src: Path, dst: Path, size: int) -> None:
    """Copy the regular file ``src`` of ``size`` bytes (as checked earlier) to the new file ``dst``, fsynced."""
    with io_errors(src):
        fd = open_regular(src)
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            raise CheckpointError(f"{str(src)!r}: changed while converting ({size} bytes when checked, {st.st_size} now)")
        with io_errors(dst), open(dst, "xb", buffering=0) as out:
            copy_bytes(fd, out, 0, size, src)
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(out.fileno())
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            raise CheckpointError(f"{str(src)!r}: changed on disk while packq was copying it; run again once nothing writes it")
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with io_errors(path):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (the files were fsynced as they were written)."""
    for folder, _, _ in os.walk(root):
        fsync_dir(Path(folder))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the C library, kernel or file system lacks it (then the caller falls back)."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def remove(path: Path) -> None:
    """Remove a file, link or folder tree, whatever is there; nothing if absent.

    An OSError names the absolute path of the entry that could not be removed (rmtree's own names the
    entry relative to its folder).
    """
    def failed(func: Any, where: str, info: Any) -> None:
        e = info[1]
        if isinstance(e, FileNotFoundError):
            return
        raise OSError(e.errno, e.strerror, os.path.abspath(where)) from None

    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=failed)


def _raise(e: OSError) -> None:
    raise e


def unremovable(root: Path) -> str | None:
    """Why the folder tree ``root`` could not be removed by this process, if it could not: checked before a
    --force conversion commits, so that it fails with the old DST in place rather than leave it half removed.

    Removing an entry needs write and search permission on its folder, and in a sticky folder ownership of
    the entry (or the folder); a folder read-only to us, or another user's, is found here. (An immutable
    attribute or a read-only mount below DST is not visible this way; :meth:`Destination.commit` reports it.)
    """
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    for folder, dirs, names in os.walk(root, onerror=_raise):
        if not (dirs or names):
            continue
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{os.path.abspath(folder)} is not writable by this user, so its entries cannot be removed"
        st = os.stat(folder, follow_symlinks=False)
        if uid not in (None, 0) and st.st_mode & stat.S_ISVTX and st.st_uid != uid:
            for name in dirs + names:
                if os.stat(os.path.join(folder, name), follow_symlinks=False).st_uid != uid:
                    return f"{os.path.abspath(os.path.join(folder, name))} belongs to another user in a sticky folder"
    return None


class Destination:
    """An exclusive claim on DST, and the hidden folder (or, ``single_file``, file) its result is built in.

    Use as a context manager; call :meth:`commit` once the hidden folder or file
    (``tmp``) is complete. Leaving the block without commit removes it. For a
    single file, ``tmp`` is a path that does not exist yet: the caller creates it.
    """

    #: set to False (tests) to use the two-rename fallback instead of renameat2
    use_renameat2 = True

    def __init__(self, dst: Path, force: bool, *, single_file: bool = False) -> None:
        name = dst.name
        if name in ("", ".", ".."):
            raise CheckpointError(f"DST must name a {'file' if single_file else 'folder'} to create, got {str(dst)!r}")
        dst = Path(os.path.abspath(dst))  # messages name absolute paths; links are not followed
        self.dst, self.force, self.single_file = dst, force, single_file
        self.parent = dst.parent
        self.lock_path = self.parent / f".packq-{self._tag(dst)}.lock"
        self.tmp, self.old = self.hidden(dst)
        self._fd: int | None = None

    @staticmethod
    def _tag(dst: Path) -> str:
        # short fixed names, whatever DST's length: a 255-byte DST name still fits
        return hashlib.sha256(os.fsencode(dst.name)).hexdigest()[:16]

    @classmethod
    def hidden(cls, dst: Path) -> tuple[Path, Path]:
        """The hidden folders beside DST that a conversion builds in and replaces: (partial, old)."""
        dst = Path(os.path.abspath(dst))
        tag = cls._tag(dst)
        return dst.parent / f".packq-{tag}.partial", dst.parent / f".packq-{tag}.old"

    def __enter__(self) -> Destination:
        if not self.parent.is_dir():
            raise CheckpointError(f"DST's parent folder {str(self.parent)!r} does not exist")
        # signals wait while the claim is taken and the hidden folder made: one landing between the mkdir and
        # the block that owns the folder would otherwise leave it behind; delivered once it is owned or gone
        with deferred_signals() as deferred:
            with io_errors(self.parent):
                self._claim()
            try:
                with io_errors(self.parent):
                    if self.old.exists() and not _exists(self.dst):
                        os.rename(self.old, self.dst)  # a fallback --force run died between its two renames
                    for stale in (self.tmp, self.old):  # left by a run that was killed: we hold the claim now
                        remove(stale)
                    if _exists(self.dst) and not self.force:
                        raise CheckpointError(f"DST {str(self.dst)!r} already exists; pass --force (force=True) to replace it")
                self.check_replaceable()  # before any work: an old DST that could not be removed is refused now
                if not self.single_file:
                    with io_errors(self.parent):
                        self.tmp.mkdir()
                if deferred.received:
                    raise Interrupted(deferred.received[0])
            except BaseException:
                with contextlib.suppress(OSError):
                    remove(self.tmp)
                self._release()
                raise
        return self

    def _claim(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"DST {str(self.dst)!r}: another packq conversion is writing it now (it holds {str(self.lock_path)!r}); "
                    "wait for it to finish, or choose another DST"
                ) from None
            # the last holder unlinks the lock file on release: make sure ours is still the one at that path
            try:
                same = os.path.samestat(os.stat(self.lock_path, follow_symlinks=False), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(self._fd)
            self._fd = None

    def check_replaceable(self) -> None:
        """With --force over an existing DST: refuse now, with the old DST in place, if it could not be
        removed once replaced (a read-only sub-folder, another user's files)."""
        if not (self.force and _exists(self.dst)) or self.dst.is_symlink() or not self.dst.is_dir():
            return
        try:
            why = unremovable(self.dst)
        except OSError as e:
            why = describe(e, self.dst)
        if why is not None:
            raise CheckpointError(f"DST {str(self.dst)!r} cannot be replaced: {why}; nothing was changed")

    def commit(self) -> None:
        """Put the complete hidden folder or file in place as DST: one atomic rename where the system allows.

        Raises CheckpointError, DST then being the complete new folder or file, if the old one cannot be removed.
        """
        self.check_replaceable()
        # from here to the end of cleanup, SIGINT and SIGTERM wait: neither the exchange nor the removal of
        # the old folder is cut short (a second Ctrl-C would leave half a folder); raised in __exit__
        self._deferral = contextlib.ExitStack()
        self._deferred = self._deferral.enter_context(deferred_signals())
        fsync_tree(self.tmp)  # (a single file was fsynced by its writer: nothing to walk)
        fsync_dir(self.parent)
        with io_errors(self.dst):
            if not _exists(self.dst):
                if not (self.use_renameat2 and _renameat2(self.tmp, self.dst, _RENAME_NOREPLACE)):
                    os.rename(self.tmp, self.dst)
            elif not (self.use_renameat2 and _renameat2(self.tmp, self.dst, _RENAME_EXCHANGE)):
                os.rename(self.dst, self.old)
                os.rename(self.tmp, self.dst)
        fsync_dir(self.parent)
        self.committed = True
        record_commit(self.dst)
        # the old DST: under the hidden tmp name after an exchange, else .old
        for old in (self.tmp, self.old):
            try:
                remove(old)
            except OSError as e:
                raise CheckpointError(
                    f"DST {str(self.dst)!r} is the complete new checkpoint, but the old one could not be fully "
                    f"removed: {describe(e, old)}; what is left of it is in {str(old)!r}") from None

    committed = False
    _deferral: contextlib.ExitStack | None = None

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if self._deferral is None:  # not committing: the cleanup after a failure or a first signal
            self._deferral = contextlib.ExitStack()
            self._deferred = self._deferral.enter_context(deferred_signals())
        try:
            if not self.committed:
                with contextlib.suppress(OSError):
                    remove(self.tmp)
        finally:
            self._release()
            self._deferral.close()
            self._deferral = None
        if self._deferred.received and kind is None:  # a signal came while committing: report it now
            raise Interrupted(self._deferred.received[0], committed=self.committed)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()
