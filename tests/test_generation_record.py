"""Generations grow across restarts: each node's generation record
(clusterfs.membership.generation_record), in one process and with lockd processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_membership import DETECT, Sim, mock_trio, with_sim

from clusterfs.comms.localcluster import write_local_config
from clusterfs.errors import StateError
from clusterfs.membership.generation_record import (
    GenerationFile,
    MemoryGenerationRecord,
    encode_record,
    generation_file_path,
)
from clusterfs.node.lockbench_cmd import LocalLockCluster
from clusterfs.node.lockd_cmd import ControlClient

# -- the record file -------------------------------------------------------------------

def test_file_starts_at_zero_and_only_grows(tmp_path: Path) -> None:
    rec = GenerationFile(tmp_path, 4)
    assert rec.durable == 0
    assert generation_file_path(tmp_path, 4).exists()      # created: the dir is writable

    async def raise_them() -> None:
        await rec.raise_to(7)
        await rec.raise_to(5)                                # never back
    trio.run(raise_them)
    assert rec.durable == 7
    assert GenerationFile(tmp_path, 4).durable == 7         # what a restart reads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node4.generation"]   # no temp


@pytest.mark.parametrize("content, why", [
    ("", "not a generation record"),
    ("\x00\x00\x00\x00", "not a generation record"),
    ('{"generation": 9}', "wrong fields"),
    (encode_record(12, 4).replace("12", "13"), "checksum mismatch"),
    (encode_record(12, 5), "node 5's record, not node 4's"),
])
def test_corrupt_file_is_refused(tmp_path: Path, content: str, why: str) -> None:
    generation_file_path(tmp_path, 4).write_text(content)
    with pytest.raises(StateError, match=f"corrupt state file .*node4.generation: .*{why}"):
        GenerationFile(tmp_path, 4)


def test_missing_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        GenerationFile(tmp_path / "nowhere", 1)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StateError, match="not a directory"):
        GenerationFile(tmp_path / "a-file", 1)


# -- in one process (tier 2) -----------------------------------------------------------

async def _restart_all(sim: Sim, ids: list[int], forget: tuple[int, ...] = ()) -> int:
    """Form a view, stop every node, start them all again (those in `forget` with an
    empty record); the highest generation before the restart."""
    sim.records = {n: MemoryGenerationRecord() for n in ids}
    for nid in ids:
        await sim.start(nid)
    await sim.until(lambda: sim.agreed(ids, ids), 3 * DETECT)
    sim.kill(ids[-1])                        # one more view, so there is some history
    await sim.until(lambda: sim.agreed(ids[:-1], ids[:-1]), 3 * DETECT)
    old = max(sim.nodes[n].view.generation for n in ids)
    for nid in ids[:-1]:
        sim.kill(nid)
    for nid in forget:
        sim.records[nid] = MemoryGenerationRecord()
    for nid in ids:
        await sim.start(nid)
    await sim.until(lambda: sim.agreed(ids, ids), 3 * DETECT)
    return old


def _first_generation(sim: Sim, nid: int) -> int:
    return sim.nodes[nid].events[0].view.generation


@mock_trio
async def test_whole_cluster_restart_starts_above_every_old_generation():
    ids = [1, 2, 3]

    async def body(sim: Sim) -> None:
        old = await _restart_all(sim, ids)
        assert all(_first_generation(sim, n) > old for n in ids), old

    await with_sim(ids, body)


@mock_trio
async def test_a_node_that_lost_its_record_is_lifted_by_the_others():
    """Node 1 coordinates after the restart and has forgotten everything; nodes 2 and 3
    refuse its low proposals and tell it their generation, so the view is still above."""
    ids = [1, 2, 3]

    async def body(sim: Sim) -> None:
        old = await _restart_all(sim, ids, forget=(1,))
        assert all(_first_generation(sim, n) > old for n in ids), old
        assert sim.records[1].durable > old      # it promised above, and recorded it

    await with_sim(ids, body)


# -- lockd processes -------------------------------------------------------------------

def _installed(cluster: LocalLockCluster, nid: int, since: int) -> list[int]:
    """The generations of the views node nid installed after byte `since` of its log."""
    text = (cluster.dir / f"lockd-{nid}.log").read_bytes()[since:].decode(errors="replace")
    return [int(g) for g in re.findall(rf"node {nid} gen (\d+): installed view: ", text)]


def _log_size(cluster: LocalLockCluster, nid: int) -> int:
    return (cluster.dir / f"lockd-{nid}.log").stat().st_size


def test_lockd_cluster_restarted_whole_continues_above_old_generations(cluster3) -> None:
    ids = [1, 2, 3]
    cluster3.kill(3)                         # some history: a view without 3, then with it
    cluster3.wait_running([1, 2])
    cluster3.start(3)
    cluster3.wait_ready(3)
    cluster3.wait_running(ids)
    before = {n: _installed(cluster3, n, 0) for n in ids}
    old = max(g for gens in before.values() for g in gens)
    assert old >= 3, before
    sizes = {n: _log_size(cluster3, n) for n in ids}
    for nid in ids:                          # the whole cluster goes down at once
        cluster3.kill(nid)
    cluster3.start_all()
    after = {n: _installed(cluster3, n, sizes[n]) for n in ids}
    assert all(gens and min(gens) > old for gens in after.values()), (old, after)
    for nid in ids:
        with ControlClient(cluster3.control(nid)) as c:
            assert c.call("status")["membership_generation"] > old


def _lockd(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cluster.toml"
    if not config.exists():
        write_local_config(config, [1, 2, 3])
    return subprocess.run([sys.executable, "-m", "clusterfs.cli", "lockd", "--config",
                           str(config), "--node-id", "1", "--control",
                           str(tmp_path / "c.sock"), *extra],
                          capture_output=True, text=True, timeout=120)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_lockd_refuses_a_corrupt_record_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    generation_file_path(state, 1).write_text(encode_record(41, 1).replace("41", "14"))
    err = _one_line_error(_lockd(tmp_path, "--state-dir", str(state)))
    assert f"corrupt state file {state}/node1.generation: checksum mismatch" in err


def test_lockd_refuses_a_missing_or_unusable_state_dir_in_one_line(tmp_path: Path) -> None:
    err = _one_line_error(_lockd(tmp_path, "--state-dir", str(tmp_path / "nowhere")))
    assert f"state dir {tmp_path}/nowhere does not exist" in err
    (tmp_path / "file").write_text("")
    err = _one_line_error(_lockd(tmp_path, "--state-dir", str(tmp_path / "file")))
    assert "not a directory" in err
    state = tmp_path / "state"
    generation_file_path(state, 1).mkdir(parents=True)      # the record is a directory
    err = _one_line_error(_lockd(tmp_path, "--state-dir", str(state)))
    assert f"cannot read {state}/node1.generation: Is a directory" in err
