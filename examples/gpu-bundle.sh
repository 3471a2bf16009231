#!/usr/bin/env bash
# Make an OCI bundle at DIR that runs PROGRAM [ARGS...] (a CUDA program, e.g. gpu-counter from
# examples/gpu-counter.cu) with the host's NVIDIA GPU, the way the NVIDIA container toolkit
# sets a container up:
#   - the device nodes /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools,
#     /dev/nvidia-modeset and /dev/nvidia<N> that exist on the host, with the host's
#     major/minor numbers, and a device cgroup rule allowing each (not /dev/nvidia-caps: MIG
#     only, which cuda-checkpoint does not support);
#   - the driver's user-space libraries bind-mounted read-only at /usr/local/nvidia/lib64 (the
#     whole directory when the host keeps them in one of their own, e.g. /usr/local/nvidia/lib64;
#     else each libcuda*/libnvidia-* file), on LD_LIBRARY_PATH;
#   - a rootfs holding PROGRAM and the shared libraries it (and libcuda) loads, copied from the
#     host, plus busybox when there is one (for `cryo exec … sh`).
# No network namespace: the container shares the host's network, so nothing (no `ip`) has to
# set one up. The spec's /sys/fs/cgroup mount is kept unless --no-cgroup-mount is given;
# --env KEY=VALUE (repeatable) adds to the process's environment.
#
# Usage: examples/gpu-bundle.sh [--no-cgroup-mount] [--env KEY=VALUE]... DIR PROGRAM [ARGS...]
# Environment:
#   CRYO            the cryo binary that writes the base spec (default: target/debug/cryo)
#   NVIDIA_DEV_DIR  where the device nodes are (default /dev)
#   NVIDIA_LIB_DIR  where the driver's libraries are (default: /usr/local/nvidia/lib64 if it
#                   exists, else the directory of libcuda.so.1 in ldconfig's cache)
#   BUSYBOX         a static busybox to add (default /bin/busybox, skipped if absent)
set -euo pipefail

cgroup_mount=1
extra_env=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-cgroup-mount) cgroup_mount=0 ;;
    --env) extra_env+=("${2:?--env needs KEY=VALUE}"); shift ;;
    *) break ;;
  esac
  shift
done
if [ $# -lt 2 ]; then
  echo "usage: $0 [--no-cgroup-mount] [--env KEY=VALUE]... DIR PROGRAM [ARGS...]" >&2
  exit 2
fi
dir=$1
program=$2
shift 2
cryo=${CRYO:-$(dirname "$0")/../target/debug/cryo}
dev_dir=${NVIDIA_DEV_DIR:-/dev}
busybox=${BUSYBOX:-/bin/busybox}
die() {
  echo "gpu-bundle: $*" >&2
  exit 1
}

[ -f "$program" ] || die "$program: no such program"
lib_dir=${NVIDIA_LIB_DIR:-}
if [ -z "$lib_dir" ]; then
  if [ -d /usr/local/nvidia/lib64 ]; then
    lib_dir=/usr/local/nvidia/lib64
  else
    libcuda=$(ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so.1" && /x86-64/ {print $NF; exit}')
    [ -n "$libcuda" ] || die "no NVIDIA driver libraries: /usr/local/nvidia/lib64 is missing and ldconfig knows no libcuda.so.1 (set NVIDIA_LIB_DIR)"
    lib_dir=$(dirname "$(readlink -f "$libcuda")")
  fi
fi
[ -e "$lib_dir/libcuda.so.1" ] || die "$lib_dir has no libcuda.so.1 (set NVIDIA_LIB_DIR to the driver's library directory)"

# --- device nodes: "path type major minor" lines, major/minor as the host has them
devices=()
for node in "$dev_dir"/nvidiactl "$dev_dir"/nvidia-uvm "$dev_dir"/nvidia-uvm-tools \
  "$dev_dir"/nvidia-modeset "$dev_dir"/nvidia[0-9]*; do
  [ -c "$node" ] || continue
  devices+=("/dev/${node#"$dev_dir"/} $(stat -c '%t %T' "$node")")
done
have() { printf '%s\n' "${devices[@]}" | grep -q "^/dev/$1 "; }
have nvidiactl || die "no $dev_dir/nvidiactl: is the NVIDIA driver loaded?"
have nvidia-uvm || die "no $dev_dir/nvidia-uvm: load nvidia_uvm (CUDA needs it)"
printf '%s\n' "${devices[@]}" | grep -q '^/dev/nvidia[0-9]' || die "no $dev_dir/nvidia<N>: no GPU device node"

# --- rootfs: the program and every library the loader will want, at the host's paths
rootfs=$dir/rootfs
mkdir -p "$rootfs"/{app,proc,sys,dev,tmp,etc,root,usr/local/nvidia/lib64}
chmod 1777 "$rootfs/tmp"
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"
app=/app/$(basename "$program")
cp -L "$program" "$rootfs$app"
chmod 0755 "$rootfs$app"
# libcuda is loaded at run time (the CUDA runtime opens it): its own dependencies count too.
# The driver's libraries themselves come from the mount, never from a copy.
lib_deps() { ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'; }
for lib in $( (lib_deps "$program"; lib_deps "$lib_dir/libcuda.so.1") | sort -u); do
  case $(basename "$lib") in libcuda.so* | libnvidia-*) continue ;; esac
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
if [ -x "$busybox" ]; then
  mkdir -p "$rootfs/bin"
  cp "$busybox" "$rootfs/bin/busybox"
  chroot "$rootfs" /bin/busybox --install -s /bin
fi

# --- the driver's libraries: the directory, or each file when they share a system directory
mounts=()
if [ "$(basename "$(dirname "$lib_dir")")/$(basename "$lib_dir")" = nvidia/lib64 ]; then
  mounts+=("$lib_dir /usr/local/nvidia/lib64")
else
  for f in "$lib_dir"/libcuda.so* "$lib_dir"/libcudadebugger.so* "$lib_dir"/libnvidia-*.so*; do
    [ -e "$f" ] || continue
    : >"$rootfs/usr/local/nvidia/lib64/$(basename "$f")"
    mounts+=("$(readlink -f "$f") /usr/local/nvidia/lib64/$(basename "$f")")
  done
fi

rm -f "$dir/config.json"
"$cryo" spec --bundle "$dir"
python3 - "$dir/config.json" "$cgroup_mount" "$app" "$@" <<'PY' 3<<<"$(printf '%s\n' "${devices[@]}")" 4<<<"$(printf '%s\n' "${mounts[@]}")" 5<<<"$(printf '%s\n' "${extra_env[@]}")"
import json, os, sys

path, cgroup_mount, args = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
devices = [l.split() for l in os.fdopen(3).read().splitlines() if l.strip()]
mounts = [l.split() for l in os.fdopen(4).read().splitlines() if l.strip()]
extra_env = [l for l in os.fdopen(5).read().splitlines() if l.strip()]
c = json.load(open(path))
p = c["process"]
p["terminal"] = False
p["args"] = args
p["env"] = [e for e in p.get("env", []) if not e.startswith("LD_LIBRARY_PATH=")] + [
    "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib64:/usr/lib64",
] + extra_env
c["root"]["readonly"] = False
linux = c["linux"]
linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "network"]
if not cgroup_mount:
    c["mounts"] = [m for m in c["mounts"] if m["destination"] != "/sys/fs/cgroup"]
linux["devices"] = [
    {"path": d, "type": "c", "major": int(ma, 16), "minor": int(mi, 16),
     "fileMode": 0o666, "uid": 0, "gid": 0}
    for d, ma, mi in devices
]
rules = linux.setdefault("resources", {}).setdefault("devices", [])
rules += [
    {"allow": True, "type": "c", "major": int(ma, 16), "minor": int(mi, 16), "access": "rwm"}
    for _, ma, mi in devices
]
c["mounts"] += [
    {"destination": dst, "type": "bind", "source": src,
     "options": ["rbind", "ro", "nosuid", "nodev"]}
    for src, dst in mounts
]
json.dump(c, open(path, "w"), indent=2)
PY
echo "$dir"
