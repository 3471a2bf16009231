//! The group checkpoint against fake CRIUs, fake freezers and a fake network lock: no member
//! is dumped before every member is frozen and the network locked; any failure leaves every
//! member thawed, the network unlocked and no group image; success publishes the group whole.
//!
//! Each member's pid is a `sleep` in a network namespace of its own (a group refuses members in
//! the host's): these tests need root.
#![allow(clippy::unwrap_used)]

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use cryo_cgroup::{Freezer, FreezerState, V1Freezer};
use cryo_checkpoint::criu::{
    CallKind, CallObserver, CriuCall, CriuClient, CriuError, CriuOutcome, Features, Notification,
};
use cryo_checkpoint::dump::{DumpEnv, DumpRequest, SnapshotMode};
use cryo_checkpoint::flags::DumpFlags;
use cryo_checkpoint::group::netlock::{NetLock, Netns};
use cryo_checkpoint::group::{checkpoint_group, DumpSeams, GroupEnv, GroupRequest, Member};
use cryo_checkpoint::guardian::GuardianLauncher;

/// A guardian that only listens (what cryo undoes itself is under test here).
struct Listener;

impl GuardianLauncher for Listener {
    fn launch(&self, orders: OwnedFd, _lock: Option<BorrowedFd<'_>>) -> std::io::Result<Child> {
        Command::new("cat")
            .stdin(Stdio::from(orders))
            .stdout(Stdio::null())
            .spawn()
    }
}

/// Which namespaces are locked now, and every lock/unlock in order.
#[derive(Default)]
struct FakeLock {
    locked: Mutex<Vec<u64>>,
    log: Mutex<Vec<String>>,
    fail_lock: bool,
}

impl NetLock for FakeLock {
    fn lock(&self, ns: &Netns) -> Result<(), String> {
        self.log.lock().unwrap().push(format!("lock {}", ns.name()));
        if self.fail_lock {
            return Err("iptables-restore: no such table".into());
        }
        self.locked.lock().unwrap().push(ns.inode);
        Ok(())
    }
    fn unlock(&self, ns: &Netns) -> Result<(), String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("unlock {}", ns.name()));
        self.locked.lock().unwrap().retain(|i| *i != ns.inode);
        Ok(())
    }
    fn is_locked(&self, ns: &Netns) -> Result<bool, String> {
        Ok(self.locked.lock().unwrap().contains(&ns.inode))
    }
}

/// A CRIU that, when it "dumps", records what every member's freezer and the network lock
/// look like; it may fail.
struct FakeCriu<'t> {
    fail: bool,
    freezers: Vec<PathBuf>,
    lock: &'t FakeLock,
    seen: &'t Mutex<Vec<(Vec<String>, usize)>>,
}

impl CriuClient for FakeCriu<'_> {
    fn version(&self) -> Result<u32, CriuError> {
        Ok(40201)
    }
    fn features(&self, _ask: Features) -> Result<Features, CriuError> {
        Ok(Features::default())
    }
    fn call(&self, call: CriuCall, n: &mut dyn CallObserver) -> Result<CriuOutcome, CriuError> {
        assert_eq!(call.kind, CallKind::Dump);
        assert!(call.opts.tcp_established(), "a group dumps its connections");
        assert!(
            call.opts.leave_running(),
            "CRIU never stops a member itself"
        );
        let failed = |msg: String| CriuError::Failed {
            kind: "DUMP".into(),
            errno: 0,
            msg,
            log: call.work_dir.join("dump.log"),
            excerpt: String::new(),
        };
        n.notify(Notification {
            script: "pre-dump",
            pid: 0,
            fd: None,
        })
        .map_err(failed)?;
        let states = self
            .freezers
            .iter()
            .map(|f| std::fs::read_to_string(f.join("freezer.state")).unwrap())
            .collect();
        self.seen
            .lock()
            .unwrap()
            .push((states, self.lock.locked.lock().unwrap().len()));
        if self.fail {
            return Err(failed(": Can't dump an unsupported file".into()));
        }
        std::fs::write(call.images_dir.join("inventory.img"), b"fake").unwrap();
        std::fs::write(
            call.work_dir.join("dump.log"),
            b"Dumping finished successfully",
        )
        .unwrap();
        Ok(CriuOutcome::default())
    }
}

struct Fixture {
    dir: PathBuf,
    sleepers: Vec<Child>,
    members: Vec<Member>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for s in &mut self.sleepers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` members, each a `sleep` in a fresh network namespace with a fake v1 freezer.
fn fixture(name: &str, n: usize, leave_running: bool) -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (each member gets a network namespace): run them as root"
    );
    let dir = std::env::temp_dir().join(format!("cryo-group-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sleepers = Vec::new();
    let mut members = Vec::new();
    for i in 0..n {
        let id = format!("m{i}");
        let base = dir.join(&id);
        std::fs::create_dir_all(base.join("freezer")).unwrap();
        std::fs::create_dir_all(base.join("bundle/rootfs")).unwrap();
        std::fs::write(base.join("freezer/freezer.state"), "THAWED").unwrap();
        std::fs::write(base.join("bundle/config.json"), "{}").unwrap();
        let sleeper = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .spawn()
            .expect("unshare (util-linux) is needed");
        // unshare execs sleep in the new namespace: wait until it has.
        let pid = sleeper.id() as i32;
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..500 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l != host) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let req = DumpRequest {
            id: id.clone(),
            pid,
            bundle: base.join("bundle"),
            spec: oci_spec::runtime::Spec::default(),
            rootfs: base.join("bundle/rootfs"),
            stdio: vec!["/dev/null".into(), "pipe:[1]".into(), "pipe:[2]".into()],
            image_dir: PathBuf::from("/set/by/the/group"),
            work_dir: None,
            flags: DumpFlags {
                leave_running,
                ..Default::default()
            },
            snapshot: SnapshotMode::None,
            compress_pages: false,
            stage_pages: None,
            freeze_timeout: None,
            criu_timeout: Duration::from_secs(60),
            failure_log_dir: Some(base.clone()),
            gpu: None,
            parent: None,
        };
        members.push(Member {
            req,
            cgroup: base.join("freezer"),
        });
        sleepers.push(sleeper);
    }
    Fixture {
        dir,
        sleepers,
        members,
    }
}

struct Seams<'t> {
    members: &'t [Member],
    failing: Option<usize>,
    lock: &'t FakeLock,
    seen: &'t Mutex<Vec<(Vec<String>, usize)>>,
}

impl DumpSeams for Seams<'_> {
    fn with_env(&self, member: usize, f: &mut dyn FnMut(&DumpEnv<'_>)) {
        let criu = FakeCriu {
            fail: self.failing == Some(member),
            freezers: self.members.iter().map(|m| m.cgroup.clone()).collect(),
            lock: self.lock,
            seen: self.seen,
        };
        let freezer = V1Freezer::new(&self.members[member].cgroup);
        let env = DumpEnv {
            criu: &criu,
            freezer: &freezer,
            guardian: &Listener,
            lock: None,
            interrupted: &|| false,
        };
        f(&env);
    }
}

/// What a group checkpoint returned.
type GroupResult =
    Result<cryo_checkpoint::group::GroupReport, cryo_checkpoint::group::GroupCheckpointError>;

/// Run a group checkpoint of `fx`; returns its result and, for each CRIU dump, every member's
/// freezer state and how many namespaces were locked when it began.
fn run(
    fx: &Fixture,
    failing: Option<usize>,
    lock: &FakeLock,
) -> (GroupResult, Vec<(Vec<String>, usize)>) {
    let seen = Mutex::new(Vec::new());
    let seams = Seams {
        members: &fx.members,
        failing,
        lock,
        seen: &seen,
    };
    let req = GroupRequest {
        image_dir: fx.dir.join("group-img"),
        name: Some("job".into()),
        lock_network: true,
        freeze_timeout: Some(Duration::from_secs(20)),
        criu_timeout: Duration::from_secs(60),
    };
    let env = GroupEnv {
        guardian: &Listener,
        interrupted: &|| false,
        netlock: lock,
    };
    let r = checkpoint_group(&req, fx.members.clone(), &seams, &env);
    (r, seen.into_inner().unwrap())
}

fn states(fx: &Fixture) -> Vec<FreezerState> {
    fx.members
        .iter()
        .map(|m| V1Freezer::new(&m.cgroup).state().unwrap())
        .collect()
}

/// Everything in `dir` but the members' own directories.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('m'))
        .collect();
    v.sort();
    v
}

fn full(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn no_member_is_dumped_before_all_are_frozen_and_the_network_locked() {
    let fx = fixture("ok", 3, true);
    let lock = FakeLock::default();
    let (r, seen) = run(&fx, None, &lock);
    let report = r.unwrap();
    assert_eq!(seen.len(), 3);
    for (freezers, locked) in &seen {
        assert!(freezers.iter().all(|s| s == "FROZEN"), "{seen:?}");
        assert_eq!(
            *locked, 3,
            "every member's namespace is locked during every dump"
        );
    }
    assert_eq!(
        states(&fx),
        vec![FreezerState::Thawed; 3],
        "--leave-running thaws all"
    );
    assert!(
        lock.locked.lock().unwrap().is_empty(),
        "and unlocks the network"
    );
    let g = cryo_checkpoint::group::manifest::check_group(&fx.dir.join("group-img")).unwrap();
    let ids: Vec<&str> = g.manifest.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["m0", "m1", "m2"]);
    assert_eq!(g.manifest.group.as_deref(), Some("job"));
    assert_eq!(report.members.len(), 3);
    assert!(report.members[1]
        .image_dir
        .ends_with("group-img/members/m1"));
    cryo_checkpoint::group::manifest::verify_group_fully(&fx.dir.join("group-img")).unwrap();
    assert_eq!(
        leftovers(&fx.dir),
        vec!["group-img"],
        "no staging left beside it"
    );

    // A second group checkpoint replaces the first whole.
    let before = std::fs::read(fx.dir.join("group-img/cryo-group.json")).unwrap();
    run(&fx, None, &lock).0.unwrap();
    assert_ne!(
        std::fs::read(fx.dir.join("group-img/cryo-group.json")).unwrap(),
        before
    );
    cryo_checkpoint::group::manifest::verify_group_fully(&fx.dir.join("group-img")).unwrap();
}

#[test]
fn a_member_whose_dump_fails_leaves_every_member_running_and_no_group_image() {
    let fx = fixture("fail", 2, true);
    let lock = FakeLock::default();
    let (r, _) = run(&fx, Some(1), &lock);
    let e = full(&r.unwrap_err());
    assert!(
        e.contains("unsupported file"),
        "the member's own error is the cause: {e}"
    );
    assert!(
        e.contains("m0 was thawed and keeps running") && e.contains("m1 was thawed"),
        "{e}"
    );
    assert_eq!(states(&fx), vec![FreezerState::Thawed; 2]);
    assert!(
        lock.locked.lock().unwrap().is_empty(),
        "the network is unlocked"
    );
    assert!(
        !fx.dir.join("group-img").exists(),
        "no group image, complete or not"
    );
    assert!(
        leftovers(&fx.dir).is_empty(),
        "no staging: {:?}",
        leftovers(&fx.dir)
    );
}

#[test]
fn a_network_that_cannot_be_locked_thaws_everyone_before_any_dump() {
    let fx = fixture("nolock", 2, false);
    let lock = FakeLock {
        fail_lock: true,
        ..FakeLock::default()
    };
    let (r, seen) = run(&fx, None, &lock);
    let e = full(&r.unwrap_err());
    assert!(e.contains("locking the members' network failed"), "{e}");
    assert!(seen.is_empty(), "no CRIU dumped anything");
    assert_eq!(states(&fx), vec![FreezerState::Thawed; 2]);
    assert!(!fx.dir.join("group-img").exists());
}

#[test]
fn stopped_members_stay_frozen_until_the_group_is_published_and_the_lock_stays() {
    let fx = fixture("stop", 2, false);
    let lock = FakeLock::default();
    let (r, _) = run(&fx, None, &lock);
    let report = r.unwrap();
    assert!(report.members.iter().all(|m| m.stopped));
    assert!(!report.manifest.leave_running);
    assert_eq!(
        lock.locked.lock().unwrap().len(),
        2,
        "the lock stays until the group is restored: {:?}",
        lock.log.lock().unwrap()
    );
    // Killed while frozen, then thawed to die.
    assert_eq!(states(&fx), vec![FreezerState::Thawed; 2]);
    cryo_checkpoint::group::manifest::verify_group_fully(&fx.dir.join("group-img")).unwrap();
}

#[test]
fn refusals_touch_nothing() {
    let mut fx = fixture("refuse", 2, true);
    fx.members[1].req.flags.pre_dump = true;
    let lock = FakeLock::default();
    let e = full(&run(&fx, None, &lock).0.unwrap_err());
    assert!(
        e.contains("--pre-dump is for the checkpoint of one container"),
        "{e}"
    );
    assert!(e.contains("no container was touched"), "{e}");
    fx.members[1].req.flags.pre_dump = false;
    fx.members[1].req.pid = std::process::id() as i32;
    let e = full(&run(&fx, None, &lock).0.unwrap_err());
    assert!(e.contains("uses the host's network namespace"), "{e}");
    assert!(lock.log.lock().unwrap().is_empty());
    assert!(!fx.dir.join("group-img").exists());
}
