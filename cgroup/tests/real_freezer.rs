//! The freezers against the real kernel: a `sleep 30` child in a fresh cgroup of the freezer
//! cryo uses on this host (v1 on a hybrid host, cgroup2 on a pure v2 one) and in a fresh
//! cgroup2 directory. Needs root, and FAILS without it: a skipped test would hide that
//! the freezer was never exercised.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use cryo_cgroup::{
    freezer_for, v1_controller_paths, ContainerCgroup, FreezeGuard, Freezer, FreezerPath,
    FreezerState, V2Freezer,
};

const V1_ROOT: &str = "/sys/fs/cgroup/freezer";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where cryo freezes on this host, and how to thaw a cgroup there: the v1 freezer hierarchy
/// where one is mounted (hybrid), else cgroup2 (a pure v2 host, or scripts/pure-v2).
fn freezer_root() -> (PathBuf, (&'static str, &'static str)) {
    let mountinfo = read(Path::new("/proc/self/mountinfo"));
    let v1 = mountinfo.lines().any(|l| {
        l.split(' ').nth(4) == Some(V1_ROOT) && l.contains(" - cgroup ") && l.ends_with("freezer")
    });
    if v1 {
        (PathBuf::from(V1_ROOT), ("freezer.state", "THAWED"))
    } else {
        let root = cryo_cgroup::discovery::cgroup2_mount_in(&mountinfo)
            .expect("neither a v1 freezer nor cgroup2 is mounted");
        (root, ("cgroup.freeze", "0"))
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "real_freezer tests create cgroups under /sys/fs/cgroup and must run as root \
         (e.g. `sudo -E cargo test -p cryo-cgroup --test real_freezer`)"
    );
}

/// A cgroup with a `sleep 30` child in it; on drop (also when a test panics) thaws the cgroup
/// so the child can die, kills and reaps the child, and removes the cgroup.
struct TestCgroup {
    dir: PathBuf,
    thaw: (&'static str, &'static str),
    child: Child,
}

impl TestCgroup {
    fn new(dir: PathBuf, thaw: (&'static str, &'static str)) -> Self {
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        let child = Command::new("sleep").arg("30").spawn().unwrap_or_else(|e| {
            let _ = std::fs::remove_dir(&dir);
            panic!("cannot spawn `sleep 30`: {e}")
        });
        let me = Self { dir, thaw, child };
        std::fs::write(me.dir.join("cgroup.procs"), me.child.id().to_string())
            .unwrap_or_else(|e| panic!("cannot move the child into {}: {e}", me.dir.display()));
        me
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A frozen task only dies once thawed, so thaw first; errors are moot while cleaning.
        let _ = std::fs::write(self.dir.join(self.thaw.0), self.thaw.1);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reaped child leaves the cgroup at once, but give the kernel a moment anyway.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove test cgroup {}", self.dir.display());
    }
}

fn proc_state(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap()
        .trim()
        .to_string()
}

/// Whether `cond` holds within a second (for what the kernel finishes just after a write).
fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// The freezer cryo picks for a process here (the v1 one on a hybrid host, cgroup2 on a pure v2
/// host) freezes and thaws it.
#[test]
fn the_hosts_freezer_freezes_and_thaws_a_real_process() {
    require_root();
    let (root, thaw) = freezer_root();
    let v1 = thaw.0 == "freezer.state";
    let dir = root.join(format!("cryo-test-{}-host", std::process::id()));
    let cg = TestCgroup::new(dir.clone(), thaw);

    let found = ContainerCgroup::for_pid(cg.pid()).unwrap();
    let (want, controllers) = if v1 {
        (FreezerPath::V1(dir.clone()), "freezer")
    } else {
        (FreezerPath::V2(dir.clone()), "")
    };
    assert_eq!(found.freezer, want);
    let paths = v1_controller_paths(cg.pid()).unwrap();
    assert!(
        paths.contains(&(controllers.to_string(), dir.clone())),
        "{paths:?}"
    );

    let f = freezer_for(&found);
    let stats = f.freeze(TIMEOUT).unwrap();
    eprintln!("freeze of an idle cgroup (v1: {v1}): {stats:?}");
    if v1 {
        assert_eq!(read(&dir.join("freezer.state")).trim(), "FROZEN");
    } else {
        assert!(read(&dir.join("cgroup.events")).contains("frozen 1"));
    }
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    // The v1 freezer parks tasks in uninterruptible sleep; cgroup2 in a stop of its own.
    if v1 {
        assert!(
            proc_state(cg.pid()).starts_with('D'),
            "{}",
            proc_state(cg.pid())
        );
    }

    f.thaw().unwrap();
    assert!(eventually(|| f.state().unwrap() == FreezerState::Thawed));
    assert!(
        eventually(|| !proc_state(cg.pid()).starts_with('D')),
        "{}",
        proc_state(cg.pid())
    );

    // The guard restores a running container to running, a paused one to paused.
    let g = FreezeGuard::freeze(f.as_ref(), TIMEOUT).unwrap();
    assert!(!g.was_frozen_before());
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    drop(g);
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    f.freeze(TIMEOUT).unwrap();
    let g = FreezeGuard::freeze(f.as_ref(), TIMEOUT).unwrap();
    assert!(g.was_frozen_before());
    g.release().unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
}

/// On a hybrid machine the cgroup2 hierarchy has no controllers but still holds processes and
/// freezes them (cgroup.freeze is a core file); on a pure v2 machine this is the normal case.
#[test]
fn v2_freezer_freezes_and_thaws_a_real_process() {
    require_root();
    let mountinfo = read(Path::new("/proc/self/mountinfo"));
    let root = cryo_cgroup::discovery::cgroup2_mount_in(&mountinfo)
        .expect("no cgroup2 mount in /proc/self/mountinfo: mount cgroup2 to run this test");
    let dir = root.join(format!("cryo-test-{}-v2", std::process::id()));
    let cg = TestCgroup::new(dir.clone(), ("cgroup.freeze", "0"));

    let paths = v1_controller_paths(cg.pid()).unwrap();
    assert!(paths.contains(&(String::new(), dir.clone())), "{paths:?}");

    let f = V2Freezer::new(&dir);
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    let stats = f.freeze(TIMEOUT).unwrap();
    eprintln!("v2 freeze of an idle cgroup: {stats:?}");
    assert!(read(&dir.join("cgroup.events")).contains("frozen 1"));
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);

    f.thaw().unwrap();
    // The kernel may report the thaw through cgroup.events a moment after the write.
    assert!(eventually(|| f.state().unwrap() == FreezerState::Thawed));

    let g = FreezeGuard::freeze(&f, TIMEOUT).unwrap();
    assert!(!g.was_frozen_before());
    g.release().unwrap();
    assert_eq!(read(&dir.join("cgroup.freeze")).trim(), "0");
}

/// A spec's cgroupsPath maps to the same directories the kernel shows for the process.
#[test]
fn cgroups_path_matches_the_process_view() {
    require_root();
    let name = format!("cryo-test-{}-path", std::process::id());
    let (root, thaw) = freezer_root();
    let cg = TestCgroup::new(root.join(&name), thaw);
    let from_spec = ContainerCgroup::from_cgroups_path(Path::new(&format!("/{name}"))).unwrap();
    assert_eq!(from_spec, ContainerCgroup::for_pid(cg.pid()).unwrap());
}
