#!/usr/bin/env bash
# docker flows against RUNTIME_NAME (a dockerd runtime: `--add-runtime NAME=PATH`, or dockerd's
# built-in runc). Needs the dockerd of `scripts/e2e-clients start`. Always /usr/bin/docker.
# Usage: docker.sh [--list | FLOW...]
# shellcheck source=tests/clients/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENT=docker
FLOWS=(run checkpoint-restore leave-running restore-new-container restore-new-container-fs restore-after-rm)

dk() { tlimit "$DOCKER" -H "unix://$DOCKER_SOCK" "$@"; }
exec_in() { local n=$1; shift; dk exec "$n" "$@"; }
state_of() { dk inspect --format '{{.State.Status}}' "$1" 2>/dev/null; }
is_state() { [ "$(state_of "$1")" = "$2" ]; }

# runc loses the filesystem changes when docker restores a checkpoint into a new container: the
# checkpoint holds no rootfs diff. That is the gap cryo fills; every other runtime must pass.
expect_restore_new_container_fs() { if is_runc; then echo fail; else echo pass; fi; }
expect_restore_after_rm() { expect_restore_new_container_fs; }

# start_checkpoint CK NAME: docker start --checkpoint, once more if dockerd fails on its own
# upload of the checkpoint to containerd's content store ("commit failed: content sha256:…:
# already exists", moby/moby#42900: a dockerd race, before any runtime is called).
start_checkpoint() {
  local err rc=0
  err=$(mktemp)
  run dk start --checkpoint "$1" "$2" 2>"$err" || rc=$?
  cat "$err" >&2
  if [ "$rc" -ne 0 ] && grep -q 'failed to upload checkpoint to containerd: .*already exists' "$err"; then
    log "dockerd's checkpoint upload race (moby/moby#42900): starting once more"
    rc=0
    run dk start --checkpoint "$1" "$2" || rc=$?
  fi
  rm -f "$err"
  [ "$rc" -eq 0 ] || fail "command $(rc_text "$rc"): dk start --checkpoint $1 $2"
}

preflight() {
  dk version >/dev/null 2>&1 || { echo "dockerd does not answer on $DOCKER_SOCK: run scripts/e2e-clients start"; return 1; }
  local runtimes
  # shellcheck disable=SC2016  # a Go template
  runtimes=$(dk info --format '{{range $k, $v := .Runtimes}}{{$k}} {{end}}')
  [[ " $runtimes " == *" $RUNTIME_NAME "* ]] \
    || { echo "dockerd has no runtime '$RUNTIME_NAME' (has: $runtimes): scripts/e2e-clients start $RUNTIME_NAME=$RUNTIME"; return 1; }
  [ "$(dk info --format '{{.ExperimentalBuild}}')" = true ] || { echo "dockerd runs without --experimental (no checkpoints)"; return 1; }
  dk image inspect "$E2E_IMAGE" >/dev/null 2>&1 || { echo "docker has no $E2E_IMAGE: run scripts/e2e-clients images"; return 1; }
}

cleanup_client() {
  local n
  for n in $(dk ps -a --format '{{.Names}}' 2>/dev/null | grep "^$NAME_PREFIX" || true); do
    quiet dk rm -f "$n"
  done
}

start_counter() {  # NAME
  must dk run -d --runtime "$RUNTIME_NAME" --name "$1" "$E2E_IMAGE" sh -c "$COUNTER_SCRIPT" >/dev/null
  wait_for 20 "$1 is running" is_state "$1" running
}

flow_run() {
  local c=${NAME_PREFIX}dk-run got
  start_counter "$c"
  assert_eq "$RUNTIME_NAME" "$(dk inspect --format '{{.HostConfig.Runtime}}' "$c")" "runtime of $c"
  wait_for 20 "counter of $c reaches 3" counter_ge "$c" 3
  assert_exec_works "$c" "docker"
  got=$(out dk logs "$c")
  got=${got%%$'\n'*}   # first line (no `| head`: with pipefail its SIGPIPE would fail the flow)
  assert_eq 1 "$got" "first line of docker logs"
  must dk stop -t 1 "$c"
  assert_eq exited "$(state_of "$c")" "state after docker stop"
  must dk rm "$c"
  if dk inspect "$c" >/dev/null 2>&1; then fail "$c still exists after docker rm"; fi
  log "ok: $c removed"
}

flow_checkpoint_restore() {
  local c=${NAME_PREFIX}dk-cr before
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  must dk checkpoint create "$c" ck1
  wait_for 10 "$c is exited after docker checkpoint create" is_state "$c" exited
  start_checkpoint ck1 "$c"
  assert_eq running "$(state_of "$c")" "state after docker start --checkpoint"
  assert_counter_continues "$c" "$before"
}

flow_leave_running() {
  local c=${NAME_PREFIX}dk-lr before
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  must dk checkpoint create --leave-running "$c" ck1
  assert_eq running "$(state_of "$c")" "state after checkpoint create --leave-running"
  counter_advancing "$c"
  # Let the live process move well past the checkpoint: a start that is not a restore would show.
  wait_for 20 "counter of $c passes $before + $COUNTER_MARGIN" counter_ge "$c" "$((before + COUNTER_MARGIN))"
  must dk stop -t 1 "$c"
  start_checkpoint ck1 "$c"
  assert_counter_continues "$c" "$before"
}

# new_container_restore ORIG NEW: checkpoint ORIG (with filesystem changes made first), restore the
# checkpoint into the new container NEW. dockerd 20.10 refuses `start --checkpoint-dir`, so the
# checkpoint is copied into NEW's own checkpoints folder. Prints the counter value at checkpoint.
new_container_restore() {
  local c=$1 c2=$2 before root id id2
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  must dk checkpoint create "$c" ck1 >&2
  wait_for 10 "$c is exited after docker checkpoint create" is_state "$c" exited
  must dk create --runtime "$RUNTIME_NAME" --name "$c2" "$E2E_IMAGE" sh -c "$COUNTER_SCRIPT" >/dev/null
  root=$(out dk info --format '{{.DockerRootDir}}')
  id=$(out dk inspect --format '{{.Id}}' "$c")
  id2=$(out dk inspect --format '{{.Id}}' "$c2")
  [ -d "$root/containers/$id/checkpoints/ck1" ] || fail "no checkpoint at $root/containers/$id/checkpoints/ck1"
  mkdir -p "$root/containers/$id2/checkpoints"
  log "+ cp -a $root/containers/$id/checkpoints/ck1 $root/containers/$id2/checkpoints/"
  cp -a "$root/containers/$id/checkpoints/ck1" "$root/containers/$id2/checkpoints/"
  start_checkpoint ck1 "$c2" >&2
  assert_eq running "$(state_of "$c2")" "state of $c2 after docker start --checkpoint"
  echo "$before"
}

flow_restore_new_container() {
  local c=${NAME_PREFIX}dk-orig c2=${NAME_PREFIX}dk-new before
  before=$(new_container_restore "$c" "$c2")
  assert_counter_continues "$c2" "$before"
}

flow_restore_new_container_fs() {
  local c=${NAME_PREFIX}dk-orig c2=${NAME_PREFIX}dk-new before
  before=$(new_container_restore "$c" "$c2")
  assert_counter_continues "$c2" "$before"
  assert_fs_changes "$c2"
}

# Issue 18 as a docker user meets it: the original container is removed before the new one is
# created, so ext4 may hand the new container's upper dir the old one's inode number (it did
# in about one run of four). Four rounds, each must carry the file changes over.
flow_restore_after_rm() {
  local round c c2 before root id id2 saved
  root=$(out dk info --format '{{.DockerRootDir}}')
  for round in 1 2 3 4; do
    c=${NAME_PREFIX}dk-rm$round c2=${NAME_PREFIX}dk-rm$round-new
    start_counter "$c"
    fs_change "$c"
    before=$(counter_at_checkpoint "$c")
    must dk checkpoint create "$c" ck1 >&2
    wait_for 10 "$c is exited after docker checkpoint create" is_state "$c" exited
    id=$(out dk inspect --format '{{.Id}}' "$c")
    saved=$(mktemp -d)
    cp -a "$root/containers/$id/checkpoints/ck1" "$saved/" || fail "cannot copy the checkpoint of $c"
    must dk rm "$c" >&2
    must dk create --runtime "$RUNTIME_NAME" --name "$c2" "$E2E_IMAGE" sh -c "$COUNTER_SCRIPT" >/dev/null
    id2=$(out dk inspect --format '{{.Id}}' "$c2")
    mkdir -p "$root/containers/$id2/checkpoints"
    cp -a "$saved/ck1" "$root/containers/$id2/checkpoints/"
    rm -rf "$saved"
    start_checkpoint ck1 "$c2" >&2
    assert_eq running "$(state_of "$c2")" "round $round: state of $c2 after docker start --checkpoint"
    assert_counter_continues "$c2" "$before"
    assert_fs_changes "$c2"
    must dk rm -f "$c2" >&2
  done
}

client_main "$@"
