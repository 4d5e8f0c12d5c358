"""The command line as a user meets it: subprocesses, their one-line messages and exit codes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import ROOT, cli

from clusterfs.cli import COMMANDS
from clusterfs.comms.localcluster import write_local_config


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr                     # one line, never a traceback
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.toml"
    write_local_config(path, [1, 2, 3])
    return path


# -- status / locks with a bad --config (finding 7) ----------------------------------------

@pytest.mark.parametrize("command", [["status"], ["locks", "inode:1"]])
def test_missing_config_file(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    r = cli(*command, "--config", str(missing), "--node-id", "1")
    one_line_error(r, 2, f"clusterfs {command[0]}:", "cannot read", str(missing))


@pytest.mark.parametrize("command", [["status"], ["locks", "inode:1"]])
def test_config_not_toml(command: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    r = cli(*command, "--config", str(bad), "--node-id", "1")
    one_line_error(r, 2, f"clusterfs {command[0]}:", "not valid TOML")


@pytest.mark.parametrize("command", [["status"], ["locks", "inode:1"]])
def test_node_id_not_in_config(command: list[str], config: Path) -> None:
    r = cli(*command, "--config", str(config), "--node-id", "9")
    one_line_error(r, 2, "node_id: 9 is not a configured node")


def test_status_without_control_or_node_id() -> None:
    one_line_error(cli("status"), 2, "--control", "--node-id")


@pytest.mark.parametrize("command", [["status"], ["locks", "inode:1"]])
def test_unreachable_lockd(command: list[str], tmp_path: Path) -> None:
    r = cli(*command, "--control", str(tmp_path / "no.sock"))
    one_line_error(r, 1, "cannot reach lockd")


# -- lockbench argument checks (finding 8) ------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--nodes", "1"], ["--nodes 1", "at least 2"]),
    (["--seconds", "0"], ["--seconds 0", "positive"]),
    (["--seconds", "-1"], ["--seconds -1.0", "positive"]),
    (["--ops", "0"], ["--ops 0", "positive"]),
    (["--remote-ops", "-5"], ["--remote-ops -5", "positive"]),
])
def test_lockbench_refuses_bad_arguments(args: list[str], words: list[str]) -> None:
    one_line_error(cli("lockbench", *args), 2, "clusterfs lockbench:", *words)


# -- keygen (finding 5) ---------------------------------------------------------------------

def test_keygen_creates_missing_parent_directory_private(tmp_path: Path) -> None:
    key = tmp_path / "etc" / "clusterfs" / "cluster.key"
    r = cli("keygen", "-o", str(key))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.parent.stat().st_mode) & 0o077 == 0      # 0700 (less by umask)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    one_line_error(cli("keygen", "-o", str(key)), 1, "exists")        # no silent overwrite


def test_keygen_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    r = cli("keygen", "-o", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


# -- lazy subcommands (finding 11) ----------------------------------------------------------

def test_help_lists_every_command() -> None:
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for name, cmd in COMMANDS.items():
        assert name in r.stdout and cmd.help in r.stdout


def test_help_imports_no_subcommand() -> None:
    code = ("import sys\nfrom clusterfs import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('clusterfs.node')))")
    r = cli(code=code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


# A broken subsystem: the native module cannot be imported (None in sys.modules
# makes every import of it fail, as an unbuilt or broken extension would).
BROKEN_NATIVE = ("import sys\nsys.modules['clusterfs.native'] = None\n"
                 "from clusterfs import cli\nsys.exit(cli.main(sys.argv[1:]))\n")


def broken(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, code=BROKEN_NATIVE)


def test_broken_subsystem_fails_only_its_commands(tmp_path: Path) -> None:
    assert broken("--help").returncode == 0
    assert broken("keygen").returncode == 0
    one_line_error(broken("status", "--control", str(tmp_path / "no.sock")), 1,
                   "cannot reach lockd")
    one_line_error(broken("mkfs", str(tmp_path / "img")), 2, "clusterfs mkfs:", "cannot load")
    one_line_error(broken("fsck", str(tmp_path / "img")), 8, "clusterfs fsck:", "cannot load")


def test_entry_points_for_mkfs_and_fsck(tmp_path: Path) -> None:
    code = "import sys\nfrom clusterfs import cli\nsys.exit(cli.{}(['--help']))"
    for fn, prog in (("mkfs_main", "mkfs.clusterfs"), ("fsck_main", "fsck.clusterfs")):
        r = cli(code=code.format(fn))
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {prog}"), r


def test_mkfs_of_a_cluster_device_says_how_many_nodes_may_mount_it(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    r = cli("mkfs", "--cluster", "lab", str(image))
    assert r.returncode == 0, r
    assert "one node at a time: -j N formats a journal for each of N nodes" in r.stdout
    r = cli("mkfs", "-f", "-j", "3", "--cluster", "lab", str(image))
    assert r.returncode == 0, r
    assert "up to 3 nodes at once, a journal each" in r.stdout


def test_unknown_command_is_a_usage_error() -> None:
    r = cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# -- tools/lockcluster.py (finding 18) ------------------------------------------------------

@pytest.mark.parametrize("kill", ["1", "4", "0"])
def test_lockcluster_refuses_kill_outside_2_to_n(kill: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "lockcluster.py"), "--nodes", "3",
                        "--kill", kill], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert f"--kill {kill}: must name a node in 2..3" in r.stderr


def test_mount_users_never_looks_at_the_mountpoint_itself(tmp_path, monkeypatch):
    """`clusterfs umount` of a busy mount names its users; finding them must not ask
    the filesystem mounted there (a cluster node without quorum never answers: umount
    hung in realpath of the mountpoint). The parent is resolved, the name kept."""
    from clusterfs.storage import holders

    real_dir = tmp_path / "real"
    (real_dir / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real_dir)
    mountpoint = str(tmp_path / "link" / "mnt")
    sleeper = subprocess.Popen(["sleep", "30"], cwd=real_dir / "mnt")
    try:
        resolved: list[str] = []
        realpath = os.path.realpath

        def recording(path, *args, **kwargs):
            resolved.append(os.fspath(path))
            return realpath(path, *args, **kwargs)

        monkeypatch.setattr(os.path, "realpath", recording)
        found = holders.mount_users(mountpoint)
        assert mountpoint not in resolved
        assert any(f"pid {sleeper.pid} (sleep): cwd" in u for u in found), found
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("option, said", [
    ("nice=-21", "mount option nice: -21 out of range -20..19"),
    ("nice=x", "mount option nice: 'x' is not a whole number"),
    ("max_glocks=5", "mount option max_glocks: 5 out of range"),
    ("min_hold_ms=-1", "mount option min_hold_ms: -1 out of range 0..60000"),
    ("colour=blue", "unknown mount option 'colour=blue'"),
    ("reserve_mib=-1", "mount option reserve_mib: -1 out of range 0..65536"),
    ("reserve_mib=1G", "mount option reserve_mib: '1G' is not a whole number"),
])
def test_a_bad_mount_option_is_one_clear_error(option, said):
    from clusterfs.node.mount_cmd import MountError, parse_options

    with pytest.raises(MountError) as err:
        parse_options([option])
    assert said in str(err.value)
    assert parse_options(["nice=5"]).nice == 5
    assert parse_options(["reserve_mib=0"]).reserve_mib == 0


# /proc/self/autogroup is empty for a task in the root group (a session whose leaders
# never called setsid since boot, as under some CI runners): "root" stands for that.
_PRIORITY_PROBE = ("import os; from clusterfs.node.mount_cmd import _set_priority; "
                   "_set_priority(-5); print(os.getpriority(os.PRIO_PROCESS, 0)); "
                   "print((open('/proc/self/autogroup').read().split() or ['root'])[-1])")


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup") or os.geteuid() != 0,
                    reason="needs the scheduler's autogroups and CAP_SYS_NICE")
def test_a_mount_leading_its_session_gives_its_scheduling_group_its_nice():
    """With autogroups a nice value ranks threads only inside their session's group:
    a mount that leads its session (a daemon, a dev-cluster node) sets the group's nice
    too; one inside someone else's session leaves that session's group alone."""
    import subprocess
    import sys

    def probe(new_session: bool) -> list[str]:
        r = subprocess.run([sys.executable, "-c", _PRIORITY_PROBE], capture_output=True,
                           text=True, timeout=60, start_new_session=new_session)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert probe(new_session=True) == ["-5", "-5"]
    words = open("/proc/self/autogroup").read().split()
    ours = words[-1] if words else "root"
    assert probe(new_session=False) == ["-5", ours]
