//! CRIU's lazy-pages daemon for `restore --lazy-pages`: the restored process runs as soon as
//! its tree is back, and its memory arrives through userfaultfd (faulted pages first, the rest
//! copied in the background), so a large container is running in a fraction of the time.
//!
//! runc expects the user to start `criu lazy-pages` beforehand; cryo does the same when a
//! daemon already listens in the work dir (a page-server migration set up by hand), and
//! otherwise starts one itself on the local image.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::CriuError;

/// The socket CRIU's restore connects to, in the work dir.
pub const LAZY_SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the work dir.
pub const LAZY_LOG: &str = "lazy-pages.log";

/// A lazy-pages daemon cryo started. Dropped without [`LazyPagesDaemon::detach`], it is
/// killed (a failed restore leaves nothing behind).
#[derive(Debug)]
pub struct LazyPagesDaemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl LazyPagesDaemon {
    /// The daemon's pid (0 once detached).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Start `criu lazy-pages` serving `images_dir`, listening in `work_dir`, and wait until
    /// it says it listens (`--status-fd`). `Ok(None)` when a daemon already listens there.
    pub fn start(
        criu: &Path,
        images_dir: &Path,
        work_dir: &Path,
        timeout: Duration,
    ) -> Result<Option<Self>, CriuError> {
        let socket = work_dir.join(LAZY_SOCKET);
        let log = work_dir.join(LAZY_LOG);
        if user_daemon_running(work_dir) {
            return Ok(None);
        }
        let _ = std::fs::remove_file(&socket);
        let fail = |detail: String| CriuError::Transport {
            step: "lazy-pages",
            detail,
            log: log.clone(),
            excerpt: super::log_excerpt(&log),
        };
        // The daemon writes a byte to its status fd once it listens. Its socket file appears
        // earlier (at bind, before listen), and a restore connecting in between is refused.
        let (ready_rx, ready_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| fail(format!("cannot create the daemon's status pipe: {e}")))?;
        let ready_tx_raw = ready_tx.as_raw_fd();
        let mut cmd = Command::new(criu);
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--work-dir")
            .arg(work_dir)
            .arg("-o")
            .arg(LAZY_LOG)
            .arg("-v4")
            .arg("--status-fd")
            .arg(STATUS_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the child only calls setsid(2), dup2(2) and fcntl(2),
        // which are async-signal-safe, on fds it owns; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: the daemon outlives cryo and must not get the caller's
                // signals (a closed terminal's SIGHUP, a Ctrl-C to the foreground group).
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // The status pipe as fd 3, open across exec.
                let rc = if ready_tx_raw == STATUS_FD {
                    libc::fcntl(STATUS_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(ready_tx_raw, STATUS_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {} lazy-pages: {e}", criu.display())))?;
        drop(ready_tx);
        let mut daemon = Self {
            child: Some(child),
            socket,
        };
        let why = match wait_ready(&ready_rx, timeout) {
            Readiness::Ready => return Ok(Some(daemon)),
            Readiness::Closed => "criu lazy-pages exited before listening".to_string(),
            Readiness::TimedOut => format!(
                "criu lazy-pages did not listen on {} within {timeout:?}",
                daemon.socket.display()
            ),
            Readiness::Failed(e) => format!("waiting for criu lazy-pages: {e}"),
        };
        // Dropping the daemon kills it; name its exit status if it already ended.
        let status = daemon
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        Err(fail(match status {
            Some(st) => format!("criu lazy-pages exited ({st}) before listening"),
            None => why,
        }))
    }

    /// The restore succeeded: leave the daemon running until it has copied every page (it
    /// exits by itself then; whoever adopts it reaps it).
    pub fn detach(mut self) {
        self.child = None;
    }
}

impl Drop for LazyPagesDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// The daemon's status fd (`--status-fd`): the first after stdio.
const STATUS_FD: i32 = 3;

/// What the daemon's status pipe said.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    /// The ready byte.
    Ready,
    /// End of file: the daemon exited first.
    Closed,
    TimedOut,
    Failed(nix::errno::Errno),
}

/// Wait for the daemon's ready byte on `ready`.
fn wait_ready(ready: &OwnedFd, timeout: Duration) -> Readiness {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Readiness::TimedOut;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Readiness::Failed(e),
        }
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(ready.as_raw_fd(), &mut byte) {
        Ok(1) => Readiness::Ready,
        Ok(_) => Readiness::Closed,
        Err(e) => Readiness::Failed(e),
    }
}

/// Is a `criu lazy-pages` someone else started serving `work_dir`? (Its socket file outlives
/// it, and a probe connection would be taken for a restore, so look at the processes.)
fn user_daemon_running(work_dir: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    let want = work_dir
        .canonicalize()
        .unwrap_or_else(|_| work_dir.to_path_buf());
    dir.flatten().any(|e| {
        let p = e.path();
        let Ok(cmdline) = std::fs::read(p.join("cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"criu"))
            && args.iter().any(|a| *a == b"lazy-pages");
        if !is_daemon {
            return false;
        }
        let names_dir = args
            .iter()
            .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)) == want.as_path());
        names_dir || std::fs::read_link(p.join("cwd")).is_ok_and(|c| c == want)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for `criu` running `body` (sh) in the work dir it is given.
    fn fake_criu(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("criu");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nwhile [ \"$1\" != --work-dir ]; do shift; done; cd \"$2\"\n{body}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn waits_for_the_ready_byte_not_for_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        // As CRIU: the socket file exists at bind, listening (the byte) comes after.
        let criu = fake_criu(
            dir.path(),
            "touch lazy-pages.socket; sleep 0.3; touch listening; printf '\\0' >&3; sleep 30",
        );
        let daemon = LazyPagesDaemon::start(&criu, dir.path(), dir.path(), Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert!(
            dir.path().join("listening").exists(),
            "start returned before the daemon said it listens"
        );
        drop(daemon);
    }

    #[test]
    fn a_daemon_that_exits_before_listening_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let criu = fake_criu(dir.path(), "touch lazy-pages.socket; exit 3");
        let e = LazyPagesDaemon::start(&criu, dir.path(), dir.path(), Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exited") && e.contains("before listening"),
            "{e}"
        );
    }

    #[test]
    fn a_daemon_that_never_listens_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let criu = fake_criu(dir.path(), "echo $$ > pid; exec sleep 30");
        let e = LazyPagesDaemon::start(&criu, dir.path(), dir.path(), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not listen"), "{e}");
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "the daemon was left running"
        );
    }
}
