#!/usr/bin/env bash
# Make an OCI bundle at DIR with a busybox-static rootfs running `sh -c SCRIPT`.
# Usage: examples/busybox-bundle.sh DIR 'SCRIPT'
# Uses the cryo on PATH (as installed by README's steps); CRYO=/path/to/cryo picks another.
set -euo pipefail
dir=$1; script=${2:-'echo hello from cryo'}
if [ -n "${CRYO:-}" ]; then
  cryo=$CRYO
elif ! cryo=$(command -v cryo); then
  echo "examples/busybox-bundle.sh: cryo is not on PATH: install it (see README), or set CRYO=/path/to/cryo" >&2
  exit 1
fi
mkdir -p "$dir/rootfs"/{bin,proc,sys,dev,tmp,etc,root}
cp /bin/busybox "$dir/rootfs/bin/"
chroot "$dir/rootfs" /bin/busybox --install -s /bin
echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/rootfs/etc/passwd"
echo 'root:x:0:' >"$dir/rootfs/etc/group"
chmod 1777 "$dir/rootfs/tmp"
rm -f "$dir/config.json"
"$cryo" spec --bundle "$dir"
python3 - "$dir/config.json" "$script" <<'PY'
import json, sys
path, script = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c", script]
c["root"]["readonly"] = False
json.dump(c, open(path, "w"), indent=2)
PY
echo "$dir"
