//! Talking to CRIU.
//!
//! cryo drives CRIU over its RPC protocol (`criu swrk`), using the protobuf types that the
//! `rust-criu` crate generates from CRIU's `rpc.proto`. The transport is our own (see
//! [`swrk`]) because rust-criu's client cannot pre-dump, feature-check, choose the network-lock
//! method, pass a CRIU config file, hand CRIU the caller's stdio for a restore, or run notify
//! callbacks that carry state. Everything above the transport talks to the [`CriuClient`] trait,
//! so the engine is tested with a fake CRIU.

pub mod lazy;
pub mod swrk;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub use rust_criu::rust_criu_protobuf::rpc;

/// What kind of request a [`CriuCall`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Full dump.
    Dump,
    /// Pre-dump (memory only, needs dirty-page tracking).
    PreDump,
    /// Restore.
    Restore,
}

impl CallKind {
    /// The RPC request type.
    pub fn req_type(self) -> rpc::Criu_req_type {
        match self {
            CallKind::Dump => rpc::Criu_req_type::DUMP,
            CallKind::PreDump => rpc::Criu_req_type::PRE_DUMP,
            CallKind::Restore => rpc::Criu_req_type::RESTORE,
        }
    }

    /// Name of the log file CRIU writes in the work directory (runc's names: clients read them).
    pub fn log_name(self) -> &'static str {
        match self {
            CallKind::Dump => "dump.log",
            CallKind::PreDump => "pre-dump.log",
            CallKind::Restore => "restore.log",
        }
    }
}

/// One dump or restore request, with the fds CRIU must inherit.
pub struct CriuCall {
    /// Dump, pre-dump or restore.
    pub kind: CallKind,
    /// The options. `images_dir_fd`/`work_dir_fd` are filled by the transport from the paths.
    pub opts: rpc::Criu_opts,
    /// Image directory.
    pub images_dir: PathBuf,
    /// Work directory (logs, stats).
    pub work_dir: PathBuf,
    /// Fds CRIU must inherit, placed at fd 4, 5, … in CRIU (fd 3 is the RPC socket). Options
    /// that name an fd (`inherit_fd`) must use those numbers: see [`CriuCall::extra_fd_number`].
    pub extra_fds: Vec<OwnedFd>,
    /// Whether CRIU gets the caller's stdio (restore: the restored tree keeps CRIU's fds 0-2,
    /// which is how a caller's new pipes reach it) or /dev/null (dump).
    pub inherit_stdio: bool,
    /// The umask CRIU runs with: a dump's image files hold the container's memory and are
    /// made private (0077); a restore keeps the caller's (CRIU restores the tasks' own).
    pub umask: Option<u32>,
}

impl CriuCall {
    /// The fd number the n-th extra fd has inside CRIU.
    pub fn extra_fd_number(n: usize) -> i32 {
        4 + n as i32
    }
}

/// A notification CRIU sent during a request (`notify_scripts`).
#[derive(Debug)]
pub struct Notification<'a> {
    /// The script name: `pre-dump`, `post-dump`, `network-lock`, `setup-namespaces`,
    /// `post-restore`, `orphan-pts-master`, `status-ready`, …
    pub script: &'a str,
    /// Pid CRIU reports (the restored init for `post-restore`/`setup-namespaces`).
    pub pid: i32,
    /// An fd sent along (the pty master for `orphan-pts-master`).
    pub fd: Option<OwnedFd>,
}

/// A point in time a CRIU call must not outlive, and what it protects (named in the error).
#[derive(Debug, Clone)]
pub struct Deadline {
    /// When.
    pub at: std::time::Instant,
    /// What runs out ("the freeze (--freeze-timeout 60s)").
    pub what: String,
}

/// The caller's side of a CRIU call: notifications, and when to give up.
pub trait CallObserver {
    /// CRIU runs as `pid` (cryo tells its guardian, so CRIU is stopped if cryo dies).
    fn started(&mut self, pid: i32) -> Result<(), String> {
        let _ = pid;
        Ok(())
    }
    /// A notification; an `Err` makes CRIU abort the request.
    fn notify(&mut self, n: Notification<'_>) -> Result<(), String>;
    /// The earliest deadline now in force: past it, CRIU is killed and the call fails.
    fn deadline(&self) -> Option<Deadline> {
        None
    }
    /// Whether the caller was asked to stop (SIGTERM): CRIU is killed and the call fails.
    fn interrupted(&self) -> bool {
        false
    }
}

/// A [`CallObserver`] that accepts every notification (no deadline, never interrupted).
#[derive(Debug, Default)]
pub struct AcceptAll;

impl CallObserver for AcceptAll {
    fn notify(&mut self, _n: Notification<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// What CRIU answered to a successful dump or restore.
#[derive(Debug, Clone, Default)]
pub struct CriuOutcome {
    /// Restored init pid (restore only).
    pub restored_pid: Option<i32>,
}

/// A failed CRIU call, with what a user needs to debug it.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// CRIU could not be started.
    #[error("cannot run {binary}: {source}; install CRIU >= 4.2 (scripts/setup builds it)")]
    Spawn {
        /// The binary.
        binary: String,
        /// OS error.
        source: std::io::Error,
    },
    /// CRIU is older than we support.
    #[error("CRIU {found} is too old: cryo needs CRIU >= {needed} on this kernel (scripts/setup builds 4.2.1)")]
    TooOld {
        /// Found version.
        found: String,
        /// Needed version.
        needed: String,
    },
    /// CRIU answered `success = false`.
    #[error("criu failed: type {kind} errno {errno}{msg}\nlog file: {log}{excerpt}")]
    Failed {
        /// Request type.
        kind: String,
        /// CRIU's errno.
        errno: i32,
        /// CRIU's error message, if any (prefixed).
        msg: String,
        /// The log file.
        log: PathBuf,
        /// Error lines from the log (prefixed).
        excerpt: String,
    },
    /// The RPC conversation broke (CRIU crashed or was killed).
    #[error("CRIU {step} failed: {detail}\nlog file: {log}{excerpt}")]
    Transport {
        /// What we were doing.
        step: &'static str,
        /// What went wrong.
        detail: String,
        /// The log file.
        log: PathBuf,
        /// Error lines from the log (prefixed).
        excerpt: String,
    },
    /// A feature this machine's CRIU or kernel lacks.
    #[error("{0}")]
    Missing(String),
    /// A deadline passed: CRIU was killed.
    #[error("{what}; CRIU was stopped\nlog file: {log}{excerpt}")]
    TimedOut {
        /// The deadline's description.
        what: String,
        /// The log file.
        log: PathBuf,
        /// Error lines from the log (prefixed).
        excerpt: String,
    },
    /// The caller was asked to stop: CRIU was killed.
    #[error("interrupted by a signal; CRIU was stopped\nlog file: {log}")]
    Interrupted {
        /// The log file.
        log: PathBuf,
    },
}

impl CriuError {
    /// The same error naming `log` as CRIU's log file (a copy kept elsewhere).
    pub fn with_log(self, log: &std::path::Path) -> Self {
        let log = log.to_path_buf();
        match self {
            CriuError::Failed {
                kind,
                errno,
                msg,
                excerpt,
                ..
            } => CriuError::Failed {
                kind,
                errno,
                msg,
                log,
                excerpt,
            },
            CriuError::Transport {
                step,
                detail,
                excerpt,
                ..
            } => CriuError::Transport {
                step,
                detail,
                log,
                excerpt,
            },
            CriuError::TimedOut { what, excerpt, .. } => CriuError::TimedOut { what, log, excerpt },
            CriuError::Interrupted { .. } => CriuError::Interrupted { log },
            other => other,
        }
    }
}

/// Features CRIU can be asked about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// Dirty-page tracking (soft-dirty): needed for pre-dump and incremental dumps.
    pub mem_track: bool,
    /// userfaultfd-based lazy restore.
    pub lazy_pages: bool,
}

/// The seam the engine talks through; [`swrk::SwrkClient`] is the real one.
pub trait CriuClient {
    /// CRIU's version as major*10000 + minor*100 + sublevel.
    fn version(&self) -> Result<u32, CriuError>;
    /// Which of the asked features this machine has.
    fn features(&self, ask: Features) -> Result<Features, CriuError>;
    /// Make sure a lazy-pages daemon serves `images_dir` for a restore working in `work_dir`
    /// (`None`: one that someone else started already does).
    fn lazy_pages_daemon(
        &self,
        images_dir: &std::path::Path,
        work_dir: &std::path::Path,
    ) -> Result<Option<lazy::LazyPagesDaemon>, CriuError> {
        let _ = (images_dir, work_dir);
        Err(CriuError::Missing(
            "this CRIU client cannot start a lazy-pages daemon".into(),
        ))
    }
    /// Run a dump, pre-dump or restore request.
    fn call(
        &self,
        call: CriuCall,
        observer: &mut dyn CallObserver,
    ) -> Result<CriuOutcome, CriuError>;
}

/// The lines of a CRIU log worth showing a user: each line with "Error" plus the lines before it.
pub fn log_excerpt(log: &std::path::Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut keep = std::collections::BTreeSet::new();
    for (i, l) in lines.iter().enumerate() {
        // CRIU always logs this one when it runs without CAP_SYS_RESOURCE: harmless noise.
        if l.contains("Error") && !l.contains("RLIMIT_NOFILE") {
            for j in i.saturating_sub(2)..=i {
                keep.insert(j);
            }
        }
    }
    let picked: Vec<&str> = keep.into_iter().rev().take(12).map(|i| lines[i]).collect();
    if picked.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nfrom the log:");
    for l in picked.into_iter().rev() {
        out.push_str("\n  ");
        out.push_str(l);
    }
    out
}

/// `4.2.1` → 40201.
pub fn version_number(major: i32, minor: i32, sub: i32) -> u32 {
    (major.max(0) as u32) * 10000 + (minor.max(0) as u32) * 100 + sub.max(0) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn excerpt_keeps_error_lines_and_context() {
        let dir = std::env::temp_dir().join(format!("cryo-excerpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("dump.log");
        std::fs::write(
            &log,
            "a\nb\nc\nd\n(00.1) Error (criu/sk-inet.c:191): inet: Connected TCP socket\ne\n",
        )
        .unwrap();
        let e = log_excerpt(&log);
        assert!(
            e.contains("Connected TCP socket") && e.contains("  c") && !e.contains("  a"),
            "{e}"
        );
        assert_eq!(log_excerpt(&dir.join("missing")), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_numbers() {
        assert_eq!(version_number(4, 2, 1), 40201);
        assert!(version_number(4, 1, 1) < version_number(4, 2, 0));
    }
}
