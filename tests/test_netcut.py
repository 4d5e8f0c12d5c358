"""Tier 3 fault test: a lockd node cut off the network for real (network namespaces).

Three `clusterfs lockd` processes, each in its own network namespace, joined by a bridge.
Node 3 holds an EX lock and node 1 waits for it; then node 3's link goes down:
  * nodes 1 and 2 (a majority) form a new view without it, recover, and grant node 1's
    request with the value block marked invalid;
  * node 3, alone and without quorum, grants nothing: a new request of its own waits;
  * when the link comes back, node 3 is not merged back: it learns it was expelled and
    exits with status 3; restarted clean, it rejoins and locks again.

The nodes run without --fence-pid-dir (the no-op fencing agent): with the process agent
the survivors, on the same host, would kill node 3 before it could learn anything.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mountutil  # noqa: E402
import netns  # noqa: E402

from clusterfs.node.lockd_cmd import ControlClient  # noqa: E402

PORT = 7400
INTERVAL = 0.2
TIMEOUT = 1.5


@pytest.fixture
def lab():
    mountutil.require(netns.missing())
    with netns.NetLab(3) as lab:
        yield lab


def _config(path: str, lab: netns.NetLab) -> None:
    lines = ['name = "netcut"', f'key = "{secrets.token_hex(32)}"', "", "[timeouts]",
             f"heartbeat_interval = {INTERVAL}", f"failure_timeout = {TIMEOUT}",
             "connect_timeout = 1.0", ""]
    for n in lab.ns:
        lines += ["[[node]]", f"id = {n}", f'name = "n{n}"',
                  f'address = "{lab.address(n)}:{PORT}"', ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


class Lockd:
    """One lockd process inside node n's namespace; its control socket is a unix socket
    in the shared filesystem, so this test process can reach it from the host."""

    def __init__(self, lab: netns.NetLab, n: int, config: str, workdir: str) -> None:
        self.control = os.path.join(workdir, f"lockd-{n}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)
        self.log_path = os.path.join(workdir, f"lockd-{n}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "clusterfs.cli", "lockd", "--config", config,
                "--node-id", str(n), "--control", self.control, "--state-dir", workdir, "-v"]
        self.proc = subprocess.Popen(lab.run(n, argv), stdout=subprocess.DEVNULL,
                                     stderr=log)
        log.close()

    def client(self, timeout: float = 30) -> ControlClient:
        deadline = time.monotonic() + 30
        while True:
            try:
                return ControlClient(self.control, timeout=timeout)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"lockd never listened; log:\n{self.log()}") from None
                time.sleep(0.1)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _wait_status(node: Lockd, pred, what: str, within: float = 30) -> dict:
    """Poll `status` until pred(status) holds; the deadline bounds a hang, it is not a
    timing requirement."""
    deadline = time.monotonic() + within
    last: dict = {}
    with node.client() as c:
        while time.monotonic() < deadline:
            last = c.call("status")
            if last.get("ok") and pred(last):
                return last
            time.sleep(0.1)
    raise AssertionError(f"{what}: last status {last}; log:\n{node.log()}")


class _Pending:
    """A lock request sent on its own connection and answered later (or never)."""

    def __init__(self, node: Lockd, **req: object) -> None:
        self.answer: dict | None = None
        self.client = node.client(timeout=120)
        self._thread = threading.Thread(target=self._run, args=(req,), daemon=True)
        self._thread.start()

    def _run(self, req: dict) -> None:
        try:
            self.answer = self.client.call("lock", **req)
        except (OSError, ConnectionError) as exc:
            self.answer = {"ok": False, "error": repr(exc)}

    def wait(self, within: float) -> dict | None:
        self._thread.join(within)
        return self.answer

    def close(self) -> None:
        self.client.close()


def test_cut_off_node_is_expelled_not_merged_and_restarts_clean(lab, tmp_path):
    config = str(tmp_path / "cluster.toml")
    _config(config, lab)
    nodes = {n: Lockd(lab, n, config, str(tmp_path)) for n in (1, 2, 3)}
    pending: list[_Pending] = []
    try:
        for node in nodes.values():
            _wait_status(node, lambda s: s["members"] == [1, 2, 3] and s["running"],
                         "three-node view")
        gen0 = _wait_status(nodes[1], lambda s: True, "status")["generation"]

        holder = nodes[3].client()
        held = holder.call("lock", name="r:1", mode="EX")
        assert held["ok"], held
        waiter = _Pending(nodes[1], name="r:1", mode="PR", timeout=60)
        pending.append(waiter)
        assert waiter.wait(1.0) is None, "PR granted while node 3 held EX"

        lab.cut(3)
        survivors = _wait_status(
            nodes[1], lambda s: s["members"] == [1, 2] and s["running"], "view without 3")
        assert survivors["generation"] > gen0
        granted = waiter.wait(30)
        assert granted is not None and granted["ok"], granted
        assert granted["mode"] == "PR" and granted["lvb_valid"] is False, granted

        # Once node 3 itself sees it has no quorum, its new requests are neither granted
        # nor failed. (Before it notices, up to failure_timeout after the cut, it may still
        # grant locks it masters: fencing, not this, is what keeps the survivors safe.)
        _wait_status(nodes[3], lambda s: not s["quorate"], "node 3 sees no quorum")
        alone = _Pending(nodes[3], name="r:2", mode="EX", timeout=60)
        pending.append(alone)
        assert alone.wait(2 * TIMEOUT) is None, f"node 3 answered without quorum: {alone.answer}"
        assert nodes[3].proc.poll() is None

        lab.heal(3)
        assert nodes[3].proc.wait(60) == 3, "node 3 did not exit as expelled:\n" + nodes[3].log()
        assert "expelled" in nodes[3].log()
        st = _wait_status(nodes[2], lambda s: True, "status")
        assert st["members"] == [1, 2], "the expelled node was merged back"

        nodes[3] = Lockd(lab, 3, config, str(tmp_path))           # restart clean
        rejoined = _wait_status(
            nodes[1], lambda s: s["members"] == [1, 2, 3] and s["running"], "rejoin")
        assert rejoined["generation"] > survivors["generation"]
        with nodes[3].client() as c:
            _wait_status(nodes[3], lambda s: s["running"], "node 3 running")
            got = c.call("lock", name="r:3", mode="EX", timeout=30)
            assert got["ok"], got
    finally:
        for p in pending:
            p.close()
        for node in nodes.values():
            node.kill()
