//! Cgroup discovery and the freezer cryo uses to stop a container for a checkpoint.
//!
//! cryo freezes the container itself, polling fast, instead of letting CRIU poll the v1
//! freezer in 100 ms steps: a checkpoint's freeze window is what timer-sensitive services feel.
//!
//! - [`discovery`]: which cgroups a container is in ([`ContainerCgroup`],
//!   [`v1_controller_paths`], [`cgroup_setup`]).
//! - [`freezer`]: freezing and thawing a v1 or v2 cgroup ([`Freezer`], [`FreezeGuard`]).
//!
//! This is a library only: no CLI or async runtime dependencies.

pub mod discovery;
mod error;
pub mod freezer;
mod guard;
pub mod mountinfo;
pub mod stats;

pub use discovery::{
    cgroup_setup, owned_hierarchies, parse_proc_cgroup, v1_controller_paths, ContainerCgroup,
    FreezerPath, ProcCgroupLine, Setup,
};
pub use error::CgroupError;
pub use freezer::{
    freezer_at, freezer_for, FreezeGuard, FreezeStats, Freezer, FreezerState, V1Freezer, V2Freezer,
};
pub use mountinfo::{parse_mountinfo, MountInfoEntry};
