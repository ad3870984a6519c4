"""Half-open block ranges and the DHT keys that name blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class BlockRange:
    """Blocks [start, end) of a model; `--blocks 10:22` means blocks 10..21."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"invalid block range {self.start}:{self.end}: need 0 <= start < end")

    @classmethod
    def parse(cls, text: str) -> BlockRange:
        """Parse "START:END" (half-open)."""
        parts = text.strip().split(":")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(f"block range must look like START:END (e.g. 0:4), got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def covers(self, other: BlockRange) -> bool:
        return self.start <= other.start and other.end <= self.end

    def overlaps(self, other: BlockRange) -> bool:
        return self.start < other.end and other.start < self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def block_key(model_id: str, block: int) -> str:
    """DHT key under which servers announce that they hold `block` of `model_id`."""
    return f"{model_id}.block.{block}"
