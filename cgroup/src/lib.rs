//! Cgroup discovery and the freezer cryo uses to stop a container for a checkpoint.
//!
//! cryo freezes the container itself, polling fast, instead of letting CRIU poll the v1
//! freezer in 100 ms steps: a checkpoint's freeze window is what timer-sensitive services feel.

pub mod discovery;
pub mod freezer;

pub use discovery::{parse_proc_cgroup, ContainerCgroup, FreezerPath, ProcCgroupLine};
pub use freezer::{
    freezer_for, FreezeGuard, FreezeStats, Freezer, FreezerState, V1Freezer, V2Freezer,
};

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong with a cgroup, naming the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Writing a control file failed.
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Reading a control file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The freeze did not complete in time; the cgroup was thawed again.
    #[error("freezing {path} did not finish within {timeout:?} (state stayed {state}); the cgroup was thawed again. A task in uninterruptible sleep (D state, e.g. on NFS or FUSE) blocks the freezer: check `ps -o pid,stat,wchan` of the container's processes")]
    FreezeTimeout {
        /// The cgroup.
        path: PathBuf,
        /// The timeout.
        timeout: Duration,
        /// The last state read.
        state: String,
    },
    /// No freezer cgroup for a process.
    #[error("process {pid} has no {what} cgroup (is the container running?)")]
    NotFound {
        /// The pid.
        pid: i32,
        /// What was looked for.
        what: String,
    },
}
