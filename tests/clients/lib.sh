# shellcheck shell=bash
# Shared code of the client end-to-end flows (tests/clients/{podman,containerd,docker}.sh).
# Sourced by those scripts; see tests/clients/README.md.
#
# Environment:
#   RUNTIME=/path/to/runtime  RUNTIME_NAME=name   the runtime under test (default: runc)
#   RESULTS_TSV=file          append one row per flow: client flow runtime result expected seconds log
#   E2E_LOG_DIR=dir           per-flow logs (default $CRYO_E2E_DIR/logs)
#   CMD_TIMEOUT=s             limit for every single client command (default 90)
#   FLOW_TIMEOUT=s            limit for a whole flow, cleanup included (default 300)
set -euo pipefail

CLIENTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$CLIENTS_DIR/../.." && pwd)
# shellcheck source=scripts/lib/e2e-common.sh
. "$REPO_DIR/scripts/lib/e2e-common.sh"

RUNTIME=${RUNTIME:-/usr/sbin/runc}
RUNTIME_NAME=${RUNTIME_NAME:-runc}
CMD_TIMEOUT=${CMD_TIMEOUT:-90}
FLOW_TIMEOUT=${FLOW_TIMEOUT:-300}
E2E_LOG_DIR=${E2E_LOG_DIR:-$E2E_DIR/logs}
RESULTS_TSV=${RESULTS_TSV:-}
export RUNTIME RUNTIME_NAME CMD_TIMEOUT FLOW_TIMEOUT E2E_LOG_DIR RESULTS_TSV

# The workload of every flow: a counter that the process keeps in memory (i), so a restarted
# process starts again from 1 while a restored one continues.
# shellcheck disable=SC2016,SC2034  # expanded inside the container; used by the client scripts
COUNTER_SCRIPT='i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo $i; sleep 0.2; done'
COUNTER_MIN=5          # the counter must reach this before a checkpoint (so "restarted" is visible)
COUNTER_MARGIN=25      # after restore: value_at_checkpoint <= value < value_at_checkpoint + this
# shellcheck disable=SC2034  # used by the client scripts
NAME_PREFIX=cryo-e2e-  # every container, image and checkpoint a flow makes starts with this

log() { printf '[%s] %s\n' "${E2E_TAG:-flow}" "$*" >&2; }

# fail MESSAGE: the current flow fails (the flow runs in its own process: exit is enough).
fail() {
  printf '[%s] FAIL: %s\n' "${E2E_TAG:-flow}" "$*" >&2
  exit 1
}

# tlimit CMD...: CMD with the per-command time limit. --foreground keeps CMD in our process
# group, so the flow's own timeout (a signal to the whole group) reaches it too.
tlimit() { timeout --foreground -k 5 "$CMD_TIMEOUT" "$@"; }

rc_text() { if [ "$1" -eq 124 ]; then echo "timed out after ${CMD_TIMEOUT}s"; else echo "exited $1"; fi; }

# run CMD...: print and run a client command (or a function of ours, which limits its own
# commands); returns its status.
run() {
  log "+ $*"
  if declare -F "$1" >/dev/null; then "$@"; else tlimit "$@"; fi
}

# must CMD...: run, and fail the flow if it does not succeed.
must() {
  local rc=0
  run "$@" || rc=$?
  [ "$rc" -eq 0 ] || fail "command $(rc_text "$rc"): $*"
}

# out CMD...: like must, but captures stdout (stderr still goes to the log).
out() {
  local rc=0 o
  o=$(run "$@") || rc=$?
  [ "$rc" -eq 0 ] || fail "command $(rc_text "$rc"): $*"
  printf '%s' "$o"
}

# quiet CMD...: best effort, for cleanup: time-limited, output and status ignored.
quiet() {
  if declare -F "$1" >/dev/null; then "$@" >/dev/null 2>&1 || true; else tlimit "$@" >/dev/null 2>&1 || true; fi
}

assert_eq() {  # EXPECTED ACTUAL WHAT
  [ "$1" = "$2" ] || fail "$3: expected '$1', got '$2'"
  log "ok: $3 = '$2'"
}

assert_int() {  # VALUE WHAT
  [[ $1 =~ ^[0-9]+$ ]] || fail "$2: expected an integer, got '$1'"
}

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds, or fail the flow.
# assert_exec_works NAME WHAT: exec in NAME prints its output and returns its exit status
# (exec_in is the client script's own).
assert_exec_works() {
  local got rc=0
  got=$(out exec_in "$1" echo exec-works)
  assert_eq exec-works "$got" "$2 exec output"
  run exec_in "$1" sh -c 'exit 7' || rc=$?
  assert_eq 7 "$rc" "$2 exec exit status"
}

wait_for() {
  local secs=$1 what=$2
  shift 2
  e2e_wait_until "$secs" "$what" "$@" || fail "timed out after ${secs}s: $what"
  log "ok: $what"
}

is_runc() { [ "$(basename "$(readlink -f "$RUNTIME")")" = runc ]; }

# ---------------------------------------------------------------- counter
# Every client script defines exec_in NAME CMD...: run CMD in the container (time-limited with
# tlimit), its stdout and exit status being CMD's.

# The workload rewrites /tmp/count with `>` (truncate, then write): a read can see it empty. So
# an empty read is retried a few times; an exec that fails is not.
counter_read() {  # NAME -> prints the counter
  local v try rc
  for try in 1 2 3 4 5; do
    rc=0
    v=$(exec_in "$1" cat /tmp/count 2>"$WORK/exec.err") || rc=$?
    v=$(tr -d '[:space:]' <<<"$v")
    if [[ $v =~ ^[0-9]+$ ]]; then printf '%s\n' "$v"; return 0; fi
    if [ "$rc" -ne 0 ] || [ -n "$v" ]; then break; fi
    sleep 0.05
  done
  log "reading the counter of $1 failed (exec status $rc, try $try, output '$v'): $(tr '\n' ' ' <"$WORK/exec.err")"
  return 1
}

counter_ge() {  # NAME N: counter >= N
  local v
  v=$(counter_read "$1") || return 1
  [ "$v" -ge "$2" ]
}

# counter_at_checkpoint NAME: wait until the counter reaches COUNTER_MIN, print its value. Call it
# right before the checkpoint: the checkpointed value is >= this.
counter_at_checkpoint() {
  local v
  wait_for 20 "counter of $1 reaches $COUNTER_MIN" counter_ge "$1" "$COUNTER_MIN"
  v=$(counter_read "$1") || fail "cannot read the counter of $1"
  log "counter of $1 before checkpoint: $v"
  printf '%s\n' "$v"
}

# counter_advancing NAME: the process runs (the counter moves within 5 s).
counter_advancing() {
  local v
  v=$(counter_read "$1") || fail "cannot read the counter of $1 (exec failed)"
  wait_for 5 "counter of $1 advances past $v (process runs)" counter_ge "$1" "$((v + 1))"
}

# counter_changed READER ARG OLD: the counter read by `READER ARG` differs from OLD.
counter_changed() { local v; v=$("$1" "$2") && [ "$v" != "$3" ]; }

# assert_continues READER ARG BEFORE WHAT: after a restore, the process continues counting from
# the checkpoint. /tmp/count lives in the container's filesystem and may still hold an old value,
# so the value judged is the first one written after the restore (the read value must change):
# BEFORE <= value < BEFORE + COUNTER_MARGIN; a restarted process writes 1, 2, ... instead.
assert_continues() {
  local reader=$1 arg=$2 before=$3 what=$4 v1 v2
  wait_for 15 "$what readable after restore" "$reader" "$arg"
  v1=$("$reader" "$arg") || fail "cannot read $what after restore"
  wait_for 5 "$what changes from $v1 (the process runs)" counter_changed "$reader" "$arg" "$v1"
  v2=$("$reader" "$arg") || fail "cannot read $what after restore"
  assert_int "$v2" "$what"
  [ "$v2" -ge "$before" ] \
    || fail "$what after restore is $v2 < $before (value at checkpoint): the process restarted instead of resuming"
  [ "$v2" -lt "$((before + COUNTER_MARGIN))" ] \
    || fail "$what after restore is $v2 >= $before + $COUNTER_MARGIN: not the checkpointed process"
  log "ok: $what continues: $before at checkpoint, $v1 then $v2 after restore"
  wait_for 5 "$what advances past $v2" counter_changed "$reader" "$arg" "$v2"
}

# assert_counter_continues NAME BEFORE: assert_continues for the counter read by exec in NAME.
assert_counter_continues() { assert_continues counter_read "$1" "$2" "counter of $1"; }

# ---------------------------------------------------------------- filesystem changes
# fs_change NAME: a new file, a changed file and a deleted file, made inside the container.
fs_change() {
  must exec_in "$1" sh -c 'echo cryo-e2e-new > /root/newfile && echo "e2e:x:4242:" >> /etc/group && rm /bin/vi'
}

# assert_fs_changes NAME: the changes made by fs_change are visible in NAME.
assert_fs_changes() {
  local name=$1 got
  got=$(exec_in "$name" sh -c \
    'cat /root/newfile 2>&1; grep -c "^e2e:x:4242:" /etc/group 2>&1; if [ -e /bin/vi ] || [ -L /bin/vi ]; then echo vi-present; else echo vi-absent; fi' 2>&1) || true
  log "filesystem of $name: $(echo "$got" | tr '\n' ' ')"
  [ "$(sed -n 1p <<<"$got")" = cryo-e2e-new ] || fail "new file /root/newfile lost in $name (got: $(sed -n 1p <<<"$got"))"
  [ "$(sed -n 2p <<<"$got")" = 1 ] || fail "changed file /etc/group lost its new line in $name"
  [ "$(sed -n 3p <<<"$got")" = vi-absent ] || fail "deleted file /bin/vi is back in $name"
  log "ok: filesystem changes (new /root/newfile, changed /etc/group, deleted /bin/vi) present in $name"
}

# ---------------------------------------------------------------- flow runner
# A client script sets CLIENT, FLOWS=(...), defines exec_in, preflight, flow_<name> (dashes -> underscores),
# cleanup_client (removes everything named $NAME_PREFIX*), optional expect_<name> printing
# pass|fail and preflight; then calls client_main "$@".

flow_fn() { echo "flow_${1//-/_}"; }

flow_expect() {
  local fn="expect_${1//-/_}"
  if declare -F "$fn" >/dev/null; then "$fn"; else echo pass; fi
}

# Run one flow in this process (called as `SCRIPT --one FLOW` under timeout).
run_one() {
  local flow=$1 fn
  fn=$(flow_fn "$flow")
  # shellcheck disable=SC2153  # FLOWS is set by the client script
  declare -F "$fn" >/dev/null || fail "unknown flow '$flow' (have: ${FLOWS[*]})"
  E2E_TAG="$CLIENT/$flow/$RUNTIME_NAME"
  WORK=$(mktemp -d "$E2E_DIR/work.XXXXXX")
  export WORK
  trap 'exit 143' TERM INT
  # A command that fails outside an assertion (set -e) says which one it was.
  set -E
  trap 'log "FAIL: command exited $? (line $LINENO): $BASH_COMMAND"' ERR
  trap 'rc=$?; trap - EXIT; log "cleanup"; cleanup_client; rm -rf "$WORK"; exit $rc' EXIT
  cleanup_client   # leftovers of an earlier, killed run
  "$fn"
  log "flow passed"
}

record() {  # FLOW RESULT EXPECTED SECONDS LOG
  [ -n "$RESULTS_TSV" ] || return 0
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$CLIENT" "$1" "$RUNTIME_NAME" "$2" "$3" "$4" "$5" >>"$RESULTS_TSV"
}

# client_main [FLOW...]: run the given flows (default: all); exit 1 if a result is not the expected one.
client_main() {
  if [ "${1:-}" = --one ]; then run_one "$2"; return; fi
  if [ "${1:-}" = --list ]; then printf '%s\n' "${FLOWS[@]}"; return; fi
  [ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
  [ -x "$RUNTIME" ] || { echo "RUNTIME=$RUNTIME is not executable" >&2; exit 1; }
  local flows=("$@") flow expect rc t0 secs result logf bad=0 why
  [ ${#flows[@]} -gt 0 ] || flows=("${FLOWS[@]}")
  mkdir -p "$E2E_LOG_DIR" "$E2E_DIR"
  E2E_TAG="$CLIENT/$RUNTIME_NAME"
  if ! why=$(preflight 2>&1); then
    log "preflight failed: $why"
    for flow in "${flows[@]}"; do record "$flow" "FAIL (setup)" "$(flow_expect "$flow")" 0 "-"; done
    exit 1
  fi
  for flow in "${flows[@]}"; do
    expect=$(flow_expect "$flow")
    logf="$E2E_LOG_DIR/$RUNTIME_NAME-$CLIENT-$flow.log"
    log "=== $CLIENT / $flow / $RUNTIME_NAME (expected: $expect; log: $logf)"
    t0=$(date +%s%N)
    set +e
    timeout -k 60 "$FLOW_TIMEOUT" bash "$0" --one "$flow" 2>&1 | tee "$logf" >&2
    rc=${PIPESTATUS[0]}
    set -e
    secs=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    if [ "$rc" -eq 0 ]; then
      result=PASS
      if [ "$expect" = fail ]; then
        result="PASS (unexpected for $RUNTIME_NAME: the check does not see the known gap)"
        bad=1
      fi
    else
      [ "$rc" -ne 124 ] || echo "[$CLIENT/$flow/$RUNTIME_NAME] FAIL: flow timed out after ${FLOW_TIMEOUT}s" | tee -a "$logf" >&2
      result=FAIL
      if [ "$expect" = fail ]; then result="FAIL (expected for $RUNTIME_NAME)"; else bad=1; fi
    fi
    log "=== $CLIENT / $flow / $RUNTIME_NAME: $result (${secs}s)"
    record "$flow" "$result" "$expect" "$secs" "$logf"
  done
  return "$bad"
}
