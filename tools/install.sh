#!/usr/bin/env bash
# Install clusterfs and everything it needs on Debian 12 (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc tgt libiscsi-dev iproute2 e2fsprogs xfsprogs; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Editable, so the compiled clusterfs._native lands inside the source tree: the tests (and
# tools/) import clusterfs from this checkout, which a plain install would leave without it.
python3 -m pip install -q --root-user-action=ignore -e ".[test]"
