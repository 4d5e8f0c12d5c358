"""Memory discipline on the failover path (issue 8, item 6): across a failover a node
opens no host file and imports nothing.

The mount audits itself when started with CLUSTERFS_AUDIT_FAILOVER=1
(clusterfs.failover): a sys.addaudithook hook in the mount process records every
file opened, module imported, process started... while a phase of the failover
path is under way (membership seeing a node go until it is fenced, journal
recovery, a proxy's re-target), and `clusterfs status --json` shows them. Here:
the hook itself (it catches what it must, in a process of its own), then real
mounts: a node killed under writers, and a proxy's server stopped under a writer.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import mountutil
import pytest
import trio
from clusterutil import CLUSTER_NAME, cluster
from mountutil import run_cli
from proxyutil import ProxyCluster, status
from recoveryutil import wait_for
from test_proxy import _write_and_stop

from clusterfs import failover
from clusterfs.errors import FenceError
from clusterfs.fence.agent import ProcessAgent
from clusterfs.fence.pidfile import identity_of, pid_file_path
from clusterfs.membership.generation_record import (
    SLOT,
    GenerationFile,
    encode_record,
    generation_file_path,
)
from clusterfs.node import prepare
from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient

AUDIT = {"CLUSTERFS_AUDIT_FAILOVER": "1"}


# -- the phases and the hook, in a process of their own ---------------------------------

def test_phases_are_flags_by_name_and_leave_a_history():
    failover.enter("test phase")
    failover.enter("test phase")              # once is enough
    assert "test phase" in failover.under_way()
    failover.leave("test phase")
    failover.leave("test phase")              # and leaving twice is harmless
    assert "test phase" not in failover.under_way()
    assert failover.phase_history()[-1]["phase"] == "test phase"


HOOKED = textwrap.dedent(r"""
    import json, sys
    from clusterfs import failover
    failover.install_audit()
    open(sys.argv[1], "w").close()            # before arming: only counted
    failover.arm_audit()
    open(sys.argv[1]).close()                 # armed, outside every phase
    failover.enter("test phase")
    import colorsys                           # never imported before: a real import
    open(sys.argv[1]).close()
    import json                               # imported already: no event
    failover.leave("test phase")
    open(sys.argv[1]).close()
    print(json.dumps(failover.report()))
""")


def test_the_hook_records_imports_and_opens_made_during_a_phase(tmp_path):
    """The audit the mount tests rely on: it sees an import and an open made while a
    phase is under way (with where they came from), and keeps what happened outside
    apart. A deliberate import, so the mount tests' empty lists mean something."""
    target = tmp_path / "f"
    r = subprocess.run([sys.executable, "-c", HOOKED, str(target)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    during = [(e["event"], e["what"]) for e in rep["during"]]
    assert ("import", "'colorsys'") in during, during
    assert ("open", f"{str(target)!r} 'r'") in during, during
    assert not any(e["what"] == "'json'" for e in rep["during"])
    assert all(e["phases"] == ["test phase"] for e in rep["during"])
    assert any("colorsys" not in e["what"] and e["where"] for e in rep["during"])
    outside = [e["what"] for e in rep["outside_sample"]]
    assert outside.count(f"{str(target)!r} 'r'") == 2, outside
    assert rep["seen"] >= len(rep["during"]) + rep["outside_count"] + 1   # + the unarmed one
    assert rep["phases"][-1]["phase"] == "test phase"


# -- what the mount loads at start (node/prepare.py) --------------------------------------

FAILOVER_MODULES = ["clusterfs/failover.py", "clusterfs/node/fencing.py",
                    "clusterfs/node/diskbeat.py", "clusterfs/node/cluster.py"]


def _lazy_imports() -> set[str]:
    """Modules imported inside functions of the failover path's packages (the ones
    node/prepare.py loads) and of the node modules it runs through."""
    root = Path(__file__).resolve().parent.parent
    files = [root / f for f in FAILOVER_MODULES]
    for package in prepare.FAILOVER_PACKAGES:
        files += (root / package.replace(".", "/")).glob("*.py")
    found = set()
    for path in files:
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        found |= {a.name for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        found.add(node.module)
    return found


PRELOADED = textwrap.dedent(r"""
    import json, sys
    from clusterfs.node.prepare import preload
    missing = preload()
    print(json.dumps({"modules": sorted(sys.modules), "missing": missing}))
""")


def test_preload_loads_every_module_the_failover_path_imports_lazily():
    """A module imported inside a function of the failover path would be imported
    there, during a failover, unless the mount loaded it first: preload() does, in a
    fresh process. (The real mounts below catch what this cannot see: the standard
    library's own lazy imports.)"""
    r = subprocess.run([sys.executable, "-c", PRELOADED], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    lazy = _lazy_imports()
    assert "clusterfs.fence.scsi_pr" in lazy | set(out["modules"])
    not_loaded = sorted(m for m in lazy - set(out["modules"]) if m not in out["missing"]
                        and m != "clusterfs._iscsi")   # built only where libiscsi is
    assert not not_loaded, not_loaded


LOGGED = textwrap.dedent(r"""
    import json, logging, sys
    from clusterfs import failover
    from clusterfs.node.prepare import TracebackFormatter
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TracebackFormatter("%(message)s"))
    log = logging.getLogger("t")
    log.addHandler(handler)
    failover.install_audit()
    failover.arm_audit()
    failover.enter("test phase")
    try:
        json.loads("{")                   # a stack through a module never quoted yet
    except ValueError:
        log.exception("it failed")
    failover.leave("test phase")
    print(json.dumps(failover.report()))
""")


def test_a_traceback_logged_during_a_phase_opens_no_source_file():
    r = subprocess.run([sys.executable, "-c", LOGGED], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "json/decoder.py\", line" in r.stderr and "JSONDecodeError" in r.stderr
    assert json.loads(r.stdout)["during"] == []


# -- what the failover path uses instead of the host's files ----------------------------

def test_the_generation_record_is_written_in_place_without_opening_a_file(tmp_path):
    """A promise made while a node departs is made durable through the descriptor the
    record keeps: no temporary file, no rename (the file keeps its inode)."""
    rec = GenerationFile(tmp_path, 4)
    path = generation_file_path(tmp_path, 4)
    inode = path.stat().st_ino
    for generation in (5, 6, 9):
        trio.run(rec.raise_to, generation)
    assert path.stat().st_ino == inode and path.stat().st_size == SLOT * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node4.generation"]
    assert GenerationFile(tmp_path, 4).durable == 9


def test_a_torn_record_falls_back_to_the_other_slot(tmp_path):
    rec = GenerationFile(tmp_path, 4)
    for generation in (7, 8):                 # 7 in slot 1, 8 in slot 0
        trio.run(rec.raise_to, generation)
    path = generation_file_path(tmp_path, 4)
    data = bytearray(path.read_bytes())
    data[20:30] = b"\xff" * 10                # the write of 8 was torn by a crash
    path.write_bytes(bytes(data))
    assert GenerationFile(tmp_path, 4).durable == 7


def test_a_one_line_record_of_an_earlier_version_is_read_and_rewritten(tmp_path):
    path = generation_file_path(tmp_path, 4)
    path.write_text(encode_record(12, 4))
    rec = GenerationFile(tmp_path, 4)
    assert rec.durable == 12 and path.stat().st_size == SLOT * 2
    trio.run(rec.raise_to, 13)
    assert GenerationFile(tmp_path, 4).durable == 13


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _record(pid_dir: Path, node_id: int, pid: int, incarnation: int) -> None:
    who = identity_of(pid)
    assert who is not None
    pid_file_path(pid_dir, node_id).write_text(f"{who.pid} {who.start_time} {incarnation:x}\n")


def test_a_process_held_since_it_joined_is_fenced_without_its_record(tmp_path, sleeper):
    """The mount holds each member's process (expect) while it joins; fencing that
    incarnation reads nothing: here the record is gone by then, and it still works."""
    _record(tmp_path, 2, sleeper.pid, 0x51)
    agent = ProcessAgent(pid_dir=tmp_path)
    agent.expect(2, 0x51)
    pid_file_path(tmp_path, 2).unlink()
    trio.run(agent.fence, 2, 7, 0x51)
    assert sleeper.wait(10) == -signal.SIGKILL
    agent.close()


def test_a_held_process_of_another_incarnation_is_not_used(tmp_path, sleeper):
    """Holding is only for the incarnation it was taken for: fencing another one goes
    by the record, as before (here: a record of a later life, so nothing is killed)."""
    _record(tmp_path, 2, sleeper.pid, 0x51)
    agent = ProcessAgent(pid_dir=tmp_path)
    agent.expect(2, 0x51)
    _record(tmp_path, 2, sleeper.pid, 0x77)
    trio.run(agent.fence, 2, 7, 0x33)
    assert sleeper.poll() is None
    agent.close()


def test_a_record_of_another_incarnation_is_not_held(tmp_path, sleeper):
    _record(tmp_path, 2, sleeper.pid, 0x77)
    agent = ProcessAgent(pid_dir=tmp_path)
    agent.expect(2, 0x51)                     # the record is not (yet) that life's
    pid_file_path(tmp_path, 2).unlink()
    with pytest.raises(FenceError, match="no pid file"):
        trio.run(agent.fence, 2, 7, 0x51)     # nothing held: it reads, and finds none
    assert sleeper.poll() is None


# -- real mounts --------------------------------------------------------------------------

WRITER = r"""
import os, sys
root, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    with open(os.path.join(root, f"f{i % 50}"), "wb") as f:
        f.write(os.urandom(4096 + 512 * (i % 17)))
        f.flush()
        os.fsync(f.fileno())
    i += 1
print(i, flush=True)
"""


def _audit(status_of, node: int) -> dict:
    r = run_cli("status", "--control", status_of(node), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["failover"]


def _phases_after(audit: dict, since: float) -> set[str]:
    return {p["phase"] for p in audit["phases"] if p["at"] >= since}


def _explain(audit: dict) -> str:
    return "\n".join(f"{e['event']} {e['what']} during {e['phases']} in {e['thread']}\n    "
                     + "\n    ".join(e.get("where", [])) for e in audit["during"])


def _print_audits(audits: dict[int, dict], what: str = "node") -> None:
    """Each process's audit, shown when a test fails (what it saw, and when)."""
    for n, audit in audits.items():
        print(f"\n{what} {n}: {audit['seen']} events seen, {audit['outside_count']} "
              f"outside the failover, phases {audit['phases']}\n{_explain(audit)}\n"
              f"paths {audit['paths']}")


def assert_quiet_failover(audit: dict, since: float, phases: set[str]) -> None:
    """The hook was in that process and armed, the failover's phases ran and ended
    after `since`, and nothing was recorded while they were under way."""
    assert audit["installed"] and audit["armed"], audit
    assert audit["seen"] > 0, "the hook saw nothing at all: is it there?"
    assert phases <= _phases_after(audit, since), audit["phases"]
    assert not audit["during_dropped"] and not audit["during"], _explain(audit)
    assert_nothing_drawn(audit, since)


def assert_nothing_drawn(audit: dict, since: float) -> None:
    """Every failover path that ended after `since` took no memory and started no
    thread: the heap did not grow, no pymalloc arena came from the kernel (the reserve
    served them), no thread was started (node/memory.py)."""
    paths = [p for p in audit["paths"] if p["at"] >= since]
    assert paths, audit["paths"]
    for path in paths:
        drawn = path["drawn"]
        assert drawn["heap_bytes"] == 0 and drawn["arenas_from_kernel"] == 0, path
        assert drawn["threads"] <= 0 and drawn["mmapped_bytes"] <= 0, path


KILL_PHASES = {"membership", "journal recovery"}


def wait_phases(c, node: int, since: float, phases: set[str]) -> None:
    """Until every one of `phases` has run on `node` and ended, after `since`."""
    wait_for(f"node {node}'s phases {sorted(phases)}",
             lambda: phases <= _phases_after(_audit(c.control, node), since),
             timeout=120, poll=0.2)


@pytest.fixture
def audited(monkeypatch):
    mountutil.require_mounts()
    for k, v in AUDIT.items():
        monkeypatch.setenv(k, v)


@contextlib.contextmanager
def writing(roots: list[str], stop: Path) -> Iterator[list[subprocess.Popen]]:
    """A WRITER on each root until the body ends (then the stop file); the caller
    checks how they ended."""
    procs: list[subprocess.Popen] = []
    try:
        procs.extend(subprocess.Popen([sys.executable, "-c", WRITER, root, str(stop)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for root in roots)
        yield procs
    finally:
        stop.touch()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_survivors_of_a_kill_open_and_import_nothing_while_they_take_over(tmp_path, audited):
    """kill -9 of node 1 while every node writes and fsyncs: node 2 (the new
    coordinator) fences it, both survivors recover the DLM and node 1's journal is
    replayed; neither records an event from the moment it sees node 1 go until its
    journal recovery is done (and membership's part, fencing, is over)."""
    with cluster(tmp_path, nodes=3) as c:
        for n in (1, 2, 3):
            os.mkdir(c.path(n, f"w{n}"))
        with writing([c.path(n, f"w{n}") for n in (1, 2, 3)], tmp_path / "stop") as procs:
            time.sleep(1.0)
            killed_at = time.time()
            c.kill9(1)
            procs[0].kill()                   # its writer dies with it
            for n in (2, 3):
                wait_phases(c, n, killed_at, KILL_PHASES)
            time.sleep(1.0)                   # the writers go on after the recovery
        for p in procs[1:]:
            assert p.returncode == 0, p.stdout.read()
        audits = {n: _audit(c.control, n) for n in (2, 3)}
        _print_audits(audits)
        for audit in audits.values():
            assert_quiet_failover(audit, killed_at, KILL_PHASES)


def test_a_proxy_opens_and_imports_nothing_while_it_retargets(tmp_path, audited):
    """Nodes 1 and 2 serve the disk, node 3 proxies (tests/test_proxy.py). The server
    node 3 writes through most is SIGSTOPped while node 3 writes and fsyncs: node 3
    re-targets to the other server, then the survivors remove the stopped node, fence
    it (the process agent kills it) and recover. Node 3 records nothing from its first
    timed-out request to the end of its journal recovery, nor does the other server
    while it fences and recovers."""
    with ProxyCluster(tmp_path) as c:
        server, stopped_at, _lines = _write_and_stop(c, 4, 6, None)
        other = 3 - server
        victim = c.mounts[server]
        wait_for("the stopped server fenced (killed)", lambda: not victim.alive(),
                 timeout=120, poll=0.2)
        c.mounts.pop(server).clean_after_crash()
        wait_phases(c, 3, stopped_at, {"proxy re-target", *KILL_PHASES})
        wait_phases(c, other, stopped_at, KILL_PHASES)
        audits = {n: _audit(c.control, n) for n in (3, other)}
        _print_audits(audits)
        assert status(c, 3)["device"]["retargets"] >= 1
        assert_quiet_failover(audits[3], stopped_at, {"proxy re-target", *KILL_PHASES})
        assert_quiet_failover(audits[other], stopped_at, KILL_PHASES)


# -- the disk fencing agents (the tests above fence through the process agent) ----------
def _disk_agent_failover(c, fenced, backing: Path) -> None:
    """tests/test_fence_mount.py's scenario (node 3 SIGSTOPped under a writer, fenced
    by the survivors through the config's agent, let go: its late write refused),
    under the audit: survivors 1 and 2 record nothing from the stop until node 3's
    journal is replayed and their membership phase (the fence itself) is over."""
    from test_fence_mount import _finish, _stop_fence_resume

    stopped_at = time.time()
    _stop_fence_resume(c, fenced, backing)
    for n in (1, 2):
        wait_phases(c, n, stopped_at, KILL_PHASES)
    audits = {n: _audit(c.control, n) for n in (1, 2)}
    _print_audits(audits)
    for audit in audits.values():
        assert_quiet_failover(audit, stopped_at, KILL_PHASES)
    _finish(c)


def test_survivors_fencing_with_scsi_pr_open_and_import_nothing(tmp_path, audited):
    """scsi-pr on a tgtd LUN: the fence is a PREEMPT AND ABORT of node 3's key."""
    import iscsiutil
    from test_fence_mount import registered_nodes, scsi_pr_cluster

    mountutil.require(iscsiutil.missing_prerequisites())
    with scsi_pr_cluster(tmp_path) as (c, observer, t), c.forced_down_on_error():
        c.start(1, 2, 3)
        _disk_agent_failover(c, lambda: 3 not in registered_nodes(observer), t.backing[1])


def test_survivors_fencing_with_a_poison_pill_open_and_import_nothing(tmp_path, audited):
    """poison-pill on a loop device: the fence writes a pill into node 3's slot and
    waits msgwait."""
    from test_fence_mount import MIB, FencedCluster, _config

    with mountutil.loop_device(256 * MIB, tmp_path) as dev:
        r = run_cli("mkfs", "-q", "-j", "3", "--cluster", CLUSTER_NAME, dev)
        assert r.returncode == 0, r.stderr
        c = FencedCluster(tmp_path, dev, _config(
            tmp_path, 'agent = "poison-pill"\ninterval = 0.5\ntimeout = 1.0\n'
                      'msgwait = 2.0\n'), 3)
        with c.forced_down_on_error():
            c.start(1, 2, 3)
            _disk_agent_failover(c, lambda: "node 3 fenced: its watcher" in c.logs(),
                                 tmp_path / "disk.img")


# -- clusterfs lockd ------------------------------------------------------------------
LOCKD_PHASES = {"membership", "lock recovery"}


def _lockd_audit(c, node: int) -> dict:
    with ControlClient(c.control(node)) as client:
        return client.call("status")["failover"]


def test_lockd_survivors_open_and_import_nothing_while_they_recover_the_locks(
        tmp_path, monkeypatch):
    """Three `clusterfs lockd` (tools/lockcluster.py's kind), every node holding EX
    locks; kill -9 of node 1: nodes 2 and 3 see it go, fence it (the process agent),
    recover the DLM and grant its locks again, and record nothing meanwhile."""
    for k, v in AUDIT.items():
        monkeypatch.setenv(k, v)
    with LocalLockCluster([1, 2, 3], workdir=str(tmp_path)) as c:
        c.start_all()
        clients = {n: ControlClient(c.control(n)) for n in (1, 2, 3)}
        try:
            for n, client in clients.items():
                for i in range(20):
                    client.call("lock", name=["inode", n * 100 + i], mode="EX")
            killed_at = time.time()
            c.kill(1)
            for n in (2, 3):
                wait_for(f"lockd {n}'s phases {sorted(LOCKD_PHASES)}",
                         lambda n=n: _phases_after(_lockd_audit(c, n), killed_at)
                         >= LOCKD_PHASES,
                         timeout=60, poll=0.2)
            got = clients[2].call("lock", name=["inode", 105], mode="EX", timeout=10)
            assert got["mode"] == "EX"                   # node 1's lock, granted again
            audits = {n: _lockd_audit(c, n) for n in (2, 3)}
        finally:
            for n, client in clients.items():
                if n != 1:
                    client.close()
        _print_audits(audits, "lockd")
        for audit in audits.values():
            assert_quiet_failover(audit, killed_at, LOCKD_PHASES)
