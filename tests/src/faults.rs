//! Fault injection for the reliability suite: a workload whose freeze a test can see (it
//! beats every millisecond and checks its own memory), ways to find the moment that matters
//! (inside the freeze, before it, after the thaw) and to strike there, checks that nothing is
//! left, and the table the suite prints (case, cryo, runc).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::runtime::{Lines, Runtime};
use crate::Bundle;

/// The heartbeat workload built for this machine (static, so it runs in a busybox rootfs).
pub fn heartbeat_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = crate::workspace().join("tests/fixtures/heartbeat.c");
            let out_dir = crate::workspace().join("target/cryo-fixtures");
            std::fs::create_dir_all(&out_dir).unwrap();
            let out = out_dir.join(format!("heartbeat-{}", std::process::id()));
            let st = Command::new("cc")
                .args(["-O2", "-static", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .expect("a C compiler (cc) is needed: scripts/setup installs build-essential");
            assert!(st.success(), "building {} failed", src.display());
            out
        })
        .clone()
}

/// A container running the heartbeat workload with `mib` MiB of memory.
pub struct Heartbeat {
    /// The runtime that runs it.
    pub rt: Runtime,
    /// Its bundle.
    pub bundle: Bundle,
    /// Its id.
    pub id: String,
    /// Its stdout.
    pub lines: Lines,
}

impl Heartbeat {
    /// Start `heartbeat mib` as `id` in a fresh busybox bundle under `rt`, and wait until it
    /// beats.
    pub fn start(rt: &Runtime, id: &str, mib: u32) -> Self {
        let bundle = Bundle::busybox(&["/heartbeat", &mib.to_string()]);
        Self::start_in(rt, bundle, id)
    }

    /// The same in a given bundle (whose args must run `/heartbeat`).
    pub fn start_in(rt: &Runtime, bundle: Bundle, id: &str) -> Self {
        std::fs::copy(heartbeat_bin(), bundle.rootfs().join("heartbeat")).unwrap();
        let lines =
            rt.spawn_with_pipe(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), id]);
        let hb = Self {
            rt: rt.clone(),
            bundle,
            id: id.to_string(),
            lines,
        };
        assert!(
            hb.advancing(Duration::from_secs(30)),
            "the workload never started beating"
        );
        hb
    }

    /// A file the workload writes, read through the host path of its rootfs.
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.bundle.rootfs().join("tmp").join(name)).unwrap_or_default()
    }

    /// The beat counter (0 before the first).
    pub fn beats(&self) -> u64 {
        self.read("hb").trim().parse().unwrap_or(0)
    }

    /// Whether the counter moves within `within`.
    pub fn advancing(&self, within: Duration) -> bool {
        let start = self.beats();
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.beats() > start {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// The workload's memory check: "ok <rounds>" or "CORRUPT <offset>".
    pub fn check(&self) -> String {
        self.read("check").trim().to_string()
    }

    /// Wait until the memory check has completed one more round (all memory checked again)
    /// and says it is intact; panics with what it says otherwise.
    pub fn assert_memory_intact(&self, within: Duration) {
        let round = |s: &str| s.strip_prefix("ok ").and_then(|r| r.parse::<u64>().ok());
        let first = round(&self.check());
        let end = Instant::now() + within;
        loop {
            let now = self.check();
            assert!(
                !now.starts_with("CORRUPT"),
                "the workload's memory is damaged: {now}"
            );
            if let (Some(a), Some(b)) = (first, round(&now)) {
                if b > a {
                    return;
                }
            }
            assert!(
                Instant::now() < end,
                "the memory check did not advance: {now}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The longest gap between two beats so far, in milliseconds.
    pub fn max_gap_ms(&self) -> f64 {
        self.read("maxgap").trim().parse::<f64>().unwrap_or(0.0) / 1000.0
    }
}

/// A cryo (or runc) command started in the background.
pub fn spawn(rt: &Runtime, args: &[&str]) -> Child {
    rt.cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a background command said and how it ended.
pub fn finish(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The pid of a `criu` child of `parent`, if one runs.
pub fn criu_child(parent: u32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "criu")
        })
}

/// Wait (up to `within`) until the workload stops beating for `quiet` while `busy` (the
/// checkpointing process) is alive, and its process is held (frozen by the cgroup freezer, or
/// stopped by CRIU's ptrace): the freeze. A workload merely starved of CPU on a busy machine
/// does not count. Returns false if it never came.
pub fn wait_for_freeze(
    hb: &Heartbeat,
    busy: &mut Child,
    quiet: Duration,
    within: Duration,
) -> bool {
    let pid = hb.rt.state(&hb.id)["pid"].as_i64().unwrap_or(0);
    let end = Instant::now() + within;
    let mut last = hb.beats();
    let mut since = Instant::now();
    while Instant::now() < end {
        if busy.try_wait().unwrap().is_some() {
            return false;
        }
        let now = hb.beats();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet && held(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    false
}

/// What holds the workload of `hb`, for a failure message: its process state and tracer,
/// its cgroups' freezer files, and the processes that mention its id.
pub fn diagnose(hb: &Heartbeat) -> String {
    let pid = hb.rt.state(&hb.id)["pid"].as_i64().unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let pick = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or("")
            .to_string()
    };
    let mut out = format!("pid {pid}: {}, {}; ", pick("State:"), pick("TracerPid:"));
    for l in std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
    {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let file = match ctrl {
            "freezer" => Path::new("/sys/fs/cgroup/freezer")
                .join(rel)
                .join("freezer.state"),
            "" if Path::new("/sys/fs/cgroup/unified").is_dir() => {
                Path::new("/sys/fs/cgroup/unified")
                    .join(rel)
                    .join("cgroup.freeze")
            }
            "" => Path::new("/sys/fs/cgroup").join(rel).join("cgroup.freeze"),
            _ => continue,
        };
        let v = std::fs::read_to_string(&file).unwrap_or_else(|e| e.to_string());
        out.push_str(&format!("{} = {}; ", file.display(), v.trim()));
    }
    out.push_str(&format!("processes: {:?}", processes_mentioning(&hb.id)));
    out
}

/// Whether process `pid` is held: in a frozen (or freezing) cgroup, or in a ptrace stop.
pub fn held(pid: i64) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("State:"))
                .map(|v| v.trim().chars().next().unwrap_or(' '))
        });
    if matches!(state, Some('t') | Some('T')) {
        return true;
    }
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    for l in cg.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let file = if ctrl == "freezer" {
            Path::new("/sys/fs/cgroup/freezer")
                .join(rel)
                .join("freezer.state")
        } else if ctrl.is_empty() {
            let v2 = if Path::new("/sys/fs/cgroup/unified").is_dir() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            Path::new(v2).join(rel).join("cgroup.freeze")
        } else {
            continue;
        };
        let v = std::fs::read_to_string(file).unwrap_or_default();
        if matches!(v.trim(), "FROZEN" | "FREEZING" | "1") {
            return true;
        }
    }
    false
}

/// Wait until the dump's `criu` child of `busy` runs while the workload still beats: CRIU started,
/// the freeze not yet. Returns CRIU's pid, stopped (SIGSTOP): send it SIGCONT after striking.
pub fn wait_for_criu_before_freeze(
    hb: &Heartbeat,
    busy: &mut Child,
    within: Duration,
) -> Option<i32> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if busy.try_wait().unwrap().is_some() {
            return None;
        }
        if let Some(c) = criu_child(busy.id()).filter(|&c| has_open(c, "dump.log")) {
            // Only the dump's CRIU counts (it has opened its log): cryo also runs short-lived
            // CRIUs to ask the version, and one of those killed after it answered is no fault.
            // Hold CRIU where it is, then make sure the workload still beats: the moment
            // stays "before the freeze" until the caller strikes (and lets CRIU go on).
            signal(c, nix::sys::signal::Signal::SIGSTOP);
            if hb.advancing(Duration::from_millis(200)) {
                return Some(c);
            }
            signal(c, nix::sys::signal::Signal::SIGCONT);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Whether process `pid` holds an open file whose path ends with `/name` (CRIU's log: the
/// CRIU doing the work, not a version query).
pub fn has_open(pid: i32, name: &str) -> bool {
    let suffix = format!("/{name}");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().ends_with(&suffix))
        })
    })
}

/// Wait until the workload beats again after a freeze while `busy` still runs (the part of a
/// checkpoint after the thaw). Returns false if `busy` ended first.
pub fn wait_for_thaw(hb: &Heartbeat, busy: &mut Child, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut frozen = false;
    let mut last = hb.beats();
    let mut since = Instant::now();
    while Instant::now() < end {
        if busy.try_wait().unwrap().is_some() {
            return false;
        }
        let now = hb.beats();
        if now != last {
            if frozen {
                return true;
            }
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(20) {
            frozen = true;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    false
}

/// SIGKILL (or another signal) to a pid.
pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// How long until the workload beats again (None: not within `within`).
pub fn time_to_thaw(hb: &Heartbeat, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    hb.advancing(within).then(|| start.elapsed())
}

/// Nothing of a checkpoint is left beside `image` (no staging directory of cryo's).
pub fn staging_left(image: &Path) -> Vec<String> {
    let parent = image.parent().unwrap();
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".cryo-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Mounts at or below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(d.as_str()))
        .map(str::to_string)
        .collect()
}

/// Processes whose command line mentions `needle` (e.g. a container id), other than us.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop: a disk that fills up,
/// or a mount an [`crate::fanotify::OpenTrap`] may watch.
pub struct Tmpfs {
    /// Its mount point.
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mount one.
    pub fn new(size: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("cryo-tmpfs"));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        Self { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// An XFS (a file system that clones ranges between files) on a loop device, mounted at a
/// fresh directory; unmounted and removed on drop. Needs `mkfs.xfs` (xfsprogs, which
/// `scripts/setup` installs).
pub struct Xfs {
    /// Its mount point.
    pub dir: PathBuf,
    image: PathBuf,
    /// Its loop device (`loop3`).
    device: String,
}

impl Xfs {
    /// Make and mount one of `size` bytes (sparse).
    pub fn new(size: u64) -> Self {
        let base = std::env::temp_dir().join(crate::unique("cryo-xfs"));
        let (image, dir) = (base.with_extension("img"), base);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let made = Command::new("mkfs.xfs")
            .arg("-q")
            .arg(&image)
            .status()
            .expect("mkfs.xfs is needed for this test: install xfsprogs (scripts/setup does)");
        assert!(made.success(), "mkfs.xfs {} failed", image.display());
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "loop-mounting an XFS image at {} failed (this test runs as root)",
            dir.display()
        );
        let out = Command::new("losetup")
            .arg("-j")
            .arg(&image)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        let device = listed
            .split(':')
            .next()
            .and_then(|d| d.trim().strip_prefix("/dev/"))
            .unwrap_or_else(|| panic!("no loop device backs {}: {listed}", image.display()))
            .to_string();
        Self { dir, image, device }
    }

    /// Bytes written to its device so far (the block layer's count: what reached the disk,
    /// not what files claim).
    pub fn device_written(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/sys/block/{}/stat", self.device)).unwrap();
        let sectors: u64 = stat.split_whitespace().nth(6).unwrap().parse().unwrap();
        sectors * 512
    }

    /// Bytes in use on it.
    pub fn used(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.dir).unwrap();
        (s.blocks() - s.blocks_free()) * s.fragment_size()
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// One row of the reliability table: the case, what cryo did, what runc did ("-" where the
/// case does not apply to runc). Rows go to `$CRYO_FAULT_TABLE` (default
/// `target/fault-table.tsv`), which `scripts/test` prints after the run.
pub fn record(case: &str, cryo: &str, runc: &str) {
    let path = std::env::var_os("CRYO_FAULT_TABLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace().join("target/fault-table.tsv"));
    let line = format!(
        "{}\t{}\t{}\n",
        case.replace('\t', " "),
        cryo.replace(['\t', '\n'], " "),
        runc.replace(['\t', '\n'], " ")
    );
    // One write of a short line with O_APPEND: rows from parallel tests do not interleave.
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}
