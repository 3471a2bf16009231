//! The store tests' workload (`tests/fixtures/churn.c`): a container holding N MiB that
//! rewrites 5 % of it per round (on SIGUSR1), keeps a checksum of all of it, and on SIGUSR2
//! checks its memory against that checksum and its files against its memory. It runs on an
//! overlay rootfs, so a restore gets the files as they were at the checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::runtime::{Lines, Runtime};
use crate::Bundle;

/// A busybox lower dir with `/churn` in it, built once per test process.
pub fn lower() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = crate::workspace().join(format!(
                "target/cryo-fixtures/churn-lower-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            crate::bundle::busybox_rootfs(&dir);
            let src = crate::workspace().join("tests/fixtures/churn.c");
            let st = Command::new("cc")
                .args(["-O2", "-static", "-o"])
                .arg(dir.join("churn"))
                .arg(&src)
                .status()
                .expect("a C compiler (cc) is needed: scripts/setup installs build-essential");
            assert!(st.success(), "building {} failed", src.display());
            dir
        })
        .clone()
}

/// A fresh overlay bundle (over [`lower`]) that runs `churn mib`: for a new container, or as
/// the target of a restore.
pub fn bundle(mib: u32) -> Bundle {
    Bundle::overlay(&lower(), &["/churn", &mib.to_string()])
}

/// The same for `churn mib 50 64 shared`: the memory is a shared anonymous mapping (CRIU
/// dumps it as shared memory, `pagemap-shmem-*.img`).
pub fn shared_bundle(mib: u32) -> Bundle {
    Bundle::overlay(
        &lower(),
        &["/churn", &mib.to_string(), "50", "64", "shared"],
    )
}

/// A running churn container.
pub struct Churn {
    /// Its runtime.
    pub rt: Runtime,
    /// Its bundle.
    pub bundle: Bundle,
    /// Its id.
    pub id: String,
    /// Its stdout.
    pub lines: Lines,
}

/// What the workload said about its state: the round and the checksum, as /tmp/state holds
/// them ("round R sum S").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State(pub String);

impl State {
    /// The round.
    pub fn round(&self) -> u64 {
        self.0
            .split_whitespace()
            .nth(1)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0)
    }
}

impl Churn {
    /// Start `churn mib` as `id` under `rt` and wait until it beats.
    pub fn start(rt: &Runtime, id: &str, mib: u32) -> Self {
        Self::start_in(rt, id, bundle(mib))
    }

    /// Start the churn container `id` of `bundle`.
    pub fn start_in(rt: &Runtime, id: &str, bundle: Bundle) -> Self {
        let lines =
            rt.spawn_with_pipe(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), id]);
        let c = Self {
            rt: rt.clone(),
            bundle,
            id: id.to_string(),
            lines,
        };
        assert!(
            c.beating(Duration::from_secs(60)),
            "the workload never started beating"
        );
        c
    }

    /// Restore `id` from checkpoint store `store` into a fresh bundle; returns the container
    /// and what cryo said on stderr.
    pub fn restore_from_store(rt: &Runtime, store: &Path, id: &str, mib: u32) -> (Self, String) {
        Self::restore_into(rt, store, id, bundle(mib))
    }

    /// The same into a given (fresh) bundle.
    pub fn restore_into(rt: &Runtime, store: &Path, id: &str, bundle: Bundle) -> (Self, String) {
        let (lines, stderr) = spawn_keeping_stderr(rt.cmd().args([
            "restore",
            "-d",
            "--store",
            store.to_str().unwrap(),
            "--bundle",
            bundle.dir.to_str().unwrap(),
            id,
        ]));
        let c = Self {
            rt: rt.clone(),
            bundle,
            id: id.to_string(),
            lines,
        };
        assert!(
            c.beating(Duration::from_secs(30)),
            "the restored workload does not beat"
        );
        (c, stderr)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.bundle.rootfs().join("tmp").join(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Whether the beat counter moves within `within`.
    pub fn beating(&self, within: Duration) -> bool {
        let start = self.read("hb");
        let end = Instant::now() + within;
        while Instant::now() < end {
            let now = self.read("hb");
            if !now.is_empty() && now != start {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The init's pid on the host.
    pub fn pid(&self) -> i32 {
        self.rt.state(&self.id)["pid"].as_i64().unwrap() as i32
    }

    /// The state the workload's files hold now.
    pub fn state(&self) -> State {
        State(self.read("state"))
    }

    /// Run one round (5 % of the memory rewritten) and wait until the workload says so.
    pub fn round(&self) -> State {
        let before = self.state().round();
        signal(self.pid(), nix::sys::signal::Signal::SIGUSR1);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state();
            if s.round() > before {
                return s;
            }
            assert!(
                Instant::now() < end,
                "round {} never came: {s:?}",
                before + 1
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Have the workload check its memory against its checksum and its files against its
    /// memory; returns the verdict ("ok R S check N", or what is wrong).
    pub fn self_check(&self) -> String {
        let before = self.read("verify");
        signal(self.pid(), nix::sys::signal::Signal::SIGUSR2);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.read("verify");
            if !v.is_empty() && v != before {
                return v;
            }
            assert!(Instant::now() < end, "the self-check never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Assert the self-check passes and that memory holds `expected`.
    pub fn assert_holds(&self, expected: &State) {
        let v = self.self_check();
        let (round, sum) = (
            expected.round(),
            expected.0.split_whitespace().nth(3).unwrap_or(""),
        );
        assert!(
            v.starts_with(&format!("ok {round} {sum} ")),
            "expected memory and files at {expected:?}, the workload says: {v}"
        );
    }

    /// SIGKILL the workload (the container stops).
    pub fn kill(&self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGKILL);
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// Run a runtime command whose stdout becomes the container's (a pipe we keep reading);
/// panics with its stderr if it fails, returns its stderr otherwise.
pub fn spawn_keeping_stderr(cmd: &mut Command) -> (Lines, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The container inherits the pipe too: read it on a thread, never to its end.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let status = child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let text = String::from_utf8_lossy(&rx.try_iter().flatten().collect::<Vec<u8>>()).into_owned();
    assert!(status.success(), "{what} failed: {text}");
    (Lines::from_stdout(stdout), text)
}
