"""What a container provides to the conversion: how a target format's tensors sit on disk.

A format says what a module's tensors mean (``packq.checkpoint.formats``); a container says where
they go: which files, in what order, under which names, with which headers and side files. The
conversion asks the target format's container to plan the whole output before anything is written
(every output name, dtype, shape and size known, every header checked), then to write that plan
into the hidden file or folder that :class:`~packq.checkpoint.files.Destination` puts in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from packq.errors import CheckpointError

if TYPE_CHECKING:
    from packq.checkpoint.job import Job
    from packq.checkpoint.progress import Progress


@dataclass
class Plan:
    """Everything a container decided before writing: what the summary reports, and the container's own details."""

    tensors: int  #: output tensors
    nbytes: int  #: bytes of tensor data written
    detail: Any = None  #: the container's own plan (per-file tensor lists, a GGUF layout, ...)
    #: what the conversion's summary adds for this container (a GGUF file: its tensor types, bits a weight, ...)
    summary: dict[str, Any] = field(default_factory=dict)


class Container:
    """One way of laying out a converted checkpoint on disk."""

    name: ClassVar[str]
    #: DST is one file (GGUF) rather than a folder (a Hugging Face checkpoint)
    single_file: ClassVar[bool] = False

    def plan(self, job: Job, dst: Path) -> Plan:
        """Decide every output file and tensor of DST, and check them (names, headers), before any write.

        Raises CheckpointError for anything the container cannot hold.
        """
        raise NotImplementedError

    def write(self, job: Job, plan: Plan, tmp: Path, bar: Progress) -> None:
        """Write the planned output into ``tmp`` (the hidden folder, or the hidden file for a single-file container),
        every file fsynced; DST is put in place by the caller."""
        raise NotImplementedError

    def verify(self, job: Job, plan: Plan, tmp: Path, check_each: Callable[[Callable[[str], None]], None]) -> None:
        """Read the written output back and compare every module with the source, bit for bit; raise on the first difference."""
        job.output.verify(job, tmp, check_each)


def unique_outputs(where: Path | str, outputs: Iterable[tuple[str, str]]) -> None:
    """Refuse two output tensors of one name, before anything is written: (name, what makes it) for every
    output. A source tensor named as one the target writes for a module (a stray ``<module>.weight`` beside
    a quantized module converted to float) would otherwise give a header naming it twice, or a gap."""
    seen: dict[str, str] = {}
    for name, origin in outputs:
        if name in seen:
            raise CheckpointError(
                f"{str(where)!r}: the output tensor {name!r} would be written twice, as {seen[name]} and as "
                f"{origin}; rename or remove the source tensor")
        seen[name] = origin
