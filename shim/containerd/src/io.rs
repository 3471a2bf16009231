//! A process's stdio, as containerd's runc shim gives it: containerd names fifos (or files);
//! the process gets pipes, and the shim copies between the pipes and the fifos. Pipes rather
//! than the fifos themselves, because a checkpoint records the process's stdio, and cryo
//! restores pipes onto the new pipes of whoever restores (runc's `descriptors.json`).
//! With a terminal, cryo hands the shim the pty master through a console socket, and the shim
//! copies between the master and the fifos.
//!
//! An output fifo is opened for writing only once containerd's client has its reading end open
//! (as the runc shim's blocking open does): data written into a fifo that nobody holds open is
//! lost when the shim closes it, and a short exec's whole output would be. The shim then keeps
//! a reading end of its own: a client that goes away does not make the process's writes fail;
//! they wait for the next reader.
//! It also keeps a writer on the stdin fifo, so that the process sees EOF only when containerd
//! closes its stdin (`CloseIO`), not whenever a client detaches.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use containerd_shim::warn;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::{fchown, Gid, Uid};

use crate::cryo::CommandIo;

/// How long the shim waits for cryo to send the pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for the output copies to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done, with the path.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A stdio URI the shim cannot serve.
    #[error(
        "stdio {uri:?} is not supported by containerd-shim-cryo-v1: use a fifo or a file \
         (file:// or a plain path)"
    )]
    Unsupported {
        /// The URI.
        uri: String,
    },
    /// cryo did not send the pty master.
    #[error("no terminal from cryo within {} s on {path}", CONSOLE_TIMEOUT.as_secs())]
    NoConsole {
        /// The console socket.
        path: PathBuf,
    },
}

fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> IoError {
    let what = what.into();
    move |source| IoError::Os { what, source }
}

fn nix_os(what: impl Into<String>) -> impl FnOnce(nix::Error) -> IoError {
    let what = what.into();
    move |e| IoError::Os {
        what,
        source: io::Error::from(e),
    }
}

/// The stdio containerd asked for: paths (empty: none) and whether it is a terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin fifo.
    pub stdin: String,
    /// stdout fifo or file.
    pub stdout: String,
    /// stderr fifo or file.
    pub stderr: String,
    /// A terminal instead of pipes.
    pub terminal: bool,
}

/// Where an output goes.
enum Destination {
    Fifo(PathBuf),
    File(PathBuf),
}

fn destination(uri: &str) -> Result<Destination, IoError> {
    let path = match uri.split_once("://") {
        None => uri,
        Some(("file", path)) => path,
        Some(_) => {
            return Err(IoError::Unsupported {
                uri: uri.to_string(),
            })
        }
    };
    let path = PathBuf::from(path);
    let is_fifo = std::fs::metadata(&path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    Ok(if is_fifo {
        Destination::Fifo(path)
    } else {
        Destination::File(path)
    })
}

/// An output, ready to be written: a file is opened at once, a fifo by the copy thread
/// ([`Output::open`]).
enum Output {
    File(File),
    Fifo(PathBuf),
}

/// How often a copy thread looks for containerd's reader of an output fifo.
const READER_POLL: Duration = Duration::from_millis(5);

fn prepare_output(uri: &str) -> Result<Output, IoError> {
    match destination(uri)? {
        Destination::Fifo(path) => Ok(Output::Fifo(path)),
        Destination::File(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(os(format!("create {}", dir.display())))?;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map(Output::File)
                .map_err(os(format!("open stdio file {}", path.display())))
        }
    }
}

impl Output {
    fn try_clone(&self) -> Result<Self, IoError> {
        Ok(match self {
            Self::File(f) => Self::File(f.try_clone().map_err(os("duplicate the stdio file"))?),
            Self::Fifo(p) => Self::Fifo(p.clone()),
        })
    }

    /// The writer, and for a fifo the shim's own reader that keeps it open. A fifo waits for
    /// containerd's reader (polling, so that a process being deleted can stop the wait:
    /// `None` then).
    fn open(self, closing: &AtomicBool) -> io::Result<Option<(File, Option<File>)>> {
        let path = match self {
            Self::File(f) => return Ok(Some((f, None))),
            Self::Fifo(path) => path,
        };
        let writer = loop {
            match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    if closing.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    thread::sleep(READER_POLL);
                }
                Err(e) => return Err(e),
            }
        };
        let flags = fcntl(writer.as_raw_fd(), FcntlArg::F_GETFL)?;
        fcntl(
            writer.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK),
        )?;
        let keeper = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)?;
        Ok(Some((writer, Some(keeper))))
    }
}

/// Open the stdin fifo: a reader that blocks for data and sees EOF once every writer closed,
/// and the shim's own writer that keeps it from seeing EOF before `CloseIO`.
fn open_stdin(path: &str) -> Result<(File, File), IoError> {
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(os(format!("open stdin fifo {path}")))?;
    // The reader exists now, so a non-blocking writer opens at once.
    let keeper = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(os(format!("open stdin fifo {path} for writing")))?;
    let flags = fcntl(reader.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(nix_os(format!("read the flags of {path}")))?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(reader.as_raw_fd(), FcntlArg::F_SETFL(blocking))
        .map_err(nix_os(format!("make {path} blocking")))?;
    Ok((reader, keeper))
}

/// The shim's ends of a process's pipes, made before cryo runs.
pub struct Pipes {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// Pipes for the non-empty paths of `paths`; the returned [`CommandIo`] holds the process's
/// ends, for cryo. The process's ends belong to `uid`/`gid` (runc's `IoUid`/`IoGid`).
pub fn make_pipes(paths: &StdioPaths, uid: u32, gid: u32) -> Result<(Pipes, CommandIo), IoError> {
    let pipe = |what: &str| -> Result<(OwnedFd, OwnedFd), IoError> {
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(nix_os(format!("create the {what} pipe")))
    };
    let chown = |fd: &OwnedFd| -> Result<(), IoError> {
        if uid == 0 && gid == 0 {
            return Ok(());
        }
        fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(nix_os("give the stdio pipes to the io uid/gid"))
    };
    let (mut pipes, mut theirs) = (
        Pipes {
            stdin: None,
            stdout: None,
            stderr: None,
        },
        (None, None, None),
    );
    if !paths.stdin.is_empty() {
        let (read, write) = pipe("stdin")?;
        chown(&read)?;
        pipes.stdin = Some(File::from(write));
        theirs.0 = Some(read);
    }
    if !paths.stdout.is_empty() {
        let (read, write) = pipe("stdout")?;
        chown(&write)?;
        pipes.stdout = Some(File::from(read));
        theirs.1 = Some(write);
    }
    if !paths.stderr.is_empty() {
        let (read, write) = pipe("stderr")?;
        chown(&write)?;
        pipes.stderr = Some(File::from(read));
        theirs.2 = Some(write);
    }
    Ok((
        pipes,
        CommandIo::Passed {
            stdin: theirs.0,
            stdout: theirs.1,
            stderr: theirs.2,
        },
    ))
}

/// The shim's side of a running process's stdio.
pub struct ProcessIo {
    /// The shim's writer on the stdin fifo (`CloseIO` drops it).
    stdin_keeper: Mutex<Option<File>>,
    /// The pty master, for resizing.
    console: Option<File>,
    /// One message per output copy when it ends.
    drained: Mutex<Option<(mpsc::Receiver<()>, usize)>>,
    /// Set when the process is deleted: copies still waiting for a reader give up.
    closing: Arc<AtomicBool>,
}

impl ProcessIo {
    /// No stdio at all.
    pub fn none() -> Self {
        Self {
            stdin_keeper: Mutex::new(None),
            console: None,
            drained: Mutex::new(None),
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Start copying between `pipes` and containerd's fifos.
    pub fn copy_pipes(paths: &StdioPaths, pipes: Pipes) -> Result<Self, IoError> {
        let (done_tx, done_rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let mut outputs = 0;
        let stdout_output = match pipes.stdout {
            Some(pipe) => {
                let output = prepare_output(&paths.stdout)?;
                let shared = if paths.stderr == paths.stdout {
                    Some(output.try_clone()?)
                } else {
                    None
                };
                spawn_copy("stdout", pipe, output, &closing, done_tx.clone());
                outputs += 1;
                shared
            }
            None => None,
        };
        if let Some(pipe) = pipes.stderr {
            let output = match stdout_output {
                Some(output) => output,
                None => prepare_output(&paths.stderr)?,
            };
            spawn_copy("stderr", pipe, output, &closing, done_tx.clone());
            outputs += 1;
        }
        let mut keeper = None;
        if let Some(pipe) = pipes.stdin {
            let (reader, keep) = open_stdin(&paths.stdin)?;
            keeper = Some(keep);
            spawn_copy_untracked("stdin", reader, pipe);
        }
        Ok(Self {
            stdin_keeper: Mutex::new(keeper),
            console: None,
            drained: Mutex::new(Some((done_rx, outputs))),
            closing,
        })
    }

    /// Take the pty master cryo sent on `socket` and copy between it and the fifos.
    pub fn copy_console(paths: &StdioPaths, socket: ConsoleSocket) -> Result<Self, IoError> {
        let master = socket.receive_master()?;
        let (done_tx, done_rx) = mpsc::channel();
        let closing = Arc::new(AtomicBool::new(false));
        let mut outputs = 0;
        if !paths.stdout.is_empty() {
            let output = prepare_output(&paths.stdout)?;
            let reader = master.try_clone().map_err(os("duplicate the pty master"))?;
            spawn_copy("terminal output", reader, output, &closing, done_tx);
            outputs += 1;
        }
        let mut keeper = None;
        if !paths.stdin.is_empty() {
            let (reader, keep) = open_stdin(&paths.stdin)?;
            keeper = Some(keep);
            let writer = master.try_clone().map_err(os("duplicate the pty master"))?;
            spawn_copy_untracked("terminal input", reader, writer);
        }
        Ok(Self {
            stdin_keeper: Mutex::new(keeper),
            console: Some(master),
            drained: Mutex::new(Some((done_rx, outputs))),
            closing,
        })
    }

    /// containerd closed the process's stdin: EOF reaches it once the client's writer is gone
    /// too.
    pub fn close_stdin(&self) {
        self.stdin_keeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Resize the terminal (a process without one ignores it, as with runc's shim).
    pub fn resize(&self, width: u32, height: u32) -> Result<(), IoError> {
        let Some(master) = &self.console else {
            return Ok(());
        };
        let size = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call; the
        // fd is the pty master we own.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(IoError::Os {
                what: "resize the terminal".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Wait (briefly) until the outputs are copied, after the process exited; then copies
    /// that still wait for a reader give up, and the shim's stdin writer goes.
    pub fn drain(&self) {
        self.close_stdin();
        let taken = self
            .drained
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((done, outputs)) = taken {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            for _ in 0..outputs {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                if done.recv_timeout(left).is_err() {
                    break;
                }
            }
        }
        self.closing.store(true, Ordering::Release);
    }
}

/// Once the output is open, copy until EOF (a pty master says EIO once the process is gone:
/// the same thing), then report on `done`.
fn spawn_copy(
    what: &'static str,
    from: File,
    to: Output,
    closing: &Arc<AtomicBool>,
    done: mpsc::Sender<()>,
) {
    let closing = closing.clone();
    thread::spawn(move || {
        match to.open(&closing) {
            Ok(Some((writer, _keeper))) => copy_until_end(what, from, writer),
            Ok(None) => {}
            Err(e) => warn!("copying {what}: open its destination: {e}"),
        }
        let _ = done.send(());
    });
}

fn spawn_copy_untracked(what: &'static str, from: File, to: File) {
    thread::spawn(move || copy_until_end(what, from, to));
}

fn copy_until_end(what: &str, mut from: File, mut to: File) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return,
            Err(e) => {
                warn!("copying {what}: read: {e}");
                return;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            warn!("copying {what}: write: {e}");
            return;
        }
    }
}

/// A unix socket cryo connects to with `--console-socket` to send the pty master; it lives in
/// a directory of its own (0700), removed on drop.
pub struct ConsoleSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// A new socket under the system's temp dir.
    pub fn new() -> Result<Self, IoError> {
        let template = std::env::temp_dir().join("cryo-shim-console.XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).map_err(nix_os(format!(
            "create a console socket dir {}",
            template.display()
        )))?;
        let path = dir.join("console.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(os(format!("listen on {}", path.display()))(e));
            }
        };
        Ok(Self {
            dir,
            path,
            listener,
        })
    }

    /// The path for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master cryo sent (waits at most [`CONSOLE_TIMEOUT`]).
    fn receive_master(&self) -> Result<File, IoError> {
        self.listener
            .set_nonblocking(true)
            .map_err(os("make the console socket non-blocking"))?;
        let deadline = Instant::now() + CONSOLE_TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(IoError::NoConsole {
                            path: self.path.clone(),
                        });
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(os(format!("accept on {}", self.path.display()))(e)),
            }
        };
        stream
            .set_nonblocking(false)
            .map_err(os("make the console connection blocking"))?;
        stream
            .set_read_timeout(Some(CONSOLE_TIMEOUT))
            .map_err(os("limit the console read"))?;
        receive_fd(stream.as_fd().as_raw_fd())
            .map_err(os(format!(
                "receive the pty master on {}",
                self.path.display()
            )))?
            .map(File::from)
            .ok_or_else(|| IoError::NoConsole {
                path: self.path.clone(),
            })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One fd passed with SCM_RIGHTS on `socket` (None: the peer sent none).
fn receive_fd(socket: RawFd) -> io::Result<Option<OwnedFd>> {
    // libcontainer sends the terminal's name as the payload.
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = loop {
        match recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut received = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: SCM_RIGHTS installed this fd in our table for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                received.get_or_insert(owned);
            }
        }
    }
    Ok(received)
}

#[cfg(test)]
#[path = "io_tests.rs"]
mod tests;
