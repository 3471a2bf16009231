//! The one error type of the crate: every variant names the cgroup file or process involved and
//! the step that failed, and its message says what the user can check.

use std::path::PathBuf;
use std::time::Duration;

use crate::freezer::FreezerState;

/// What went wrong with a cgroup, naming the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Writing a cgroup control file failed.
    #[error(
        "cannot write {value:?} to {}: {source} (does the cgroup still exist, i.e. is the \
         container still running, and does cryo run as root?)",
        path.display()
    )]
    Write {
        /// The control file.
        path: PathBuf,
        /// The value that was being written.
        value: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading a cgroup control file (or a /proc file) failed.
    #[error(
        "cannot read {}: {source} (does the cgroup or process still exist, and does cryo run \
         as root?)",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The freeze did not complete in time; cryo asked the kernel to thaw the cgroup again so
    /// the container is not left half-frozen.
    #[error(
        "freezing {} did not finish within {timeout:?} (the state stayed {state}); {}. A task in \
         uninterruptible sleep (D state, e.g. blocked on NFS, FUSE or a hung device) cannot be \
         frozen: look at `ps -o pid,stat,wchan:32,cmd` for the container's tasks, fix what they \
         wait on, or retry with a longer timeout",
        path.display(),
        thaw_outcome(thaw_error.as_deref())
    )]
    FreezeTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// The timeout that elapsed.
        timeout: Duration,
        /// The last state read before giving up.
        state: FreezerState,
        /// Why thawing again failed, if it did (then the cgroup may still be FREEZING).
        thaw_error: Option<String>,
    },
    /// A process or one of its cgroups could not be found.
    #[error(
        "process {pid}: no {what} (is the container still running, and is the cgroup \
         hierarchy mounted in cryo's mount namespace?)"
    )]
    NotFound {
        /// The process id.
        pid: i32,
        /// What was looked for.
        what: String,
    },
    /// A cgroup or /proc file held something this crate does not understand.
    #[error("unexpected content {line:?} in {}: is this a Linux cgroup file?", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The offending line or value.
        line: String,
    },
    /// A `linux.cgroupsPath` that cryo refuses to use.
    #[error("invalid cgroups path {}: {reason}; fix linux.cgroupsPath in config.json", path.display())]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// Why it is refused.
        reason: &'static str,
    },
    /// libcgroups could not tell how cgroups are set up on this machine.
    #[error(
        "cannot detect the cgroup setup under /sys/fs/cgroup: {source} (mount cgroup v1 \
         controllers or cgroup2 there)"
    )]
    Setup {
        /// libcgroups' error.
        #[source]
        source: libcgroups::common::GetCgroupSetupError,
    },
}

fn thaw_outcome(thaw_error: Option<&str>) -> String {
    match thaw_error {
        None => "the cgroup was thawed again and the container keeps running".to_string(),
        Some(e) => format!(
            "thawing it again FAILED ({e}), so the container may be stuck half-frozen: write \
             THAWED to freezer.state (v1) or 0 to cgroup.freeze (v2) by hand"
        ),
    }
}
