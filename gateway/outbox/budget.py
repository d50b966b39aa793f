"""Budget planning: which incoming and stored records a batch drops (pure: stored records come in as an iterator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from gateway.outbox.records import DropReason, FullPolicy

DROP_WHY: Mapping[DropReason, str] = {
    DropReason.BUDGET: "over a byte budget",
    DropReason.AGE: "older than the age budget",
    DropReason.CORRUPT: "in a damaged or replaced file",
    DropReason.DISK_FULL: "refused while the disk is full",
    DropReason.QUEUE_FULL: "refused while the in-memory queue is full",
    DropReason.OVERSIZE: "larger than the broker takes",
    DropReason.DEAD_LETTER: "moved to the dead-letter table",
}


class LanePlan:
    """What one batch does to one lane: the slice of incoming records kept, stored records dropped."""

    __slots__ = ("_stored", "_stored_factory", "deleted", "deleted_bytes", "end", "first", "policy", "sizes")

    def __init__(
        self, policy: FullPolicy, sizes: list[int], stored: Callable[[], Iterator[tuple[int, int]]]
    ) -> None:
        self.policy = policy
        self.sizes = sizes  # of the incoming records of this lane, in batch order
        self.first = 0  # incoming records [first, end) are kept
        self.end = len(sizes)
        self.deleted: list[int] = []  # ids of stored records to delete
        self.deleted_bytes = 0
        self._stored_factory = stored
        self._stored: Iterator[tuple[int, int]] | None = None

    @property
    def kept_bytes(self) -> int:
        """Bytes of the incoming records that will be inserted."""
        return sum(self.sizes[self.first : self.end])

    @property
    def dropped(self) -> int:
        """Records this batch drops in this lane: refused incoming plus deleted stored ones."""
        return len(self.sizes) - (self.end - self.first) + len(self.deleted)

    def drop(self, need: int) -> int:
        """Drop records by the lane's policy until ``need`` bytes are freed; return bytes freed."""
        freed = 0
        if self.policy is FullPolicy.DROP_NEWEST:
            while freed < need and self.end > self.first:
                self.end -= 1
                freed += self.sizes[self.end]
        elif self.policy is FullPolicy.DROP_OLDEST:
            # Stored records are older than anything in this batch, so they go first.
            if self._stored is None:
                self._stored = self._stored_factory()
            while freed < need:
                nxt = next(self._stored, None)
                if nxt is None:
                    break
                self.deleted.append(nxt[0])
                self.deleted_bytes += nxt[1]
                freed += nxt[1]
            while freed < need and self.first < self.end:
                freed += self.sizes[self.first]
                self.first += 1
        return freed
