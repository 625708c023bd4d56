"""The newest events of the log in memory, so that a consumer close behind the head reads its next page without SQL.

Memory holds every position from some point up to `end`, without a gap: each one an event, or a `Hole`. This
store's own appends arrive as they commit; another process's are read in by the store (one query for every
consumer) or, when no consumer here reads their types, only noted as holes. An append of ours that lands after
positions memory has not seen yet (another process's, whose notice is still on its way) waits, parked, until
they are read: memory never answers for positions it skipped.

Loop thread only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.eventlog.store import RecordedEvent


@dataclass(frozen=True, slots=True)
class Hole:
    """A position holding no event memory can give: none at all (an append rolled back, and PostgreSQL's identity
    column never hands its positions out again), or another process's event of one of `types`, not read (each
    an Event.announced_as: a type, or a type with its addressee)."""

    position: int
    types: frozenset[str] = frozenset()
    stream = ""  # no stream's: read_stream skips it like another stream's event


class RecentEvents:
    def __init__(self, keep: int, end: int = 0) -> None:
        self.keep = keep  # at least this many of the newest positions stay
        self._entries: list[RecordedEvent | Hole] = []  # consecutive positions up to `end`, oldest first
        self._end = end  # memory has seen every position up to here (all of them in `_entries`, if any)
        self._parked: dict[int, RecordedEvent] = {}  # our own appends beyond a gap, by position

    @property
    def end(self) -> int:
        return self._end

    def gap_end(self) -> int:
        """The last position before our own oldest parked append: up to there the log must be read; 0 if none."""
        return min(self._parked) - 1 if self._parked else 0

    def add_own(self, records: Iterable[RecordedEvent]) -> None:
        """This store's committed appends, in position order."""
        for record in records:
            if record.position > self._end:
                self._parked[record.position] = record
        self._unpark()

    def add_read(self, records: Sequence[RecordedEvent], limit: int, target: int) -> set[str]:
        """Events read from the database: up to `limit` after what memory held when the read began (its `end`,
        which only ever grows), in position order, asked for because the log reaches `target` (committed: every
        position below it is final). The types of those memory did not have."""
        if len(records) == limit:  # a full page: it ends at its last event (the positions it skipped are holes)
            covered = records[-1].position
        else:  # a short page: everything there was, up to target and beyond
            covered = max(target, records[-1].position if records else target)
        fresh: set[str] = set()
        if covered <= self._end:
            return fresh
        by_position = {r.position: r for r in records}
        for position in range(self._end + 1, covered + 1):
            record = self._parked.pop(position, None)
            if record is None:
                record = by_position.get(position)
                if record is not None:
                    fresh.add(record.event.type)
            self._entries.append(record if record is not None else Hole(position))
        self._end = covered
        self._unpark()
        return fresh

    def add_unread(self, first: int, last: int, types: frozenset[str]) -> bool:
        """Another process's append of `types` at `first`..`last`, not read: memory notes the positions as holes.
        False (nothing noted) unless it starts right after what memory holds."""
        if first != self._end + 1 or last < first or self._parked:
            return False
        self._entries.extend(Hole(position, types) for position in range(first, last + 1))
        self._end = last
        self._trim()
        return True

    def skip_to(self, position: int) -> None:
        """Memory gives up on everything up to `position` (too much to read): it starts again after it."""
        if position <= self._end:
            return
        self._entries.clear()
        self._end = position
        self._parked = {p: r for p, r in self._parked.items() if p > position}
        self._unpark()

    def _unpark(self) -> None:
        if self._parked:
            for position in [p for p in self._parked if p <= self._end]:
                del self._parked[position]
            while (record := self._parked.pop(self._end + 1, None)) is not None:
                self._entries.append(record)
                self._end = record.position
        self._trim()

    def _trim(self) -> None:
        if len(self._entries) > 2 * self.keep:
            del self._entries[:-self.keep]

    # reading ---------------------------------------------------------------------------------------
    def page(self, position: int, types: frozenset[str] | None, limit: int, head: int,
             addressee: str | None = None) -> list[RecordedEvent] | None:
        """Up to `limit` events of `types` (None: any) after `position`, as the database would give them while
        its newest is `head`; None when memory cannot tell (it does not reach back that far, nor up to `head`, or a
        hole of another process's events may hold some for `addressee`: None for every daemon's)."""
        entries = self._entries
        if not entries or self._end < head or entries[0].position > position + 1:
            return None
        page: list[RecordedEvent] = []
        for i in range(max(0, position + 1 - entries[0].position), len(entries)):
            entry = entries[i]
            if isinstance(entry, Hole):
                if entry.types and wanted(entry.types, types, addressee):
                    return None
                continue
            if types is None or entry.event.type in types:
                page.append(entry)
                if len(page) == limit:
                    break
        return page

    def stream(self, stream: str, head: int) -> list[RecordedEvent] | None:
        """The events of `stream`, oldest first; None unless memory holds it from its first event and every hole
        is known to hold none of it."""
        if not self._entries or self._end < head:
            return None
        records: list[RecordedEvent] = []
        for entry in self._entries:
            if entry.stream == stream:
                records.append(entry)  # type: ignore[arg-type]  # a Hole's stream is ""
            elif isinstance(entry, Hole) and entry.types:
                return None
        return records if records and records[0].version == 1 else None


def wanted(kinds: Iterable[str], types: frozenset[str] | None, addressee: str | None) -> bool:
    """Whether events of `kinds` (Event.announced_as) may be some a reader of `types` (None: any) for `addressee` (None:
    whatever the addressee) reads."""
    for kind in kinds:
        type_, _, to = kind.partition("@")
        if (types is None or type_ in types) and (addressee is None or to in ("", addressee)):
            return True
    return False
