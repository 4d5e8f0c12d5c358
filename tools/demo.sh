#!/usr/bin/env bash
# The main job, end to end on this machine (run as root):
#   1. install clusterfs and its system dependencies;
#   2. a 3-node cluster on one 2 GiB loop device (tools/devcluster: mkfs --cluster, the
#      config and key, three `clusterfs mount --config` processes on 127.0.0.1);
#   3. real work on all three at once: writers on nodes 1 and 2 (a source tree, a
#      256 MiB fsync'd file, tools/stress in each node's own directory), a reader on
#      node 3 verifying what they wrote as they go;
#   4. every node sees the same tree (one digest per node);
#   5. tools/stress on all three nodes, kill -9 of node 2 in the middle of it: the
#      survivors recover its journal (times printed) and go on without an error; node 2
#      restarts and rejoins; every file any node fsync'd is there, one tree everywhere;
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

step "tools/stress on all three nodes; kill -9 of node 2 in the middle of it"
storm() {   # storm NODE: 30 s of tools/stress in the node's own directory, in the background
    tools/stress run --dir "$dc/node$1" --seed "$((100 + $1))" --duration 30 \
        --private "storm$1" --log "$work/storm$1.log" --progress 10 \
        > "$work/storm$1.out" 2>&1
}
durable() {  # on node 2: 64 KiB files, each fsync'd, its checksum noted only after that
    mkdir -p "$n2/durable"
    for i in $(seq 1 100000); do
        head -c 65536 /dev/urandom > "$work/dur.tmp"
        dd if="$work/dur.tmp" of="$n2/durable/f$i" bs=64k conv=fsync status=none \
            2>/dev/null || return 0
        echo "$(sha256sum < "$work/dur.tmp" | cut -d' ' -f1)  f$i" >> "$work/durable.sums"
    done
}
storm 1 & t1=$!
storm 2 & t2=$!
storm 3 & t3=$!
durable & d2=$!
sleep 10
head -c 8M /dev/urandom > "$work/last.bin"
dd if="$work/last.bin" of="$n2/last.bin" bs=1M conv=fsync status=none
echo "node 2 fsync'd 8 MiB in the middle of its stress run; kill -9 of node 2 now"
t0=$(now)
tools/devcluster kill 2 --dir "$dc"
check "node 1 reads what node 2 fsync'd last" cmp "$work/last.bin" "$n1/last.bin"
serve_s=$(since "$t0")
echo "kill -9 to the survivors serving node 2's file again: ${serve_s} s"
clusterfs status --control "$dc/control/node1.sock" --json > "$work/after-kill.json"
read -r rec_total rec_dlm rec_replay < <(python3 - "$work/after-kill.json" <<'PY'
import json, sys
rec = json.load(open(sys.argv[1]))["mount"]["last_recovery"] or {}
print(rec.get("total_s", 0), rec.get("dlm_wait_s", 0), rec.get("replay_s", 0))
PY
)
echo "  of which: journal recovery ${rec_total} s after the view change (fencing and DLM" \
     "recovery ${rec_dlm} s, replay ${rec_replay} s); the rest is detection (failure_timeout 3 s)"
wait "$d2" || true
check "node 1 reads all $(wc -l < "$work/durable.sums") files node 2 fsync'd one by one" \
    bash -c "cd '$n1/durable' && sha256sum --quiet -c '$work/durable.sums'"
check "node 1's stress run went on through the kill" wait "$t1"
check "node 3's stress run went on through the kill" wait "$t3"
wait "$t2" || true                                 # its node was killed under it
for n in 1 3; do tail -1 "$work/storm$n.out" | sed "s/^/node $n stress: /"; done
tail -1 "$work/storm2.out" | sed "s/^/node 2 stress (its node killed under it, so expected): /"
echo "after the kill" > "$n3/after-kill"
t0=$(now)
tools/devcluster start 2 --dir "$dc"
rejoin_s=$(since "$t0")
check "node 2 rejoined and reads what node 3 wrote meanwhile" grep -q "after the kill" "$n2/after-kill"
check "node 2 still has every file it fsync'd before its first run" \
    tools/stress verify --log "$work/stress2.log" --root "$n2"
check "node 2 has every file it fsync'd before it was killed" \
    tools/stress verify --log "$work/storm2.log" --root "$n2"
check "node 2 sees every file nodes 1 and 3 fsync'd meanwhile" \
    bash -c "tools/stress verify --log '$work/storm1.log' --root '$n2' &&
             tools/stress verify --log '$work/storm3.log' --root '$n2'"
for n in 1 2 3; do
    tools/stress digest --dir "$dc/node$n" > "$work/final$n"
done
check "one tree on all three nodes after the kill" \
    bash -c "cmp -s '$work/final1' '$work/final2' && cmp -s '$work/final1' '$work/final3'"

step "down: unmount all, stop every node, fsck, detach"
check "down with a clean fsck" tools/devcluster down --dir "$dc" --fsck

step "summary"
python3 - "$up_s" "$work_s" "$read_s" "$serve_s" "$rejoin_s" "$rec_total" <<'PY'
import sys
up, work, read, serve, rejoin, recovery = map(float, sys.argv[1:])
print(f"  3 nodes up (mkfs, config, mounts)          {up:6.2f} s")
print(f"  two writers + a reader at once             {work:6.2f} s")
print(f"  node 3 reads node 2's 256 MiB               {256 / read:6.0f} MiB/s")
print(f"  kill -9 of node 2 (under stress) to serving {serve:6.2f} s (failure_timeout 3 s;"
      f" journal recovery {recovery:.2f} s of it)")
print(f"  node 2 restarted and rejoined               {rejoin:6.2f} s")
PY
echo
echo "demo complete: three nodes on one device, one tree everywhere, nothing lost on kill -9 under stress"
