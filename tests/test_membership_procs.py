"""Tier 3: three real node processes on 127.0.0.1; kill -9 one; the others agree."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from clusterfs.comms.localcluster import write_local_config

INTERVAL = 0.2
TIMEOUT = 1.5


class NodeProc:
    def __init__(self, config: str, nid: int, log: str | None = None) -> None:
        self.nid = nid
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        err = open(log, "ab") if log else subprocess.DEVNULL   # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clusterfs.node.cluster", "--config", config,
             "--node-id", str(nid)] + (["-v"] if log else []),
            stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if log:
            err.close()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait_event(self, pred, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"node {self.nid}: no matching event; saw {self.seen}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(ev)
            if pred(ev):
                return ev

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def procs():
    started: list[NodeProc] = []
    yield started
    for p in started:
        p.kill()


@pytest.mark.parametrize("interval, timeout, limit", [
    (INTERVAL, TIMEOUT, TIMEOUT + 1.5),
    (0.5, 3.0, 5.0),                 # the defaults: out of the view within 5 s
])
def test_kill_9_one_of_three_others_agree_within_timeout(tmp_path, procs, interval, timeout,
                                                          limit):
    cfg = tmp_path / "cluster.toml"
    write_local_config(cfg, [1, 2, 3], heartbeat_interval=interval, failure_timeout=timeout)
    for nid in (1, 2, 3):
        procs.append(NodeProc(str(cfg), nid))
    deadline = time.monotonic() + 20
    full = [p.wait_event(lambda e: e.get("event") == "view" and e["members"] == [1, 2, 3],
                         deadline) for p in procs]
    assert len({e["gen"] for e in full}) == 1 and full[0]["quorate"]

    killed_at = time.monotonic()
    procs[2].kill()                          # SIGKILL node 3
    after = [p.wait_event(lambda e: e.get("event") == "view" and e["members"] == [1, 2],
                          killed_at + limit + 2.0) for p in procs[:2]]
    took = time.monotonic() - killed_at
    print(f"new view {took:.2f} s after kill -9 (failure timeout {timeout} s)")
    assert took <= limit
    assert after[0] == after[1]              # same generation, same change, on both
    assert after[0]["gen"] > full[0]["gen"] and after[0]["left"] == [3]
    assert after[0]["quorate"]
    fenced = [p.wait_event(lambda e: e.get("event") == "fenced", time.monotonic() + 5)
              for p in procs[:2]]
    assert fenced[0] == fenced[1] == {"event": "fenced", "gen": after[0]["gen"], "nodes": [3]}


def test_sigstopped_node_is_expelled_when_it_wakes(tmp_path, procs):
    """A node frozen past the failure timeout (as if cut off) is not merged back."""
    cfg = tmp_path / "cluster.toml"
    write_local_config(cfg, [1, 2, 3], heartbeat_interval=INTERVAL, failure_timeout=TIMEOUT)
    for nid in (1, 2, 3):
        procs.append(NodeProc(str(cfg), nid))
    deadline = time.monotonic() + 20
    for p in procs:
        p.wait_event(lambda e: e.get("event") == "view" and e["members"] == [1, 2, 3], deadline)
    procs[2].proc.send_signal(signal.SIGSTOP)
    try:
        after = [p.wait_event(lambda e: e.get("event") == "view" and e["members"] == [1, 2],
                              time.monotonic() + TIMEOUT + 3.0) for p in procs[:2]]
        assert after[0] == after[1]
    finally:
        procs[2].proc.send_signal(signal.SIGCONT)
    ev = procs[2].wait_event(lambda e: e.get("event") == "expelled", time.monotonic() + 10)
    assert ev["gen"] >= after[0]["gen"]
    time.sleep(2 * TIMEOUT)
    # the survivors never took it back
    for p in procs[:2]:
        while not p.events.empty():
            e = p.events.get()
            p.seen.append(e)
            assert e.get("event") != "view", e


def test_kill_9_and_restart_the_lowest_id_never_removes_a_live_node(tmp_path, procs):
    """Node 1 (the coordinator) is killed -9 and restarted, several rounds, in a
    cluster of five: the restarted node becomes coordinator again at once and must
    not remove live members it has not heard from yet (over TCP the others'
    reconnects to it lag behind its own heartbeats)."""
    ids = [1, 2, 3, 4, 5]
    cfg = tmp_path / "cluster.toml"
    write_local_config(cfg, ids, heartbeat_interval=INTERVAL, failure_timeout=TIMEOUT)
    logs = {nid: str(tmp_path / f"node{nid}.log") for nid in ids}
    nodes = {nid: NodeProc(str(cfg), nid, logs[nid]) for nid in ids}
    procs.extend(nodes.values())
    survivors = ids[1:]

    def check(ev: dict, nid: int) -> None:
        assert ev.get("event") != "expelled", f"live node {nid} expelled: {nodes[nid].seen}"
        if ev.get("event") == "view":
            missing = set(survivors) - set(ev["members"])
            assert not missing, f"node {nid}: view {ev} removed live nodes {sorted(missing)}"

    def wait_view(nid: int, members: list[int], deadline: float) -> dict:
        def pred(e: dict) -> bool:
            check(e, nid)
            return e.get("event") == "view" and e["members"] == members
        return nodes[nid].wait_event(pred, deadline)

    deadline = time.monotonic() + 30
    for nid in ids:
        nodes[nid].wait_event(lambda e: e.get("event") == "view" and e["members"] == ids,
                              deadline)
    for _ in range(3):
        nodes[1].kill()
        deadline = time.monotonic() + TIMEOUT + 20
        for nid in survivors:
            wait_view(nid, survivors, deadline)
        nodes[1] = NodeProc(str(cfg), 1, logs[1])
        procs.append(nodes[1])
        deadline = time.monotonic() + 30
        for nid in ids:
            wait_view(nid, ids, deadline)
        # a few failure timeouts later, nobody live has left any view
        time.sleep(3 * TIMEOUT)
        for nid in ids:
            while not nodes[nid].events.empty():
                ev = nodes[nid].events.get()
                nodes[nid].seen.append(ev)
                check(ev, nid)
            assert nodes[nid].proc.poll() is None, f"node {nid} exited"
