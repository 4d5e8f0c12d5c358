"""IscsiDevice: a LUN on an iSCSI target, reached from this process through libiscsi.

No kernel initiator, no /dev/sdX: the device is named by a URL,

    iscsi://[USER[%PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]/TARGET-IQN/LUN[?timeout=S]

(several portals of one target, comma-separated: the paths to the LUN; `timeout`:
seconds a login or a command may take on one path), and every read, write and
flush is one synchronous SCSI command (READ 16, WRITE 16, SYNCHRONIZE CACHE 16) on
our own session, made through the cffi module clusterfs._iscsi
(native/iscsi_build.py). The interface is BlockDevice's, so the layers above cannot
tell the two apart; what BlockDevice does in the background (write-behind,
read-ahead) is done here in line or not at all.

Failures are bounded: every command has a timeout (libiscsi's, checked by its own
event loop once a second against a clock of whole seconds), and libiscsi's
automatic reconnect is off, so a path that dies or stops answering turns into a
failed command within about `timeout` (+1) seconds instead of a hang.

Re-targeting: a command the session could not complete (connection lost, timed out)
is sent again on a new session, through the next portal of the URL (the same one
again last; for a one-portal URL, only that one): log in, cut the old session off,
send the command again. Each portal is tried once per failed command; only when
none takes it does the command fail with StorageError, and the device then refuses
all further I/O (its session is out of step with the target). The cut-off, before
anything is sent on the new session, is what keeps a write still held on the old
path (a stuck portal, a gateway that resumes) from landing later over a newer copy:

- with persistent reservations in use (this session registered a key: fencing by
  scsi-pr), every session has a key of its own (clusterfs.fence.scsi_pr: the node's
  key with a session tag). The new session registers a new tag, checks that the old
  session's key is still registered (else this node was fenced meanwhile and must
  not write: it unregisters again and raises ReservationConflict), then PREEMPT AND
  ABORT of the old key: the target aborts the old nexus's tasks (tgtd only PREEMPTs)
  and answers its every later command with RESERVATION CONFLICT;
- without a reservation nothing in SCSI cuts one nexus off from another's session
  (task management reaches only tasks the target already has), so: the new session
  logs in with the old one's ISID (iSCSI session reinstatement, RFC 7143 6.3.5: a
  conforming target then closes the old session and ends its tasks; only for
  portals of one portal group, and tgtd only after a CHAP stage), and the write
  that failed is *maybe in flight* on the old path until that path's connection is
  closed from the far end: we half-close our end and watch it. A later write over
  any of its bytes, and any flush (after which another node may write them), waits
  for that close, at most `settle` seconds (URL ?settle=S, default SETTLE_TIMEOUT);
  then it fails (StorageError, the device failed) rather than go out where the old
  copy could still land over it. docs/storage.md has the bounds and the limits.

A libiscsi context is not thread-safe: one lock serialises every call on it. cffi
releases the GIL for the duration of each call, so other threads run meanwhile.

A command answered with CHECK CONDITION / UNIT ATTENTION (the target tells us that
something changed: a reset, a reservation preempted or released) was not executed,
and is sent again, at most UA_RETRIES times. A command answered with RESERVATION
CONFLICT raises ReservationConflict (a StorageError): on a read or write that means
another node preempted our persistent-reservation key, i.e. this node was fenced
(clusterfs.fence.scsi_pr). The session itself stays usable (reads may still be
allowed), so such a device is not marked failed, and that is no reason to re-target.

Persistent reservations (SPC-3, PERSISTENT RESERVE IN/OUT), for the fencing agent:
pr_read_keys, pr_read_reservation, pr_register, pr_reserve, pr_preempt. Keys are
registered per I_T nexus, i.e. per session: the session that writes must register
its own key (clusterfs.fence.scsi_pr.register); `pr_key` is the one it registered.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from clusterfs.errors import ReservationConflict, StorageError
from clusterfs.fence import scsi_pr
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage.device import BlockAddressed, WritesAtOnce

log = logging.getLogger(__name__)

SCHEME = "iscsi://"
COMMAND_TIMEOUT = 30          # seconds for a login or one SCSI command, one portal
PATH_TIMEOUT = 1              # the same with several portals: soon on to the next
SETTLE_TIMEOUT = 6            # seconds a write maybe in flight on a left path may hold
                              # newer writes over its bytes and flushes (no reservation)
MAX_TIMEOUT = 3600
MAX_TRANSFER = 1 << 20        # bytes per READ/WRITE command
INITIATOR = f"iqn.2025-01.io.clusterfs:{socket.gethostname() or 'host'}"
URL_FORM = "iscsi://[USER[%PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]/TARGET-IQN/LUN"
UA_RETRIES = 5                # UNIT ATTENTION answers retried per command
PR_IN_LENGTH = 8 + 8 * 256    # PERSISTENT RESERVE IN allocation: 256 keys
ASCQ_INVALID_FIELD_IN_CDB = 0x2400
FENCED = "reservation conflict: this node was fenced"
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")


class ScsiCheckCondition(StorageError):
    """A command answered with CHECK CONDITION (sense key and ASC/ASCQ attached)."""

    def __init__(self, message: str, key: int, ascq: int) -> None:
        super().__init__(message)
        self.key = key
        self.ascq = ascq


class _PathLost(Exception):
    """The current session could not complete a command or a login (internal: the
    device re-targets, or fails with StorageError once every portal was tried)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


@dataclass(frozen=True)
class IscsiUrl:
    """An iscsi:// URL cut into what re-targeting needs: one libiscsi URL per portal."""

    credentials: str              # "USER[%PASSWORD]@", or ""
    portals: tuple[str, ...]      # "HOST[:PORT]" each, in the order given
    rest: str                     # "/TARGET-IQN/LUN", and any query libiscsi takes
    timeout: int | None           # ?timeout=SECONDS, if given
    settle: int | None = None     # ?settle=SECONDS, if given

    def for_portal(self, i: int) -> str:
        return f"{SCHEME}{self.credentials}{self.portals[i]}{self.rest}"


def parse_url(url: str) -> IscsiUrl:
    """Split `url` into its portals. StorageError (the reason, without the URL) for a
    malformed portal list or timeout; the rest is left to libiscsi's parser, which
    alone judges a one-portal URL, as before there were several."""
    if not is_iscsi_url(url):
        raise StorageError(f"does not start with {SCHEME}")
    authority, slash, rest = url[len(SCHEME):].partition("/")
    credentials, at, hosts = authority.rpartition("@")
    portals = tuple(hosts.split(","))
    if len(portals) > 1:
        for p in portals:
            _check_portal(p)
        twice = sorted({p for p in portals if portals.count(p) > 1})
        if twice:
            raise StorageError(f"portal {twice[0]} listed twice")
    rest, options = _take_options(slash + rest)
    return IscsiUrl(credentials + at, portals, rest, options.get("timeout"),
                    options.get("settle"))


def _check_portal(portal: str) -> None:
    """StorageError unless `portal` is HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    if not portal:
        raise StorageError("empty portal in the portal list")
    host, port = portal, None
    if portal.startswith("["):
        host, bracket, after = portal.partition("]")
        host += bracket
        if after:
            if not after.startswith(":"):
                raise StorageError(f"bad portal {portal!r}")
            port = after[1:]
        ok = _IPV6.fullmatch(host) is not None
    else:
        if ":" in portal:
            host, port = portal.split(":", 1)
        ok = _HOST.fullmatch(host) is not None
    if not ok:
        raise StorageError(f"bad host in portal {portal!r}")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise StorageError(f"bad port in portal {portal!r}")


def _take_options(rest: str) -> tuple[str, dict[str, int]]:
    """`rest` without our query arguments (timeout=S, settle=S), and their values;
    the others are libiscsi's."""
    path, q, query = rest.partition("?")
    if not q:
        return rest, {}
    kept, options = [], {}
    for arg in query.split("&"):
        name, _, value = arg.partition("=")
        if name not in ("timeout", "settle"):
            kept.append(arg)
            continue
        if not value.isdigit() or not 0 < int(value) <= MAX_TIMEOUT:
            raise StorageError(f"{name}={value}: want whole seconds, 1 to {MAX_TIMEOUT}")
        options[name] = int(value)
    return path + ("?" + "&".join(kept) if kept else ""), options


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


@dataclass
class _MaybeInFlight:
    """A write a session we left may still run at the target (no reservation cut
    that session off): its bytes, and our end of that session's connection, which
    we half-closed and watch. Settled once the far end closes it."""

    start: int                    # byte range [start, end) of the write
    end: int
    conn: socket.socket
    portal: str
    since: float                  # time.monotonic() when we left that session

    def overlaps(self, span: tuple[int, int] | None) -> bool:
        """Does a write over `span` (None: a flush) have to wait for this one?"""
        return span is None or (span[0] < self.end and self.start < span[1])

    def settled(self, wait: float = 0.0) -> bool:
        """Whether the far end closed the connection (waiting up to `wait` s). What
        comes before the close (a late reply, an R2T) is read and dropped."""
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self.conn], [], [], left)
                if not ready:
                    return False
                if not self.conn.recv(1 << 16, socket.MSG_DONTWAIT):
                    return True
            except BlockingIOError:
                continue                    # another thread read it first
            except (OSError, ValueError):
                return True                 # reset, or closed by whoever saw it settle


def _random_isid() -> int:
    """24 random bits for an ISID of the "random" format (RFC 7143, 10.12.5): the
    initiator port of one session; the same ISID again reinstates that session."""
    return int.from_bytes(os.urandom(3), "big")


class IscsiDevice(WritesAtOnce, BlockAddressed):
    """One iSCSI LUN, logged in to at construction through the first portal that
    answers (StorageError with the reasons if none does).

    `fd` is None: there is no local descriptor (node/mount_cmd.py's flock skips it).
    `path` is the URL as given but for a CHAP password, which it shows as ***.
    `timeout`: seconds a login or a command may take on one path (default: the
    URL's ?timeout=, else COMMAND_TIMEOUT for one portal, PATH_TIMEOUT for several).
    """

    def __init__(self, url: str, writable: bool = True,
                 timeout: int | None = None, initiator: str | None = None) -> None:
        self.path = redact(url)
        self.initiator = initiator or INITIATOR
        self.fd = None
        self.writable = writable
        self.reads = 0
        self.writes = 0
        self.unit_attentions = 0
        self.conflicts = 0
        self.retargets = 0
        self.lun = 0
        self.sector = 0                     # the LUN's logical block size in bytes
        self.size = 0
        self.pr_key: int | None = None      # the key this session registered, if any
        self._lock = threading.Lock()
        self._failed: str | None = None     # set once the session is no longer usable
        self._refused: str | None = None    # set by refuse_writes(): why writes stop
        # called (under the session lock) with the message when a read or write meets
        # RESERVATION CONFLICT, i.e. this node was fenced: the mount withdraws there
        self.on_fenced: Callable[[str], None] | None = None
        self._ctx = None
        self._portal = 0                    # index of the current session's portal
        self._isid = _random_isid()
        self._in_flight: list[_MaybeInFlight] = []   # writes left on a path (no PR)
        binding = _binding()
        if binding is None:
            raise StorageError(f"{self.path}: iSCSI support is not built (libiscsi-dev was "
                               "missing at install; install it and run tools/install.sh)")
        self._ffi, self._lib = binding
        try:
            self._url = parse_url(url)
        except StorageError as exc:
            raise StorageError(f"{self.path}: not an iSCSI URL ({exc}); expected "
                               f"{URL_FORM}") from None
        self.portals = list(self._url.portals)
        self.timeout = timeout or self._url.timeout or (
            COMMAND_TIMEOUT if len(self.portals) == 1 else PATH_TIMEOUT)
        self.settle_timeout = self._url.settle or SETTLE_TIMEOUT
        self.settle_waits = 0
        self._check_urls()
        self._first_login()
        self.blocks = self.size // BLOCK_SIZE

    # -- sessions -----------------------------------------------------------------------
    def _check_urls(self) -> None:
        """Every portal's URL through libiscsi's parser before any login, so that a
        malformed URL is refused before anything reaches a target."""
        ffi, lib = self._ffi, self._lib
        ctx = lib.iscsi_create_context(self.initiator.encode())
        if ctx == ffi.NULL:
            raise StorageError(f"{self.path}: cannot create an iSCSI context")
        try:
            for i in range(len(self.portals)):
                url = lib.iscsi_parse_full_url(ctx, self._url.for_portal(i).encode())
                if url == ffi.NULL:
                    raise StorageError(f"{self.path}: not an iSCSI URL "
                                       f"({self._url_error(ctx)}); expected {URL_FORM}")
                self.lun = url.lun
                lib.iscsi_destroy_url(url)
        finally:
            lib.iscsi_destroy_context(ctx)

    def _first_login(self) -> None:
        """Log in through the first portal that takes us, and learn the LUN's size."""
        why = []
        for i in range(len(self.portals)):
            try:
                self._open_session(i, self._isid)
                self.sector, self.size = self._read_capacity()
                return
            except _PathLost as exc:
                why.append(exc.reason if len(self.portals) == 1
                           else f"{self.portals[i]}: {exc.reason}")
                self._drop_session()
            except BaseException:
                self._drop_session()
                raise
        raise StorageError(f"{self.path}: cannot log in: {'; '.join(why)}")

    def _open_session(self, portal: int, isid: int) -> None:
        """A new session through portal number `portal`, with ISID `isid`; it becomes
        the current one. _PathLost with the reason if the login fails."""
        ffi, lib = self._ffi, self._lib
        ctx = lib.iscsi_create_context(self.initiator.encode())
        if ctx == ffi.NULL:
            raise _PathLost("cannot create an iSCSI context")
        name = self.portals[portal]
        try:
            # parsing with the context also sets the target name (and CHAP, if given)
            url = lib.iscsi_parse_full_url(ctx, self._url.for_portal(portal).encode())
            if url == ffi.NULL:
                raise _PathLost(f"not an iSCSI URL ({self._url_error(ctx)})")
            try:
                address = ffi.string(url.portal)
            finally:
                lib.iscsi_destroy_url(url)
            lib.iscsi_set_isid_random(ctx, isid, 0)
            lib.iscsi_set_session_type(ctx, lib.ISCSI_SESSION_NORMAL)
            lib.iscsi_set_header_digest(ctx, lib.ISCSI_HEADER_DIGEST_NONE_CRC32C)
            lib.iscsi_set_timeout(ctx, self.timeout)
            lib.iscsi_set_noautoreconnect(ctx, 1)   # a lost session fails the command
            if lib.iscsi_full_connect_sync(ctx, address, self.lun) != 0:
                raise _PathLost(_unreachable(name, self.timeout) or self._error(ctx))
        except BaseException:
            lib.iscsi_destroy_context(ctx)
            raise
        self._ctx, self._portal, self._isid, self.pr_key = ctx, portal, isid, None

    def _drop_session(self) -> None:
        """Forget the current session without a logout (its path failed): closing our
        end of the connection is all that is left to do."""
        if self._ctx is not None:
            self._lib.iscsi_destroy_context(self._ctx)
            self._ctx = None

    def _leave_session(self) -> socket.socket | None:
        """Forget the current session, but keep our end of its connection open and
        half-closed (a FIN: the far end reads what we sent, then closes), so that its
        close can be seen: the session's commands can no longer run after it."""
        fd = self._lib.iscsi_get_fd(self._ctx) if self._ctx is not None else -1
        conn = None
        if fd >= 0:
            try:
                conn = socket.socket(fileno=os.dup(fd))
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                if conn is not None:
                    conn.close()
                conn = None                 # not connected any more: nothing to watch
        self._drop_session()
        return conn

    def _read_capacity(self) -> tuple[int, int]:
        """(logical block size, bytes) of the LUN, on the current session."""
        task = self._on_path("read capacity", self._lib.iscsi_readcapacity16_sync, ())
        try:
            rc16 = self._ffi.cast("struct scsi_readcapacity16 *",
                                  self._lib.scsi_datain_unmarshall(task))
            if rc16 == self._ffi.NULL:
                raise StorageError(f"{self.path}: read capacity: reply not understood")
            sector = rc16.block_length
            size = (rc16.returned_lba + 1) * rc16.block_length
        finally:
            self._lib.scsi_free_scsi_task(task)
        if sector <= 0 or MAX_TRANSFER % sector:
            raise StorageError(f"{self.path}: unsupported logical block size {sector}")
        return sector, size

    def _error(self, ctx=None) -> str:
        ctx = self._ctx if ctx is None else ctx
        text = self._ffi.string(self._lib.iscsi_get_error(ctx)).decode(errors="replace")
        return " ".join(text.split()) or "unknown error"

    def _url_error(self, ctx) -> str:
        # libiscsi says "Invalid URL <url>\n<what>\n<the form>": keep <what> (not the URL,
        # which may hold a password)
        lines = self._ffi.string(self._lib.iscsi_get_error(ctx)).decode(
            errors="replace").splitlines()
        return lines[1].strip() if len(lines) > 1 else "unparsable"

    # -- commands -------------------------------------------------------------------------
    def _command(self, what: str, call, *args, fenced: bool = False,
                 span: tuple[int, int] | None = None):
        """Run one synchronous SCSI command under the lock; its task (to be freed by
        the caller) or StorageError. UNIT ATTENTION answers are retried (bounded);
        RESERVATION CONFLICT raises ReservationConflict (`fenced`: say that it means
        this node was fenced, as for reads and writes). A command the session could
        not complete (connection lost, timed out) is sent again through another
        session (re-targeting, the module doc); if no portal takes it, the device is
        left failed. `span`: the bytes a write covers (it waits for an older write
        over them maybe still in flight on a path we left)."""
        with self._lock:
            if self._failed is not None:
                raise StorageError(f"{self.path}: {what}: {self._failed}")
            if self._ctx is None:
                raise StorageError(f"{self.path}: {what}: device is closed")
            try:
                return self._on_path(what, call, args, fenced)
            except _PathLost as lost:
                return self._retarget(what, call, args, fenced, lost.reason, span)

    def _settle(self, what: str, span: tuple[int, int] | None) -> None:
        """Before a write over `span` (None: a flush) goes out: wait until every write
        over those bytes maybe in flight on a path we left is settled (its connection
        closed from the far end), each at most settle_timeout after we left it. One
        that does not settle in time fails this call and the device: sending the
        newer copy could let the older land over it. The wait is outside the device
        lock: reads and other writes go on meanwhile."""
        with self._lock:
            waiting = [entry for entry in self._in_flight if entry.overlaps(span)]
        for entry in waiting:
            if not entry.settled():
                self.settle_waits += 1
                left = entry.since + self.settle_timeout - time.monotonic()
                if not entry.settled(max(0.0, left)):
                    with self._lock:
                        self._failed = (f"a write at {entry.start} left on portal "
                                        f"{entry.portal} may still land there: its "
                                        f"connection not closed within "
                                        f"{self.settle_timeout} s")
                    raise StorageError(f"{self.path}: {what}: {self._failed}")
            with self._lock:
                if entry in self._in_flight:
                    self._in_flight.remove(entry)
                    entry.conn.close()

    def _on_path(self, what: str, call, args: tuple, fenced: bool = False):
        """One command on the current session, UNIT ATTENTION retried: its task, or
        ReservationConflict / ScsiCheckCondition, or _PathLost when the session could
        not complete it (the caller holds the lock)."""
        lib, ffi = self._lib, self._ffi
        for attempt in range(UA_RETRIES + 1):
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
            self._conflict(what, fenced)
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
        raise _PathLost(reason)

    def _conflict(self, what: str, fenced: bool, why: str | None = None) -> None:
        """Raise ReservationConflict for `what` (telling the mount first if `fenced`)."""
        self.conflicts += 1
        message = f"{self.path}: {what}: {FENCED if fenced else 'reservation conflict'}"
        if why:
            message += f" ({why})"
        if fenced and self.on_fenced is not None:
            self.on_fenced(message)         # the mount stops writing at once
        raise ReservationConflict(message)

    # -- re-targeting -----------------------------------------------------------------------
    def _retarget_order(self, failed: int) -> list[int]:
        """The portals to try after portal `failed` gave up: the others in the URL's
        order from the next one round, then that one again."""
        n = len(self.portals)
        return [(failed + k) % n for k in range(1, n + 1)]

    def _retarget(self, what: str, call, args: tuple, fenced: bool, reason: str,
                  span: tuple[int, int] | None = None):
        """Send the command that failed with `reason` again through a new session
        (each portal once, the module doc); its task. StorageError, and the device
        failed, if no portal takes it. A write (`span`) left on a session no
        reservation cuts off is kept as maybe in flight (_settle)."""
        started = time.monotonic()
        failed_at, old_key, old_isid = self._portal, self.pr_key, self._isid
        if old_key is None and span is not None:
            conn = self._leave_session()
            if conn is not None:
                self._in_flight.append(_MaybeInFlight(span[0], span[1], conn,
                                                      self.portals[failed_at], started))
        self._drop_session()
        tried = []
        for i in self._retarget_order(failed_at):
            try:
                # reservations in use: a new I_T nexus, the old one is preempted;
                # without: the old ISID, so that the target reinstates (ends) the
                # old session at our login
                self._open_session(i, old_isid if old_key is None else _random_isid())
                self._check_same_lun()
                self._cut_off(old_key, what, fenced)
                task = self._on_path(what, call, args, fenced)
            except _PathLost as exc:
                tried.append(f"{self.portals[i]}: {exc.reason}")
                self._drop_session()
                continue
            self.retargets += 1
            log.warning("%s: %s on portal %s (%s); re-targeted to portal %s (%.2f s to "
                        "log in, cut the old session off and send it again)", self.path,
                        what, self.portals[failed_at], reason, self.portals[i],
                        time.monotonic() - started)
            return task
        self._failed = f"iSCSI session lost earlier ({reason})"
        raise StorageError(f"{self.path}: {what}: {reason}; no path took it again "
                           f"({'; '.join(tried)})")

    def _check_same_lun(self) -> None:
        """_PathLost unless the new session's LUN has the size and block size of the
        one we were writing to (a portal that leads elsewhere is no path to it)."""
        sector, size = self._read_capacity()
        if (sector, size) != (self.sector, self.size):
            raise _PathLost(f"the LUN there has {size} bytes in blocks of {sector}, "
                            f"not {self.size} in blocks of {self.sector}")

    def _cut_off(self, old_key: int | None, what: str, fenced: bool) -> None:
        """With reservations in use, register a key of our own on the new session and
        preempt the old session's key from it, so that nothing the old session still
        has at (or on the way to) the target is executed. ReservationConflict if this
        node was fenced meanwhile (the new key is unregistered again first).
        Without reservations, the login did it (session reinstatement)."""
        if old_key is None:
            return
        keys = self._pr_read_keys_here()
        if old_key not in keys:
            self._conflict(what, fenced, f"our key {old_key:#x} was preempted")
        new_key = scsi_pr.claim_session_key(old_key, keys)
        try:
            self._pr_out_here("register",
                              self._lib.SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
                              0, new_key, 0)
            self.pr_key = new_key
            # the old key still there *after* our registration: a fence that removed
            # it before would have been seen; one that comes later finds our new key
            if old_key not in self._pr_read_keys_here():
                self._unregister_here()
                self._conflict(what, fenced, f"our key {old_key:#x} was preempted")
            self._preempt_here(new_key, old_key, what, fenced)
        except BaseException:
            if self.pr_key != new_key:
                scsi_pr.release_session_key(new_key)
            raise
        scsi_pr.release_session_key(old_key)

    def _preempt_here(self, key: int, victim: int, what: str, fenced: bool) -> None:
        """PREEMPT AND ABORT (PREEMPT where the target has no abort) of `victim` by
        `key` on the current session; RESERVATION CONFLICT: the victim key went (a
        fence), or ours did."""
        lib = self._lib
        try:
            try:
                self._pr_out_here("preempt and abort",
                                  lib.SCSI_PERSISTENT_RESERVE_PREEMPT_AND_ABORT, key,
                                  victim, scsi_pr.WERO)
            except ScsiCheckCondition as exc:
                if (exc.key != lib.SCSI_SENSE_ILLEGAL_REQUEST
                        or exc.ascq != ASCQ_INVALID_FIELD_IN_CDB):
                    raise _PathLost(str(exc)) from None
                self._pr_out_here("preempt", lib.SCSI_PERSISTENT_RESERVE_PREEMPT, key,
                                  victim, scsi_pr.WERO)
        except ReservationConflict:
            self._unregister_here()
            self._conflict(what, fenced, f"our key {victim:#x} was preempted")

    def _unregister_here(self) -> None:
        """Best effort: drop the current session's registration (we were fenced)."""
        key, self.pr_key = self.pr_key, None
        scsi_pr.release_session_key(key)
        try:
            self._pr_out_here("unregister",
                              self._lib.SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
                              0, 0, 0)
        except (StorageError, _PathLost):
            pass

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
            span = (at * self.sector, at * self.sector + n)
            what = f"write at {span[0]}"
            if self._in_flight:
                self._settle(what, span)
            task = self._command(what, lib.iscsi_write16_sync,
                                 at, buf + start, n, self.sector, 0, 0, 0, 0, 0,
                                 fenced=True, span=span)
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
        if self._in_flight:
            self._settle("flush", None)
        task = self._command("flush", self._lib.iscsi_synchronizecache16_sync, 0, 0, 0, 0,
                             fenced=True)
        self._lib.scsi_free_scsi_task(task)

    def refuse_writes(self, reason: str) -> None:
        """From now on every write and flush fails at once with `reason` (a node told
        to stop writing: a poison pill, a withdraw). Reads still work."""
        self._refused = reason

    # -- persistent reservations (SPC-3), for clusterfs.fence.scsi_pr -----------------
    def _pr_in(self, what: str, action: int, here: bool = False) -> bytes:
        """PERSISTENT RESERVE IN; `here`: on the current session as it is (the lock
        held, no re-targeting: the re-target's own commands)."""
        lib = self._lib
        args = (action, PR_IN_LENGTH)
        if here:
            task = self._on_path(what, lib.iscsi_persistent_reserve_in_sync, args)
        else:
            task = self._command(what, lib.iscsi_persistent_reserve_in_sync, *args)
        try:
            return self._ffi.buffer(task.datain.data, task.datain.size)[:]
        finally:
            lib.scsi_free_scsi_task(task)

    def _pr_out(self, what: str, action: int, key: int, sa_key: int, pr_type: int,
                here: bool = False) -> None:
        lib = self._lib
        params = self._ffi.new("struct scsi_persistent_reserve_out_basic *")
        params.reservation_key = key
        params.service_action_reservation_key = sa_key
        args = (action, lib.SCSI_PERSISTENT_RESERVE_SCOPE_LU, pr_type, params)
        if here:
            task = self._on_path(what, lib.iscsi_persistent_reserve_out_sync, args)
        else:
            task = self._command(what, lib.iscsi_persistent_reserve_out_sync, *args)
        lib.scsi_free_scsi_task(task)

    def _pr_out_here(self, what: str, action: int, key: int, sa_key: int,
                     pr_type: int) -> None:
        self._pr_out(what, action, key, sa_key, pr_type, here=True)

    def _keys_of(self, what: str, data: bytes) -> list[int]:
        if len(data) < 8:
            raise StorageError(f"{self.path}: {what}: short answer ({len(data)} bytes)")
        length = min(int.from_bytes(data[4:8], "big"), len(data) - 8)
        return [int.from_bytes(data[i : i + 8], "big") for i in range(8, 8 + length - 7, 8)]

    def _pr_read_keys_here(self) -> list[int]:
        data = self._pr_in("read keys", self._lib.SCSI_PERSISTENT_RESERVE_READ_KEYS,
                           here=True)
        return self._keys_of("read keys", data)

    def pr_read_keys(self) -> list[int]:
        """The reservation keys registered on the LUN (one per registered I_T nexus)."""
        data = self._pr_in("read keys", self._lib.SCSI_PERSISTENT_RESERVE_READ_KEYS)
        return self._keys_of("read keys", data)

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
        unregister), whatever it was; `pr_key` says which. A session whose path fails
        later registers a key of the same node on its new session (re-targeting)."""
        self._pr_out("register", self._lib.SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
                     0, key, 0)
        if self.pr_key not in (None, key):
            scsi_pr.release_session_key(self.pr_key)
        self.pr_key = key or None

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
            self._drop_session()
            scsi_pr.release_session_key(self.pr_key)
            for entry in self._in_flight:
                entry.conn.close()
            self._in_flight.clear()

    def statistics(self) -> dict[str, object]:
        return {"reads": self.reads, "writes": self.writes, "blocks": self.blocks,
                "unit_attentions": self.unit_attentions, "conflicts": self.conflicts,
                "retargets": self.retargets, "portal": self.portals[self._portal],
                "settle_waits": self.settle_waits, "maybe_in_flight": len(self._in_flight)}
