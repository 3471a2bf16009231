//! cryo's guardian process (see `cryo_checkpoint::guardian`): started by `checkpoint` and
//! `restore` as `cryo --root R [--log L] __guardian`, it reads orders on stdin and holds the
//! container's lock on fd 3 until it exits.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use cryo_checkpoint::guardian::{self, Ending, GuardianHost, GuardianLauncher};

use crate::context::Context;

/// The fd the guardian finds the container's lock on.
const LOCK_FD: i32 = 3;

/// Starts `cryo __guardian` (this very binary) for a checkpoint or restore.
pub struct Launcher<'c> {
    ctx: &'c Context,
}

impl<'c> Launcher<'c> {
    /// A launcher passing on `ctx`'s root and log settings.
    pub fn new(ctx: &'c Context) -> Self {
        Self { ctx }
    }
}

impl GuardianLauncher for Launcher<'_> {
    fn launch(&self, orders: OwnedFd, lock: Option<BorrowedFd<'_>>) -> std::io::Result<Child> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--root").arg(&self.ctx.root);
        if let Some(log) = &self.ctx.log {
            cmd.arg("--log").arg(log);
            cmd.arg("--log-format").arg(self.ctx.log_format_arg());
        }
        cmd.arg("__guardian")
            .stdin(Stdio::from(orders))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let lock_raw = lock.map(|l| l.as_raw_fd());
        // SAFETY: the closure only calls async-signal-safe functions (setsid, dup2, fcntl,
        // signal, write) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: the terminal's ^C and a kill of cryo's process group pass
                // it by.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let placed = match lock_raw {
                    // Already there: only its close-on-exec flag must go.
                    Some(LOCK_FD) => libc::fcntl(LOCK_FD, libc::F_SETFD, 0),
                    Some(fd) => libc::dup2(fd, LOCK_FD),
                    None => 0,
                };
                if placed < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

/// What the guardian does on cryo's behalf.
struct Host<'c> {
    ctx: &'c Context,
}

impl GuardianHost for Host<'_> {
    fn cleanup(&self, tag: &str) -> Result<(), String> {
        // The guardian already holds the container's lock (inherited): no new lock here.
        super::cleanup::undo_half_made(self.ctx, tag).map_err(|e| format!("{e:#}"))
    }

    fn log(&self, message: &str) {
        crate::logging::log("warning", &format!("guardian: {message}"));
    }
}

/// `__guardian`: serve until cryo dismisses it or goes away.
pub fn run(ctx: &Context) -> anyhow::Result<i32> {
    // Last in the OOM killer's queue: it is what cleans up after a killed cryo.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // SAFETY: fd 0 is the orders socket cryo gave us; from here this owns it.
    let orders = unsafe { OwnedFd::from_raw_fd(0) };
    let ending = guardian::serve(orders, &Host { ctx });
    Ok(match ending {
        Ending::Dismissed => 0,
        Ending::Undid => 1,
    })
}
