"""Hugging Face checkpoints on disk: streamed, verified, atomic conversion and inspection."""

from __future__ import annotations

from packq.checkpoint.convert import convert_checkpoint
from packq.checkpoint.inspect import inspect_checkpoint

__all__ = ["convert_checkpoint", "inspect_checkpoint"]
