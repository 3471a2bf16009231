//! cryo's own page receiver: CRIU sends the container's pages to cryo instead of writing them
//! itself, so that the costly part of writing them happens outside the freeze.
//!
//! CRIU can dump pages to a page server over a socket it is handed (`criu_opts.ps.fd`). cryo
//! passes one end of a socketpair and serves the other in a thread. Before the freeze, while
//! CRIU starts up, that thread creates each task's pages image in the image dir, sized from
//! the task's resident anonymous memory, and faults it in ([`staging`]). Inside the freeze
//! CRIU splices the pages into the socket (no copy) and the thread copies them straight into
//! those pre-faulted pages: one copy, no allocation. The images are plain CRIU images
//! (`pagemap-*.img` + `pages-*.img`, byte for byte what CRIU writes), so runc and `crit` read
//! them as before.

pub mod memory;
pub mod protocol;
pub mod session;
pub mod staging;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use session::{Session, Summary};
pub use staging::{Estimate, Mode};

/// Socket buffers big enough that CRIU rarely waits for the copy (the data in them are
/// references to the frozen container's pages, not copies).
const SOCKET_BUFFER: usize = 16 << 20;

/// The receiver failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Writing an image file failed (a full disk shows here, not as CRIU's broken pipe).
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading CRIU's stream or answering it failed.
    #[error("CRIU's page stream broke: {0}")]
    Stream(#[source] std::io::Error),
    /// CRIU sent something a dump does not send.
    #[error("{0}")]
    Protocol(String),
    /// The receiving thread could not run.
    #[error("the page receiver thread: {0}")]
    Thread(String),
}

impl ReceiveError {
    pub(crate) fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { step, path, source }
    }

    /// Whether this is cryo's own write failing (the cause to report over CRIU's error).
    pub fn is_write_failure(&self) -> bool {
        matches!(self, Self::Io { .. })
    }
}

/// A running receiver.
#[derive(Debug)]
pub struct PageReceiver {
    thread: Option<JoinHandle<Result<Session, ReceiveError>>>,
    staged: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    wait_limit: Duration,
    /// The thread's end of the socket, to end its wait for CRIU when the dump is abandoned
    /// before CRIU ever ran (CRIU's end may still be open in the caller then).
    ours: Option<UnixStream>,
}

impl PageReceiver {
    /// Start receiving into `image_dir`, staging the given tasks' images first as `mode`
    /// says; `replaced`: the page images are replaced after the dump (a store increment),
    /// their staged length is left as it is. Returns the receiver and the socket end to hand
    /// CRIU.
    pub fn start(
        image_dir: &Path,
        estimates: Vec<Estimate>,
        mode: Mode,
        replaced: bool,
    ) -> Result<(Self, OwnedFd), ReceiveError> {
        let (mut ours, theirs) = UnixStream::pair().map_err(ReceiveError::Stream)?;
        enlarge_buffers(&ours, &theirs);
        let (staged_tx, staged) = mpsc::channel();
        let dir = image_dir.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let wait_limit = staging::wait_limit(estimates.iter().map(|e| e.bytes).sum());
        let session_stop = stop.clone();
        let ours_for_drop = ours.try_clone().ok();
        let thread = std::thread::Builder::new()
            .name("cryo-pages".into())
            .spawn(move || {
                let mut session = Session::new(&dir, mode, replaced, session_stop);
                for e in estimates {
                    if let Err(err) = session.stage(e.vpid, e.bytes) {
                        tracing::debug!("staging the pages of task {}: {err}", e.vpid);
                    }
                }
                let _ = staged_tx.send(());
                session.serve(&mut ours)?;
                Ok(session)
            })
            .map_err(|e| ReceiveError::Thread(e.to_string()))?;
        let receiver = Self {
            thread: Some(thread),
            staged,
            stop,
            wait_limit,
            ours: ours_for_drop,
        };
        Ok((receiver, theirs.into()))
    }

    /// Call just before the freeze, so that the container, not the freeze, waits for the
    /// staging: wait until it is done, at most [`staging::wait_limit`] for its size, then stop
    /// it where it stands. What is not staged by then is received unstaged.
    pub fn wait_staged(&self) {
        let _ = self.staged.recv_timeout(self.wait_limit);
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Wait for the end of the stream and give the images their final names. On an error the
    /// receiver's files are removed.
    pub fn finish(mut self) -> Result<Summary, ReceiveError> {
        let thread = self
            .thread
            .take()
            .ok_or_else(|| ReceiveError::Thread("it already ended".into()))?;
        thread
            .join()
            .map_err(|_| ReceiveError::Thread("it panicked".into()))??
            .finish()
    }
}

impl Drop for PageReceiver {
    /// An unfinished receiver (the dump failed or never ran) is cut off from the socket;
    /// joining it removes its files.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let (Some(s), true) = (&self.ours, self.thread.is_some()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn enlarge_buffers(ours: &UnixStream, theirs: &UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    // Root may exceed the sysctl limits (the *Force options); an unprivileged caller simply
    // keeps the defaults.
    let _ = setsockopt(theirs, sockopt::SndBufForce, &SOCKET_BUFFER);
    let _ = setsockopt(ours, sockopt::RcvBufForce, &SOCKET_BUFFER);
}
