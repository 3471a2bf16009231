//! Running cryo (or runc) with a private state root.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A runtime binary with its own `--root`.
#[derive(Clone)]
pub struct Runtime {
    /// The binary.
    pub bin: PathBuf,
    /// Its state root.
    pub root: PathBuf,
    /// Removes the root when the last clone goes.
    _root_guard: std::sync::Arc<EmptyRootRemover>,
}

/// Removes a state root that holds no container any more (cryo keeps an empty `.locks`
/// directory there, runc nothing). A root that still holds a container, as after a failed
/// test, is left for whoever reads the failure.
struct EmptyRootRemover(PathBuf);

impl Drop for EmptyRootRemover {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0.join(".locks"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Runtime {
    /// cryo with a fresh root.
    pub fn cryo() -> Self {
        crate::require_prerequisites();
        Self::with_root(crate::cryo_bin(), "cryo-root")
    }

    /// runc with a fresh root.
    pub fn runc() -> Self {
        Self::with_root(PathBuf::from("runc"), "runc-root")
    }

    fn with_root(bin: PathBuf, prefix: &str) -> Self {
        let root = std::env::temp_dir().join(crate::unique(prefix));
        Self {
            bin,
            _root_guard: std::sync::Arc::new(EmptyRootRemover(root.clone())),
            root,
        }
    }

    /// A command with `--root` set.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        c
    }

    /// Run to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "{} {args:?} panicked: {stderr}",
            self.bin.display()
        );
        out
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            self.bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run, require failure, return stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "{} {args:?} should have failed",
            self.bin.display()
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `state` as JSON.
    pub fn state(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// Start a command whose stdout is a pipe we read (what conmon and the shims do), wait for
    /// the runtime to exit, return the pipe's read end.
    pub fn spawn_with_pipe(&self, args: &[&str]) -> Lines {
        let mut cmd = self.cmd();
        cmd.args(args);
        spawn_with_pipe(cmd)
    }

    /// Guard that force-deletes `id` on drop.
    pub fn guard(&self, id: &str) -> ContainerGuard {
        ContainerGuard {
            rt: self.clone(),
            id: id.to_string(),
        }
    }
}

/// [`Runtime::spawn_with_pipe`] for any command (a runtime run through a wrapper).
pub fn spawn_with_pipe(mut cmd: Command) -> Lines {
    // stderr is a pipe too (CRIU cannot checkpoint an fd on a host file); the container
    // inherits it, so it is read on a thread instead of waited for.
    let what = format!("{cmd:?}");
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let status = child.wait().unwrap();
    if !status.success() {
        std::thread::sleep(Duration::from_millis(200));
        let msg: Vec<u8> = rx.try_iter().flatten().collect();
        panic!("{what} failed: {}", String::from_utf8_lossy(&msg));
    }
    Lines::new(stdout)
}

/// Lines from a container's stdout, read on a thread so waits can time out.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
}

impl Lines {
    /// Lines of a child's stdout.
    pub fn from_stdout(stdout: ChildStdout) -> Self {
        Self::new(stdout)
    }

    fn new(stdout: ChildStdout) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { rx }
    }

    /// Next line within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Wait until a line parses to a number >= `n`; returns it.
    pub fn wait_count(&self, n: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(l) = self.next(Duration::from_millis(200)) {
                if let Some(v) = l
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u64>().ok())
                {
                    if v >= n {
                        return v;
                    }
                }
            }
        }
        panic!("counter did not reach {n} within {timeout:?}");
    }

    /// Everything until the pipe closes (or `timeout`); returns the lines.
    pub fn drain(&self, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut v = Vec::new();
        while Instant::now() < end {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => v.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(_) => {}
            }
        }
        v
    }
}

/// Force-deletes a container on drop.
pub struct ContainerGuard {
    rt: Runtime,
    id: String,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = self
            .rt
            .cmd()
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// The freezer state of a container (by its init pid), on either cgroup layout.
pub use crate::cgroups::freezer_state;
