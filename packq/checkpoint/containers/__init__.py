"""How converted checkpoints sit on disk: one container per layout, and the registry of them.

A target format names its container (``CheckpointFormat.container``); the conversion asks that
container to plan and write the output. A new container (a GGUF file, say) is one module here with
a :class:`~packq.checkpoint.containers.base.Container` and one line below.
"""

from __future__ import annotations

from packq.checkpoint.containers.base import Container, Plan
from packq.checkpoint.containers.folder import SafetensorsFolder
from packq.checkpoint.containers.gguf import GGUFFile

CONTAINERS: dict[str, Container] = {c.name: c for c in [SafetensorsFolder(), GGUFFile()]}

__all__ = ["CONTAINERS", "Container", "Plan"]
