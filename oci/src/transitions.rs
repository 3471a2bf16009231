//! The one transition table: which verb may act on a container in which status.
//!
//! ```text
//!   create ──▶ Created ──start──▶ Running ◀──resume── Paused
//!                 │                 │  ╲──pause──────▶  │
//!                 │                 │ exit/kill          │ checkpoint (leave-running → stays)
//!                 ▼                 ▼                    ▼
//!              delete ◀──────── Stopped ◀── checkpoint (no leave-running: container removed)
//!   restore ──▶ Running
//! ```
//! `delete --force` is allowed from every status; checkpoint is allowed from Running *and*
//! Paused, because containerd and docker pause a container before they checkpoint it.

use std::fmt;

/// Container status as the OCI state reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Being created.
    Creating,
    /// Created, waiting for `start`.
    Created,
    /// Init process running.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// Init process gone.
    Stopped,
}

/// Every verb that acts on an existing container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `start`
    Start,
    /// `kill`
    Kill,
    /// `kill --all`: signals whatever is still in the container's cgroup, also after its init
    /// exited (runc allows it on a stopped container).
    KillAll,
    /// `delete` without `--force`
    Delete,
    /// `delete --force`
    ForceDelete,
    /// `exec`
    Exec,
    /// `pause`
    Pause,
    /// `resume`
    Resume,
    /// `checkpoint`
    Checkpoint,
    /// `update`
    Update,
    /// `ps`
    Ps,
    /// `events`
    Events,
}

/// A verb refused in a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} container {id}: it is {status}{hint}")]
pub struct TransitionError {
    /// Container id.
    pub id: String,
    /// The verb.
    pub verb: Verb,
    /// Its status.
    pub status: Status,
    /// What the user can do instead.
    pub hint: &'static str,
}

/// Allow or refuse `verb` on container `id` in `status`.
pub fn check(id: &str, verb: Verb, status: Status) -> Result<(), TransitionError> {
    use Status::*;
    use Verb::*;
    let (ok, hint) = match verb {
        Start => (
            status == Created,
            "; only a created container can be started",
        ),
        Kill => (
            matches!(status, Created | Running | Paused),
            "; there is no process left to signal",
        ),
        KillAll => (status != Creating, "; it is still being created"),
        Delete => (
            matches!(status, Created | Stopped),
            "; stop it first (`cryo kill ID KILL`) or use `cryo delete --force`",
        ),
        ForceDelete => (true, ""),
        // A paused container needs exec's --ignore-paused, which exec checks itself.
        Exec => (
            matches!(status, Created | Running | Paused),
            "; exec needs a created or running container",
        ),
        Pause => (
            status == Running,
            "; only a running container can be paused",
        ),
        Resume => (status == Paused, "; only a paused container can be resumed"),
        Checkpoint => (
            matches!(status, Running | Paused),
            "; only a running or paused container can be checkpointed",
        ),
        Update => (status != Stopped, "; the container has exited"),
        Ps => (status != Creating, "; it is still being created"),
        Events => (status != Stopped, "; the container has exited"),
    };
    if ok {
        Ok(())
    } else {
        Err(TransitionError {
            id: id.to_string(),
            verb,
            status,
            hint,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Start => "start",
            Verb::Kill | Verb::KillAll => "kill",
            Verb::Delete | Verb::ForceDelete => "delete",
            Verb::Exec => "exec in",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Checkpoint => "checkpoint",
            Verb::Update => "update",
            Verb::Ps => "list processes of",
            Verb::Events => "watch events of",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_allows_running_and_paused_only() {
        for s in [Status::Running, Status::Paused] {
            assert!(check("c", Verb::Checkpoint, s).is_ok());
        }
        for s in [Status::Created, Status::Stopped, Status::Creating] {
            let e = check("c", Verb::Checkpoint, s).unwrap_err().to_string();
            assert!(e.contains("cannot checkpoint container c"), "{e}");
        }
    }

    #[test]
    fn delete_needs_force_while_running() {
        assert!(check("c", Verb::Delete, Status::Running).is_err());
        assert!(check("c", Verb::ForceDelete, Status::Running).is_ok());
        assert!(check("c", Verb::Delete, Status::Stopped).is_ok());
        let e = check("c", Verb::Delete, Status::Running)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force"), "{e}");
    }

    #[test]
    fn runc_allows_exec_in_a_created_container_and_kill_all_or_ps_after_exit() {
        assert!(check("c", Verb::Exec, Status::Created).is_ok());
        assert!(check("c", Verb::Exec, Status::Stopped).is_err());
        assert!(check("c", Verb::Kill, Status::Stopped).is_err());
        assert!(check("c", Verb::KillAll, Status::Stopped).is_ok());
        assert!(check("c", Verb::Ps, Status::Stopped).is_ok());
    }

    #[test]
    fn start_pause_resume() {
        assert!(check("c", Verb::Start, Status::Created).is_ok());
        assert!(check("c", Verb::Start, Status::Running).is_err());
        assert!(check("c", Verb::Pause, Status::Running).is_ok());
        assert!(check("c", Verb::Resume, Status::Paused).is_ok());
        assert!(check("c", Verb::Resume, Status::Stopped).is_err());
    }
}
