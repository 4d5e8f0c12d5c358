"""IscsiDevice: a LUN on an iSCSI target, reached from this process through libiscsi.

No kernel initiator, no /dev/sdX: the device is named by a URL,

    iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN

and every read, write and flush is one synchronous SCSI command (READ 16, WRITE 16,
SYNCHRONIZE CACHE 16) on our own session, made through the cffi module
clusterfs._iscsi (native/iscsi_build.py). The interface is BlockDevice's, so the
layers above cannot tell the two apart; what BlockDevice does in the background
(write-behind, read-ahead) is done here in line or not at all.

Failures are bounded: every command has a timeout (libiscsi's, checked by its own
event loop at least once a second), and libiscsi's automatic reconnect is off, so a
target that dies or stops answering turns into a StorageError within about
COMMAND_TIMEOUT seconds instead of a hang. After such a failure the session is out
of step with the target and the device refuses all further I/O (a device that
finds another path to the LUN, and re-targets, is later work: ../ARCHITECTURE).

A libiscsi context is not thread-safe: one lock serialises every call on it. cffi
releases the GIL for the duration of each call, so other threads run meanwhile.

A command answered with CHECK CONDITION / UNIT ATTENTION (the target tells us that
something changed: a reset, a reservation preempted or released) was not executed,
and is sent again, at most UA_RETRIES times. A command answered with RESERVATION
CONFLICT raises ReservationConflict (a StorageError): on a read or write that means
another node preempted our persistent-reservation key, i.e. this node was fenced
(clusterfs.fence.scsi_pr). The session itself stays usable (reads may still be
allowed), so such a device is not marked failed.

Persistent reservations (SPC-3, PERSISTENT RESERVE IN/OUT), for the fencing agent:
pr_read_keys, pr_read_reservation, pr_register, pr_reserve, pr_preempt. Keys are
registered per I_T nexus, i.e. per session: the session that writes must register
its own key (clusterfs.fence.scsi_pr.register).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable

from clusterfs.errors import ReservationConflict, StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage.device import BlockAddressed, WritesAtOnce

SCHEME = "iscsi://"
COMMAND_TIMEOUT = 30          # seconds for a login or one SCSI command
MAX_TRANSFER = 1 << 20        # bytes per READ/WRITE command
INITIATOR = f"iqn.2025-01.io.clusterfs:{socket.gethostname() or 'host'}"
URL_FORM = "iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN"
UA_RETRIES = 5                # UNIT ATTENTION answers retried per command
PR_IN_LENGTH = 8 + 8 * 256    # PERSISTENT RESERVE IN allocation: 256 keys
ASCQ_INVALID_FIELD_IN_CDB = 0x2400
FENCED = "reservation conflict: this node was fenced"


class ScsiCheckCondition(StorageError):
    """A command answered with CHECK CONDITION (sense key and ASC/ASCQ attached)."""

    def __init__(self, message: str, key: int, ascq: int) -> None:
        super().__init__(message)
        self.key = key
        self.ascq = ascq


def node_initiator(node_id: int, role: str = "") -> str:
    """The initiator name a cluster node logs in under: this host's, with the node id
    (and a role: "fence" for its agent's sessions), so that several nodes on one host
    are several I_T nexuses with registrations of their own."""
    return f"{INITIATOR}-node{node_id}" + (f"-{role}" if role else "")


def is_iscsi_url(path: str) -> bool:
    return path.startswith(SCHEME)


def redact(url: str) -> str:
    """The URL without its CHAP password (iscsi://USER%PASSWORD@...), for messages."""
    return re.sub(r"^(iscsi://[^/@%]*)%[^/@]*@", r"\1%***@", url)


def _unreachable(portal: str, timeout: float) -> str | None:
    """Why a TCP connection to `portal` fails, or None if it does not (libiscsi's own
    text for a refused connection names its reconnect logic, not the refusal)."""
    host, _, port = portal.rpartition(":")
    if not host or "]" in port:                  # no port given: iSCSI's default
        host, port = portal, "3260"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or exc
        return f"cannot connect to {host}:{port}: {why}"


def _binding():
    try:
        from clusterfs._iscsi import ffi, lib  # noqa: PLC0415 - only iSCSI users need it
    except ImportError:
        return None
    return ffi, lib


class IscsiDevice(WritesAtOnce, BlockAddressed):
    """One iSCSI LUN, logged in to at construction (StorageError with the reason if not).

    `fd` is None: there is no local descriptor (node/mount_cmd.py's flock skips it).
    `path` is the URL as given but for a CHAP password, which it shows as ***.
    """

    def __init__(self, url: str, writable: bool = True,
                 timeout: int = COMMAND_TIMEOUT, initiator: str | None = None) -> None:
        self.path = redact(url)
        self.initiator = initiator or INITIATOR
        self._url = url
        self.fd = None
        self.writable = writable
        self.timeout = timeout
        self.reads = 0
        self.writes = 0
        self.unit_attentions = 0
        self.conflicts = 0
        self.lun = 0
        self.sector = 0                     # the LUN's logical block size in bytes
        self._lock = threading.Lock()
        self._failed: str | None = None     # set once the session is no longer usable
        self._refused: str | None = None    # set by refuse_writes(): why writes stop
        # called (under the session lock) with the message when a read or write meets
        # RESERVATION CONFLICT, i.e. this node was fenced: the mount withdraws there
        self.on_fenced: Callable[[str], None] | None = None
        binding = _binding()
        if binding is None:
            raise StorageError(f"{self.path}: iSCSI support is not built (libiscsi-dev was "
                               "missing at install; install it and run tools/install.sh)")
        self._ffi, self._lib = binding
        self._ctx = self._lib.iscsi_create_context(self.initiator.encode())
        if self._ctx == self._ffi.NULL:
            raise StorageError(f"{self.path}: cannot create an iSCSI context")
        try:
            self._login()
            self._read_capacity()
        except BaseException:
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None
            raise
        self.blocks = self.size // BLOCK_SIZE

    # -- session --------------------------------------------------------------------
    def _login(self) -> None:
        ffi, lib, ctx = self._ffi, self._lib, self._ctx
        # parsing with the context also sets the target name (and CHAP, if given)
        url = lib.iscsi_parse_full_url(ctx, self._url.encode())
        if url == ffi.NULL:
            raise StorageError(f"{self.path}: not an iSCSI URL ({self._url_error()}); "
                               f"expected {URL_FORM}")
        try:
            self.lun = url.lun
            portal = ffi.string(url.portal)
        finally:
            lib.iscsi_destroy_url(url)
        lib.iscsi_set_session_type(ctx, lib.ISCSI_SESSION_NORMAL)
        lib.iscsi_set_header_digest(ctx, lib.ISCSI_HEADER_DIGEST_NONE_CRC32C)
        lib.iscsi_set_timeout(ctx, self.timeout)
        lib.iscsi_set_noautoreconnect(ctx, 1)   # a lost session fails the command
        if lib.iscsi_full_connect_sync(ctx, portal, self.lun) != 0:
            why = _unreachable(portal.decode(errors="replace"), self.timeout) or self._error()
            raise StorageError(f"{self.path}: cannot log in: {why}")

    def _read_capacity(self) -> None:
        task = self._command("read capacity", self._lib.iscsi_readcapacity16_sync)
        try:
            rc16 = self._ffi.cast("struct scsi_readcapacity16 *",
                                  self._lib.scsi_datain_unmarshall(task))
            if rc16 == self._ffi.NULL:
                raise StorageError(f"{self.path}: read capacity: reply not understood")
            self.sector = rc16.block_length
            self.size = (rc16.returned_lba + 1) * rc16.block_length
        finally:
            self._lib.scsi_free_scsi_task(task)
        if self.sector <= 0 or MAX_TRANSFER % self.sector:
            raise StorageError(f"{self.path}: unsupported logical block size {self.sector}")

    def _error(self) -> str:
        text = self._ffi.string(self._lib.iscsi_get_error(self._ctx)).decode(errors="replace")
        return " ".join(text.split()) or "unknown error"

    def _url_error(self) -> str:
        # libiscsi says "Invalid URL <url>\n<what>\n<the form>": keep <what> (not the URL,
        # which may hold a password)
        lines = self._ffi.string(self._lib.iscsi_get_error(self._ctx)).decode(
            errors="replace").splitlines()
        return lines[1].strip() if len(lines) > 1 else "unparsable"

    def _command(self, what: str, call, *args, fenced: bool = False):
        """Run one synchronous SCSI command under the lock; its task (to be freed by
        the caller) or StorageError. UNIT ATTENTION answers are retried (bounded);
        RESERVATION CONFLICT raises ReservationConflict (`fenced`: say that it means
        this node was fenced, as for reads and writes). A command the session could
        not complete (connection lost, timed out, cancelled) leaves the device failed."""
        lib, ffi = self._lib, self._ffi
        with self._lock:
            for attempt in range(UA_RETRIES + 1):
                if self._failed is not None:
                    raise StorageError(f"{self.path}: {what}: {self._failed}")
                if self._ctx is None:
                    raise StorageError(f"{self.path}: {what}: device is closed")
                task = call(self._ctx, self.lun, *args)
                if task != ffi.NULL and task.status == lib.SCSI_STATUS_GOOD:
                    return task
                status = None if task == ffi.NULL else task.status
                key = ascq = 0
                if status == lib.SCSI_STATUS_CHECK_CONDITION:
                    key, ascq = task.sense.key, task.sense.ascq
                if task != ffi.NULL:
                    lib.scsi_free_scsi_task(task)
                if key == lib.SCSI_SENSE_UNIT_ATTENTION and attempt < UA_RETRIES:
                    self.unit_attentions += 1      # not executed: send it again
                    continue
                break
            if status == lib.SCSI_STATUS_RESERVATION_CONFLICT:
                self.conflicts += 1
                message = f"{self.path}: {what}: {FENCED if fenced else 'reservation conflict'}"
                if fenced and self.on_fenced is not None:
                    self.on_fenced(message)         # the mount stops writing at once
                raise ReservationConflict(message)
            # libiscsi's error text is fresh for a failed call and for sense data; a
            # cancelled or timed-out task may leave an older one there
            if status == lib.SCSI_STATUS_CANCELLED:
                reason = "connection to the target lost"
            elif status == lib.SCSI_STATUS_TIMEOUT:
                reason = f"no answer from the target within {self.timeout} s"
            else:
                reason = self._error()
            if status == lib.SCSI_STATUS_CHECK_CONDITION:
                raise ScsiCheckCondition(f"{self.path}: {what}: {reason}", key, ascq)
            self._failed = f"iSCSI session lost earlier ({reason})"
        raise StorageError(f"{self.path}: {what}: {reason}")

    # -- whole logical blocks ---------------------------------------------------------
    def _read_lbas(self, lba: int, count: int) -> bytes:
        ffi, lib = self._ffi, self._lib
        out = []
        per = MAX_TRANSFER // self.sector
        while count:
            n = min(count, per)
            task = self._command(f"read at {lba * self.sector}", lib.iscsi_read16_sync,
                                 lba, n * self.sector, self.sector, 0, 0, 0, 0, 0,
                                 fenced=True)
            try:
                got = task.datain.size
                if got != n * self.sector:
                    raise StorageError(f"{self.path}: short read at {lba * self.sector}")
                out.append(ffi.buffer(task.datain.data, got)[:])
            finally:
                lib.scsi_free_scsi_task(task)
            lba += n
            count -= n
        return out[0] if len(out) == 1 else b"".join(out)

    def _write_lbas(self, lba: int, buf, length: int) -> None:
        """Write `length` bytes (whole logical blocks) of the cffi buffer `buf`."""
        lib = self._lib
        for start in range(0, length, MAX_TRANSFER):
            n = min(MAX_TRANSFER, length - start)
            at = lba + start // self.sector
            task = self._command(f"write at {at * self.sector}", lib.iscsi_write16_sync,
                                 at, buf + start, n, self.sector, 0, 0, 0, 0, 0,
                                 fenced=True)
            lib.scsi_free_scsi_task(task)

    # -- BlockDevice's interface --------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the LUN, as a file)."""
        end = min(offset + length, self.size)
        if offset < 0:
            raise StorageError(f"{self.path}: read at {offset}: negative offset")
        if offset >= end:
            return b""
        s = self.sector
        first, last = offset // s, -(-end // s)
        self.reads += 1
        data = self._read_lbas(first, last - first)
        skip = offset - first * s
        if skip == 0 and len(data) == end - offset:
            return data
        return data[skip : skip + end - offset]

    def read_data(self, offset: int, length: int) -> bytes:
        return self.pread(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise StorageError(f"{self.path}: write at {offset}: opened read-only")
        if self._refused is not None:
            raise StorageError(f"{self.path}: write at {offset}: {self._refused}")
        self._guard()
        # The caller's bytes are passed to libiscsi in place, and the buffer is released
        # on the way out whatever happens: a buffer export left to the garbage collector
        # (an exception's traceback keeps this frame) made CPython 3.11 segfault in its
        # garbage collector in our tests.
        with self._ffi.from_buffer("unsigned char[]", data) as buf:
            self._pwrite(offset, buf, len(buf))

    def _pwrite(self, offset: int, buf, length: int) -> None:
        end = offset + length
        if offset < 0 or end > self.size:
            raise StorageError(f"{self.path}: write at {offset}: beyond the end of the "
                               f"device ({self.size} bytes)")
        if not length:
            return
        s = self.sector
        self.writes += 1
        if offset % s == 0 and end % s == 0:
            self._write_lbas(offset // s, buf, length)
            return
        # a partial logical block: read the blocks at either edge, merge, write back
        first, last = offset // s, -(-end // s)
        merged = bytearray(self._read_lbas(first, 1))
        merged += bytes((last - first - 1) * s)
        if last - 1 > first and end % s:
            merged[-s:] = self._read_lbas(last - 1, 1)
        merged[offset - first * s : end - first * s] = self._ffi.buffer(buf, length)
        with self._ffi.from_buffer("unsigned char[]", merged) as whole:
            self._write_lbas(first, whole, len(merged))


    def bypass_page_cache(self) -> bool:
        """Always true here: every command goes to the target, no host cache between."""
        return True

    def flush(self) -> None:
        """SYNCHRONIZE CACHE 16 over the whole LUN: what was written is on stable storage."""
        if not self.writable:
            return
        if self._refused is not None:
            raise StorageError(f"{self.path}: flush: {self._refused}")
        self._guard()
        task = self._command("flush", self._lib.iscsi_synchronizecache16_sync, 0, 0, 0, 0,
                             fenced=True)
        self._lib.scsi_free_scsi_task(task)

    def refuse_writes(self, reason: str) -> None:
        """From now on every write and flush fails at once with `reason` (a node told
        to stop writing: a poison pill, a withdraw). Reads still work."""
        self._refused = reason

    # -- persistent reservations (SPC-3), for clusterfs.fence.scsi_pr -----------------
    def _pr_in(self, what: str, action: int) -> bytes:
        lib = self._lib
        task = self._command(what, lib.iscsi_persistent_reserve_in_sync, action,
                             PR_IN_LENGTH)
        try:
            return self._ffi.buffer(task.datain.data, task.datain.size)[:]
        finally:
            lib.scsi_free_scsi_task(task)

    def _pr_out(self, what: str, action: int, key: int, sa_key: int, pr_type: int) -> None:
        lib = self._lib
        params = self._ffi.new("struct scsi_persistent_reserve_out_basic *")
        params.reservation_key = key
        params.service_action_reservation_key = sa_key
        task = self._command(what, lib.iscsi_persistent_reserve_out_sync, action,
                             lib.SCSI_PERSISTENT_RESERVE_SCOPE_LU, pr_type, params)
        lib.scsi_free_scsi_task(task)

    def pr_read_keys(self) -> list[int]:
        """The reservation keys registered on the LUN (one per registered I_T nexus)."""
        data = self._pr_in("read keys", self._lib.SCSI_PERSISTENT_RESERVE_READ_KEYS)
        if len(data) < 8:
            raise StorageError(f"{self.path}: read keys: short answer ({len(data)} bytes)")
        length = min(int.from_bytes(data[4:8], "big"), len(data) - 8)
        return [int.from_bytes(data[i : i + 8], "big") for i in range(8, 8 + length - 7, 8)]

    def pr_read_reservation(self) -> tuple[int, int] | None:
        """(holder's key, type) of the LUN's persistent reservation, or None."""
        data = self._pr_in("read reservation",
                           self._lib.SCSI_PERSISTENT_RESERVE_READ_RESERVATION)
        if len(data) < 8:
            raise StorageError(f"{self.path}: read reservation: short answer")
        if int.from_bytes(data[4:8], "big") < 16 or len(data) < 24:
            return None
        return int.from_bytes(data[8:16], "big"), data[21] & 0x0F

    def pr_register(self, key: int) -> None:
        """REGISTER AND IGNORE EXISTING KEY: this session's key becomes `key` (0:
        unregister), whatever it was."""
        self._pr_out("register", self._lib.SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
                     0, key, 0)

    def pr_reserve(self, key: int, pr_type: int) -> None:
        """RESERVE (scope LU) of type `pr_type` through our registration `key`."""
        self._pr_out("reserve", self._lib.SCSI_PERSISTENT_RESERVE_RESERVE, key, 0, pr_type)

    def pr_preempt(self, key: int, victim: int, pr_type: int, abort: bool = True) -> bool:
        """PREEMPT AND ABORT (or PREEMPT) the registrations of key `victim` through ours
        (`key`); a reservation `victim` held passes to us with type `pr_type`. A target
        that does not implement PREEMPT AND ABORT (ILLEGAL REQUEST, INVALID FIELD IN CDB:
        tgtd, for one) gets a PREEMPT. True if the abort was done."""
        lib = self._lib
        if abort:
            try:
                self._pr_out("preempt and abort", lib.SCSI_PERSISTENT_RESERVE_PREEMPT_AND_ABORT,
                             key, victim, pr_type)
                return True
            except ScsiCheckCondition as exc:
                if (exc.key != lib.SCSI_SENSE_ILLEGAL_REQUEST
                        or exc.ascq != ASCQ_INVALID_FIELD_IN_CDB):
                    raise
        self._pr_out("preempt", lib.SCSI_PERSISTENT_RESERVE_PREEMPT, key, victim, pr_type)
        return False

    def close(self) -> None:
        with self._lock:
            if self._ctx is None:
                return
            if self._failed is None:
                self._lib.iscsi_logout_sync(self._ctx)     # best effort, bounded by timeout
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None

    def statistics(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "blocks": self.blocks,
                "unit_attentions": self.unit_attentions, "conflicts": self.conflicts}
