#!/usr/bin/env bash
# The main job, end to end on this machine (run as root):
#   1. install clusterfs and its system dependencies;
#   2. a 3-node cluster on one 2 GiB loop device (tools/devcluster: mkfs --cluster, the
#      config and key, three `clusterfs mount --config` processes on 127.0.0.1);
#   3. real work on all three at once: writers on nodes 1 and 2 (a source tree, a
#      256 MiB fsync'd file, tools/stress in each node's own directory), a reader on
#      node 3 verifying what they wrote as they go;
#   4. every node sees the same tree (one digest per node);
#   5. kill -9 of node 2: the survivors recover its journal and read everything it
#      had fsync'd; node 2 restarts and rejoins;
#   6. down (unmount all, stop, detach) with fsck, and a summary with figures.
# Everything it makes lives under one temp dir and is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash tools/install.sh

work=$(mktemp -d /tmp/clusterfs-demo.XXXXXX)
dc="$work/cluster"
cleanup() {
    set +e
    [ -f "$dc/devcluster.json" ] && tools/devcluster down --dir "$dc" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
# check WHAT CMD...: run CMD; stop the demo with FAILED if it fails
check() {
    local what=$1; shift
    if "$@"; then echo "$what: ok"; else echo "FAILED: $what" >&2; exit 1; fi
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
n1="$dc/node1" n2="$dc/node2" n3="$dc/node3"

step "a 3-node cluster on one 2 GiB loop device"
t0=$(now)
tools/devcluster up --nodes 3 --dir "$dc" --size 2G
up_s=$(since "$t0")
tools/devcluster status --dir "$dc" > "$work/status.txt"
head -4 "$work/status.txt"

step "writers on nodes 1 and 2, a reader verifying on node 3, all at once"
src=$(python3 -c 'import os, trio; print(os.path.dirname(trio.__file__))')
(cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$work/tree.sums"
head -c 256M /dev/urandom > "$work/big.bin"
mkdir "$n1/shared"
t0=$(now)
( cp -a "$src" "$n1/shared/trio-src" && echo "node 1: source tree copied" ) &
w1=$!
( dd if="$work/big.bin" of="$n2/shared-big.bin" bs=1M conv=fsync status=none \
  && echo "node 2: 256 MiB written and fsync'd" ) &
w2=$!
stress() {   # stress NODE SEED: tools/stress in the node's own directory; its last lines
    ( set -o pipefail
      tools/stress run --dir "$dc/node$1" --seed "$2" --ops 1500 --private "work$1" \
          --log "$work/stress$1.log" --fsync-at-end --progress 10 2>&1 \
          | tail -2 | sed "s/^/node $1 stress: /" )
}
stress 1 11 &
s1=$!
stress 2 22 &
s2=$!
seen=0
while kill -0 "$w1" 2>/dev/null; do              # node 3 reads node 1's tree as it grows
    seen=$(find "$n3/shared" -type f 2>/dev/null | wc -l)
    sleep 1
done
check "node 1's copy" wait "$w1"
check "node 2's write" wait "$w2"
check "node 1's stress run" wait "$s1"
check "node 2's stress run" wait "$s2"
work_s=$(since "$t0")
echo "node 3 saw $seen files of the tree while it was being copied"
check "node 3 verifies node 1's source tree" \
    bash -c "cd '$n3/shared/trio-src' && sha256sum --quiet -c '$work/tree.sums'"
t0=$(now)
check "node 3 verifies node 2's 256 MiB file" cmp "$work/big.bin" "$n3/shared-big.bin"
read_s=$(since "$t0")
check "node 3 verifies node 1's fsync'd stress files" \
    tools/stress verify --log "$work/stress1.log" --root "$n3"
check "node 1 verifies node 2's fsync'd stress files" \
    tools/stress verify --log "$work/stress2.log" --root "$n1"

step "every node sees the same tree"
for n in 1 2 3; do
    tools/stress digest --dir "$dc/node$n" | tee "$work/digest$n" | sed "s/^/node $n: /"
done
check "one tree on all three nodes" \
    bash -c "cmp -s '$work/digest1' '$work/digest2' && cmp -s '$work/digest1' '$work/digest3'"

step "kill -9 of node 2 right after it fsync'd a file; the survivors go on"
head -c 8M /dev/urandom > "$work/last.bin"
dd if="$work/last.bin" of="$n2/last.bin" bs=1M conv=fsync status=none
t0=$(now)
tools/devcluster kill 2 --dir "$dc"
check "node 1 reads what node 2 fsync'd last" cmp "$work/last.bin" "$n1/last.bin"
serve_s=$(since "$t0")
echo "kill -9 to the survivors serving node 2's file again: ${serve_s} s"
grep -h "journal recovery done" "$dc/node1.log" "$dc/node3.log" | tail -2 | sed 's/^.*INFO /  /'
echo "after the kill" > "$n3/after-kill"
t0=$(now)
tools/devcluster start 2 --dir "$dc"
rejoin_s=$(since "$t0")
check "node 2 rejoined and reads what node 3 wrote meanwhile" grep -q "after the kill" "$n2/after-kill"
check "node 2 still has every file it fsync'd" \
    tools/stress verify --log "$work/stress2.log" --root "$n2"

step "down: unmount all, stop every node, fsck, detach"
check "down with a clean fsck" tools/devcluster down --dir "$dc" --fsck

step "summary"
python3 - "$up_s" "$work_s" "$read_s" "$serve_s" "$rejoin_s" <<'PY'
import sys
up, work, read, serve, rejoin = map(float, sys.argv[1:])
print(f"  3 nodes up (mkfs, config, mounts)          {up:6.2f} s")
print(f"  two writers + a reader at once             {work:6.2f} s")
print(f"  node 3 reads node 2's 256 MiB               {256 / read:6.0f} MiB/s")
print(f"  kill -9 of node 2 to survivors serving      {serve:6.2f} s (failure_timeout 3 s)")
print(f"  node 2 restarted and rejoined               {rejoin:6.2f} s")
PY
echo
echo "demo complete: three nodes on one device, one tree everywhere, nothing lost on kill -9"
