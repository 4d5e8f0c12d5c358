"""The queued writes of a ProxyDevice not sent yet: one contiguous run of them.

Cluster mounts open files direct_io, and the kernel splits a write at the page
edges of the user's buffer: a 1 MiB write() from a malloc'd buffer (16 bytes past
a page edge) arrives as 1 MiB - 16 bytes, then 16. The file system queues the
first as its whole blocks plus the block it ends inside (made of the new bytes and
the old ones), and the second as that block again, whole. Sent as they come, that
is three requests per megabyte where an aligned writer sends one, and the third
overlaps the second, so it also waits for its reply (a server works on a
connection's requests side by side: the proxy never lets two writes of the same
bytes be under way at once). Held here instead, a write that rewrites the run's
tail replaces it (the old tail is never sent), and a write that continues the run
joins it: the megabyte goes out as one request, as an aligned writer's does.

Pure bookkeeping (no I/O, no lock: the device's lock covers it). The pieces are the
callers' buffers, not copies (write_behind's contract: the data does not change
afterwards); `take` joins them into the bytes of one request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class PendingRun:
    """Contiguous writes [start, start + length), oldest first, none overlapping."""

    def __init__(self) -> None:
        self.start = 0
        self.length = 0
        self.pieces: deque[memoryview] = deque()

    @property
    def end(self) -> int:
        return self.start + self.length

    def joins(self, offset: int, length: int) -> bool:
        """Whether a write of [offset, offset + length) may join the run: the run is
        empty, or the write starts at or before the run's end and reaches it, so it
        continues the run or rewrites its tail (all of it, maybe) and goes on."""
        return not self.length or offset <= self.end <= offset + length

    def add(self, offset: int, data: memoryview) -> int:
        """Append a write that `joins`, cutting off the run's bytes it rewrites first:
        how many bytes were cut (never to be sent)."""
        cut = 0
        if self.length:
            keep = max(offset - self.start, 0)
            cut = self.length - keep
            self._truncate(keep)
        if not self.length:
            self.start = offset
        self.pieces.append(data)
        self.length += len(data)
        return cut

    def _truncate(self, keep: int) -> None:
        """Keep the run's first `keep` bytes only."""
        while self.pieces and self.length - len(self.pieces[-1]) >= keep:
            self.length -= len(self.pieces.pop())
        if self.length > keep:
            last = self.pieces[-1]
            self.pieces[-1] = last[: len(last) - (self.length - keep)]
            self.length = keep

    def take(self, limit: int) -> tuple[int, bytes]:
        """The run's first `limit` bytes (fewer if it is shorter), as (offset, bytes),
        and the run goes on after them."""
        offset, parts, got = self.start, [], 0
        while self.pieces and got < limit:
            piece = self.pieces[0]
            room = limit - got
            if len(piece) > room:
                parts.append(piece[:room])
                self.pieces[0] = piece[room:]
                got = limit
                break
            parts.append(self.pieces.popleft())
            got += len(piece)
        self.start += got
        self.length -= got
        return offset, b"".join(parts)

    def clear(self) -> None:
        self.pieces.clear()
        self.length = 0

    def overlaps(self, offset: int, length: int) -> bool:
        return bool(self.length) and self.start < offset + length and offset < self.end

    def newest_first(self) -> Iterator[tuple[int, memoryview]]:
        """(offset, data) of each piece, the newest first (none overlap: any order
        would do, but this is the order `from_newest_write` reads)."""
        at = self.end
        for piece in reversed(self.pieces):
            at -= len(piece)
            yield at, piece
