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
- `GenerationFile`: `DIR/node<ID>.generation`, one line of JSON with a CRC,
  replaced atomically (write a temporary file, fsync, rename over, fsync the
  directory), so a crash leaves the old record or the new one, never a torn one.
  The writes run in a worker thread (an fsync may take long on a loaded disk);
  they are serialized, and the file never goes back.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Protocol

import trio

from clusterfs.errors import StateError

FORMAT = 1


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
    creates one at 0, which proves the directory writable): StateError if the
    directory is missing or unwritable or the record is corrupt."""

    def __init__(self, state_dir: str | os.PathLike[str], node_id: int) -> None:
        self.dir = Path(state_dir)
        self.node_id = node_id
        self.path = generation_file_path(state_dir, node_id)
        if not self.dir.is_dir():
            raise StateError(f"state dir {self.dir} does not exist or is not a directory")
        self._generation = self._read()
        if self._generation is None:
            self._generation = 0
            self._write(0)
        self._lock = trio.Lock()

    @property
    def durable(self) -> int:
        return self._generation

    async def raise_to(self, generation: int) -> None:
        async with self._lock:          # one write at a time: the file never goes back
            if generation <= self._generation:
                return
            await trio.to_thread.run_sync(self._write, generation)
            self._generation = generation

    def _read(self) -> int | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read {self.path}: {_reason(exc)}") from exc
        try:
            return decode_record(text, self.node_id)
        except ValueError as exc:
            raise StateError(f"corrupt state file {self.path}: {exc}") from exc

    def _write(self, generation: int) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, encode_record(generation, self.node_id).encode())
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
