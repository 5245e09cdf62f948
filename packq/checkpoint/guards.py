"""Guards a conversion runs under: what it reads kept apart from what it replaces, signals, and resources.

- :func:`check_src_against_dst`: the one place where SRC, its folder and each of its files (links followed),
  is compared with DST.
  A Hugging Face snapshot links every file into ``blobs/``; a SRC whose files link into DST (or into the
  hidden folders beside it) would read, after ``--force`` replaced DST, as the converted checkpoint.
- :func:`terminating`: SIGTERM ends a run as SIGINT does (``KeyboardInterrupt``), so that every run, whatever
  it was doing (opening, analysing, planning, writing), cleans up and reports in one line.
- :func:`deferred_signals`: SIGINT and SIGTERM wait while DST is committed and the hidden folders cleared, so
  that a second Ctrl-C cannot leave a half-deleted folder or interrupt the exchange.
- :func:`resources`: running out of memory or threads becomes a one-line :class:`CheckpointError` saying what
  ran out and how much the largest piece of work needed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from packq.errors import CheckpointError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def files_of(root: Path) -> Iterator[Path]:
    """Every entry of SRC's tree that a conversion may read: files and links (followed when read), in real
    sub-folders (a link to a folder is refused where files are copied)."""
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            yield Path(folder) / name


def check_src_against_dst(src: Path, dst: Path, hidden: Iterable[Path] = ()) -> None:
    """Refuse a DST that is SRC, lies inside it or holds it, and then any file of SRC that resolves into DST
    or the hidden folders beside it (:func:`check_reads_against_dst`): before anything is written."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise CheckpointError(f"DST {str(dst)!r} is SRC itself; choose a new folder")
    if s in d.parents:
        raise CheckpointError(f"DST {str(dst)!r} is inside SRC {str(src)!r}; choose a folder outside the source")
    if d in s.parents:
        raise CheckpointError(f"SRC {str(src)!r} is inside DST {str(dst)!r}; replacing DST would destroy the source")
    check_reads_against_dst(files_of(src), dst, hidden)


def check_reads_against_dst(reads: Iterable[Path], dst: Path, hidden: Iterable[Path] = ()) -> None:
    """Refuse when a file packq reads resolves (every link followed) into DST or the hidden folders beside it.

    ``reads``: every file of SRC that the conversion may open (:func:`files_of`), whatever the container.
    """
    doomed = [os.path.realpath(p) for p in (dst, *hidden)]
    for path in reads:
        real = os.path.realpath(path)
        for folder in doomed:
            if _inside(real, folder):
                raise CheckpointError(
                    f"SRC file {str(path)!r} is a link to {real!r}, inside DST {str(dst)!r} (or a folder packq "
                    "replaces with it): writing DST would change SRC; copy SRC's files first (cp -rL)")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; ``committed``: whether DST had already been put in place (a signal deferred while
    the commit ran is raised once it is done)."""

    def __init__(self, signum: int, committed: bool = False) -> None:
        super().__init__(f"signal {signum}")
        self.signum, self.committed = signum, committed


#: DSTs this process has put in place, so that a signal arriving after a commit (while the summary is made or
#: printed) is reported as what it is: an interruption of a run whose DST is complete
_COMMITTED: set[str] = set()


def record_commit(dst: Path) -> None:
    _COMMITTED.add(os.path.abspath(dst))


def forget_commit(dst: str | Path) -> None:
    _COMMITTED.discard(os.path.abspath(dst))


def was_committed(dst: str | Path) -> bool:
    return os.path.abspath(dst) in _COMMITTED


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def terminating() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside, where nothing else handles it (main thread only; elsewhere
    signals cannot be handled): an application's own SIGTERM handler is left alone."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Deferred:
    """The signals that arrived while deferred (see :func:`deferred_signals`)."""

    def __init__(self) -> None:
        self.received: list[int] = []


@contextlib.contextmanager
def deferred_signals() -> Iterator[Deferred]:
    """SIGINT and SIGTERM are recorded, not acted on, inside; the caller decides after (``Deferred.received``).

    Python runs signal handlers in the main thread only, whichever thread the kernel delivered the signal
    to, so replacing the handlers is enough to keep every one of them out of the block.
    """
    state = Deferred()
    if not _main_thread():
        yield state
        return

    def record(signum: int, frame: Any) -> None:
        state.received.append(signum)

    previous = {s: signal.signal(s, record) for s in _SIGNALS}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


@contextlib.contextmanager
def resources(what: str, largest: tuple[str, int] | None = None) -> Iterator[None]:
    """MemoryError, and a thread that cannot be started, as one line: what ran out, and how much was needed.

    ``largest``: (name, bytes) of the largest tensor the work holds at once, for the message.
    """
    try:
        yield
    except MemoryError:
        need = (f"; the largest tensor, {largest[0]!r}, needs {_size(largest[1])} and packq holds a few such "
                "pieces at once") if largest else ""
        raise CheckpointError(f"{what}: out of memory{need} (a memory limit such as ulimit -v, or too little RAM)") from None
    except RuntimeError as e:
        if "can't start new thread" not in str(e) and "cannot start new thread" not in str(e):
            raise
        raise CheckpointError(
            f"{what}: cannot start a thread ({e}): a limit on threads (ulimit -u, a container's pids limit) is "
            "reached; packq needs a few (PACKQ_NUM_THREADS=1 keeps its kernels to one)") from None
