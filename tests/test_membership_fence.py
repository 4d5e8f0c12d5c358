"""Fencing agents: NoopAgent and ProcessAgent (kill -9 from a pid map or pid files)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from clusterfs.fence.agent import FenceError, NoopAgent, ProcessAgent
from clusterfs.fence.pidfile import identity_of


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_noop_agent_records():
    agent = NoopAgent()
    trio.run(agent.fence, 3, 7)
    assert agent.calls == [(3, 7)] and agent.statistics()["fenced"] == 1


def test_process_agent_kills_by_pid_map_and_pid_file(tmp_path):
    a, b = sleeper(), sleeper()
    try:
        who = identity_of(b.pid)      # a pid file records pid and start time
        assert who is not None
        (tmp_path / "node2.pid").write_text(f"{who.pid} {who.start_time}\n")
        agent = ProcessAgent({1: a.pid}, pid_dir=tmp_path)
        trio.run(agent.fence, 1, 5)
        assert a.poll() is not None      # gone (the agent may have reaped it)
        trio.run(agent.fence, 2, 5)
        assert b.poll() is not None
        with pytest.raises(FenceError):
            trio.run(agent.fence, 4, 5)    # unknown pid: nothing proves it gone
        trio.run(agent.fence, 1, 6)        # already dead: fine
        assert agent.calls == [(1, 5), (2, 5), (4, 5), (1, 6)]
        (tmp_path / "node9.pid").write_text("garbage")
        with pytest.raises(FenceError):
            trio.run(agent.fence, 9, 6)
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
