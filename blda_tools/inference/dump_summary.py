"""What a dump did (`DumpSummary`), and the warning of an image it skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class CorruptImageWarning(UserWarning):
    """An image that cannot be decoded was skipped (counted in `DumpSummary.corrupt`)."""


@dataclass
class DumpSummary:
    """What a dump did. `corrupt` lists the skipped images' messages."""

    out: Path
    has_labels: bool
    images_already_stored: int = 0
    images_written: int = 0
    rows_written: int = 0
    # The whole store, with what an earlier run stored before `--resume`.
    images_in_store: int = 0
    rows_in_store: int = 0
    corrupt: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else 0.0
