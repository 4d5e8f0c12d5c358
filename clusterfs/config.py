"""The cluster configuration file (TOML).

Example (see docs/cluster.md for every field)::

    name = "dev"
    key_file = "cluster.key"        # relative to this file; or: key = "<64 hex chars>"

    [timeouts]
    heartbeat_interval = 0.5        # seconds between heartbeats
    failure_timeout = 3.0           # a node silent this long leaves the view
    dead_on_refusal = true          # a node whose host refuses our connection
                                    # (its process is gone) leaves at once
    answer_timeout = 1.0            # a lock message unanswered this long: probe its node
    probe_timeout = 1.0             # a probed node silent this long leaves the view

    [[node]]
    id = 1                          # 32-bit unsigned, unique
    name = "alpha"
    address = "127.0.0.1:7001"

    [fencing]                       # optional; default agent "noop"
    agent = "scsi-pr"               # noop | process | scsi-pr | poison-pill
    devices = ["iscsi://10.0.0.5/iqn.2025-01.com.example:disk1/1"]

Every error is a ConfigError whose message starts with the field it is about,
e.g. ``node[2].address: port 70000 out of range``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterfs.errors import ConfigError

KEY_MIN = 16
KEY_MAX = 64
MAX_FRAME_DEFAULT = 1 << 20
IO_TIMEOUT_DEFAULT = 1.0
ANSWER_TIMEOUT_DEFAULT = 1.0
NODE_ID_MAX = 2**32 - 1


@dataclass(frozen=True)
class NodeConfig:
    id: int
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


FENCE_AGENTS = ("noop", "process", "scsi-pr", "poison-pill")
# the [fencing] fields each agent takes (besides `agent`)
FENCE_FIELDS = {
    "noop": (),
    "process": ("pid_dir",),
    "scsi-pr": ("devices",),
    "poison-pill": ("device", "interval", "timeout", "msgwait"),
}


@dataclass(frozen=True)
class FencingConfig:
    """The [fencing] table: which agent fences a removed node, and its options
    (docs/cluster.md, docs/recovery.md "Fencing agents")."""
    agent: str = "noop"
    pid_dir: str | None = None          # process: DIR/node<ID>.pid records
    devices: tuple[str, ...] = ()       # scsi-pr: every path/LUN (iscsi:// URLs)
    device: str | None = None           # poison-pill: the shared device (lockd; a
                                        # mount uses the device it mounts)
    interval: float = 1.0               # poison-pill: watcher reads its slot this often
    timeout: float = 2.0                # poison-pill: no good read this long: stop
    msgwait: float = 4.0                # poison-pill: the fencer's wait after the pill


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    key: bytes = field(repr=False)
    nodes: tuple[NodeConfig, ...]
    heartbeat_interval: float = 0.5
    failure_timeout: float = 3.0
    connect_timeout: float = 2.0
    # a peer whose host refuses a connection (nothing listens at its address: its
    # process is gone) is dead at once, without waiting for failure_timeout
    dead_on_refusal: bool = True
    max_frame: int = MAX_FRAME_DEFAULT
    storage_group: tuple[int, ...] = ()
    path: str | None = None
    fencing: FencingConfig = field(default_factory=FencingConfig)
    # [storage]: where each group node's block server listens (node id -> (host, port)),
    # and how long a proxied I/O may take before the proxy tries another server
    block_servers: tuple[tuple[int, str, int], ...] = ()
    io_timeout: float = IO_TIMEOUT_DEFAULT
    # a block server whose device I/O has been under way this long takes its disk
    # for hung: it stops serving and fences itself (storage/blockserver.py; None:
    # half of failure_timeout)
    disk_timeout: float | None = None
    # a DLM message owed an answer (a request, a conversion, a lookup, a blocking
    # callback waiting on a demote, a recovery barrier) unanswered this long makes the
    # node suspect the one that owes it (membership probes it: docs/cluster.md)
    answer_timeout: float = ANSWER_TIMEOUT_DEFAULT
    # a suspected node not heard from this long after the probe is dead (None: a third
    # of failure_timeout, at least two heartbeat intervals)
    probe_timeout: float | None = None

    def block_server(self, node_id: int) -> tuple[str, int]:
        """The block server address of group node `node_id` (ConfigError if none)."""
        for nid, host, port in self.block_servers:
            if nid == node_id:
                return host, port
        raise ConfigError(f"storage.servers: no block server address for node {node_id}")

    @property
    def disk_hung_after(self) -> float:
        """storage.disk_timeout, else half of failure_timeout (never below io_timeout)."""
        if self.disk_timeout is not None:
            return self.disk_timeout
        return max(self.io_timeout, self.failure_timeout / 2)

    def reaches_disk(self, node_id: int) -> bool:
        """Whether the node has a direct path to the disk (no storage group: all do)."""
        return not self.storage_group or node_id in self.storage_group

    def node(self, node_id: int) -> NodeConfig:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(f"node_id: {node_id} is not a configured node")

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    @property
    def size(self) -> int:
        return len(self.nodes)


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and check a cluster TOML file; ConfigError names the bad field."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: cannot read {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {p}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=p.parent, path=str(p))


def parse_config(data: dict[str, Any], *, base_dir: str | os.PathLike[str] = ".",
                 path: str | None = None) -> ClusterConfig:
    known = {"name", "key", "key_file", "timeouts", "node", "storage", "max_frame",
             "fencing"}
    for k in data:
        if k not in known:
            raise ConfigError(f"{k}: unknown field")
    name = _get(data, "name", str, "name", default="clusterfs")
    if not name:
        raise ConfigError("name: must not be empty")
    key = _load_key(data, Path(base_dir))

    t = data.get("timeouts", {})
    if not isinstance(t, dict):
        raise ConfigError("timeouts: must be a table")
    for k in t:
        if k not in ("heartbeat_interval", "failure_timeout", "connect_timeout",
                     "dead_on_refusal", "answer_timeout", "probe_timeout"):
            raise ConfigError(f"timeouts.{k}: unknown field")
    hb = _seconds(t, "heartbeat_interval", 0.5)
    ft = _seconds(t, "failure_timeout", 3.0)
    ct = _seconds(t, "connect_timeout", 2.0)
    refusal = t.get("dead_on_refusal", True)
    if not isinstance(refusal, bool):
        raise ConfigError("timeouts.dead_on_refusal: must be true or false")
    if ft < 2 * hb:
        raise ConfigError(f"timeouts.failure_timeout: {ft} s must be at least twice "
                          f"heartbeat_interval ({hb} s)")
    # default: ANSWER_TIMEOUT_DEFAULT, or a quarter of a shorter failure_timeout
    answer = _seconds(t, "answer_timeout", min(ANSWER_TIMEOUT_DEFAULT, ft / 4))
    if answer > ft / 2:
        raise ConfigError(f"timeouts.answer_timeout: {answer} s must be at most half of "
                          f"failure_timeout ({ft} s)")
    probe = _seconds(t, "probe_timeout", 1.0) if "probe_timeout" in t else None
    if probe is not None and not hb <= probe <= ft:
        raise ConfigError(f"timeouts.probe_timeout: {probe} s must be at least "
                          f"heartbeat_interval ({hb} s) and at most failure_timeout ({ft} s)")

    max_frame = _get(data, "max_frame", int, "max_frame", default=MAX_FRAME_DEFAULT)
    if not 1024 <= max_frame <= 64 << 20:
        raise ConfigError(f"max_frame: {max_frame} out of range 1024..{64 << 20}")

    raw_nodes = data.get("node")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError("node: at least one [[node]] entry is required")
    nodes: list[NodeConfig] = []
    ids: set[int] = set()
    names: set[str] = set()
    addrs: set[tuple[str, int]] = set()
    for i, rn in enumerate(raw_nodes):
        where = f"node[{i}]"
        if not isinstance(rn, dict):
            raise ConfigError(f"{where}: must be a table")
        for k in rn:
            if k not in ("id", "name", "address"):
                raise ConfigError(f"{where}.{k}: unknown field")
        if "id" not in rn:
            raise ConfigError(f"{where}.id: missing")
        nid = rn["id"]
        if not isinstance(nid, int) or isinstance(nid, bool):
            raise ConfigError(f"{where}.id: must be an integer")
        if not 0 <= nid <= NODE_ID_MAX:
            raise ConfigError(f"{where}.id: {nid} out of range 0..{NODE_ID_MAX}")
        if nid in ids:
            raise ConfigError(f"{where}.id: duplicate id {nid}")
        nname = rn.get("name", f"node{nid}")
        if not isinstance(nname, str) or not nname:
            raise ConfigError(f"{where}.name: must be a non-empty string")
        if nname in names:
            raise ConfigError(f"{where}.name: duplicate name {nname!r}")
        if "address" not in rn:
            raise ConfigError(f"{where}.address: missing")
        host, port = parse_address(rn["address"], f"{where}.address")
        if (host, port) in addrs:
            raise ConfigError(f"{where}.address: duplicate address {rn['address']}")
        ids.add(nid)
        names.add(nname)
        addrs.add((host, port))
        nodes.append(NodeConfig(nid, nname, host, port))

    group, servers, io_timeout, disk = parse_storage(data.get("storage", {}), ids, ft)

    fencing = parse_fencing(data.get("fencing", {}), Path(base_dir))
    return ClusterConfig(name=name, key=key, nodes=tuple(nodes), heartbeat_interval=hb,
                         failure_timeout=ft, connect_timeout=ct, dead_on_refusal=refusal,
                         max_frame=max_frame,
                         storage_group=tuple(group), path=path, fencing=fencing,
                         block_servers=servers, io_timeout=io_timeout, disk_timeout=disk,
                         answer_timeout=answer, probe_timeout=probe)


def parse_storage(storage: Any, ids: set[int], failure_timeout: float
                  ) -> tuple[tuple[int, ...], tuple[tuple[int, str, int], ...], float,
                             float | None]:
    """The [storage] table: group (node ids with a direct path to the disk, which
    serve it to the others), servers (a "host:port" per group node, its block
    server; only needed when some node is outside the group), io_timeout
    (seconds; at most half of failure_timeout; default 1 s, or a quarter of a
    failure_timeout under 4 s) and disk_timeout (seconds a block server's device
    I/O may be under way before its disk counts as hung; at least io_timeout, less
    than failure_timeout; None: the default, half of failure_timeout)."""
    if not isinstance(storage, dict):
        raise ConfigError("storage: must be a table")
    for k in storage:
        if k not in ("group", "servers", "io_timeout", "disk_timeout"):
            raise ConfigError(f"storage.{k}: unknown field")
    group = storage.get("group", [])
    if not isinstance(group, list) or not all(isinstance(g, int) for g in group):
        raise ConfigError("storage.group: must be a list of node ids")
    for g in group:
        if g not in ids:
            raise ConfigError(f"storage.group: {g} is not a configured node id")
    raw = storage.get("servers", {})
    if not isinstance(raw, dict):
        raise ConfigError("storage.servers: must be a table of node id = \"host:port\"")
    servers = []
    for k, v in raw.items():
        if not k.isdigit() or int(k) not in group:
            raise ConfigError(f"storage.servers.{k}: not a node id of storage.group")
        host, port = parse_address(v, f"storage.servers.{k}")
        servers.append((int(k), host, port))
    if servers and len(servers) != len(group):
        raise ConfigError("storage.servers: every node of storage.group needs an address")
    # default: IO_TIMEOUT_DEFAULT, or a quarter of a shorter failure_timeout
    v = storage.get("io_timeout", min(IO_TIMEOUT_DEFAULT, failure_timeout / 4))
    if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
        raise ConfigError("storage.io_timeout: must be a positive number of seconds")
    if v > failure_timeout / 2:
        raise ConfigError(f"storage.io_timeout: {v} s must be at most half of "
                          f"failure_timeout ({failure_timeout} s)")
    return tuple(group), tuple(sorted(servers)), float(v), _disk_timeout(
        storage, float(v), failure_timeout)


def _disk_timeout(storage: dict, io_timeout: float, failure_timeout: float
                  ) -> float | None:
    """storage.disk_timeout: a proxy gives up on a request after io_timeout, so a
    shorter one would take a slow disk for a hung one; it must end well before the
    proxies' flushes give up (twice failure_timeout), hence below failure_timeout."""
    d = storage.get("disk_timeout")
    if d is None:
        return None
    if not isinstance(d, int | float) or isinstance(d, bool) or d <= 0:
        raise ConfigError("storage.disk_timeout: must be a positive number of seconds")
    if not io_timeout <= d < failure_timeout:
        raise ConfigError(f"storage.disk_timeout: {d} s must be at least io_timeout "
                          f"({io_timeout} s) and less than failure_timeout "
                          f"({failure_timeout} s)")
    return float(d)


def parse_fencing(t: Any, base: Path) -> FencingConfig:
    """The [fencing] table; ConfigError naming `fencing.<field>`."""
    if not isinstance(t, dict):
        raise ConfigError("fencing: must be a table")
    agent = t.get("agent", "noop")
    if not isinstance(agent, str):
        raise ConfigError("fencing.agent: must be a string")
    if agent not in FENCE_AGENTS:
        raise ConfigError(f"fencing.agent: unknown agent {agent!r} (one of "
                          f"{', '.join(FENCE_AGENTS)})")
    every = {f for fields in FENCE_FIELDS.values() for f in fields}
    for k in t:
        if k == "agent":
            continue
        if k not in every:
            raise ConfigError(f"fencing.{k}: unknown field")
        if k not in FENCE_FIELDS[agent]:
            raise ConfigError(f"fencing.{k}: not an option of agent {agent!r}")
    out: dict[str, Any] = {"agent": agent}
    if "pid_dir" in t:
        out["pid_dir"] = _path(t["pid_dir"], "fencing.pid_dir", base)
    if agent == "scsi-pr":
        devices = t.get("devices")
        if devices is None:
            raise ConfigError("fencing.devices: missing (agent 'scsi-pr' needs every "
                              "path to the LUN, as iscsi:// URLs)")
        if not isinstance(devices, list) or not devices or \
                not all(isinstance(d, str) for d in devices):
            raise ConfigError("fencing.devices: must be a non-empty list of iscsi:// URLs")
        for d in devices:
            if not d.startswith("iscsi://"):
                raise ConfigError(f"fencing.devices: {d!r} is not an iscsi:// URL "
                                  "(persistent reservations need a SCSI LUN)")
        if len(set(devices)) != len(devices):
            raise ConfigError("fencing.devices: a path is listed twice")
        out["devices"] = tuple(devices)
    if "device" in t:
        d = t["device"]
        if not isinstance(d, str) or not d:
            raise ConfigError("fencing.device: must be a device path or iscsi:// URL")
        out["device"] = d if d.startswith("iscsi://") else _path(d, "fencing.device", base)
    interval = _fence_seconds(t, "interval", 1.0)
    timeout = _fence_seconds(t, "timeout", 2 * interval)
    msgwait = _fence_seconds(t, "msgwait", 2 * timeout)
    if timeout <= interval:
        raise ConfigError(f"fencing.timeout: {timeout:g} s must be longer than interval "
                          f"({interval:g} s)")
    if msgwait <= timeout:
        raise ConfigError(f"fencing.msgwait: {msgwait:g} s must be longer than timeout "
                          f"({timeout:g} s): a fenced node's watcher may take that long")
    out.update(interval=interval, timeout=timeout, msgwait=msgwait)
    return FencingConfig(**out)


def _path(v: Any, where: str, base: Path) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: must be a path")
    return v if os.path.isabs(v) else str(base / v)


def _fence_seconds(t: dict[str, Any], k: str, default: float) -> float:
    v = t.get(k, default)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ConfigError(f"fencing.{k}: must be a number of seconds")
    if not 0 < v <= 600:
        raise ConfigError(f"fencing.{k}: {v} out of range (0, 600]")
    return float(v)


def parse_address(addr: Any, where: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ConfigError naming `where`."""
    if not isinstance(addr, str):
        raise ConfigError(f"{where}: must be a string 'host:port'")
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"{where}: bad address {addr!r}, want '[v6]:port'")
        port_s = rest[1:]
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: bad address {addr!r}, want 'host:port'")
    if not host:
        raise ConfigError(f"{where}: missing host in {addr!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part and (part.replace("-", "").isalnum()) for part in host.split(".")):
            raise ConfigError(f"{where}: bad host {host!r}") from None
    if not port_s.isdigit():
        raise ConfigError(f"{where}: bad port {port_s!r}")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} out of range")
    return host, port


def decode_key(text: str, where: str) -> bytes:
    """A key is hex (even length) or base64; KEY_MIN..KEY_MAX bytes."""
    s = text.strip()
    key: bytes | None = None
    try:
        key = bytes.fromhex(s)
    except ValueError:
        try:
            key = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: not hex or base64") from None
    if not KEY_MIN <= len(key) <= KEY_MAX:
        raise ConfigError(f"{where}: key is {len(key)} bytes, want {KEY_MIN}..{KEY_MAX}")
    return key


def _load_key(data: dict[str, Any], base: Path) -> bytes:
    if "key" in data and "key_file" in data:
        raise ConfigError("key: give key or key_file, not both")
    if "key" in data:
        if not isinstance(data["key"], str):
            raise ConfigError("key: must be a string")
        return decode_key(data["key"], "key")
    if "key_file" not in data:
        raise ConfigError("key_file: missing (or give key)")
    kf = data["key_file"]
    if not isinstance(kf, str) or not kf:
        raise ConfigError("key_file: must be a path")
    kp = Path(kf) if os.path.isabs(kf) else base / kf
    try:
        text = kp.read_text("ascii")
    except FileNotFoundError:
        raise ConfigError(f"key_file: not found: {kp}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"key_file: cannot read {kp}: {exc}") from exc
    return decode_key(text, "key_file")


def _get(d: dict[str, Any], k: str, typ: type, where: str, *, default: Any) -> Any:
    v = d.get(k, default)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ConfigError(f"{where}: must be {typ.__name__}")
    return v


def _seconds(t: dict[str, Any], k: str, default: float) -> float:
    v = t.get(k, default)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ConfigError(f"timeouts.{k}: must be a number of seconds")
    if not 0 < v <= 600:
        raise ConfigError(f"timeouts.{k}: {v} out of range (0, 600]")
    return float(v)
