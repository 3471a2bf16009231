#!/usr/bin/env bash
# containerd + ctr flows through cryo's own shim: `ctr run --runtime io.containerd.cryo.v1
# --runtime-config-path CONFIG`, the config naming RUNTIME (the cryo binary) as the binary the
# shim runs. Needs the containerd of `scripts/e2e-clients start` with containerd-shim-cryo-v1 in
# its bin dir (`scripts/e2e-clients shim PATH`). Usage: cryo-shim.sh [--list | FLOW...]
# The helpers (ctr wrapper, checkpoint/restore, cleanup) are containerd.sh's.
# shellcheck source=tests/clients/containerd.sh
. "$(dirname "${BASH_SOURCE[0]}")/containerd.sh"

CLIENT=cryo-shim
FLOWS=(lifecycle exit-status terminal oom shim-killed bad-config checkpoint-restore
  restore-new-id restore-without-rw task-checkpoint task-checkpoint-exit
  checkpoint-fails-keeps-running)
SHIM_RUNTIME=io.containerd.cryo.v1
SHIM_NAME=containerd-shim-cryo-v1

# The shim's config for this flow (its path is recorded with the container, and a checkpoint
# image carries it to the restore).
shim_config() {
  local f=$WORK/cryo-shim.toml
  if [ ! -f "$f" ]; then
    printf '# written by tests/clients/cryo-shim.sh\ncryo = "%s"\n' "$RUNTIME" >"$f"
  fi
  echo "$f"
}

run_args() { echo --runtime "$SHIM_RUNTIME" --runtime-config-path "$(shim_config)"; }

# tests' shim-task: task API calls ctr 1.6 cannot make, sent straight to a task's shim.
SHIM_TASK=$REPO_DIR/target/debug/shim-task

# The shim binary on the PATH of the running containerd (where containerd looks it up).
shim_on_containerd_path() {
  local pid dir path
  pid=$(cat "$E2E_DIR/containerd/containerd.pid" 2>/dev/null) || return 1
  path=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^PATH=//p')
  [ -n "$path" ] || return 1
  IFS=: read -r -a dirs <<<"$path"
  for dir in "${dirs[@]}"; do
    if [ -x "$dir/$SHIM_NAME" ]; then echo "$dir/$SHIM_NAME"; return 0; fi
  done
  return 1
}

preflight() {
  tlimit ctr --address "$CONTAINERD_SOCK" version >/dev/null 2>&1 \
    || { echo "containerd does not answer on $CONTAINERD_SOCK: run scripts/e2e-clients start"; return 1; }
  c_ images ls -q | grep -qxF "$E2E_IMAGE" || { echo "containerd has no $E2E_IMAGE: run scripts/e2e-clients images"; return 1; }
  shim_on_containerd_path >/dev/null \
    || { echo "$SHIM_NAME is not on the PATH of the running containerd: scripts/e2e-clients shim target/debug/$SHIM_NAME (containerd started by scripts/e2e-clients start looks in $E2E_DIR/bin)"; return 1; }
  command -v script >/dev/null || { echo "script (util-linux) is missing: the terminal flow needs it"; return 1; }
  [ -x "$SHIM_TASK" ] || { echo "$SHIM_TASK is missing: cargo build --workspace builds it"; return 1; }
}

start_counter() {  # NAME [SCRIPT]
  # shellcheck disable=SC2046  # run_args is a list of words
  must c_ run -d $(run_args) "$E2E_IMAGE" "$1" sh -c "${2:-$COUNTER_SCRIPT}" >/dev/null
  wait_for 20 "task $1 is RUNNING" is_status "$1" RUNNING
}

# The container records cryo's runtime and the shim's config (a restore reuses both).
assert_binary_name() {
  local n=$1 info
  info=$(out c_ containers info "$n")
  python3 -c 'import base64, json, sys
info = json.load(sys.stdin)
rt = info["Runtime"]
assert rt["Name"] == sys.argv[1], "runtime %r" % rt["Name"]
opts = base64.b64decode(rt["Options"]["value"]).decode("latin-1")
assert sys.argv[2] in opts, "options %r lack %s" % (opts, sys.argv[2])' "$SHIM_RUNTIME" "$(shim_config)" <<<"$info" \
    || fail "container $n does not run with $SHIM_RUNTIME and $(shim_config)"
  log "ok: $n runs with $SHIM_RUNTIME, config $(shim_config)"
}

init_pid() { c_ tasks ls | awk -v n="$1" '$1 == n { print $2 }'; }
pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# The exit status containerd reports when the task is deleted (ctr warns about non-zero ones).
deleted_exit_status() {  # NAME -> prints the status
  local err
  err=$(tlimit ctr --address "$CONTAINERD_SOCK" -n "$NS" tasks rm "$1" 2>&1 >/dev/null) \
    || fail "ctr tasks rm $1 failed: $err"
  if [[ $err =~ exit\ code\ ([0-9]+) ]]; then echo "${BASH_REMATCH[1]}"; else echo 0; fi
}

flow_lifecycle() {
  local c=${NAME_PREFIX}shim-life pid ps metrics sleeper
  start_counter "$c"
  assert_binary_name "$c"
  wait_for 20 "counter of $c reaches 3" counter_ge "$c" 3
  assert_exec_works "$c" "ctr tasks exec through the cryo shim"
  pid=$(init_pid "$c")
  assert_int "$pid" "init pid of $c"
  ps=$(out c_ tasks ps "$c")
  grep -qw "$pid" <<<"$ps" || fail "ctr tasks ps $c does not list the init $pid: $ps"
  log "ok: ctr tasks ps lists the init ($pid)"
  metrics=$(out c_ tasks metrics "$c")
  grep -Eq '^(memory\.usage_in_bytes|memory\.usage)[[:space:]]+[1-9]' <<<"$metrics" \
    || fail "ctr tasks metrics $c shows no memory usage: $metrics"
  grep -Eq '^pids\.current[[:space:]]+[1-9]' <<<"$metrics" || fail "ctr tasks metrics $c shows no pids: $metrics"
  log "ok: ctr tasks metrics reports memory and pids"
  # ctr 1.6 has no `tasks update`: the update goes to the shim as containerd forwards it.
  must "$SHIM_TASK" update --bundle "$(bundle_of "$c")" --id "$c" --memory-limit 67108864
  metrics=$(out c_ tasks metrics "$c")
  grep -Eq '^memory\.(limit_in_bytes|usage_limit)[[:space:]]+67108864[[:space:]]*$' <<<"$metrics" \
    || fail "an update to a 64 MiB memory limit did not reach the cgroup: $metrics"
  log "ok: update set the memory limit"
  # A detached exec: ctr tasks ps names it, kill --all ends it with the init.
  must c_ tasks exec -d --exec-id sleeper "$c" sleep 1000
  ps=$(out c_ tasks ps "$c")
  sleeper=$(awk '/sleeper/ { print $1 }' <<<"$ps")
  assert_int "$sleeper" "pid of the exec 'sleeper' in ctr tasks ps ($ps)"
  must c_ tasks pause "$c"
  assert_eq PAUSED "$(task_status "$c")" "task status after pause"
  must c_ tasks resume "$c"
  assert_eq RUNNING "$(task_status "$c")" "task status after resume"
  counter_advancing "$c"
  must c_ tasks kill --all -s SIGKILL "$c"
  wait_for 10 "task $c is STOPPED" is_status "$c" STOPPED
  wait_for 10 "the exec 'sleeper' (pid $sleeper) is gone too" pid_gone "$sleeper"
  assert_eq 137 "$(deleted_exit_status "$c")" "exit status of $c after SIGKILL"
  must c_ containers rm "$c"
  if c_ containers ls -q | grep -qxF "$c"; then fail "$c still listed after ctr containers rm"; fi
  [ ! -e "/run/containerd/io.containerd.runtime.v2.task/$NS/$c" ] || fail "the bundle of $c is still there"
  log "ok: $c removed"
}

flow_exit_status() {
  local c=${NAME_PREFIX}shim-exit3 rc=0
  # shellcheck disable=SC2046
  run c_ run --rm $(run_args) "$E2E_IMAGE" "$c" sh -c 'echo bye; exit 3' </dev/null >"$WORK/out" || rc=$?
  assert_eq 3 "$rc" "exit status of ctr run (task exits 3)"
  assert_eq bye "$(cat "$WORK/out")" "output of the task"
  # The same through an exec.
  c=${NAME_PREFIX}shim-exit-exec
  start_counter "$c"
  rc=0
  run exec_in "$c" sh -c 'exit 42' </dev/null || rc=$?
  assert_eq 42 "$rc" "exit status of an exec"
}

# ctr -t wants a terminal of its own: `script` gives it one.
in_pty() {  # CMD...: run CMD in a pty, its output on stdout and its status as ours
  local cmd
  cmd=$(printf '%q ' "$@")
  tlimit script -qefc "$cmd" /dev/null </dev/null
}

flow_terminal() {
  local c=${NAME_PREFIX}shim-tty rc=0 got
  # shellcheck disable=SC2046
  got=$(in_pty ctr --address "$CONTAINERD_SOCK" -n "$NS" run -t --rm $(run_args) "$E2E_IMAGE" "$c" \
    sh -c 'tty; exit 4') || rc=$?
  log "terminal output: $(tr -d '\r' <<<"$got" | tr '\n' ' ')"
  assert_eq 4 "$rc" "exit status of ctr run -t"
  # (the pty echoes ctr's stdin, /dev/null, as "^@" before the output: with runc's shim too)
  grep -q '/dev/pts/[0-9]' <<<"$got" || fail "the task had no terminal (tty said: $got)"
  c=${NAME_PREFIX}shim-tty-exec
  start_counter "$c"
  rc=0
  got=$(in_pty ctr --address "$CONTAINERD_SOCK" -n "$NS" tasks exec -t --exec-id "tty-$$" "$c" \
    sh -c 'tty; exit 5') || rc=$?
  assert_eq 5 "$rc" "exit status of ctr tasks exec -t"
  grep -q '/dev/pts/[0-9]' <<<"$got" || fail "the exec had no terminal (tty said: $got)"
  log "ok: run -t and exec -t get a terminal"
}

flow_oom() {
  local c=${NAME_PREFIX}shim-oom events_pid
  tlimit ctr --address "$CONTAINERD_SOCK" events >"$WORK/events" 2>&1 &
  events_pid=$!
  # busybox tail buffers /dev/zero (no newline ever comes) until the 32 MiB limit kills it.
  # shellcheck disable=SC2046
  must c_ run -d --memory-limit 33554432 $(run_args) "$E2E_IMAGE" "$c" sh -c 'sleep 1; exec tail /dev/zero' >/dev/null
  wait_for 30 "task $c is STOPPED (killed by the OOM killer)" is_status "$c" STOPPED
  wait_for 5 "an OOM event for $c" grep -q "/tasks/oom.*$c" "$WORK/events"
  kill "$events_pid" 2>/dev/null || true
  wait "$events_pid" 2>/dev/null || true
  assert_eq 137 "$(deleted_exit_status "$c")" "exit status of the OOM-killed task"
}

not_running() { [ "$(task_status "$1")" != RUNNING ]; }

# The shim dies (SIGKILL): containerd runs `containerd-shim-cryo-v1 delete`, which removes the
# container with cryo (its processes killed, cryo's state and the rootfs mount gone).
flow_shim_killed() {
  local c=${NAME_PREFIX}shim-killed pid shim root
  start_counter "$c"
  pid=$(init_pid "$c")
  assert_int "$pid" "init pid of $c"
  shim=$(awk '{ print $4 }' "/proc/$pid/stat")
  assert_eq "$SHIM_NAME" "$(basename "$(tr '\0' '\n' <"/proc/$shim/cmdline" | head -n 1)")" "binary of the init's parent (pid $shim)"
  root=$(awk -F'"' '/^root/ { print $2 }' "$(shim_config)")
  root=${root:-/run/containerd/cryo}/$NS
  [ -d "$root/$c" ] || fail "no cryo state for $c in $root"
  run kill -KILL "$shim"
  wait_for 20 "containerd no longer reports $c running" not_running "$c"
  wait_for 10 "the init (pid $pid) is gone" pid_gone "$pid"
  wait_for 10 "cryo's state of $c is gone" test ! -e "$root/$c"
  if grep -qF " $(bundle_of "$c")/rootfs " /proc/self/mounts; then fail "the rootfs of $c is still mounted"; fi
  log "ok: the delete action removed $c"
}

# A config the shim cannot use is refused when containerd starts the shim, by name.
flow_bad_config() {
  local c=${NAME_PREFIX}shim-badcfg err rc=0
  printf '[checkpoint]\nrootfs_snapshot = "always"\n' >"$WORK/bad.toml"
  err=$(tlimit ctr --address "$CONTAINERD_SOCK" -n "$NS" run -d --runtime "$SHIM_RUNTIME" \
    --runtime-config-path "$WORK/bad.toml" "$E2E_IMAGE" "$c" true 2>&1) || rc=$?
  log "ctr run said: $err"
  [ "$rc" -ne 0 ] || fail "ctr run with an invalid shim config succeeded"
  [[ $err == *"$WORK/bad.toml"* && $err == *always* ]] || fail "the error names neither the config nor the bad value: $err"
  [ -z "$(task_status "$c")" ] || fail "a task $c exists after the refused start"
}

flow_restore_without_rw() {
  local c=${NAME_PREFIX}shim-orig c2=${NAME_PREFIX}shim-norw before
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  checkpoint "$c" "$CKPT_REPO/$c:1"
  remove_container "$c"
  # Without --rw ctr gives the new container a fresh rootfs from the image; the changes come
  # from cryo's rootfs snapshot in the checkpoint (runc's shim would lose them).
  must c_ containers restore --live "$c2" "$CKPT_REPO/$c:1" >/dev/null
  wait_for 20 "restored task $c2 is RUNNING" is_status "$c2" RUNNING
  assert_counter_continues "$c2" "$before"
  assert_fs_changes "$c2"
}

# `ctr t checkpoint` (no options): containerd stores the image as containerd.io/checkpoint/…
# with the CRIU data, and the task keeps running.
flow_task_checkpoint() {
  local c=${NAME_PREFIX}shim-tck ref
  start_counter "$c"
  wait_for 20 "counter of $c reaches 3" counter_ge "$c" 3
  ref=$(out c_ tasks checkpoint "$c" | tail -n 1)
  [[ $ref == containerd.io/checkpoint/$c:* ]] || fail "ctr tasks checkpoint printed '$ref', not an image name"
  assert_has_criu "$ref"
  quiet c_ images rm --sync "$ref"
  assert_eq RUNNING "$(task_status "$c")" "task status after ctr tasks checkpoint"
  counter_advancing "$c"
}

# checkpoint --exit: ctr 1.6 passes --exit, --image-path and --work-path only to runtimes named
# io.containerd.runc.v1/v2, so the request goes to the shim the way containerd forwards it for
# those (tests' shim-task binary), with runc's checkpoint options.
flow_task_checkpoint_exit() {
  local c=${NAME_PREFIX}shim-exit before bundle count_file f v r
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  bundle=$(bundle_of "$c")
  must "$SHIM_TASK" checkpoint --bundle "$bundle" --id "$c" --exit --image-path "$WORK/img" --work-path "$WORK/work"
  wait_for 10 "task $c is STOPPED after checkpoint --exit" is_status "$c" STOPPED
  for f in inventory.img pstree.img descriptors.json cryo-manifest.json; do
    [ -s "$WORK/img/$f" ] || fail "checkpoint --exit wrote no $f into the image path"
  done
  [ -s "$WORK/work/dump.log" ] || fail "no dump.log in the work path"
  log "ok: CRIU image, cryo manifest and dump.log written"
  count_file=$bundle/rootfs/tmp/count
  v=$(cat "$count_file")
  sleep 1
  assert_eq "$v" "$(cat "$count_file")" "counter file of the stopped task (must not move)"
  # The image restores (with cryo itself, in the stopped task's bundle).
  mkdir -p "$WORK/runtime-root"
  r=0
  tlimit "$RUNTIME" --root "$WORK/runtime-root" restore --detach --image-path "$WORK/img" \
    --work-path "$WORK/rwork" --bundle "$bundle" "${c}-r" </dev/null > >(exec cat >"$WORK/restored.out") 2>&1 || r=$?
  [ "$r" -eq 0 ] || fail "$RUNTIME restore of the checkpoint --exit image $(rc_text "$r")"
  assert_continues file_counter "$count_file" "$before" "counter in $count_file"
  quiet "$RUNTIME" --root "$WORK/runtime-root" delete --force "${c}-r"
}

# A checkpoint CRIU refuses (an established TCP connection, no --tcp-established): ctr reports
# cryo's error, the task keeps running with its connection, CRIU's log is in the bundle.
TCP_SCRIPT='sleep 1000000 | nc -l -p 5555 > /tmp/recv &
sleep 0.5
(while true; do cat /tmp/count 2>/dev/null; sleep 0.2; done) | nc 127.0.0.1 5555 &
'"$COUNTER_SCRIPT"

established() { exec_in "$1" netstat -tn 2>/dev/null | grep ':5555 ' | grep -c ESTABLISHED || true; }
has_two_established() { [ "$(established "$1")" = 2 ]; }

flow_checkpoint_fails_keeps_running() {
  local c=${NAME_PREFIX}shim-fail rc=0 err
  start_counter "$c" "$TCP_SCRIPT"
  wait_for 20 "two ESTABLISHED sockets on 127.0.0.1:5555 in $c" has_two_established "$c"
  err=$(tlimit ctr --address "$CONTAINERD_SOCK" -n "$NS" containers checkpoint --task --rw "$c" "$CKPT_REPO/$c:1" 2>&1) || rc=$?
  log "ctr containers checkpoint said: $err"
  [ "$rc" -ne 0 ] || fail "the checkpoint of a task with an established TCP connection succeeded"
  [[ $err == *"keeps running"* ]] || fail "the error does not say the task keeps running: $err"
  [[ $err == *criu-dump.log* ]] || fail "the error does not name CRIU's log: $err"
  grep -qi 'tcp' "$(bundle_of "$c")/criu-dump.log" || fail "criu-dump.log in the bundle does not name the TCP socket"
  wait_for 10 "task $c is RUNNING again" is_status "$c" RUNNING
  counter_advancing "$c"
  assert_eq 2 "$(established "$c")" "ESTABLISHED sockets after the failed checkpoint"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then client_main "$@"; fi
