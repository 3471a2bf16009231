//! Coordinated checkpoints: one consistent cut across containers that talk to each other over
//! TCP (MPI ranks, a service and its database).
//!
//! Checkpointing such containers one after another does not give a state to restore: between
//! two dumps one member sends what the other's image never received while its own image
//! already counts it as delivered, so after a restore the connection stalls or loses data.
//! A group checkpoint ([`checkpoint_group`]) runs each member's checkpoint (the same steps as
//! for one container, [`crate::dump`]) in a thread of its own, and the threads meet at a
//! [`gate::Gate`]:
//!
//! 1. every member is prepared (every refusal happens before anything is frozen);
//! 2. every member's CRIU is ready (its `pre-dump` notification): all freeze at once;
//! 3. every member is frozen: cryo locks the network of every member's namespace
//!    ([`netlock`]) so no packet moves between them; only then does any CRIU dump (in parallel,
//!    each with its established TCP connections: what sits in the socket queues is in the
//!    image);
//! 4. every member is dumped: with `--leave-running` the network is unlocked and all thaw
//!    together; otherwise they stay frozen;
//! 5. every member's image is complete: the group manifest is written last and the group
//!    published whole ([`manifest`]); only then are members that are to stop killed, their
//!    TCP sockets first put back in repair mode so that nothing is said on the wire
//!    ([`tcp_repair`]); the network lock stays until the group is restored.
//!
//! If any member fails at any step, the gate breaks: every member thaws (or stays paused) and
//! keeps running, the network is unlocked, and the group's staging directory, with every
//! member image in it, is removed. A guardian process ([`crate::guardian`]) per member thaws
//! it if cryo dies; one more, the group's, unlocks the network and removes the staging.
//!
//! A group restore ([`restore_group`]) restores every member in a thread of its own (CRIU
//! started one member at a time: it must start in the member's cgroups, which cryo joins);
//! each CRIU stops at its `post-restore` notification, where every task is restored but none
//! runs and every TCP socket is still in repair mode. When all are there, cryo removes the
//! network lock and lets them all go. A member that fails makes every other CRIU undo its
//! restore; a failure afterwards (recording the state) undoes every member's
//! [`crate::restore::PendingRestore`].

mod checkpoint;
pub mod gate;
pub mod manifest;
pub mod netlock;
mod restore;
pub mod tcp_repair;

use std::path::PathBuf;
use std::time::Duration;

pub use checkpoint::{
    checkpoint_group, DumpSeams, GroupCause, GroupCheckpointError, GroupEnv, GroupReport, Member,
};
pub use manifest::{is_group_image, GroupManifest};
pub use restore::{
    restore_group, GroupRestoreCause, GroupRestoreError, GroupRestored, MemberRestored,
    RestoreSeams,
};

/// The annotation that names a container's group (`cryo checkpoint --group NAME`).
pub const ANNOTATION: &str = "io.cryo.group";

/// A group checkpoint's request (each member's own request is in its [`Member`]).
#[derive(Debug, Clone)]
pub struct GroupRequest {
    /// Where the group image goes (`--image-path`).
    pub image_dir: PathBuf,
    /// The group's name, when the members were named by [`ANNOTATION`].
    pub name: Option<String>,
    /// Lock the members' network (off: `--network-lock skip`, for members that share no TCP
    /// connection).
    pub lock_network: bool,
    /// `--freeze-timeout` (`None`: by the members' memory together).
    pub freeze_timeout: Option<Duration>,
    /// `--criu-timeout`.
    pub criu_timeout: Duration,
}

/// What a member was left as after a failed group verb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLeft {
    /// The member.
    pub id: String,
    /// What became of it.
    pub left: String,
}
