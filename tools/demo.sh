#!/usr/bin/env bash
# The main job, end to end on this machine (run as root):
#   1. install clusterfs and its system dependencies;
#   2. make a 2 GiB loop device, mkfs.clusterfs it, mount it, do real work on it
#      (a source tree copied in, a 256 MiB file written and fsync'd, renames,
#      hard links, a 20 000-entry directory), unmount, remount, verify every
#      byte, unmount, fsck;
#   3. start a 3-node lock service (clusterfs lockd) on 127.0.0.1, take locks,
#      kill -9 one node and show the survivors re-forming the view.
# Everything it makes lives under one temp dir and is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash tools/install.sh

work=$(mktemp -d /tmp/clusterfs-demo.XXXXXX)
loop=""
pids=()
cleanup() {
    set +e
    mountpoint -q "$work/mnt" && clusterfs umount "$work/mnt"
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    [ -n "$loop" ] && losetup -d "$loop"
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
# check WHAT CMD...: run CMD; stop the demo with FAILED if it fails (a bare `cmd && echo`
# would not stop a `set -e` script)
check() {
    local what=$1; shift
    if "$@"; then echo "$what: ok"; else echo "FAILED: $what" >&2; exit 1; fi
}

step "a 2 GiB loop device"
truncate -s 2G "$work/disk.img"
loop=$(losetup -f --show "$work/disk.img")
echo "$loop"

step "mkfs.clusterfs -j 3 $loop"
mkfs.clusterfs -j 3 "$loop"

mkdir -p "$work/mnt"
step "clusterfs mount $loop $work/mnt"
clusterfs mount "$loop" "$work/mnt"
df -h "$work/mnt"

step "real work: copy a source tree, a 256 MiB fsync'd file, renames, links, a big directory"
src=$(python3 -c 'import os, trio; print(os.path.dirname(trio.__file__))')
cp -a "$src" "$work/mnt/trio-src"
(cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$work/tree.sums"
head -c 256M /dev/urandom > "$work/big.bin"
dd if="$work/big.bin" of="$work/mnt/big.bin" bs=1M conv=fsync status=none
mkdir -p "$work/mnt/a/b/c"
mv "$work/mnt/trio-src" "$work/mnt/a/b/c/trio"
ln "$work/mnt/big.bin" "$work/mnt/a/big-link"
mkdir "$work/mnt/many"
python3 - "$work/mnt/many" <<'PY'
import os, sys, time
d = sys.argv[1]
t = time.monotonic()
for i in range(20000):
    os.close(os.open(f"{d}/f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
print(f"20000 creates in {time.monotonic() - t:.1f} s")
PY
df -h "$work/mnt"

step "unmount, remount, verify every byte"
clusterfs umount "$work/mnt"      # returns once the daemon has written back and exited
clusterfs mount "$loop" "$work/mnt"
tree_identical() { (cd "$work/mnt/a/b/c/trio" && sha256sum --quiet -c "$work/tree.sums"); }
check "source tree identical" tree_identical
check "big.bin identical" cmp "$work/big.bin" "$work/mnt/big.bin"
check "hard link count 2" test "$(stat -c %h "$work/mnt/big.bin")" = 2
check "many/ has 20000 entries" test "$(ls "$work/mnt/many" | wc -l)" = 20000
clusterfs umount "$work/mnt"

step "fsck.clusterfs $loop"
fsck.clusterfs "$loop"

step "a 3-node lock service on 127.0.0.1"
python3 tools/lockcluster.py --nodes 3 --kill 3
echo
echo "demo finished: all checks passed"
