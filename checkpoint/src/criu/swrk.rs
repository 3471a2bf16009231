//! The real [`CriuClient`]: spawns `criu swrk 3` per request and speaks protobuf over a
//! SOCK_SEQPACKET socketpair, one message per packet.

use std::ffi::OsString;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{
    recv, recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use protobuf::{Message, MessageField};

use super::{
    log_excerpt, rpc, version_number, CallKind, CallObserver, CriuCall, CriuClient, CriuError,
    CriuOutcome, Features, Notification,
};

/// How often a waiting call looks at the observer's deadline and interrupt flag.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(50);

/// Extra fds are first parked at or above this number so that placing them at 4, 5, … in the
/// child cannot clobber one another.
const PARK_FD_FLOOR: RawFd = 100;

/// Spawns the `criu` binary found on PATH (or a given path).
#[derive(Debug, Clone)]
pub struct SwrkClient {
    binary: PathBuf,
    /// How long a version or feature query may take.
    probe_timeout: std::time::Duration,
    /// Environment variables CRIU gets on top of ours (a GPU container's PATH).
    env: Vec<(OsString, OsString)>,
}

/// The default limit on a version or feature query (CRIU answers in milliseconds).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Only a deadline: for version and feature queries.
struct ProbeDeadline(super::Deadline);

impl CallObserver for ProbeDeadline {
    fn notify(&mut self, _n: Notification<'_>) -> Result<(), String> {
        Ok(())
    }
    fn deadline(&self) -> Option<super::Deadline> {
        Some(self.0.clone())
    }
}

impl Default for SwrkClient {
    fn default() -> Self {
        Self::new("criu")
    }
}

/// One running `criu swrk` and our end of its socket.
struct Session {
    child: std::process::Child,
    sock: OwnedFd,
    log: PathBuf,
}

impl SwrkClient {
    /// A client running `binary` (a name on PATH or a path).
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            probe_timeout: PROBE_TIMEOUT,
            env: Vec::new(),
        }
    }

    /// The same client, giving version and feature queries at most `limit`.
    pub fn with_probe_timeout(mut self, limit: std::time::Duration) -> Self {
        self.probe_timeout = limit;
        self
    }

    /// The same client, with `key=value` in CRIU's environment (and so its plugins' tools').
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn spawn(
        &self,
        extra: &[OwnedFd],
        inherit_stdio: bool,
        umask: Option<u32>,
        log: PathBuf,
    ) -> Result<Session, CriuError> {
        let transport = |detail: String| CriuError::Transport {
            step: "start",
            detail,
            log: log.clone(),
            excerpt: String::new(),
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| transport(format!("socketpair: {e}")))?;
        // Park every fd the child needs well above the numbers it will get; the parked copies
        // are CLOEXEC, so only the dup2'd targets survive the exec.
        let mut parked: Vec<OwnedFd> = Vec::with_capacity(extra.len() + 1);
        for fd in std::iter::once(theirs.as_fd()).chain(extra.iter().map(|f| f.as_fd())) {
            let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(PARK_FD_FLOOR))
                .map_err(|e| transport(format!("dup: {e}")))?;
            // SAFETY: fcntl just returned this new descriptor and nothing else owns it.
            parked.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        let targets: Vec<(RawFd, RawFd)> = parked
            .iter()
            .enumerate()
            .map(|(i, fd)| (fd.as_raw_fd(), 3 + i as RawFd))
            .collect();
        let mut cmd = Command::new(&self.binary);
        cmd.arg("swrk").arg("3");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if inherit_stdio {
            cmd.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        // SAFETY: the closure only calls dup2 and umask, which are async-signal-safe, on fds
        // that stay open in the parent until spawn returns; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &(from, to) in &targets {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(mask) = umask {
                    libc::umask(mask as libc::mode_t);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        drop(parked);
        drop(theirs);
        Ok(Session {
            child,
            sock: ours,
            log,
        })
    }

    fn simple_request(&self, req: rpc::Criu_req) -> Result<rpc::Criu_resp, CriuError> {
        let session = self.spawn(&[], false, None, PathBuf::from("(no log)"))?;
        session.send(&req)?;
        let what = format!("{:?}", req.type_())
            .to_lowercase()
            .replace('_', " ");
        let deadline = ProbeDeadline(super::Deadline {
            at: std::time::Instant::now() + self.probe_timeout,
            what: format!(
                "{} did not answer a {what} query within {}s (--criu-timeout): is it a working CRIU?",
                self.binary.display(),
                self.probe_timeout.as_secs()
            ),
        });
        let answer = session.wait(&deadline).and_then(|()| session.recv());
        let Session {
            mut child, sock, ..
        } = session;
        drop(sock);
        let _ = child.wait();
        Ok(answer?.0)
    }
}

impl Session {
    fn broken(&self, step: &'static str, detail: String) -> CriuError {
        CriuError::Transport {
            step,
            detail,
            log: self.log.clone(),
            excerpt: log_excerpt(&self.log),
        }
    }

    fn send(&self, req: &rpc::Criu_req) -> Result<(), CriuError> {
        let bytes = req
            .write_to_bytes()
            .map_err(|e| self.broken("encode request", e.to_string()))?;
        loop {
            match send(self.sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.broken("send request", e.to_string())),
            }
        }
    }

    /// Wait until CRIU has something to say, keeping the observer's deadline and interrupt:
    /// past either, CRIU is killed (its tasks are released as it dies) and the call fails.
    fn wait(&self, observer: &dyn CallObserver) -> Result<(), CriuError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            if observer.interrupted() {
                self.kill();
                return Err(CriuError::Interrupted {
                    log: self.log.clone(),
                });
            }
            let mut slice = WAIT_SLICE;
            if let Some(d) = observer.deadline() {
                let now = std::time::Instant::now();
                if now >= d.at {
                    self.kill();
                    return Err(CriuError::TimedOut {
                        what: d.what,
                        excerpt: log_excerpt(&self.log),
                        log: self.log.clone(),
                    });
                }
                slice = slice.min(d.at - now);
            }
            let ms =
                PollTimeout::try_from(slice.as_millis().max(1) as u32).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(self.broken("wait", e.to_string())),
            }
        }
    }

    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Receive one packet (and the fd CRIU may attach to it).
    fn recv(&self) -> Result<(rpc::Criu_resp, Option<OwnedFd>), CriuError> {
        let fd = self.sock.as_raw_fd();
        // Size the packet first: SEQPACKET keeps message boundaries and MSG_TRUNC reports the
        // real length of the next one.
        let mut probe = [0u8; 1];
        let len = loop {
            match recv(fd, &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Ok(0) => {
                    return Err(self.broken(
                        "conversation",
                        "CRIU closed the connection (it crashed or was killed)".into(),
                    ))
                }
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.broken("receive", e.to_string())),
            }
        };
        let mut buf = vec![0u8; len];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let (n, fd_received) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut got = None;
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = c {
                                for raw in fds {
                                    // SAFETY: SCM_RIGHTS installed this fd in our table for us.
                                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                    got.get_or_insert(owned);
                                }
                            }
                        }
                    }
                    break (msg.bytes, got);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(self.broken("receive", e.to_string())),
            }
        };
        let resp = rpc::Criu_resp::parse_from_bytes(&buf[..n])
            .map_err(|e| self.broken("decode response", e.to_string()))?;
        Ok((resp, fd_received))
    }
}

impl CriuClient for SwrkClient {
    fn lazy_pages_daemon(
        &self,
        images_dir: &Path,
        work_dir: &Path,
    ) -> Result<Option<super::lazy::LazyPagesDaemon>, CriuError> {
        super::lazy::LazyPagesDaemon::start(
            &self.binary,
            images_dir,
            work_dir,
            std::time::Duration::from_secs(10),
        )
    }
    fn version(&self) -> Result<u32, CriuError> {
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::VERSION);
        let resp = self.simple_request(req)?;
        let v = resp.version.as_ref().ok_or_else(|| {
            CriuError::Missing("CRIU did not report its version (older than 3.0?)".into())
        })?;
        Ok(version_number(
            v.major_number(),
            v.minor_number(),
            v.sublevel(),
        ))
    }

    fn features(&self, ask: Features) -> Result<Features, CriuError> {
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::FEATURE_CHECK);
        let mut f = rpc::Criu_features::new();
        if ask.mem_track {
            f.set_mem_track(true);
        }
        if ask.lazy_pages {
            f.set_lazy_pages(true);
        }
        req.features = MessageField::some(f);
        // CRIU answers success=false when a feature is missing; the flags are what count.
        let resp = self.simple_request(req)?;
        let got = resp.features.as_ref();
        Ok(Features {
            mem_track: ask.mem_track && got.is_some_and(|f| f.mem_track()),
            lazy_pages: ask.lazy_pages && got.is_some_and(|f| f.lazy_pages()),
        })
    }

    fn call(
        &self,
        call: CriuCall,
        observer: &mut dyn CallObserver,
    ) -> Result<CriuOutcome, CriuError> {
        let log = call.work_dir.join(call.kind.log_name());
        let images = open_dir(&call.images_dir, &log)?;
        let work = open_dir(&call.work_dir, &log)?;
        let mut opts = call.opts;
        opts.set_images_dir_fd(images.as_raw_fd());
        opts.set_work_dir_fd(work.as_raw_fd());
        opts.set_log_file(call.kind.log_name().to_string());
        if opts.log_level.is_none() {
            opts.set_log_level(4);
        }
        opts.set_notify_scripts(true);
        let mut req = rpc::Criu_req::new();
        req.set_type(call.kind.req_type());
        req.opts = MessageField::some(opts);

        let session = self.spawn(&call.extra_fds, call.inherit_stdio, call.umask, log.clone())?;
        drop(call.extra_fds);
        let result = observer
            .started(session.child.id() as i32)
            .map_err(|e| session.broken("start", e))
            .and_then(|()| converse(&session, &req, call.kind, observer));
        drop(images);
        drop(work);
        // Closing our end lets CRIU exit; reap it so no zombie is left behind.
        let Session {
            mut child, sock, ..
        } = session;
        drop(sock);
        let status = child.wait();
        let outcome = result?;
        if call.kind == CallKind::PreDump {
            return Ok(outcome); // CRIU exits non-zero after a pre-dump by design.
        }
        match status {
            Ok(s) if s.success() => Ok(outcome),
            Ok(s) => Err(CriuError::Transport {
                step: "exit",
                detail: format!("criu exited with {s} after answering"),
                excerpt: log_excerpt(&log),
                log,
            }),
            Err(e) => Err(CriuError::Transport {
                step: "wait",
                detail: e.to_string(),
                excerpt: log_excerpt(&log),
                log,
            }),
        }
    }
}

fn converse(
    session: &Session,
    req: &rpc::Criu_req,
    kind: CallKind,
    observer: &mut dyn CallObserver,
) -> Result<CriuOutcome, CriuError> {
    session.send(req)?;
    let mut outcome = CriuOutcome::default();
    loop {
        session.wait(observer)?;
        let (resp, fd) = session.recv()?;
        let ty = resp.type_();
        if ty == rpc::Criu_req_type::NOTIFY {
            let n = resp.notify.as_ref();
            let script = n.map(|n| n.script()).unwrap_or_default().to_string();
            let pid = n.map(|n| n.pid()).unwrap_or_default();
            if script == "post-restore" {
                outcome.restored_pid = Some(pid);
            }
            let res = observer.notify(Notification {
                script: &script,
                pid,
                fd,
            });
            let mut ack = rpc::Criu_req::new();
            ack.set_type(rpc::Criu_req_type::NOTIFY);
            ack.set_notify_success(res.is_ok());
            session.send(&ack)?;
            if let Err(e) = res {
                return Err(session.broken(
                    "notify",
                    format!("handling CRIU's {script} notification failed: {e}"),
                ));
            }
            continue;
        }
        if !resp.success() {
            let msg = resp
                .cr_errmsg
                .as_ref()
                .filter(|m| !m.contains("RLIMIT_NOFILE"))
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            return Err(CriuError::Failed {
                kind: format!("{ty:?}"),
                errno: resp.cr_errno(),
                msg,
                excerpt: log_excerpt(&session.log),
                log: session.log.clone(),
            });
        }
        if ty != kind.req_type() {
            return Err(session.broken(
                "conversation",
                format!(
                    "unexpected {ty:?} answer to a {:?} request",
                    kind.req_type()
                ),
            ));
        }
        if let Some(r) = resp.restore.as_ref() {
            if r.has_pid() {
                outcome.restored_pid = Some(r.pid());
            }
        }
        return Ok(outcome);
    }
}

fn open_dir(path: &Path, log: &Path) -> Result<File, CriuError> {
    File::open(path).map_err(|e| CriuError::Transport {
        step: "open directory",
        detail: format!("{}: {e}", path.display()),
        log: log.to_path_buf(),
        excerpt: String::new(),
    })
}
