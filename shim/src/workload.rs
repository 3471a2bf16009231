//! The last steps in a container's process before it becomes the workload, run through
//! libcontainer's `Executor` hook (after namespaces, mounts, user and capabilities are set,
//! right before `execve`):
//!
//! - SIGPIPE back to its default. Rust's runtime ignores SIGPIPE in cryo, and an ignored
//!   disposition survives `execve`: without this, `yes | head -1` in the container would never
//!   end `yes` by SIGPIPE, unlike under runc.
//! - The terminal's size (`process.consoleSize`, or the size of the terminal `cryo run`/`exec`
//!   was started from), set on the pty before the workload can read it, as runc does.
//! - Joining the cgroups libcgroups did not place the process in (`exec --cgroup CTRL:PATH`,
//!   runc's other hierarchies): cryo opens their `cgroup.procs` beforehand, the process inherits
//!   the descriptors and writes `0` (itself) into each.
//! - For an `exec`, having cryo give its stdio to the process's user (see `stdio_owner`).

use std::collections::HashMap;
use std::os::fd::RawFd;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::Spec;

/// cryo's executor; see the module doc.
#[derive(Clone, Default)]
pub struct Workload {
    /// `cgroup.procs` descriptors (open in cryo, inherited) to move into.
    pub cgroup_procs: Vec<RawFd>,
    /// Terminal size (rows, columns) to set when the spec gives none.
    pub terminal_size: Option<(u16, u16)>,
    /// The process's end of cryo's stdio-ownership handshake (see `stdio_owner`).
    pub stdio_owner: Option<RawFd>,
}

impl Workload {
    fn prepare(&self, spec: &Spec) -> Result<(), ExecutorError> {
        for fd in &self.cgroup_procs {
            // SAFETY: the descriptor was opened by cryo for this process and stays open in it
            // until execve (close-on-exec); writing "0" moves the writer into that cgroup.
            let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(ExecutorError::Other(format!(
                    "adding pid to cgroup (fd {fd}): {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        if let Some(sock) = self.stdio_owner {
            crate::stdio_owner::ask(sock)
                .map_err(|e| ExecutorError::Other(format!("giving the process its stdio: {e}")))?;
        }
        // SAFETY: restoring a default disposition has no preconditions; this process is about
        // to execve and runs no other threads.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let process = spec.process().as_ref();
        if process.and_then(|p| p.terminal()).unwrap_or(false) {
            let size = process
                .and_then(|p| p.console_size())
                .map(|b| (b.height() as u16, b.width() as u16))
                .filter(|&(h, w)| h > 0 && w > 0)
                .or(self.terminal_size);
            if let Some((rows, cols)) = size {
                set_terminal_size(0, rows, cols);
            }
        }
        Ok(())
    }
}

/// TIOCSWINSZ on `fd`; a failure only leaves the size as it was.
pub fn set_terminal_size(fd: RawFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// The size of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

impl Executor for Workload {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.prepare(spec)?;
        DefaultExecutor {}.exec(spec)
    }

    /// libcontainer's check wants a PATH in the environment even for a command given by its
    /// path (an exec's process file may set no environment at all); runc needs none then.
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let program = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first())
            .filter(|a| a.contains('/'));
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        match program {
            Some(program) if !has_path => {
                use std::os::unix::fs::PermissionsExt;
                match std::fs::metadata(program) {
                    Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
                    _ => Err(ExecutorValidationError::ArgValidationError(format!(
                        "executable {program:?} not found or not executable"
                    ))),
                }
            }
            _ => DefaultExecutor {}.validate(spec),
        }
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}
