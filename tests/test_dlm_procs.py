"""Tier 3: lockd processes on 127.0.0.1 driven over their control sockets."""

from __future__ import annotations

import json
import time

import pytest
from cliutil import cli

from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient


def test_lockd_lock_try_lvb_status_locks(cluster3: LocalLockCluster) -> None:
    c1 = ControlClient(cluster3.control(1))
    c2 = ControlClient(cluster3.control(2))
    try:
        r = c1.call("lock", name="inode:7", mode="EX")
        assert r["ok"] and r["mode"] == "EX"
        r2 = c2.call("lock", name="inode:7", mode="PR", **{"try": True})
        assert not r2["ok"] and r2["error"] == "WouldBlock" and r2["errno"] == 11
        assert c1.call("unlock", handle=r["handle"], lvb=b"hello".hex())["ok"]
        r3 = c2.call("lock", name="inode:7", mode="PR", timeout=10)
        assert r3["ok"] and bytes.fromhex(r3["lvb"]).rstrip(b"\0") == b"hello"

        out = cli("status", "--control", cluster3.control(2))
        assert out.returncode == 0, out.stderr
        assert "members     1 2 3" in out.stdout and "quorum      yes" in out.stdout
        assert "granted=1" in out.stdout

        out = cli("locks", "inode:7", "--control", cluster3.control(3))
        assert out.returncode == 0, out.stderr
        assert "master 1" in out.stdout and "node 2" in out.stdout and " PR " in out.stdout
    finally:
        c1.close()
        c2.close()


def test_closing_connection_releases_locks(cluster3: LocalLockCluster) -> None:
    with ControlClient(cluster3.control(3)) as c:
        assert c.call("lock", name="x:1", mode="EX")["ok"]
    with ControlClient(cluster3.control(1)) as c:
        r = c.call("lock", name="x:1", mode="EX", timeout=10)
        assert r["ok"], r


def test_kill_holder_waiter_completes(cluster3: LocalLockCluster) -> None:
    c1 = ControlClient(cluster3.control(1))
    c2 = ControlClient(cluster3.control(2), timeout=60)
    try:
        assert c1.call("lock", name="j:0", mode="NL")["ok"]          # node 1 masters
        with ControlClient(cluster3.control(3)) as c3:
            held = c3.call("lock", name="j:0", mode="EX")
            assert held["ok"]
            keep = c1.call("lock", name="other:1", mode="PR")
            assert keep["ok"]
            c2.sock.sendall(b'{"op": "lock", "name": "j:0", "mode": "EX", "timeout": 50}\n')
            time.sleep(0.3)
            cluster3.kill(3)                                       # kill -9 the holder
        # c2's socket timeout (60 s) bounds the wait; a closed socket fails at once
        line = b""
        while not line.endswith(b"\n"):
            chunk = c2.sock.recv(4096)
            assert chunk, "node 2's lockd closed the control connection instead of granting"
            line += chunk
        r = json.loads(line)
        assert r["ok"] and r["mode"] == "EX" and r["lvb_valid"] is False, r
        st = c1.call("status")
        assert st["members"] == [1, 2] and st["running"]
        assert st["lockspace"]["owned_granted"] == 2                # node 1 kept both locks
    finally:
        c1.close()
        c2.close()


def test_lockbench_runs() -> None:
    from clusterfs.node.lockbench_cmd import bench

    res = bench(nodes=3, ops=500, remote_ops=100, seconds=1.0)
    assert res["local_lock_unlock_per_s"] > 100
    assert 0 < res["remote_rtt_p50_us"] <= res["remote_rtt_p99_us"]
    assert res["pingpong_handovers_per_s"] > 5


def test_no_quorum_request_waits_then_completes(cluster3: LocalLockCluster) -> None:
    import json

    cluster3.kill(2)
    cluster3.kill(3)                                    # 1 of 3 left: no quorum
    c1 = ControlClient(cluster3.control(1), timeout=60)
    try:
        deadline = time.monotonic() + 20
        while c1.call("status")["quorate"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not c1.call("status")["quorate"]
        c1.sock.sendall(b'{"op": "lock", "name": "q:1", "mode": "EX", "timeout": 50}\n')
        c1.sock.settimeout(2.0)
        with pytest.raises(TimeoutError):
            c1.sock.recv(4096)                          # neither granted nor failed
        c1.sock.settimeout(60)
        cluster3.start(2)                               # quorum again
        cluster3.wait_ready(2)
        line = b""
        while not line.endswith(b"\n"):
            line += c1.sock.recv(4096)
        r = json.loads(line)
        assert r["ok"] and r["mode"] == "EX", r
    finally:
        c1.close()


def _cluster_totals(clients: list[ControlClient]) -> dict[str, int]:
    totals = {"mastered_resources": 0, "directory_entries": 0, "removed": 0}
    for c in clients:
        st = c.call("status")["lockspace"]
        for k in totals:
            totals[k] += st[k]
    return totals


def test_idle_resources_removed_across_processes(tmp_path, monkeypatch) -> None:
    """DLM_REMOVE: resources locked once and released are freed by their
    masters after the toss time, and their directory entries go too."""
    monkeypatch.setenv("CLUSTERFS_DLM_TOSS_SECONDS", "0.5")
    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path), verbose=True) as cl:
        cl.start_all()
        clients = [ControlClient(cl.control(n), timeout=60) for n in (1, 2, 3)]
        try:
            for i in range(90):
                c = clients[i % 3]
                r = c.call("lock", name=f"toss:{i}", mode="EX", timeout=30)
                assert r["ok"], r
                assert c.call("unlock", handle=r["handle"])["ok"]
            t = _cluster_totals(clients)
            assert t["mastered_resources"] + t["removed"] == 90, t
            deadline = time.monotonic() + 60        # (a bound on waiting, not a timing check)
            while (t := _cluster_totals(clients))["mastered_resources"] or t["directory_entries"]:
                assert time.monotonic() < deadline, t
                time.sleep(0.2)
            assert t["removed"] == 90, t
            r = clients[1].call("lock", name="toss:0", mode="PR", timeout=30)   # usable again
            assert r["ok"] and _cluster_totals(clients)["mastered_resources"] == 1
        finally:
            for c in clients:
                c.close()
