//! A container process's terminal, the three ways runc offers it:
//!
//! - no terminal: the process gets cryo's stdio;
//! - `--detach --console-socket PATH`: the pty master goes to the caller's socket (libcontainer
//!   sends it there);
//! - a terminal in the foreground (`cryo run`/`exec` of a `terminal: true` process without
//!   `--detach`): cryo takes the master itself, through a socket of its own, and copies between
//!   it and its own stdin/stdout until the process exits, as runc does. Its own terminal, if
//!   stdin is one, is put in raw mode meanwhile, so keys reach the container untouched.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::workload::{set_terminal_size, terminal_size};

/// How a process gets its terminal (or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalMode {
    /// No terminal: the process inherits cryo's stdio.
    None,
    /// The pty master goes to the caller's console socket.
    Socket(PathBuf),
    /// cryo relays between the pty and its own stdio.
    Foreground,
}

/// runc's rules: a console socket only for a detached process with a terminal, and a detached
/// process with a terminal needs one. `socket` is made absolute against the working directory
/// (libcontainer reaches it through a link in the container's state directory).
pub fn terminal_mode(
    terminal: bool,
    detach: bool,
    socket: Option<&Path>,
) -> anyhow::Result<TerminalMode> {
    match (terminal, detach, socket) {
        (true, true, Some(s)) => Ok(TerminalMode::Socket(
            std::path::absolute(s)
                .with_context(|| format!("cannot resolve --console-socket {}", s.display()))?,
        )),
        (true, true, None) => bail!(
            "the process has a terminal (process.terminal) and --detach was given: pass \
             --console-socket to receive it, or run it in the foreground"
        ),
        (false, _, Some(_)) => bail!(
            "--console-socket given, but the process has no terminal (process.terminal is \
             false; `exec` needs --tty)"
        ),
        (true, false, Some(_)) => {
            bail!("--console-socket works only with --detach: without it cryo relays the terminal itself")
        }
        (true, false, None) => Ok(TerminalMode::Foreground),
        (false, _, None) => Ok(TerminalMode::None),
    }
}

/// A listening socket of cryo's own that receives the pty master.
pub struct ConsoleReceiver {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleReceiver {
    /// Listen at a fresh path in `dir` (cryo's state root).
    pub fn bind(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = dir.join(format!(
            ".console-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen for the terminal at {}", path.display()))?;
        Ok(Self { listener, path })
    }

    /// Where libcontainer should send the master.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master, once the container process sent it (it did before libcontainer returned).
    pub fn receive(&self, timeout: Duration) -> anyhow::Result<OwnedFd> {
        let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms)).context("waiting for the terminal")? == 0 {
            bail!(
                "the container process did not send its terminal within {} s",
                timeout.as_secs()
            );
        }
        let (stream, _) = self.listener.accept().context("accepting the terminal")?;
        let mut data = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut data)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the terminal")?;
        for cmsg in msg.cmsgs().context("reading the terminal message")? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we are
                    // its only owner.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        bail!("the container process sent no terminal descriptor")
    }
}

impl Drop for ConsoleReceiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Puts a terminal in raw mode; restores it on drop.
struct RawMode {
    fd: std::io::Stdin,
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        let fd = std::io::stdin();
        let saved = tcgetattr(&fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&fd, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

/// Relay between `master` and cryo's stdin/stdout until `pid` (a child of cryo) exits;
/// returns its exit code (128 + signal when killed), as `wait_forwarding` does.
pub fn relay(master: OwnedFd, pid: Pid) -> i32 {
    let _ = crate::commands::forward_signals(pid);
    let _raw = RawMode::enter();
    let stdin_fd = std::io::stdin().as_raw_fd();
    if let Some((rows, cols)) = terminal_size(stdin_fd) {
        set_terminal_size(master.as_raw_fd(), rows, cols);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t) };
    if let Ok(input) = master.try_clone() {
        // Keys to the container; the thread ends with cryo (stdin may never reach EOF).
        std::thread::spawn(move || {
            let mut to = std::fs::File::from(input);
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    let mut from = std::fs::File::from(master);
    let mut out = std::io::stdout();
    let mut open = true;
    loop {
        if RESIZED.swap(false, Ordering::SeqCst) {
            if let Some((rows, cols)) = terminal_size(stdin_fd) {
                set_terminal_size(from.as_raw_fd(), rows, cols);
            }
        }
        if open {
            open = copy_ready(&mut from, &mut out, 100);
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if !open {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(WaitStatus::Exited(_, code)) => {
                drain(&mut from, &mut out, open);
                return code;
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                drain(&mut from, &mut out, open);
                return 128 + sig as i32;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 255,
        }
    }
}

/// Copy what `from` has within `ms`; false once the terminal is closed (EIO: no process holds
/// its other end any more).
fn copy_ready(from: &mut std::fs::File, out: &mut std::io::Stdout, ms: u16) -> bool {
    let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => return true,
        Err(_) => return false,
        Ok(_) => {}
    }
    let mut buf = [0u8; 8192];
    match from.read(&mut buf) {
        Ok(0) => false,
        Ok(n) => {
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::Interrupted,
    }
}

/// What the exited process wrote and nobody read yet.
fn drain(from: &mut std::fs::File, out: &mut std::io::Stdout, open: bool) {
    let mut open = open;
    while open {
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
            break;
        }
        open = copy_ready(from, out, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runcs_terminal_rules() {
        assert_eq!(
            terminal_mode(false, true, None).expect("plain"),
            TerminalMode::None
        );
        assert_eq!(
            terminal_mode(true, false, None).expect("foreground"),
            TerminalMode::Foreground
        );
        assert!(matches!(
            terminal_mode(true, true, Some(Path::new("/run/s.sock"))),
            Ok(TerminalMode::Socket(p)) if p == Path::new("/run/s.sock")
        ));
        let needs_socket = terminal_mode(true, true, None).expect_err("needs a socket");
        assert!(needs_socket.to_string().contains("--console-socket"));
        let no_terminal = terminal_mode(false, true, Some(Path::new("s"))).expect_err("no tty");
        assert!(no_terminal
            .to_string()
            .contains("process.terminal is false"));
        assert!(terminal_mode(true, false, Some(Path::new("s"))).is_err());
        for e in [needs_socket, no_terminal] {
            assert!(!e.to_string().contains("youki"), "{e}");
        }
    }

    #[test]
    fn a_relative_console_socket_is_taken_from_the_working_directory() {
        let TerminalMode::Socket(p) =
            terminal_mode(true, true, Some(Path::new("tty.sock"))).expect("socket")
        else {
            panic!("not a socket mode");
        };
        assert!(p.is_absolute());
        assert!(p.ends_with("tty.sock"));
    }
}
