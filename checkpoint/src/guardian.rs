//! The guardian: a small process that outlives cryo for the length of a checkpoint or a
//! restore, so that no way cryo can end (SIGKILL, the OOM killer, a crash, a hang) leaves a
//! container frozen or half-made.
//!
//! cryo starts it before touching anything (a re-exec of its own binary in a new session,
//! deaf to the terminal's signals, last in the OOM killer's queue, holding a duplicate of the
//! container's lock) and, before each step that would need undoing, tells it over a socket
//! what to undo ([`Order`]). When the socket closes without [`Order::Done`], cryo is gone and
//! the guardian undoes, in this order: it lets CRIU end (CRIU notices its caller is gone at its
//! next message and cures the tasks; after a short grace it is killed), thaws the cgroup cryo
//! froze (unless it was frozen before), removes what cryo was writing, and runs the host's
//! cleanup of a half-made restore. Because it holds the lock, no other verb can act on the
//! container until that is done.
//!
//! It also holds the freeze deadline: if the container is still frozen by cryo when the
//! deadline passes (cryo hung, CRIU hung), it stops CRIU and thaws, and cryo, if it is alive,
//! fails at its next step. cryo's own error paths undo the same things in-process first; every
//! action here is idempotent.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How long CRIU may take to end by itself once cryo is gone before it is killed: it notices
/// at its next message to cryo and then cures the tasks. A kill is worse than a wait: killed
/// while its code is in a task, CRIU leaves that task to die of SIGTRAP.
const CRIU_GRACE: Duration = Duration::from_secs(1);
/// How long a killed CRIU may take to disappear (it detaches from the tasks as it dies).
const CRIU_KILL_WAIT: Duration = Duration::from_secs(5);

/// What cryo tells its guardian, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "order", rename_all = "kebab-case")]
pub enum Order {
    /// cryo is about to freeze this cgroup (sent before the freeze request is written): thaw
    /// it if cryo dies, unless it was frozen before; and thaw it anyway at the deadline.
    Freezing {
        /// The cgroup directory (v1 freezer or cgroup2).
        cgroup: PathBuf,
        /// The cgroup was frozen (paused) before cryo froze it: never thaw it.
        was_frozen: bool,
        /// Milliseconds since the epoch after which cryo may not keep it frozen.
        deadline_unix_ms: Option<u64>,
    },
    /// cryo thawed the cgroup (or handed its state on): nothing to thaw any more.
    Thawed,
    /// A CRIU process works for cryo: wait for it (then kill it) before thawing.
    Criu {
        /// Its pid.
        pid: i32,
    },
    /// Remove this path (a directory cryo is filling) if cryo dies.
    Remove {
        /// The path.
        path: PathBuf,
    },
    /// The path is no longer cryo's to remove (it was published or removed).
    Keep {
        /// The path.
        path: PathBuf,
    },
    /// Run the host's cleanup for this tag if cryo dies (a restore in progress).
    Cleanup {
        /// What the host cleans ([`GuardianHost::cleanup`]).
        tag: String,
    },
    /// The cleanup for this tag is no longer needed.
    CleanupDone {
        /// The tag.
        tag: String,
    },
    /// cryo is about to lock the network of this namespace for a group checkpoint
    /// ([`crate::group::netlock`]): unlock it if cryo dies.
    NetworkLocked {
        /// The namespace (`/proc/<pid>/ns/net`), which the guardian opens at once.
        netns: PathBuf,
    },
    /// That namespace was unlocked again, or stays locked on purpose: nothing to undo.
    NetworkReleased {
        /// The namespace, as in [`Order::NetworkLocked`].
        netns: PathBuf,
    },
    /// cryo finished (or undid everything itself): exit without acting.
    Done,
}

/// A guardian that could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum GuardianError {
    /// Starting the process failed.
    #[error("cannot start cryo's guardian process: {0}")]
    Start(#[source] std::io::Error),
    /// The guardian is gone: cryo must not go on to freeze or mount without it.
    #[error("cryo's guardian process is not answering ({0}); nothing was changed")]
    Lost(#[source] std::io::Error),
}

/// Starts the guardian process; the real one re-executes cryo (see the `cryo` binary), tests
/// may start anything that calls [`serve`].
pub trait GuardianLauncher {
    /// Start a guardian reading orders from `orders` (give it as the child's stdin) and
    /// holding a duplicate of `lock` until it exits.
    fn launch(&self, orders: OwnedFd, lock: Option<BorrowedFd<'_>>) -> std::io::Result<Child>;
}

/// cryo's end: a running guardian. Dropped without [`Guardian::dismiss`], it closes the
/// socket and waits while the guardian undoes what it was told (cryo's own error paths drop
/// it after undoing in-process; the guardian's second pass finds nothing left to do).
#[derive(Debug)]
pub struct Guardian {
    child: Option<Child>,
    socket: Option<UnixStream>,
}

impl Guardian {
    /// Start a guardian with `launcher`, handing it `lock` to hold.
    pub fn start(
        launcher: &dyn GuardianLauncher,
        lock: Option<BorrowedFd<'_>>,
    ) -> Result<Self, GuardianError> {
        let (ours, theirs) = UnixStream::pair().map_err(GuardianError::Start)?;
        let child = launcher
            .launch(OwnedFd::from(theirs), lock)
            .map_err(GuardianError::Start)?;
        Ok(Self {
            child: Some(child),
            socket: Some(ours),
        })
    }

    /// Tell the guardian something; an error means it is gone.
    pub fn order(&mut self, order: &Order) -> Result<(), GuardianError> {
        let mut line =
            serde_json::to_vec(order).map_err(|e| GuardianError::Lost(std::io::Error::other(e)))?;
        line.push(b'\n');
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| GuardianError::Lost(std::io::ErrorKind::NotConnected.into()))?;
        send_all(socket, &line).map_err(GuardianError::Lost)
    }

    /// Everything is done (or undone): let the guardian exit without acting, and wait for it.
    pub fn dismiss(mut self) -> Result<(), GuardianError> {
        let sent = self.order(&Order::Done);
        self.close_and_wait();
        sent
    }

    fn close_and_wait(&mut self) {
        self.socket.take();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        self.close_and_wait();
    }
}

/// `write_all` without SIGPIPE: a dead guardian must be an error, never the end of cryo.
fn send_all(socket: &UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    while !bytes.is_empty() {
        match send(socket.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What the guardian process needs from its host (the `cryo` binary).
pub trait GuardianHost {
    /// Undo a half-made restore named by `tag` (cryo's container id).
    fn cleanup(&self, tag: &str) -> Result<(), String>;
    /// Say what the guardian did (cryo's log).
    fn log(&self, message: &str);
}

/// What the guardian knows it may have to undo.
#[derive(Debug, Default)]
struct Duties {
    freeze: Option<Freeze>,
    criu: Option<Criu>,
    remove: Vec<PathBuf>,
    cleanups: Vec<String>,
    networks: Vec<(PathBuf, Option<crate::group::netlock::Netns>)>,
}

#[derive(Debug)]
struct Freeze {
    cgroup: PathBuf,
    was_frozen: bool,
    deadline: Option<SystemTime>,
}

#[derive(Debug)]
struct Criu {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// cryo dismissed it.
    Dismissed,
    /// cryo went away without dismissing it, and it undid what it was told.
    Undid,
}

/// The guardian process's main loop: read orders from `orders` until cryo dismisses it or
/// goes away, keeping the freeze deadline meanwhile; then undo what is left.
pub fn serve(orders: OwnedFd, host: &dyn GuardianHost) -> Ending {
    let raw = orders.as_raw_fd();
    let mut reader = BufReader::new(File::from(orders));
    let mut duties = Duties::default();
    let mut line = String::new();
    loop {
        let timeout = duties.deadline_in();
        // Lines already buffered need no wait (poll sees only what is left in the socket).
        if reader.buffer().is_empty() && !readable_within(raw, timeout) {
            // The deadline passed with the container still frozen by cryo.
            if let Some(f) = duties.freeze.as_ref() {
                host.log(&format!(
                    "the container in {} stayed frozen past its deadline: stopping CRIU and thawing it",
                    f.cgroup.display()
                ));
            }
            duties.stop_criu(host);
            duties.thaw(host);
            continue;
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match serde_json::from_str::<Order>(line.trim()) {
            Ok(Order::Done) => return Ending::Dismissed,
            Ok(order) => duties.take(order),
            Err(e) => host.log(&format!("ignoring an unreadable order {line:?}: {e}")),
        }
    }
    // Drain nothing more: cryo is gone. Undo.
    let _ = reader.read_to_end(&mut Vec::new());
    duties.stop_criu(host);
    duties.thaw(host);
    duties.unlock_networks(host);
    for path in std::mem::take(&mut duties.remove) {
        match cryo_oci::fsutil::remove_tree_same_fs(&path) {
            Ok(true) => host.log(&format!("removed the unfinished {}", path.display())),
            Ok(false) => {}
            Err(e) => host.log(&format!("could not remove {}: {e}", path.display())),
        }
    }
    for tag in std::mem::take(&mut duties.cleanups) {
        if let Err(e) = host.cleanup(&tag) {
            host.log(&format!(
                "cleaning up after the restore of {tag} failed: {e}"
            ));
        }
    }
    Ending::Undid
}

impl Duties {
    fn take(&mut self, order: Order) {
        match order {
            Order::Freezing {
                cgroup,
                was_frozen,
                deadline_unix_ms,
            } => {
                self.freeze = Some(Freeze {
                    cgroup,
                    was_frozen,
                    deadline: deadline_unix_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                })
            }
            Order::Thawed => self.freeze = None,
            Order::Criu { pid } => {
                self.criu = Some(Criu {
                    pid,
                    pidfd: pidfd_open(pid).ok(),
                })
            }
            Order::Remove { path } => self.remove.push(path),
            Order::Keep { path } => self.remove.retain(|p| p != &path),
            Order::Cleanup { tag } => self.cleanups.push(tag),
            Order::CleanupDone { tag } => self.cleanups.retain(|t| t != &tag),
            Order::NetworkLocked { netns } => {
                // Opened now: it names that namespace even if its processes die.
                let ns = crate::group::netlock::Netns::open(&netns).ok();
                self.networks.push((netns, ns));
            }
            Order::NetworkReleased { netns } => self.networks.retain(|(p, _)| p != &netns),
            Order::Done => {}
        }
    }

    /// Time left until the freeze deadline (None: no deadline pending).
    fn deadline_in(&self) -> Option<Duration> {
        let deadline = self.freeze.as_ref()?.deadline?;
        Some(
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
        )
    }

    /// Let CRIU end by itself for a moment, then kill it, and wait until it is gone: its
    /// tasks are only free (and thawable) once it has detached from them.
    fn stop_criu(&mut self, host: &dyn GuardianHost) {
        let Some(criu) = self.criu.take() else { return };
        let Some(pidfd) = criu.pidfd else { return };
        // A stopped CRIU cannot end by itself.
        let _ = pidfd_signal(&pidfd, libc::SIGCONT);
        if wait_pidfd(&pidfd, CRIU_GRACE) {
            return;
        }
        host.log(&format!("stopping CRIU (pid {})", criu.pid));
        let _ = pidfd_signal(&pidfd, libc::SIGKILL);
        if !wait_pidfd(&pidfd, CRIU_KILL_WAIT) {
            host.log(&format!(
                "CRIU (pid {}) did not end within {CRIU_KILL_WAIT:?} of SIGKILL",
                criu.pid
            ));
        }
    }

    fn unlock_networks(&mut self, host: &dyn GuardianHost) {
        use crate::group::netlock::NetLock;
        for (path, ns) in std::mem::take(&mut self.networks) {
            let Some(ns) = ns else {
                host.log(&format!(
                    "could not open {} to unlock its network",
                    path.display()
                ));
                continue;
            };
            match crate::group::netlock::Iptables::default().unlock(&ns) {
                Ok(()) => host.log(&format!("unlocked the network of {}", ns.name())),
                Err(e) => host.log(&format!(
                    "could not unlock the network of {}: {e}",
                    ns.name()
                )),
            }
        }
    }

    fn thaw(&mut self, host: &dyn GuardianHost) {
        let Some(f) = self.freeze.take() else { return };
        if f.was_frozen {
            return;
        }
        let freezer = cryo_cgroup::freezer_at(&f.cgroup);
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let thawed = freezer.thaw().is_ok()
                && freezer
                    .state()
                    .is_ok_and(|s| s != cryo_cgroup::FreezerState::Frozen);
            if thawed {
                host.log(&format!("thawed {}", f.cgroup.display()));
                return;
            }
            if !f.cgroup.exists() || Instant::now() >= until {
                host.log(&format!("could not thaw {}", f.cgroup.display()));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether `fd` has something to read (or hung up) within `timeout` (None: wait forever).
fn readable_within(fd: i32, timeout: Option<Duration>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // SAFETY: `fd` is the orders socket, owned by the caller's reader for the whole call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
    let start = Instant::now();
    loop {
        let left = match timeout {
            None => PollTimeout::NONE,
            Some(t) => {
                let left = t.saturating_sub(start.elapsed());
                PollTimeout::try_from(left.as_millis().min(60_000) as u32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, left) {
            Ok(0) => {
                if timeout.is_some_and(|t| start.elapsed() >= t) {
                    return false;
                }
            }
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true, // let the read report it
        }
    }
}

/// A pidfd for `pid` (Linux ≥ 5.3): it names this process even after the pid is reused.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(pidfd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to `timeout` for the process behind `pidfd` to end (the pidfd becomes readable).
fn wait_pidfd(pidfd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    let ms =
        PollTimeout::try_from(timeout.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
    loop {
        match poll(&mut fds, ms) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Milliseconds since the epoch `after` from now, for [`Order::Freezing`].
pub fn deadline_after(after: Duration) -> u64 {
    (SystemTime::now() + after)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "guardian_tests.rs"]
mod tests;
