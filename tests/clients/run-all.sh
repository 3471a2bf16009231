#!/usr/bin/env bash
# Runs every client flow (podman, containerd, docker) against one or more runtimes and prints a
# markdown table of the results.
#
#   tests/clients/run-all.sh [NAME=PATH...]
#
# Default runtime: $RUNTIME_NAME=$RUNTIME if both are set, else runc=/usr/sbin/runc. Several
# NAME=PATH give one column each (e.g. runc=/usr/sbin/runc cryo=/usr/local/bin/cryo).
# Installs the clients if missing, starts containerd + dockerd (and stops them again at the end if
# this run started them; CRYO_E2E_KEEP_DAEMONS=1 keeps them), imports the test image.
# Env: CLIENTS (default "podman containerd cryo-shim docker"), RESULTS_TSV (default
# $CRYO_E2E_DIR/results.tsv), CRYO_SHIM (containerd-shim-cryo-v1 for the cryo-shim flows; default:
# the one beside the runtime's binary). cryo-shim flows run for every runtime but runc (cryo's
# shim drives cryo): runc's column shows "-" for them.
# Exit status: 0 when every flow gave its expected result, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/lib/e2e-common.sh
. "$repo/scripts/lib/e2e-common.sh"
E2E_TAG=run-all
e2e=$repo/scripts/e2e-clients

[ "$(id -u)" = 0 ] || e2e_die "must run as root"

runtimes=("$@")
if [ ${#runtimes[@]} -eq 0 ]; then
  if [ -n "${RUNTIME:-}" ] && [ -n "${RUNTIME_NAME:-}" ]; then
    runtimes=("$RUNTIME_NAME=$RUNTIME")
  else
    runtimes=(runc=/usr/sbin/runc)
  fi
fi
read -r -a clients <<<"${CLIENTS:-podman containerd cryo-shim docker}"
RESULTS_TSV=${RESULTS_TSV:-$E2E_DIR/results.tsv}
export RESULTS_TSV

t0=$(date +%s%N)
"$e2e" install

started=0
if ! "$e2e" status >/dev/null 2>&1; then started=1; fi
stop_daemons() {
  if [ "$started" = 1 ] && [ "${CRYO_E2E_KEEP_DAEMONS:-0}" != 1 ]; then "$e2e" stop || true; fi
}
trap stop_daemons EXIT
"$e2e" start "${runtimes[@]}"
"$e2e" images

mkdir -p "$(dirname "$RESULTS_TSV")"
printf 'client\tflow\truntime\tresult\texpected\tseconds\tlog\n' >"$RESULTS_TSV"

for rt in "${runtimes[@]}"; do
  for client in "${clients[@]}"; do
    script=$here/$client.sh
    [ -f "$script" ] || e2e_die "no flows for client '$client' ($script)"
    if [ "$client" = cryo-shim ]; then
      if [ "$(basename "$(readlink -f "${rt#*=}")")" = runc ]; then
        e2e_log "##### cryo-shim flows are cryo's own shim driving cryo: not run with ${rt%%=*}"
        continue
      fi
      if ! "$e2e" shim "${CRYO_SHIM:-$(dirname "${rt#*=}")/containerd-shim-cryo-v1}"; then
        while IFS= read -r flow; do
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$client" "$flow" "${rt%%=*}" "FAIL (setup: no shim)" pass 0 - >>"$RESULTS_TSV"
        done < <(bash "$script" --list)
        continue
      fi
    fi
    e2e_log "##### $client with ${rt%%=*} (${rt#*=})"
    RUNTIME_NAME=${rt%%=*} RUNTIME=${rt#*=} bash "$script" || true
    # A flow that left no row (the script died) counts as failed.
    while IFS= read -r flow; do
      awk -F'\t' -v c="$client" -v f="$flow" -v r="${rt%%=*}" '$1 == c && $2 == f && $3 == r { found = 1 } END { exit !found }' "$RESULTS_TSV" \
        || printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$client" "$flow" "${rt%%=*}" "FAIL (no result)" pass 0 - >>"$RESULTS_TSV"
    done < <(bash "$script" --list)
  done
done

stop_daemons
started=0
wall=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.0f", (b - a) / 1e9 }')

# Markdown: one row per (client, flow), one column per runtime.
table=$(awk -F'\t' '
  NR == 1 { next }
  {
    key = $1 "\t" $2
    if (!(key in seen)) { seen[key] = 1; keys[++nk] = key }
    if (!($3 in rseen)) { rseen[$3] = 1; rts[++nr] = $3 }
    cell[key, $3] = $4 " (" $6 "s)"
  }
  END {
    printf "| client | flow |"; for (i = 1; i <= nr; i++) printf " %s |", rts[i]; printf "\n"
    printf "|---|---|"; for (i = 1; i <= nr; i++) printf "---|"; printf "\n"
    for (k = 1; k <= nk; k++) {
      split(keys[k], p, "\t"); printf "| %s | %s |", p[1], p[2]
      for (i = 1; i <= nr; i++) { c = cell[keys[k], rts[i]]; printf " %s |", (c == "" ? "-" : c) }
      printf "\n"
    }
  }' "$RESULTS_TSV")
bad=$(awk -F'\t' 'NR > 1 && !($4 == "PASS" || $4 ~ /^FAIL \(expected/) { n++ } END { print n + 0 }' "$RESULTS_TSV")
total=$(awk 'END { print NR - 1 }' "$RESULTS_TSV")

{
  echo
  echo "$table"
  echo
  echo "wall time: ${wall}s; results: $RESULTS_TSV; logs: ${E2E_LOG_DIR:-$E2E_DIR/logs}"
  echo "$((total - bad)) passed, $bad failed"
} | tee "${RESULTS_TSV%.tsv}.md"
[ "$bad" -eq 0 ]
