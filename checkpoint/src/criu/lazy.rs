//! CRIU's lazy-pages daemon for `restore --lazy-pages`: the restored process runs as soon as
//! its tree is back, and its memory arrives through userfaultfd (faulted pages first, the rest
//! copied in the background), so a large container is running in a fraction of the time.
//!
//! runc expects the user to start `criu lazy-pages` beforehand; cryo does the same when a
//! daemon already listens in the work dir (a page-server migration set up by hand), and
//! otherwise starts one itself on the local image.

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
    /// Start `criu lazy-pages` serving `images_dir`, listening in `work_dir`, and wait until
    /// its socket exists. `Ok(None)` when a daemon already listens there.
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
        let mut cmd = Command::new(criu);
        cmd.arg("lazy-pages")
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--work-dir")
            .arg(work_dir)
            .arg("-o")
            .arg(LAZY_LOG)
            .arg("-v4")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the child only calls setsid(2), which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            // Its own session: the daemon outlives cryo and must not get the caller's signals
            // (a closed terminal's SIGHUP, a Ctrl-C to the foreground group).
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {} lazy-pages: {e}", criu.display())))?;
        let mut daemon = Self {
            child: Some(child),
            socket,
        };
        let end = Instant::now() + timeout;
        while !daemon.socket.exists() {
            if let Some(c) = daemon.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    daemon.child = None;
                    return Err(fail(format!(
                        "criu lazy-pages exited ({st}) before listening"
                    )));
                }
            }
            if Instant::now() > end {
                return Err(fail(format!(
                    "criu lazy-pages did not listen on {} within {timeout:?}",
                    daemon.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Some(daemon))
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
