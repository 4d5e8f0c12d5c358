"""make_agent: the fencing agent the cluster config's [fencing] table names, built at
start-up (every agent module is imported with this one, and the agent opens and
registers what it needs now: nothing is imported, opened or logged in to on the
failover path).

The fence layer sits below storage, so devices come from the caller: `open_device`
(clusterfs.storage.open_block_device, or a function of the caller's) opens a path
or iscsi:// URL, and a mount passes the device it already has as `device`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clusterfs.config import ClusterConfig
from clusterfs.errors import ConfigError, FenceError
from clusterfs.fence.agent import FenceAgent, NoopAgent, ProcessAgent
from clusterfs.fence.poison_pill import PillWatcher, PoisonPillAgent
from clusterfs.fence.scsi_pr import ScsiPrAgent

__all__ = ["PillWatcher", "make_agent"]


def make_agent(config: ClusterConfig, node_id: int, *,
               open_device: Callable[[str], Any] | None = None,
               device: Any = None, pid_dir: str | None = None) -> FenceAgent:
    """The agent of config.fencing for node `node_id`.

    open_device(path_or_url) -> device: opens the scsi-pr paths (one session each,
    registered here with this node's key) and the poison-pill device when `device`
    is not given. pid_dir overrides fencing.pid_dir for the process agent. Errors
    (FenceError, StorageError, ConfigError) are one line, for the caller to print."""
    f = config.fencing
    if f.agent == "noop":
        return NoopAgent()
    if f.agent == "process":
        where = pid_dir or f.pid_dir
        if where is None:
            raise ConfigError("fencing.pid_dir: missing (agent 'process' needs the "
                              "directory of node<ID>.pid records)")
        return ProcessAgent(pid_dir=where)
    if f.agent == "scsi-pr":
        opener = _need(open_device, "scsi-pr")
        opened: list[Any] = []
        try:
            for url in f.devices:
                opened.append(opener(url))  # noqa: PERF401 - closed on failure
            return ScsiPrAgent(opened, config.name, node_id,
                               reopen=lambda i: opener(f.devices[i]))
        except BaseException:
            for dev in opened:
                dev.close()
            raise
    if f.agent == "poison-pill":
        if device is not None:
            return PoisonPillAgent(device, node_id, msgwait=f.msgwait)
        if f.device is None:
            raise ConfigError("fencing.device: missing (agent 'poison-pill' needs the "
                              "shared device when not given one by the mount)")
        own = _need(open_device, "poison-pill")(f.device)
        try:
            return PoisonPillAgent(own, node_id, msgwait=f.msgwait)
        except BaseException:
            own.close()
            raise
    raise ConfigError(f"fencing.agent: unknown agent {f.agent!r}")


def _need(open_device: Callable[[str], Any] | None, agent: str) -> Callable[[str], Any]:
    if open_device is None:
        raise FenceError(f"fencing agent {agent!r}: no way to open its devices was given")
    return open_device
