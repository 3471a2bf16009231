#!/usr/bin/env bash
# containerd + ctr flows against RUNTIME (selected per container with `ctr run --runc-binary`).
# Needs the containerd of `scripts/e2e-clients start`. Usage: containerd.sh [--list | FLOW...]
# shellcheck source=tests/clients/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENT=containerd
FLOWS=(run checkpoint-restore restore-new-id task-checkpoint-exit)
NS=default
CKPT_REPO=localhost/${NAME_PREFIX}ckpt

c_() { tlimit ctr --address "$CONTAINERD_SOCK" -n "$NS" "$@"; }
exec_in() {
  local n=$1
  shift
  c_ tasks exec --exec-id "e2e-$$-$RANDOM" "$n" "$@"
}
task_status() {  # NAME -> RUNNING/STOPPED/PAUSED/... or nothing
  c_ tasks ls 2>/dev/null | awk -v n="$1" '$1 == n { print $3 }'
}
is_status() { [ "$(task_status "$1")" = "$2" ]; }
bundle_of() { echo "/run/containerd/io.containerd.runtime.v2.task/$NS/$1"; }

preflight() {
  tlimit ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1 \
    || { echo "containerd does not answer on $CONTAINERD_SOCK: run scripts/e2e-clients start"; return 1; }
  c_ images ls -q | grep -qxF "$E2E_IMAGE" || { echo "containerd has no $E2E_IMAGE: run scripts/e2e-clients images"; return 1; }
}

# Kill and remove a container and its task (best effort, time-limited).
remove_container() {
  local n=$1 i
  if [ -n "$(task_status "$n")" ]; then
    quiet c_ tasks kill -s SIGKILL "$n"
    for ((i = 0; i < 50; i++)); do
      [ "$(task_status "$n")" = RUNNING ] || break
      sleep 0.2
    done
    quiet c_ tasks rm -f "$n"
  fi
  quiet c_ containers rm "$n"
}

cleanup_client() {
  local n d
  # First what the task-checkpoint-exit flow restored with the runtime itself (outside containerd).
  if [ -n "${WORK:-}" ] && [ -d "$WORK/runtime-root" ]; then
    for d in "$WORK/runtime-root"/*/; do
      [ -d "$d" ] || continue
      n=$(basename "$d")
      quiet "$RUNTIME" --root "$WORK/runtime-root" delete --force "$n"
    done
  fi
  for n in $(c_ containers ls -q 2>/dev/null | grep "^$NAME_PREFIX" || true); do remove_container "$n"; done
  for n in $(c_ images ls -q 2>/dev/null | grep "^$CKPT_REPO/" || true); do quiet c_ images rm --sync "$n"; done
}

start_counter() {  # NAME
  # ctr run -d copies the first output lines to its own stdout before it detaches: keep them out of the log
  # ctr asks for cpu shares (1024) unless told 0: a host without the cpu controller has none.
  local shares=()
  e2e_cgroup_controller cpu || shares=(--cpu-shares 0)
  must c_ run -d --runc-binary "$RUNTIME" "${shares[@]}" "$E2E_IMAGE" "$1" sh -c "$COUNTER_SCRIPT" >/dev/null
  wait_for 20 "task $1 is RUNNING" is_status "$1" RUNNING
}

# The runtime containerd recorded for a container: the shim's options carry BinaryName.
assert_binary_name() {
  local n=$1 opts
  opts=$(out c_ containers info "$n" | python3 -c 'import base64, json, sys
print(base64.b64decode(json.load(sys.stdin)["Runtime"]["Options"]["value"]).decode("latin-1"))')
  [[ $opts == *"$RUNTIME"* ]] || fail "container $n does not record BinaryName $RUNTIME (options: $opts)"
  log "ok: $n runs with BinaryName $RUNTIME"
}

flow_run() {
  local c=${NAME_PREFIX}ctr-run
  start_counter "$c"
  assert_binary_name "$c"
  wait_for 20 "counter of $c reaches 3" counter_ge "$c" 3
  assert_exec_works "$c" "ctr tasks"
  must c_ tasks pause "$c"
  assert_eq PAUSED "$(task_status "$c")" "task status after pause"
  must c_ tasks resume "$c"
  assert_eq RUNNING "$(task_status "$c")" "task status after resume"
  counter_advancing "$c"
  must c_ tasks kill -s SIGKILL "$c"
  wait_for 10 "task $c is STOPPED" is_status "$c" STOPPED
  must c_ tasks rm "$c"
  must c_ containers rm "$c"
  if c_ containers ls -q | grep -qxF "$c"; then fail "$c still listed after ctr containers rm"; fi
  log "ok: $c removed"
}

# assert_has_criu REF: the checkpoint image's index holds the CRIU layer (ctr 1.6 can write one
# without it and still exit 0).
assert_has_criu() {
  local ref=$1 digest types
  digest=$(c_ images ls | awk -v r="$ref" '$1 == r { print $3 }')
  [ -n "$digest" ] || fail "no digest for image $ref"
  types=$(out c_ content get "$digest" | python3 -c 'import json, sys
print(" ".join(m["mediaType"] for m in json.load(sys.stdin).get("manifests", [])))')
  [[ " $types " == *" application/vnd.containerd.container.criu.checkpoint.criu.tar "* ]] \
    || fail "checkpoint image $ref has no CRIU data (index holds: $types)"
  log "ok: checkpoint image $ref holds the CRIU layer"
}

# checkpoint NAME REF: `ctr c checkpoint --task --rw`; the task keeps running (containerd pauses,
# checkpoints with --leave-running, resumes). Works around the ctr 1.6 bug that makes a second
# checkpoint of a container silently lose the CRIU data: earlier checkpoint images of NAME go first.
checkpoint() {
  local n=$1 ref=$2 old
  for old in $(c_ images ls -q | grep "^$CKPT_REPO/$n:" || true); do
    must c_ images rm --sync "$old"
  done
  must c_ containers checkpoint --task --rw "$n" "$ref"
  c_ images ls -q | grep -qxF "$ref" || fail "no checkpoint image $ref after ctr containers checkpoint"
  assert_has_criu "$ref"
  assert_eq RUNNING "$(task_status "$n")" "task status of $n after ctr containers checkpoint --task"
}

restore() {  # NAME REF
  must c_ containers restore --live --rw "$1" "$2" >/dev/null
  wait_for 20 "restored task $1 is RUNNING" is_status "$1" RUNNING
}

flow_checkpoint_restore() {
  local c=${NAME_PREFIX}ctr-cr before
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  checkpoint "$c" "$CKPT_REPO/$c:1"
  counter_advancing "$c"
  remove_container "$c"
  restore "$c" "$CKPT_REPO/$c:1"
  assert_counter_continues "$c" "$before"
  assert_fs_changes "$c"
  # A second checkpoint of the same (restored) container, restored again under the same id.
  before=$(counter_at_checkpoint "$c")
  checkpoint "$c" "$CKPT_REPO/$c:2"
  remove_container "$c"
  restore "$c" "$CKPT_REPO/$c:2"
  assert_counter_continues "$c" "$before"
  assert_fs_changes "$c"
}

flow_restore_new_id() {
  local c=${NAME_PREFIX}ctr-orig c2=${NAME_PREFIX}ctr-new before
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  checkpoint "$c" "$CKPT_REPO/$c:1"
  # The checkpoint keeps the original's cgroup path: the original goes first, or both would share it.
  remove_container "$c"
  restore "$c2" "$CKPT_REPO/$c:1"
  assert_binary_name "$c2"
  assert_counter_continues "$c2" "$before"
  assert_fs_changes "$c2"
}

# file_counter FILE: the counter the workload keeps in FILE (seen from the host), retried while
# the file is caught between truncation and write.
file_counter() {
  local v _
  for _ in 1 2 3 4 5; do
    v=$(tr -d '[:space:]' <"$1" 2>/dev/null) || true
    if [[ $v =~ ^[0-9]+$ ]]; then echo "$v"; return 0; fi
    sleep 0.05
  done
  return 1
}

# `ctr t checkpoint --exit` writes plain CRIU images to --image-path and stops the task. ctr 1.6
# cannot restore them (no `ctr run --checkpoint`; `ctr c restore` only takes `ctr c checkpoint`
# images), so the image is restored with the runtime itself in the stopped task's bundle.
flow_task_checkpoint_exit() {
  local c=${NAME_PREFIX}ctr-exit before bundle count_file f v r
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  must c_ tasks checkpoint --exit --image-path "$WORK/img" --work-path "$WORK/work" "$c"
  wait_for 10 "task $c is STOPPED after checkpoint --exit" is_status "$c" STOPPED
  for f in inventory.img pstree.img descriptors.json; do
    [ -s "$WORK/img/$f" ] || fail "checkpoint --exit wrote no $f into --image-path"
  done
  [ -s "$WORK/work/dump.log" ] || fail "no dump.log in --work-path"
  log "ok: CRIU image and dump.log written"
  bundle=$(bundle_of "$c")
  count_file=$bundle/rootfs/tmp/count
  v=$(cat "$count_file")
  sleep 1
  assert_eq "$v" "$(cat "$count_file")" "counter file of the stopped task (must not move)"

  # Restore with the runtime: stdout/stderr must be pipes (descriptors.json holds pipes).
  mkdir -p "$WORK/runtime-root"
  log "+ $RUNTIME --root $WORK/runtime-root restore --detach --image-path $WORK/img --work-path $WORK/rwork --bundle $bundle ${c}-r"
  r=0
  tlimit "$RUNTIME" --root "$WORK/runtime-root" restore --detach --image-path "$WORK/img" \
    --work-path "$WORK/rwork" --bundle "$bundle" "${c}-r" </dev/null > >(exec cat >"$WORK/restored.out") 2>&1 || r=$?
  [ "$r" -eq 0 ] || fail "$RUNTIME restore of the ctr t checkpoint --exit image $(rc_text "$r")"
  assert_continues file_counter "$count_file" "$before" "counter in $count_file"
  quiet "$RUNTIME" --root "$WORK/runtime-root" delete --force "${c}-r"
}

# Sourced by cryo-shim.sh for the helpers above: run only when executed.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then client_main "$@"; fi
