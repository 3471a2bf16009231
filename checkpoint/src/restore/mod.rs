//! `cryo restore`: nothing is changed until the image is known good, and everything changed is
//! undone if the restore does not end in a running container.
//!
//! 1. The image is verified ([`crate::image::verify_image_but_pages`]: manifest, every file's
//!    size and digest, no stranger files) and CRIU checked, before anything is touched. Only
//!    the page images' digests are checked later, beside CRIU, and waited for at CRIU's
//!    `post-restore`, before any restored task runs ([`crate::image::alongside`]).
//! 2. A guardian process ([`crate::guardian`]) and a journal in the container's state dir
//!    ([`journal`]) are set up; from here every thing made is recorded before it is made.
//! 3. The rootfs changeset is applied ([`rootfs_step`]), /dev/shm refilled, compressed pages
//!    staged, the lazy-pages daemon started, the rootfs bind-mounted for CRIU, the cgroup
//!    created; CRIU restores under a deadline and the interrupt flag.
//! 4. The result is a [`PendingRestore`]: the caller records the container's state, then
//!    [`PendingRestore::commit`]s. Dropped uncommitted, it undoes everything (the restored
//!    processes included); if cryo dies instead, its guardian or the next verb on the id undoes
//!    it from the journal.

pub mod journal;
mod mount;
pub mod rootfs_step;
mod run;

use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::Spec;

use crate::criu::CriuError;
use crate::flags::{CommonFlags, FlagError};
use crate::guardian::{GuardianError, GuardianLauncher};
use crate::image::ImageError;
use crate::manifest::Manifest;
use crate::plan::PlanError;
use crate::rootfs::RootfsError;

pub use run::{restore, PendingRestore};

/// Restore-only flags.
#[derive(Debug, Clone, Default)]
pub struct RestoreFlags {
    /// Shared flags.
    pub common: CommonFlags,
    /// `--tcp-close`
    pub tcp_close: bool,
    /// `--lsm-profile TYPE:NAME`
    pub lsm_profile: Option<String>,
    /// `--lsm-mount-context`
    pub lsm_mount_context: Option<String>,
    /// `--no-rootfs-restore`
    pub no_rootfs_restore: bool,
}

/// What the restore needs.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// New container id.
    pub id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// Its spec.
    pub spec: Spec,
    /// Host path of the target rootfs.
    pub rootfs: PathBuf,
    /// `--image-path`.
    pub image_dir: PathBuf,
    /// `--work-path`.
    pub work_dir: PathBuf,
    /// A private directory for this container: the journal lives there, and the rootfs is
    /// bind-mounted there for CRIU.
    pub scratch_dir: PathBuf,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// The cgroup path of the new container, relative to each hierarchy root.
    pub cgroup_path: PathBuf,
    /// Flags.
    pub flags: RestoreFlags,
    /// `--criu-timeout`: how long CRIU may work.
    pub criu_timeout: Duration,
}

/// What the host side does for a restore: cgroups and hooks. The shim implements it with
/// libcgroups and libcontainer; tests with a fake.
pub trait RestoreHost: journal::CgroupUndo {
    /// Create the container's cgroups and move the calling process in (CRIU inherits them);
    /// returns `(controller, path)` pairs for CRIU's `cg_root` (controller `""`: cgroup2).
    fn join_cgroup(&mut self) -> Result<Vec<(String, String)>, String>;
    /// Move the calling process back where it was.
    fn leave_cgroup(&mut self);
    /// Run prestart and createRuntime hooks for the restored init `pid`.
    fn run_hooks(&mut self, pid: i32) -> Result<(), String>;
    /// CRIU was started (in the cgroups [`RestoreHost::join_cgroup`] made): the calling
    /// process may leave them from here. A group restore ([`crate::group`]) starts one
    /// member's CRIU at a time.
    fn criu_started(&mut self) {}
    /// Every task of init `pid` is restored (CRIU's `post-restore`): none runs yet, the TCP
    /// sockets are still in repair mode. An error makes CRIU undo the restore. A group
    /// restore waits here until every member is restored.
    fn restored(&mut self, pid: i32) -> Result<(), String> {
        let _ = pid;
        Ok(())
    }
    /// Who a directory is (the restore's test for "the same upper dir").
    fn dir_identity(&self, dir: &Path) -> Option<crate::facts::DirIdentity> {
        crate::facts::dir_identity(dir)
    }
}

/// The seams a restore goes through.
pub struct RestoreEnv<'a> {
    /// CRIU.
    pub criu: &'a dyn crate::criu::CriuClient,
    /// Starts the guardian process.
    pub guardian: &'a dyn GuardianLauncher,
    /// The container's lock, held by the guardian too while it lives.
    pub lock: Option<std::os::fd::BorrowedFd<'a>>,
    /// Whether SIGINT/SIGTERM/SIGHUP arrived.
    pub interrupted: &'a dyn Fn() -> bool,
}

/// A successful restore.
#[derive(Debug)]
pub struct RestoreReport {
    /// The restored init process.
    pub pid: i32,
    /// The manifest, if the image had one (runc images do not).
    pub manifest: Option<Manifest>,
    /// The rootfs snapshot was applied (false: not needed or not present).
    pub rootfs_applied: bool,
    /// Why the snapshot was not applied, if it was not.
    pub rootfs_note: String,
    /// What fds 0-2 of the restored init are now (the new external descriptors).
    pub stdio: Vec<String>,
    /// Milliseconds until the process ran again.
    pub restore_ms: f64,
    /// Milliseconds spent verifying the image before anything was touched.
    pub verify_ms: f64,
    /// The page images' check beside CRIU (none: nothing was left to it).
    pub pages_check: Option<crate::image::alongside::AlongsideTimes>,
    /// What the user should know (an image without manifest, an old format).
    pub warnings: Vec<String>,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreCause {
    /// The image is refused.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// CRIU failed, was too old, timed out or was stopped.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// A flag value.
    #[error(transparent)]
    Options(#[from] FlagError),
    /// Planning CRIU's externals.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The rootfs changeset or the open files.
    #[error(transparent)]
    // Boxed: the rootfs errors carry paths and outcomes, and every step returns this.
    Rootfs(#[from] Box<RootfsError>),
    /// The guardian.
    #[error(transparent)]
    Guardian(#[from] GuardianError),
    /// The image was made by a newer CRIU than this machine's.
    #[error("the image was made by CRIU {made}, this machine's CRIU is {here}: restore it with CRIU >= {made}")]
    CriuOlderThanImage {
        /// CRIU version that dumped.
        made: String,
        /// CRIU version here.
        here: String,
    },
    /// A file step, with its path.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something the host (cgroups, hooks, console) or an older helper reported.
    #[error("{0}")]
    Host(String),
    /// SIGINT/SIGTERM/SIGHUP.
    #[error("interrupted by a signal")]
    Interrupted,
}

/// A failed restore: the step and the cause. Everything the restore made was undone.
#[derive(Debug, thiserror::Error)]
#[error(
    "restore of container {id} failed while {step}{}",
    undo_note(undo_problems)
)]
pub struct RestoreError {
    /// Container id.
    pub id: String,
    /// The step.
    pub step: &'static str,
    /// What went wrong (boxed: errors travel up every step's return).
    #[source]
    pub cause: Box<RestoreCause>,
    /// What could not be undone (empty: nothing is left).
    pub undo_problems: Vec<String>,
}

fn undo_note(problems: &[String]) -> String {
    if problems.is_empty() {
        String::new()
    } else {
        format!(
            " (undoing the restore left problems: {}; `cryo delete --force` retries)",
            problems.join("; ")
        )
    }
}

/// `40201` → `4.2.1`.
fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// Is `pid` a `criu lazy-pages` process (so a journal never kills anything else)?
fn lazy_daemon_of(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == b"lazy-pages"))
        .unwrap_or(false)
}

impl From<RootfsError> for RestoreCause {
    fn from(e: RootfsError) -> Self {
        RestoreCause::Rootfs(Box::new(e))
    }
}
