"""Fencing for real: pid files with process identity, ProcessAgent against real
processes, and lockd clusters whose recovery waits for (and goes through) it."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from clusterfs.errors import ClusterFSError, FenceError
from clusterfs.fence import agent as agent_module
from clusterfs.fence.agent import NoopAgent, ProcessAgent
from clusterfs.fence.pidfile import (
    PidRecord,
    ProcessIdentity,
    identity_of,
    pid_file_path,
    read_pid_file,
    read_pid_record,
    write_pid_file,
)
from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient

DEADLINE = 60     # bounds a wait for the cluster; passing it fails the test


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def record(pid_dir: Path, node_id: int, who: ProcessIdentity,
           incarnation: int | None = None) -> None:
    inc = "" if incarnation is None else f" {incarnation:x}"
    pid_file_path(pid_dir, node_id).write_text(f"{who.pid} {who.start_time}{inc}\n")


def fence(agent: ProcessAgent, node_id: int, incarnation: int | None = None) -> None:
    trio.run(agent.fence, node_id, 7, incarnation)


# -- pid files -------------------------------------------------------------------------

def test_pid_file_records_pid_and_start_time(tmp_path: Path) -> None:
    me = write_pid_file(tmp_path / "new", 4)
    assert me.pid == os.getpid()
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(") ", 1)[1].split()
    assert me.start_time == int(fields[22 - 3])          # field 22: starttime
    assert read_pid_file(tmp_path / "new", 4) == me
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["node4.pid"]   # no temp left


def test_pid_file_records_the_incarnation(tmp_path: Path) -> None:
    me = write_pid_file(tmp_path, 4, 0xABC1)
    assert pid_file_path(tmp_path, 4).read_text() == f"{me.pid} {me.start_time} abc1\n"
    assert read_pid_record(tmp_path, 4) == PidRecord(me, 0xABC1)
    record(tmp_path, 5, me)                                # an older two-field record
    assert read_pid_record(tmp_path, 5) == PidRecord(me, None)


def test_pid_file_of_a_live_process_is_not_taken_over(tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    record(tmp_path, 1, who)
    with pytest.raises(FenceError, match=f"already runs as pid {sleeper.pid}"):
        write_pid_file(tmp_path, 1)
    assert read_pid_file(tmp_path, 1) == who
    sleeper.kill()
    sleeper.wait()
    assert write_pid_file(tmp_path, 1).pid == os.getpid()   # a dead one's record is reused


def test_second_lockd_for_a_running_node_is_refused(cluster3) -> None:
    r = subprocess.run([sys.executable, "-m", "clusterfs.cli", "lockd", "--config",
                        str(cluster3.config_path), "--node-id", "2", "--control",
                        str(cluster3.dir / "second.sock"), "--fence-pid-dir",
                        str(cluster3.fence_dir), "--state-dir", str(cluster3.state_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert f"node 2 already runs as pid {cluster3.procs[2].pid}" in r.stderr
    assert read_pid_file(cluster3.fence_dir, 2) == identity_of(cluster3.procs[2].pid)


def test_fence_error_is_a_clusterfs_error_and_still_importable_from_agent() -> None:
    assert issubclass(FenceError, ClusterFSError)
    assert agent_module.FenceError is FenceError


# -- ProcessAgent against real processes ---------------------------------------------

def test_live_process_is_killed_and_reported_fenced(tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    record(tmp_path, 2, who)
    agent = ProcessAgent(pid_dir=tmp_path)
    fence(agent, 2)                                        # returns only once it is gone
    assert sleeper.poll() == -signal.SIGKILL               # already exited: poll just reaps
    assert agent.calls == [(2, 7)]


def test_the_recorded_incarnation_itself_is_killed(tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    record(tmp_path, 2, who, incarnation=0x51)
    fence(ProcessAgent(pid_dir=tmp_path), 2, incarnation=0x51)
    assert sleeper.poll() == -signal.SIGKILL


def test_a_record_of_a_later_incarnation_is_not_killed(tmp_path: Path, sleeper,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """The node was restarted (as incarnation 0x77) after the incarnation a view removed
    (0x51): the restart replaced the record only once 0x51's process was gone."""
    who = identity_of(sleeper.pid)
    assert who is not None
    record(tmp_path, 2, who, incarnation=0x77)
    with caplog.at_level(logging.INFO, logger="clusterfs.fence.agent"):
        fence(ProcessAgent(pid_dir=tmp_path), 2, incarnation=0x51)
    assert sleeper.poll() is None                          # the restarted node lives on
    assert "restarted since as incarnation 0x77" in caplog.text


def test_an_unknown_incarnation_on_either_side_fences_the_recorded_process(
        tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    record(tmp_path, 2, who)                               # the record does not say
    fence(ProcessAgent(pid_dir=tmp_path), 2, incarnation=0x51)
    assert sleeper.poll() == -signal.SIGKILL


def test_identity_mismatch_kills_nothing_and_counts_fenced(tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    # the pid was reused: the recorded process started at another time
    record(tmp_path, 3, ProcessIdentity(who.pid, who.start_time - 1))
    fence(ProcessAgent(pid_dir=tmp_path), 3)
    assert sleeper.poll() is None                          # untouched


def test_recorded_process_gone_counts_fenced(tmp_path: Path, sleeper) -> None:
    who = identity_of(sleeper.pid)
    assert who is not None
    sleeper.kill()
    sleeper.wait()
    record(tmp_path, 5, who)
    fence(ProcessAgent(pid_dir=tmp_path), 5)


def test_missing_pid_file_is_a_fencing_failure(tmp_path: Path) -> None:
    with pytest.raises(FenceError, match="no pid file"):
        fence(ProcessAgent(pid_dir=tmp_path), 6)
    with pytest.raises(FenceError, match="no pid known"):
        fence(ProcessAgent(), 6)


def test_unreadable_pid_file_is_a_fencing_failure(tmp_path: Path) -> None:
    pid_file_path(tmp_path, 9).write_text("garbage")
    with pytest.raises(FenceError, match="bad pid file"):
        fence(ProcessAgent(pid_dir=tmp_path), 9)


def test_pid_map_pins_the_process_alive_when_given(sleeper) -> None:
    agent = ProcessAgent({1: sleeper.pid})
    fence(agent, 1)
    assert sleeper.poll() == -signal.SIGKILL
    fence(agent, 1)                                        # gone now: still fenced


def test_noop_agent_warns_every_time(caplog: pytest.LogCaptureFixture) -> None:
    agent = NoopAgent()
    with caplog.at_level(logging.WARNING, logger="clusterfs.fence.agent"):
        trio.run(agent.fence, 3, 7)
        trio.run(agent.fence, 4, 8)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("proves nothing" in r.getMessage() for r in warned)
    assert agent.calls == [(3, 7), (4, 8)]


# -- lockd clusters --------------------------------------------------------------------

def wait_for(what: str, pred, cluster: LocalLockCluster) -> None:
    """Poll pred() until true; fail (with the nodes' logs) past DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not pred():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- node {n}\n{cluster.log_tail(n, 3000)}"
                             for n in cluster.node_ids)
            pytest.fail(f"never happened: {what}\n{logs}")
        time.sleep(0.1)


def status(cluster: LocalLockCluster, node_id: int) -> dict:
    with ControlClient(cluster.control(node_id)) as c:
        return c.call("status")


def test_lockd_records_itself_and_crash_is_fenced_by_process_agent(cluster3) -> None:
    for nid in (1, 2, 3):
        assert read_pid_file(cluster3.fence_dir, nid) == identity_of(cluster3.procs[nid].pid)
    cluster3.kill(3)
    cluster3.wait_running([1, 2])
    # node 1 coordinates; its ProcessAgent, holding node 3's process since it joined
    # (no record read at the fence: the failover path opens no file), found it gone
    assert re.search(r"node 3 fenced: pid \d+ was gone already", cluster3.log_tail(1, 10**7))
    assert pid_file_path(cluster3.fence_dir, 3).exists()   # a crash leaves its record


@pytest.fixture
def fence_by_record(monkeypatch) -> None:
    """lockd's process agent reads the record at the fence, not at the join (else it
    holds each member's process from its join, and a record removed later is moot)."""
    monkeypatch.setenv("CLUSTERFS_LOCKD_FENCE_BY_RECORD", "1")


def test_missing_pid_file_holds_recovery_until_fencing_is_proven(fence_by_record,
                                                                  cluster3) -> None:
    victim = identity_of(cluster3.procs[3].pid)
    assert victim is not None
    pid_file_path(cluster3.fence_dir, 3).unlink()
    cluster3.kill(3)
    def stuck_at_fencing() -> bool:
        text = cluster3.log_tail(1, 10**7)
        return "fencing node 3 failed" in text and "recover: 1 wait for fencing of [3]" in text

    wait_for("node 1 retries the fence of node 3 while its recovery waits", stuck_at_fencing,
             cluster3)
    assert not status(cluster3, 1)["running"]              # no locking on an unproven fence
    record(cluster3.fence_dir, 3, victim)                  # now it can be proven gone
    cluster3.wait_running([1, 2])


def test_lockd_quitting_cleanly_keeps_its_record_so_survivors_go_on(cluster3) -> None:
    """A quit is a clean leave: the others drop the node in a new view without fencing
    it (its closing port, a refusal acted on at once, used to get it SIGKILLed on its
    way out), and it exits 0 leaving its record."""
    with ControlClient(cluster3.control(2)) as c:
        assert c.call("quit")["ok"]
    assert cluster3.procs[2].wait(timeout=DEADLINE) == 0
    assert pid_file_path(cluster3.fence_dir, 2).exists()
    wait_for("nodes 1 and 3 run without node 2",
             lambda: all(status(cluster3, n)["members"] == [1, 3]
                         and status(cluster3, n)["running"] for n in (1, 3)), cluster3)
    assert "fencing node 2" not in cluster3.log_tail(1, 10**7)


def test_lockd_restarted_before_its_old_life_is_fenced_is_not_killed(tmp_path: Path) -> None:
    """kill -9 lockd 3 and start it again at once. Its new incarnation's heartbeats make
    the coordinator remove the old one, whose fence comes after the new process has
    replaced the record (the record is written before the new process joins). A fence
    by node id SIGKILLed the new process; fenced by incarnation, it lives and rejoins.
    The long failure timeout only makes sure the restart beats the timeout; so does
    dead_on_refusal = false (else node 3's refused port gets the old life removed and
    fenced before the new one has started: a silent death, as on another host)."""
    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path), failure_timeout=6.0,
                          dead_on_refusal=False, verbose=True) as cluster:
        cluster.start_all()
        cluster.kill(3)
        cluster.start(3)
        restarted = cluster.procs[3]
        cluster.wait_ready(3)
        cluster.wait_running([1, 2, 3])
        assert restarted.poll() is None, cluster.log_tail(3)
        assert cluster.procs[3] is restarted
        coordinator = cluster.log_tail(1, 10**7)
        # the old life fenced by its record (the new one replaced it) or by the process
        # held since it joined (gone already): either way nothing killed
        assert ("node 3 fenced: incarnation" in coordinator
                and "restarted since as incarnation" in coordinator) or (
            re.search(r"node 3 fenced: pid \d+ was gone already", coordinator) is not None
        ), coordinator[-3000:]
        assert "SIGKILL" not in coordinator
