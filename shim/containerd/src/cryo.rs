//! Running the `cryo` binary, as containerd's runc shim runs `runc`: one process per
//! operation, with runc's global flags (`--root`, `--log <bundle>/log.json --log-format
//! json`). cryo's error for a failed call is the last error line it appended to that log.
//!
//! The shim's reaper waits for every child, cryo included, so a command is never waited for
//! with `Child::wait` (the reaper may have taken its status first): its exit comes from the
//! reaper's monitor, subscribed to before the spawn.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, ExitEvent, Subject, Subscription, Topic};
use containerd_shim::warn;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::exits::ExitTracker;

/// How long a command may take before the shim stops it. Checkpoint and restore move the
/// container's memory and have their own, longer limit.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit of `checkpoint` and `restore`.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// Between SIGTERM (cryo aborts at its next step and thaws) and SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// A failed cryo call.
#[derive(Debug, thiserror::Error)]
pub enum CryoError {
    /// The binary could not be started.
    #[error(
        "cannot run {binary} ({verb}): {source}; set the cryo binary in the runtime's options"
    )]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The verb.
        verb: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// cryo ran and failed.
    #[error("cryo {verb} failed: {message}")]
    Failed {
        /// The verb.
        verb: &'static str,
        /// Exit status (128 + signal when killed).
        status: i32,
        /// cryo's last error line, or its stderr, or the status.
        message: String,
    },
    /// cryo did not finish in time and was stopped.
    #[error("cryo {verb} did not finish within {} s and was stopped", limit.as_secs())]
    Timeout {
        /// The verb.
        verb: &'static str,
        /// The limit.
        limit: Duration,
    },
}

impl CryoError {
    /// cryo said the container does not exist (a delete after `checkpoint --exit`, a resume
    /// of an exited container).
    pub fn container_gone(&self) -> bool {
        matches!(self, Self::Failed { message, .. } if message.contains("does not exist"))
    }
}

/// The stdio a command's process gets.
pub enum CommandIo {
    /// stdin `/dev/null`; stdout and stderr are read (ps's JSON, error text).
    Captured,
    /// The container process's own stdio: cryo passes it on to the process it starts. `None`
    /// entries are `/dev/null`.
    Passed {
        /// stdin.
        stdin: Option<OwnedFd>,
        /// stdout.
        stdout: Option<OwnedFd>,
        /// stderr.
        stderr: Option<OwnedFd>,
    },
}

/// One container's cryo: binary, state root and log file.
#[derive(Clone)]
pub struct Cryo {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    criu: Option<PathBuf>,
    systemd_cgroup: bool,
    tracker: Arc<ExitTracker>,
}

/// What a successful command printed (empty unless [`CommandIo::Captured`]).
pub struct Output {
    /// stdout.
    pub stdout: Vec<u8>,
}

impl Cryo {
    /// cryo for the container whose bundle is `bundle`.
    pub fn new(
        binary: PathBuf,
        root: PathBuf,
        bundle: &Path,
        criu: Option<PathBuf>,
        systemd_cgroup: bool,
        tracker: Arc<ExitTracker>,
    ) -> Self {
        Self {
            binary,
            root,
            log: bundle.join("log.json"),
            criu,
            systemd_cgroup,
            tracker,
        }
    }

    /// Run `cryo <global flags> <verb> <args>` and wait for it (at most `limit`).
    pub fn run(
        &self,
        verb: &'static str,
        args: &[OsString],
        io: CommandIo,
        limit: Duration,
    ) -> Result<Output, CryoError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json");
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        if let Some(criu) = &self.criu {
            // cryo runs `criu` from PATH; `--criu` says which one to callers that honour it.
            cmd.arg("--criu").arg(criu);
            if let Some(dir) = criu.parent() {
                cmd.env("PATH", path_with_first(dir));
            }
        }
        cmd.arg(verb).args(args);
        let captured = matches!(io, CommandIo::Captured);
        match io {
            CommandIo::Captured => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
            CommandIo::Passed {
                stdin,
                stdout,
                stderr,
            } => {
                cmd.stdin(stdio_or_null(stdin))
                    .stdout(stdio_or_null(stdout))
                    .stderr(stdio_or_null(stderr));
            }
        }
        let log_start = file_len(&self.log);

        // Subscribed before the spawn: the exit cannot slip past.
        let subscription = monitor_subscribe(Topic::Pid)
            .unwrap_or_else(|e| unreachable!("the in-process monitor cannot refuse: {e}"));
        let mut child = cmd.spawn().map_err(|source| CryoError::Spawn {
            binary: self.binary.clone(),
            verb,
            source,
        })?;
        let pid = child.id() as i32;
        self.tracker.command_started(pid);
        // The Command still holds the container's pipe ends: close them, or the container's
        // reader would never see EOF.
        drop(cmd);

        let readers = captured.then(|| {
            (
                child.stdout.take().map(spawn_reader),
                child.stderr.take().map(spawn_reader),
            )
        });
        let waited = wait_exit(&subscription, pid, limit);
        self.tracker.command_finished(pid);
        let status = match waited {
            Some(status) => status,
            None => {
                stop(pid, &subscription);
                return Err(CryoError::Timeout { verb, limit });
            }
        };
        let (stdout, stderr) = match readers {
            Some((out, err)) => (join_reader(out, verb), join_reader(err, verb)),
            None => (Vec::new(), Vec::new()),
        };
        if status == 0 {
            return Ok(Output { stdout });
        }
        let message = last_log_error(&self.log, log_start)
            .or_else(|| {
                let text = String::from_utf8_lossy(&stderr).trim().to_string();
                (!text.is_empty()).then_some(text)
            })
            .unwrap_or_else(|| format!("exit status {status}, no error in {}", self.log.display()));
        Err(CryoError::Failed {
            verb,
            status,
            message,
        })
    }
}

fn stdio_or_null(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

/// PATH with `dir` in front.
fn path_with_first(dir: &Path) -> OsString {
    let mut path = OsString::from(dir);
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    path
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// How long the output of an exited command may still take: a process cryo left behind (a
/// daemon) can hold its pipes open, and the shim must not wait for that one.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

type Reader = mpsc::Receiver<io::Result<Vec<u8>>>;

fn spawn_reader(mut pipe: impl Read + Send + 'static) -> Reader {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let result = pipe.read_to_end(&mut bytes).map(|_| bytes);
        let _ = tx.send(result);
    });
    rx
}

/// What a reader got; nothing (and a warning in the shim's log) when its pipe failed or stayed
/// open past [`OUTPUT_GRACE`].
fn join_reader(reader: Option<Reader>, verb: &'static str) -> Vec<u8> {
    let Some(reader) = reader else {
        return Vec::new();
    };
    match reader.recv_timeout(OUTPUT_GRACE) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            warn!("cryo {verb}: reading its output failed: {e}");
            Vec::new()
        }
        Err(_) => {
            warn!("cryo {verb}: its output stayed open after it exited (a process it started holds it)");
            Vec::new()
        }
    }
}

/// The exit status of `pid`, or None when `limit` passed first.
fn wait_exit(subscription: &Subscription, pid: i32, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match subscription.rx.recv_timeout(left) {
            Ok(ExitEvent {
                subject: Subject::Pid(p),
                exit_code,
            }) if p == pid => return Some(exit_code),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Stop a command that ran past its limit: SIGTERM first (cryo aborts at its next step and
/// leaves the container as it was), SIGKILL after a grace period.
fn stop(pid: i32, subscription: &Subscription) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_exit(subscription, pid, TERMINATE_GRACE).is_none() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = wait_exit(subscription, pid, TERMINATE_GRACE);
    }
}

/// The message of the last error line cryo appended to its JSON log after `from`.
fn last_log_error(log: &Path, from: u64) -> Option<String> {
    let mut file = File::open(log).ok()?;
    // A log that shrank was replaced: read all of it.
    let from = if file_len(log) < from { 0 } else { from };
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .find_map(|v| v["msg"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_after_the_offset_is_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"error\",\"msg\":\"old failure\",\"time\":\"t\"}\n",
        )
        .expect("write");
        let from = file_len(&log);
        let mut more = std::fs::read_to_string(&log).expect("read");
        more.push_str("{\"level\":\"info\",\"msg\":\"working\",\"time\":\"t\"}\n");
        more.push_str("not json\n");
        more.push_str(
            "{\"level\":\"error\",\"msg\":\"container c1 does not exist\",\"time\":\"t\"}\n",
        );
        std::fs::write(&log, more).expect("write");
        assert_eq!(
            last_log_error(&log, from).as_deref(),
            Some("container c1 does not exist")
        );
        assert_eq!(last_log_error(&log, file_len(&log)), None);
        assert_eq!(last_log_error(&dir.path().join("absent"), 0), None);
    }

    #[test]
    fn container_gone_is_recognised() {
        let gone = CryoError::Failed {
            verb: "delete",
            status: 1,
            message: "container c1 does not exist".into(),
        };
        assert!(gone.container_gone());
        let other = CryoError::Failed {
            verb: "delete",
            status: 1,
            message: "cgroup busy".into(),
        };
        assert!(!other.container_gone());
    }
}
