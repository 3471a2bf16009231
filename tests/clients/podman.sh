#!/usr/bin/env bash
# podman flows against RUNTIME/RUNTIME_NAME (a runtime entry of the private containers.conf that
# `scripts/e2e-clients start NAME=PATH` writes). Usage: podman.sh [--list | FLOW...]
# shellcheck source=tests/clients/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENT=podman
FLOWS=(lifecycle checkpoint-restore leave-running export-import tcp-established logs-after-restore)

pm() { tlimit podman --runtime "$RUNTIME_NAME" "$@"; }
exec_in() { local n=$1; shift; pm exec "$n" "$@"; }
state_of() { pm inspect --format '{{.State.Status}}' "$1" 2>/dev/null; }
is_state() { [ "$(state_of "$1")" = "$2" ]; }

preflight() {
  [ -f "$CONTAINERS_CONF" ] || { echo "no $CONTAINERS_CONF: run scripts/e2e-clients start $RUNTIME_NAME=$RUNTIME"; return 1; }
  local path
  path=$(pm info --format '{{.Host.OCIRuntime.Path}}') || { echo "podman info failed with --runtime $RUNTIME_NAME"; return 1; }
  [ "$path" = "$RUNTIME" ] || { echo "podman runtime '$RUNTIME_NAME' is '$path', not $RUNTIME (containers.conf [engine.runtimes])"; return 1; }
  pm image exists "$E2E_IMAGE" || { echo "podman has no $E2E_IMAGE: run scripts/e2e-clients images"; return 1; }
}

cleanup_client() {
  local n
  for n in $(tlimit podman ps -a --format '{{.Names}}' 2>/dev/null | grep "^$NAME_PREFIX" || true); do
    quiet podman rm -f -t 0 "$n"
  done
}

start_counter() {  # NAME [SCRIPT]
  must pm run -d --name "$1" "$E2E_IMAGE" sh -c "${2:-$COUNTER_SCRIPT}"
  wait_for 20 "$1 is running" is_state "$1" running
}

last_log_line() { pm logs "$1" 2>/dev/null | tail -n 1 | tr -d '[:space:]'; }
log_line_gt() { local v; v=$(last_log_line "$1") && [[ $v =~ ^[0-9]+$ ]] && [ "$v" -gt "$2" ]; }

flow_lifecycle() {
  local c=${NAME_PREFIX}pm-life got
  start_counter "$c"
  wait_for 20 "counter of $c reaches 3" counter_ge "$c" 3
  assert_exec_works "$c" "podman"
  got=$(out pm logs "$c")
  got=${got%%$'\n'*}   # first line (no `| head`: with pipefail its SIGPIPE would fail the flow)
  assert_eq 1 "$got" "first line of podman logs"
  wait_for 10 "podman logs of $c reach line 5" log_line_gt "$c" 4
  must pm stop -t 1 "$c"
  assert_eq exited "$(state_of "$c")" "state after podman stop"
  must pm rm "$c"
  if pm container exists "$c"; then fail "$c still exists after podman rm"; fi
  log "ok: $c removed"
}

flow_checkpoint_restore() {
  local c=${NAME_PREFIX}pm-cr before
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  must pm container checkpoint "$c"
  assert_eq exited "$(state_of "$c")" "state after checkpoint"
  must pm container restore "$c"
  assert_eq running "$(state_of "$c")" "state after restore"
  assert_counter_continues "$c" "$before"
  assert_fs_changes "$c"
}

flow_leave_running() {
  local c=${NAME_PREFIX}pm-lr before
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  must pm container checkpoint --leave-running "$c"
  assert_eq running "$(state_of "$c")" "state after checkpoint --leave-running"
  counter_advancing "$c"
  # Let the live process move well past the checkpoint, so a restore that kept the live value
  # (instead of the checkpointed one) would be caught by the margin.
  wait_for 20 "counter of $c passes $before + $COUNTER_MARGIN" counter_ge "$c" "$((before + COUNTER_MARGIN))"
  must pm stop -t 1 "$c"
  must pm container restore "$c"
  assert_counter_continues "$c" "$before"
}

flow_export_import() {
  local c=${NAME_PREFIX}pm-exp c2=${NAME_PREFIX}pm-imp before
  start_counter "$c"
  fs_change "$c"
  before=$(counter_at_checkpoint "$c")
  must pm container checkpoint --export "$WORK/$c.tar.zst" "$c"
  [ -s "$WORK/$c.tar.zst" ] || fail "checkpoint --export wrote no archive"
  assert_eq exited "$(state_of "$c")" "state of $c after checkpoint --export"
  must pm container restore --import "$WORK/$c.tar.zst" --name "$c2"
  assert_eq running "$(state_of "$c2")" "state of $c2 after restore --import"
  assert_counter_continues "$c2" "$before"
  assert_fs_changes "$c2"
  assert_eq exited "$(state_of "$c")" "state of the original $c"
}

# TCP: a server (busybox nc has no -s: it listens on every address of the container's own netns)
# and a client connected to it over 127.0.0.1, both in the container; the client sends the counter
# every 0.2 s and the server writes what it receives to /tmp/recv.
# shellcheck disable=SC2016  # expanded inside the container
TCP_SCRIPT='sleep 1000000 | nc -l -p 5555 > /tmp/recv &
sleep 0.5
(while true; do cat /tmp/count 2>/dev/null; sleep 0.2; done) | nc 127.0.0.1 5555 &
'"$COUNTER_SCRIPT"

established() {  # NAME: prints the number of ESTABLISHED sockets on port 5555
  exec_in "$1" netstat -tn 2>/dev/null | grep ':5555 ' | grep -c ESTABLISHED || true
}
has_two_established() { [ "$(established "$1")" = 2 ]; }
connections() {  # NAME: the ESTABLISHED 5555 connections as sorted "local peer" pairs
  exec_in "$1" netstat -tn 2>/dev/null | awk '$6 == "ESTABLISHED" && ($4 ~ /:5555$/ || $5 ~ /:5555$/) { sub(/^::ffff:/, "", $4); sub(/^::ffff:/, "", $5); print $4, $5 }' | sort | tr '\n' ' '
}
recv_lines() { exec_in "$1" sh -c 'wc -l < /tmp/recv' 2>/dev/null | tr -d '[:space:]'; }
recv_ge() { local n; n=$(recv_lines "$1") && [ -n "$n" ] && [ "$n" -ge "$2" ]; }

flow_tcp_established() {
  local c=${NAME_PREFIX}pm-tcp before r r0 conns
  start_counter "$c" "$TCP_SCRIPT"
  wait_for 20 "two ESTABLISHED sockets on 127.0.0.1:5555 in $c" has_two_established "$c"
  wait_for 20 "server in $c received 3 lines" recv_ge "$c" 3
  conns=$(connections "$c")
  log "connections before checkpoint: $conns"
  before=$(counter_at_checkpoint "$c")
  r0=$(recv_lines "$c")
  assert_int "$r0" "lines received by the server before checkpoint"
  must pm container checkpoint --tcp-established "$c"
  assert_eq exited "$(state_of "$c")" "state after checkpoint --tcp-established"
  must pm container restore --tcp-established "$c"
  assert_counter_continues "$c" "$before"
  # The same two sockets (same ephemeral port), not a new connection of a restarted process.
  assert_eq "$conns" "$(connections "$c")" "ESTABLISHED connections on port 5555 after restore"
  r=$(recv_lines "$c")
  assert_int "$r" "lines received by the server"
  [ "$r" -ge "$r0" ] || fail "the server's /tmp/recv shrank from $r0 to $r lines: the server restarted"
  wait_for 10 "data flows over the restored connection (server gets line $((r + 3)))" recv_ge "$c" "$((r + 3))"
}

flow_logs_after_restore() {
  local c=${NAME_PREFIX}pm-logs before first last
  start_counter "$c"
  before=$(counter_at_checkpoint "$c")
  must pm container checkpoint "$c"
  last=$(last_log_line "$c")
  assert_int "$last" "last podman logs line at checkpoint"
  must pm container restore "$c"
  assert_counter_continues "$c" "$before"
  wait_for 10 "podman logs of $c show new lines after restore (past $((last + 3)))" log_line_gt "$c" "$((last + 3))"
  first=$(out pm logs "$c")
  first=${first%%$'\n'*}
  assert_eq 1 "$first" "first podman logs line (the log from before the checkpoint is kept)"
  # The lines after the checkpoint continue the old sequence: no second "1".
  assert_eq 1 "$(pm logs "$c" | grep -cx 1)" "number of '1' lines in podman logs (a restart would add one)"
}

client_main "$@"
