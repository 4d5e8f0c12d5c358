"""The highest generation a node has promised or installed, kept across restarts.

A view's generation must only grow, also across a restart of the whole cluster.
Membership state lives in memory, so without a record every lockd that starts
again would count from generation 1. Like corosync's ring id file, each node
keeps the highest generation it has promised (installed views are never above
it: a node installs only a view it promised) and makes it durable *before* it
acts on it (answers a proposal, or proposes one itself). After a restart it
promises and proposes only above that number; since every view was promised by
all of its members, any member's record lifts the next view above every earlier
one (a node that lost its record is lifted by the others' refusals).

Two records behind one interface:

- `MemoryGenerationRecord`: no durability (tests in one process; a test may hand
  one record to several lives of a node to model a restart).
- `GenerationFile`: `DIR/node<ID>.generation`, two slots of SLOT bytes, each one
  line of JSON with a CRC (NUL-padded). Each new record goes into the slot that
  does not hold the current one (pwrite, fdatasync), so a crash leaves the old
  record or the new one, never only a torn one; reading takes the highest valid
  slot. The file is made (or rewritten from the one-line format of earlier
  versions) when it is opened, through a temporary file renamed over it, and its
  descriptor is kept: a promise made while a node departs writes to that
  descriptor and opens no file (clusterfs.failover; docs/recovery.md). The
  writes run in a worker thread (an fsync may take long on a loaded disk); they
  are serialized, and the file never goes back.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Protocol

import trio

from clusterfs import workers
from clusterfs.errors import StateError

FORMAT = 1
SLOT = 512          # bytes per record slot (a sector; a torn one fails its CRC, the other stands)
SLOTS = 2


class GenerationRecord(Protocol):
    @property
    def durable(self) -> int:
        """The highest generation recorded (0 if none)."""

    async def raise_to(self, generation: int) -> None:
        """Return once `generation` (if higher) is recorded; StateError if it cannot be."""


class MemoryGenerationRecord:
    def __init__(self, generation: int = 0) -> None:
        self._generation = generation

    @property
    def durable(self) -> int:
        return self._generation

    async def raise_to(self, generation: int) -> None:
        # no checkpoint: the in-memory tests' schedules stay what they were
        self._generation = max(self._generation, generation)


def generation_file_path(state_dir: str | os.PathLike[str], node_id: int) -> Path:
    return Path(state_dir) / f"node{node_id}.generation"


class GenerationFile:
    """The record in `state_dir` for node_id. Opening it reads the record (or
    creates one at 0, which proves the directory writable) and keeps the file
    open: StateError if the directory is missing or unwritable or the record is
    corrupt."""

    def __init__(self, state_dir: str | os.PathLike[str], node_id: int) -> None:
        self.dir = Path(state_dir)
        self.node_id = node_id
        self.path = generation_file_path(state_dir, node_id)
        if not self.dir.is_dir():
            raise StateError(f"state dir {self.dir} does not exist or is not a directory")
        found = self._read()
        self._generation, self._slot = found if found is not None else (0, 0)
        if found is None or self.path.stat().st_size != SLOT * SLOTS:
            self._replace(self._generation)        # new, or the one-line format
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise StateError(f"cannot open {self.path}: {_reason(exc)}") from exc
        self._lock = trio.Lock()

    @property
    def durable(self) -> int:
        return self._generation

    async def raise_to(self, generation: int) -> None:
        async with self._lock:          # one write at a time: the file never goes back
            if generation <= self._generation:
                return
            await workers.run(self._write, generation)
            self._generation = generation

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self) -> tuple[int, int] | None:
        """(generation, slot) of the highest valid record; None if there is no file."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {_reason(exc)}") from exc
        try:
            return decode_slots(data, self.node_id)
        except ValueError as exc:
            raise StateError(f"corrupt state file {self.path}: {exc}") from exc

    def _write(self, generation: int) -> None:
        """Into the other slot, in place: the current record stays whole until the
        new one is durable."""
        slot = 1 - self._slot
        try:
            os.pwrite(self._fd, _slot_bytes(generation, self.node_id), slot * SLOT)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {_reason(exc)}") from exc
        self._slot = slot

    def _replace(self, generation: int) -> None:
        """A whole new file holding `generation` in slot 0 (at open only)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, _slot_bytes(generation, self.node_id) + bytes(SLOT))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)       # the rename itself must survive a crash
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {_reason(exc)}") from exc
        self._slot = 0


def _slot_bytes(generation: int, node_id: int) -> bytes:
    return encode_record(generation, node_id).encode().ljust(SLOT, b"\0")


def decode_slots(data: bytes, node_id: int) -> tuple[int, int]:
    """(generation, slot) of the highest valid record in a file's bytes (a file of
    the one-line format is slot 0); ValueError, saying what is wrong with the first
    slot, if none is valid (a torn write spoils one slot at most)."""
    slots = [data[i:i + SLOT] for i in range(0, max(len(data), 1), SLOT)][:SLOTS]
    found: list[tuple[int, int]] = []
    errors: list[str] = []
    for i, raw in enumerate(slots):
        try:
            found.append((decode_record(raw.rstrip(b"\0").decode(), node_id), i))
        except (ValueError, UnicodeDecodeError) as exc:
            errors.append("not text" if isinstance(exc, UnicodeDecodeError) else str(exc))
    if not found:
        raise ValueError(errors[0])
    return max(found)


def encode_record(generation: int, node_id: int) -> str:
    body = {"format": FORMAT, "node": node_id, "generation": generation}
    return json.dumps(dict(body, crc32=_crc(body))) + "\n"


def decode_record(text: str, node_id: int) -> int:
    """The generation in a record; ValueError saying what is wrong with it."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a generation record ({exc.msg})") from None
    if not isinstance(d, dict) or set(d) != {"format", "node", "generation", "crc32"}:
        raise ValueError("not a generation record (wrong fields)")
    if d["format"] != FORMAT:
        raise ValueError(f"unknown format {d['format']!r}")
    body = {k: d[k] for k in ("format", "node", "generation")}
    if d["crc32"] != _crc(body):
        raise ValueError("checksum mismatch")
    if d["node"] != node_id:
        raise ValueError(f"it is node {d['node']}'s record, not node {node_id}'s")
    gen = d["generation"]
    if not isinstance(gen, int) or gen < 0:
        raise ValueError(f"bad generation {gen!r}")
    return gen


def _crc(body: dict[str, object]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True).encode())


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not text"
    return exc.strerror or str(exc)
