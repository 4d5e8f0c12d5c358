"""POSIX attributes through a real mount: chmod/chown/utimens (nanoseconds),
permission checks as a non-root user, user/trusted/security xattrs, statfs."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time

import pytest
from fileutil import errno_of, write_file
from mountutil import run_as

NOBODY = 65534
OTHER = 4242


# ---------------------------------------------------------------------------- chmod/chown/utime


def test_chmod(fsys):
    p = fsys.path("f")
    write_file(p, b"")
    for mode in (0o600, 0o644, 0o755, 0o4755, 0o2750, 0o1777, 0o000):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
    os.mkdir(fsys.path("d"), 0o700)
    assert stat.S_IMODE(os.stat(fsys.path("d")).st_mode) == 0o700
    os.chmod(fsys.path("d"), 0o1777)
    fsys.remount()
    assert stat.S_IMODE(os.stat(fsys.path("d")).st_mode) == 0o1777
    assert stat.S_IFMT(os.stat(fsys.path("d")).st_mode) == stat.S_IFDIR
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o000


def test_chown(fsys):
    p = fsys.path("f")
    write_file(p, b"")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.symlink("f", fsys.path("l"))
    os.lchown(fsys.path("l"), 7, 8)
    assert (os.lstat(fsys.path("l")).st_uid, os.lstat(fsys.path("l")).st_gid) == (7, 8)
    assert os.stat(fsys.path("l")).st_uid == 1234
    # chown of a setuid executable drops the setuid bit
    os.chmod(p, 0o4755)
    os.chown(p, 99, 99)
    assert stat.S_IMODE(os.stat(p).st_mode) & stat.S_ISUID == 0
    fsys.remount()
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (99, 99)
    assert os.lstat(fsys.path("l")).st_uid == 7


def test_utimens_nanoseconds(fsys):
    p = fsys.path("f")
    write_file(p, b"x")
    times = (1_234_567_890_123_456_789, 1_600_000_000_987_654_321)
    os.utime(p, ns=times)
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == times
    # pre-epoch and sub-second values
    os.utime(p, ns=(5, 999_999_999))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 999_999_999)
    os.mkdir(fsys.path("d"))
    os.utime(fsys.path("d"), ns=times)
    # utime(None) = now
    before = time.time_ns()
    os.utime(p)
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 2_000_000_000
    assert st.st_mtime_ns <= time.time_ns() + 2_000_000_000
    os.utime(p, ns=times)
    fsys.remount()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == times
    st = os.stat(fsys.path("d"))
    assert (st.st_atime_ns, st.st_mtime_ns) == times


def test_mtime_ctime_move_on_write_and_chmod(fsys):
    p = fsys.path("f")
    write_file(p, b"x")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    c0 = os.stat(p).st_ctime_ns
    time.sleep(0.02)
    with open(p, "ab") as f:
        f.write(b"y")
    st = os.stat(p)
    assert st.st_mtime_ns > 1_000_000_000
    assert st.st_ctime_ns >= c0
    c1 = st.st_ctime_ns
    time.sleep(0.02)
    os.chmod(p, 0o600)
    assert os.stat(p).st_ctime_ns > c1
    # creating an entry moves the parent dir's mtime
    os.utime(fsys.root, ns=(1_000_000_000, 1_000_000_000))
    write_file(fsys.path("g"), b"")
    assert os.stat(fsys.root).st_mtime_ns > 1_000_000_000


# ---------------------------------------------------------------------------- permissions


def _nobody_checks():
    """Runs as uid/gid NOBODY with cwd = the test directory on the mount."""
    out = {}

    def attempt(name, fn, *args):
        try:
            fn(*args)
            out[name] = 0
        except OSError as e:
            out[name] = e.errno

    def read(p):
        with open(p, "rb") as f:
            return f.read()

    def write(p):
        with open(p, "ab") as f:
            f.write(b"w")

    out["public_content"] = read("public")
    attempt("read_public", read, "public")
    attempt("read_private", read, "private")
    attempt("write_public", write, "public")
    attempt("write_own", write, "open/mine")
    attempt("create_in_closed", write, "closed/new")
    attempt("create_in_open", write, "open/new")
    attempt("list_closed", os.listdir, "closed")
    attempt("stat_in_noexec", os.stat, "noexec/inner")
    attempt("list_noexec", os.listdir, "noexec")
    attempt("unlink_in_closed", os.unlink, "closed/file")
    attempt("sticky_unlink_other", os.unlink, "sticky/roots")
    attempt("sticky_unlink_own", os.unlink, "sticky/nobodys")
    attempt("chmod_not_owner", os.chmod, "public", 0o777)
    attempt("chmod_owner", os.chmod, "open/mine", 0o600)
    attempt("chown_to_root", os.chown, "open/mine", 0, 0)
    attempt("utime_not_owner", os.utime, "public", (1, 1))
    attempt("utime_now_not_owner_writable", os.utime, "writable", None)
    attempt("exec_script", lambda p: subprocess.run([p], check=True), "./script")
    attempt("exec_own_script", lambda p: subprocess.run([p], check=True), "open/run")
    return out


def test_permissions_as_non_root(fsys):
    base = fsys.path("perm")
    os.mkdir(base, 0o755)
    j = lambda *p: os.path.join(base, *p)  # noqa: E731
    write_file(j("public"), b"public data")
    os.chmod(j("public"), 0o644)
    write_file(j("private"), b"secret")
    os.chmod(j("private"), 0o600)
    write_file(j("writable"), b"")
    os.chmod(j("writable"), 0o666)
    os.mkdir(j("closed"), 0o755)
    write_file(j("closed", "file"), b"")
    os.mkdir(j("open"))
    os.chmod(j("open"), 0o777)     # chmod: mkdir's mode is filtered by the umask
    write_file(j("open", "mine"), b"")
    os.chown(j("open", "mine"), NOBODY, NOBODY)
    os.mkdir(j("noexec"), 0o644)
    write_file(j("noexec", "inner"), b"")
    os.mkdir(j("sticky"))
    os.chmod(j("sticky"), 0o1777)
    write_file(j("sticky", "roots"), b"")
    os.chmod(j("sticky", "roots"), 0o666)
    write_file(j("sticky", "nobodys"), b"")
    os.chown(j("sticky", "nobodys"), NOBODY, NOBODY)
    write_file(j("script"), b"#!/bin/sh\n")
    os.chmod(j("script"), 0o744)   # exec for owner (root) only
    write_file(j("open", "run"), b"#!/bin/sh\nexit 0\n")
    os.chmod(j("open", "run"), 0o755)

    r = run_as(NOBODY, NOBODY, base, _nobody_checks)

    # what nobody may do (proves the mount is reachable at all as that user) ...
    assert r["public_content"] == b"public data"
    assert r["read_public"] == 0
    assert r["write_own"] == 0
    assert r["create_in_open"] == 0
    assert r["list_closed"] == 0
    assert r["sticky_unlink_own"] == 0
    assert r["chmod_owner"] == 0
    assert r["utime_now_not_owner_writable"] == 0
    # ... and what it may not
    assert r["read_private"] == errno.EACCES
    assert r["write_public"] == errno.EACCES
    assert r["create_in_closed"] == errno.EACCES
    assert r["unlink_in_closed"] == errno.EACCES
    assert r["stat_in_noexec"] == errno.EACCES
    assert r["list_noexec"] == 0        # r without x: names readable, entries not
    assert r["sticky_unlink_other"] in (errno.EPERM, errno.EACCES)
    assert r["chmod_not_owner"] == errno.EPERM
    assert r["chown_to_root"] == errno.EPERM
    assert r["utime_not_owner"] == errno.EPERM
    assert r["exec_script"] == errno.EACCES
    assert r["exec_own_script"] == 0
    # the effects are real
    assert os.stat(j("open", "new")).st_uid == NOBODY
    assert os.stat(j("open", "new")).st_gid == NOBODY
    assert stat.S_IMODE(os.stat(j("open", "mine")).st_mode) == 0o600
    assert os.path.exists(j("sticky", "roots"))
    assert not os.path.exists(j("sticky", "nobodys"))
    assert os.path.exists(j("closed", "file"))


def _group_checks():
    def read(p):
        with open(p, "rb") as f:
            return f.read()
    try:
        return read("grp")
    except OSError as e:
        return e.errno


def test_group_permission(fsys):
    base = fsys.path("g")
    os.mkdir(base, 0o755)
    p = os.path.join(base, "grp")
    write_file(p, b"group readable")
    os.chown(p, 0, OTHER)
    os.chmod(p, 0o640)
    assert run_as(NOBODY, OTHER, base, _group_checks) == b"group readable"
    assert run_as(NOBODY, NOBODY, base, _group_checks) == errno.EACCES


def test_root_bypasses_modes(fsys):
    p = fsys.path("f")
    write_file(p, b"data")
    os.chmod(p, 0o000)
    with open(p, "rb") as f:
        assert f.read() == b"data"


# ---------------------------------------------------------------------------- xattrs


@pytest.mark.parametrize("ns", ["user", "trusted", "security"])
def test_xattrs(fsys, ns):
    p = fsys.path("f")
    write_file(p, b"")
    name = f"{ns}.test"
    os.setxattr(p, name, b"value-1")
    assert os.getxattr(p, name) == b"value-1"
    assert name in os.listxattr(p)
    os.setxattr(p, name, b"\x00binary\xff" * 10)                 # replace
    assert os.getxattr(p, name) == b"\x00binary\xff" * 10
    os.setxattr(p, f"{ns}.empty", b"")
    assert os.getxattr(p, f"{ns}.empty") == b""
    big = bytes(range(256)) * 12                                   # 3 KiB value
    os.setxattr(p, f"{ns}.big", big)
    assert os.getxattr(p, f"{ns}.big") == big
    assert errno_of(os.setxattr, p, name, b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, p, f"{ns}.nope", b"x", os.XATTR_REPLACE) == errno.ENODATA
    assert errno_of(os.getxattr, p, f"{ns}.nope") == errno.ENODATA
    assert errno_of(os.removexattr, p, f"{ns}.nope") == errno.ENODATA
    fsys.remount()
    assert os.getxattr(p, f"{ns}.big") == big
    assert {name, f"{ns}.empty", f"{ns}.big"} <= set(os.listxattr(p))
    os.removexattr(p, name)
    assert errno_of(os.getxattr, p, name) == errno.ENODATA
    assert name not in os.listxattr(p)


def test_xattrs_on_dirs_and_many(fsys):
    d = fsys.path("d")
    os.mkdir(d)
    for i in range(50):
        os.setxattr(d, f"user.k{i:03d}", f"v{i}".encode())
    names = set(os.listxattr(d))
    assert {f"user.k{i:03d}" for i in range(50)} <= names
    assert os.getxattr(d, "user.k049") == b"v49"
    assert errno_of(os.getxattr, fsys.path("missing"), "user.x") == errno.ENOENT
    too_long = "user." + "n" * 251
    assert errno_of(os.setxattr, d, too_long, b"v") == errno.ERANGE


def _nobody_xattr():
    out = {}
    try:
        os.setxattr("f", "user.x", b"v")
        out["user_set_other"] = 0
    except OSError as e:
        out["user_set_other"] = e.errno
    try:
        out["trusted_list"] = [n for n in os.listxattr("f") if n.startswith("trusted.")]
    except OSError as e:
        out["trusted_list"] = e.errno
    try:
        out["user_get"] = os.getxattr("f", "user.shared")
    except OSError as e:
        out["user_get"] = e.errno
    return out


def test_xattr_permissions(fsys):
    d = fsys.path("x")
    os.mkdir(d, 0o755)
    p = os.path.join(d, "f")
    write_file(p, b"")
    os.chmod(p, 0o644)
    os.setxattr(p, "trusted.hidden", b"t")
    os.setxattr(p, "user.shared", b"s")
    r = run_as(NOBODY, NOBODY, d, _nobody_xattr)
    assert r["user_get"] == b"s"
    assert r["user_set_other"] == errno.EACCES
    assert r["trusted_list"] == []      # trusted.* is invisible to unprivileged users


# ---------------------------------------------------------------------------- statfs


@pytest.mark.device_size(256 << 20)
def test_statfs_reflects_usage(fsys):
    def free() -> int:
        s = os.statvfs(fsys.root)
        return s.f_bfree * s.f_frsize

    s = os.statvfs(fsys.root)
    assert s.f_frsize > 0 and s.f_blocks * s.f_frsize <= 256 << 20
    assert s.f_blocks * s.f_frsize >= 128 << 20
    assert s.f_bavail <= s.f_bfree <= s.f_blocks
    assert s.f_namemax == 255
    assert s.f_files > 0 and s.f_ffree <= s.f_files
    free0 = free()
    files0 = os.statvfs(fsys.root).f_ffree
    size = 64 << 20
    with open(fsys.path("big"), "wb") as f:
        f.writelines(os.urandom(1 << 20) for _ in range(size >> 20))
        f.flush()
        os.fsync(f.fileno())
    free1 = free()
    assert free0 - free1 >= size * 0.98, (free0, free1)
    assert free0 - free1 <= size * 1.1, (free0, free1)
    assert os.statvfs(fsys.root).f_ffree < files0
    fsys.remount()          # the figures come from the disk, not from memory
    assert abs(free() - free1) <= size * 0.02
    os.unlink(fsys.path("big"))
    os.sync()
    deadline = time.monotonic() + 10
    while free() < free0 - (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.1)    # some filesystems release freed blocks asynchronously
    assert abs(free() - free0) <= 1 << 20, (free0, free())
