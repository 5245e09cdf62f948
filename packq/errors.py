"""packq's exceptions: one base class, and the checkpoint error the command line reports in one line."""

from __future__ import annotations


class PackqError(Exception):
    """Base class of the errors packq raises itself (argument errors are TypeError/ValueError)."""


class CheckpointError(PackqError, ValueError):
    """A checkpoint on disk, or a request about one, that packq cannot convert as asked."""
