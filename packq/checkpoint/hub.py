"""SRC as a Hugging Face Hub repo id (``org/name``), resolved through huggingface_hub's local cache.

An existing path always wins. Otherwise a repo id is looked up in the local cache first, so that it
works offline; only where it is not cached, and ``HF_HUB_OFFLINE`` is not set, is it downloaded.
huggingface_hub is an optional extra (``pip install 'packq[hub]'``), imported only here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from packq.errors import CheckpointError

#: what the Hub accepts as a model repo id: one owner, one name
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def resolve(src: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local folder for SRC: the path itself, or the cached snapshot of a Hub repo id at ``revision``."""
    path = Path(src)
    if path.exists() or path.is_symlink() or not REPO_ID.match(str(src)) or str(src).startswith((".", "/")):
        if revision is not None:
            raise CheckpointError(f"--revision {revision!r} applies to a Hub repo id, and {str(src)!r} is a local path")
        return path
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{str(src)!r}: no such folder; to read it as a Hugging Face Hub repo id, install packq[hub] (huggingface_hub)"
        ) from None
    where = f"{src}@{revision}" if revision else str(src)
    try:
        try:
            folder = snapshot_download(str(src), revision=revision, local_files_only=True)
        except LocalEntryNotFoundError:
            if constants.HF_HUB_OFFLINE:
                raise CheckpointError(
                    f"{str(where)!r}: not a local folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                    "while HF_HUB_OFFLINE is set"
                ) from None
            folder = snapshot_download(str(src), revision=revision)
    except CheckpointError:
        raise
    except Exception as e:  # the Hub's own errors: unknown repo or revision, no network, no access
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{str(where)!r}: cannot resolve it on the Hugging Face Hub: {type(e).__name__}: {first}") from None
    return Path(folder)
