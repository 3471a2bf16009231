# shellcheck shell=bash
# Shared helpers for scripts/e2e-clients and tests/clients/*.sh (sourced, not executed).
# Paths of the private client setup live here so both sides agree on them.
# shellcheck disable=SC2034  # the variables below are used by the scripts that source this file

E2E_DIR=${CRYO_E2E_DIR:-/tmp/cryo-e2e}
E2E_IMAGE=localhost/cryo-busybox:latest
DOCKER=/usr/bin/docker                      # /usr/local/bin/docker is an unrelated newer client
CONTAINERD_SOCK=/run/containerd/containerd.sock
DOCKER_SOCK=/var/run/docker.sock
PODMAN_CONF=$E2E_DIR/podman/containers.conf
PODMAN_STORAGE_CONF=$E2E_DIR/podman/storage.conf

# Every podman call must see the private config, also when the caller forgot `eval "$(… env)"`.
export CONTAINERS_CONF="$PODMAN_CONF"
export CONTAINERS_STORAGE_CONF="$PODMAN_STORAGE_CONF"
export CONTAINERD_ADDRESS="$CONTAINERD_SOCK"
export DOCKER_HOST="unix://$DOCKER_SOCK"

e2e_log() { printf '[%s] %s\n' "${E2E_TAG:-e2e}" "$*" >&2; }
e2e_die() { printf '[%s] ERROR: %s\n' "${E2E_TAG:-e2e}" "$*" >&2; exit 1; }

# e2e_wait_until SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds; 1 on timeout.
e2e_wait_until() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(( $(date +%s%N) + secs * 1000000000 ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s%N)" -ge "$deadline" ]; then
      e2e_log "timed out after ${secs}s waiting for: $what"
      return 1
    fi
    sleep 0.2
  done
}

# e2e_pid_alive PID NAME: PID runs and its comm is NAME (guards against a reused PID).
e2e_pid_alive() {
  local pid=$1 name=$2 comm
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$name" ]
}

# e2e_cgroup_controller NAME: containers here can use controller NAME (a mounted v1 hierarchy
# carries it, or the cgroup2 root offers it). A pure cgroup v2 host as scripts/pure-v2 emulates
# it on a hybrid machine offers none: the v1 hierarchies keep them.
e2e_cgroup_controller() {
  local name=$1
  if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    grep -qw "$name" /sys/fs/cgroup/cgroup.controllers
  else
    findmnt -rn -t cgroup -o OPTIONS | tr ',' '\n' | grep -qx "$name"
  fi
}
