//! The checkpoint engine against a fake CRIU and a fake freezer: every failure thaws, a paused
//! container stays paused, success writes the manifest last.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cryo_cgroup::{Freezer, FreezerState, V1Freezer};
use cryo_checkpoint::criu::{
    CallKind, CallObserver, CriuCall, CriuClient, CriuError, CriuOutcome, Features, Notification,
};
use cryo_checkpoint::dump::{self, DumpEnv, DumpReport, DumpRequest, SnapshotMode};
use cryo_checkpoint::flags::DumpFlags;
use cryo_checkpoint::guardian::GuardianLauncher;

/// A guardian that only listens: these tests check what cryo undoes itself (the real guardian
/// is tested in the guardian module and end to end).
struct Listener;

impl GuardianLauncher for Listener {
    fn launch(&self, orders: OwnedFd, _lock: Option<BorrowedFd<'_>>) -> std::io::Result<Child> {
        Command::new("cat")
            .stdin(Stdio::from(orders))
            .stdout(Stdio::null())
            .spawn()
    }
}

/// An error with all its causes, as the CLI prints it.
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

fn checkpoint(
    req: &DumpRequest,
    criu: &dyn CriuClient,
    freezer: &dyn Freezer,
    interrupted: &dyn Fn() -> bool,
) -> Result<DumpReport, dump::CheckpointError> {
    let env = DumpEnv {
        criu,
        freezer,
        guardian: &Listener,
        lock: None,
        interrupted,
    };
    dump::checkpoint(req, &env)
}

struct FakeCriu {
    fail: bool,
    freezer: PathBuf,
    seen_state: RefCell<Option<String>>,
    seen_leave_running: RefCell<Option<bool>>,
}

impl CriuClient for FakeCriu {
    fn version(&self) -> Result<u32, CriuError> {
        Ok(40201)
    }
    fn features(&self, _ask: Features) -> Result<Features, CriuError> {
        Ok(Features::default()) // like this kernel: no soft-dirty
    }
    fn call(&self, call: CriuCall, n: &mut dyn CallObserver) -> Result<CriuOutcome, CriuError> {
        assert_eq!(call.kind, CallKind::Dump);
        assert_eq!(call.umask, Some(0o077), "a dump's files are private");
        // As CRIU: the pre-dump notification comes before it looks at the freezer.
        if let Err(e) = n.notify(Notification {
            script: "pre-dump",
            pid: 0,
            fd: None,
        }) {
            return Err(CriuError::Failed {
                kind: "NOTIFY".into(),
                errno: 0,
                msg: e,
                log: call.work_dir.join("dump.log"),
                excerpt: String::new(),
            });
        }
        *self.seen_state.borrow_mut() =
            std::fs::read_to_string(self.freezer.join("freezer.state")).ok();
        *self.seen_leave_running.borrow_mut() = Some(call.opts.leave_running());
        if self.fail {
            return Err(CriuError::Failed {
                kind: "DUMP".into(),
                errno: 0,
                msg: String::new(),
                log: call.work_dir.join("dump.log"),
                excerpt: String::new(),
            });
        }
        if n.interrupted() {
            return Err(CriuError::Interrupted {
                log: call.work_dir.join("dump.log"),
            });
        }
        std::fs::write(call.images_dir.join("inventory.img"), b"fake").unwrap();
        std::fs::write(call.images_dir.join("core-1.img"), b"registers").unwrap();
        std::fs::write(
            call.work_dir.join("dump.log"),
            b"Dumping finished successfully",
        )
        .unwrap();
        Ok(CriuOutcome::default())
    }
}

fn setup(name: &str, initial: &str) -> (PathBuf, DumpRequest) {
    let dir = std::env::temp_dir().join(format!("cryo-engine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("freezer")).unwrap();
    std::fs::create_dir_all(dir.join("bundle/rootfs")).unwrap();
    std::fs::write(dir.join("freezer/freezer.state"), initial).unwrap();
    std::fs::write(dir.join("bundle/config.json"), "{}").unwrap();
    let spec: oci_spec::runtime::Spec = oci_spec::runtime::Spec::default();
    let req = DumpRequest {
        id: "c1".into(),
        pid: std::process::id() as i32,
        bundle: dir.join("bundle"),
        spec,
        rootfs: dir.join("bundle/rootfs"),
        stdio: vec!["/dev/null".into(), "pipe:[1]".into(), "pipe:[2]".into()],
        image_dir: dir.join("img"),
        work_dir: None,
        flags: DumpFlags {
            leave_running: true,
            ..Default::default()
        },
        snapshot: SnapshotMode::Auto,
        compress_pages: false,
        // The fake CRIU does not speak the page-server protocol.
        stage_pages: None,
        freeze_timeout: Some(Duration::from_secs(1)),
        criu_timeout: Duration::from_secs(60),
        failure_log_dir: Some(dir.clone()),
        gpu: None,
        parent: None,
    };
    (dir, req)
}

fn fake(dir: &Path, fail: bool) -> FakeCriu {
    FakeCriu {
        fail,
        freezer: dir.join("freezer"),
        seen_state: RefCell::new(None),
        seen_leave_running: RefCell::new(None),
    }
}

#[test]
fn criu_failure_thaws_and_says_so() {
    let (dir, req) = setup("fail", "THAWED");
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, true);
    let e = checkpoint(&req, &criu, &freezer, &|| false).unwrap_err();
    assert_eq!(
        criu.seen_state.borrow().as_deref(),
        Some("FROZEN"),
        "CRIU must run inside the freeze"
    );
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    let msg = full(&e);
    assert!(
        msg.contains("dumping with CRIU") && msg.contains("thawed and keeps running"),
        "{msg}"
    );
    assert!(
        !dir.join("img").exists(),
        "a failed checkpoint leaves no image dir"
    );
    assert_eq!(
        only_entries(&dir),
        vec!["bundle", "freezer"],
        "nothing half-made beside it"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The names in `dir`, sorted.
fn only_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_checkpoint_keeps_the_previous_one_whole() {
    let (dir, req) = setup("keep", "THAWED");
    let freezer = V1Freezer::new(dir.join("freezer"));
    checkpoint(&req, &fake(&dir, false), &freezer, &|| false).unwrap();
    let before = std::fs::read(dir.join("img/cryo-manifest.json")).unwrap();
    let e = checkpoint(&req, &fake(&dir, true), &freezer, &|| false).unwrap_err();
    assert!(full(&e).contains("dumping with CRIU"), "{}", full(&e));
    assert_eq!(
        std::fs::read(dir.join("img/cryo-manifest.json")).unwrap(),
        before
    );
    cryo_checkpoint::image::verify_image(&dir.join("img")).expect("the old image still verifies");
    assert_eq!(only_entries(&dir), vec!["bundle", "freezer", "img"]);
    // And a second good one replaces it whole.
    checkpoint(&req, &fake(&dir, false), &freezer, &|| false).unwrap();
    assert_ne!(
        std::fs::read(dir.join("img/cryo-manifest.json")).unwrap(),
        before
    );
    cryo_checkpoint::image::verify_image(&dir.join("img")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_image_path_holding_user_files_is_refused_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, req) = setup("userdir", "THAWED");
    std::fs::create_dir(dir.join("img")).unwrap();
    std::fs::write(dir.join("img/notes.txt"), "mine").unwrap();
    std::fs::set_permissions(dir.join("img"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let e = full(&checkpoint(&req, &criu, &freezer, &|| false).unwrap_err());
    assert!(e.contains("notes.txt") && e.contains("not touched"), "{e}");
    assert!(
        criu.seen_state.borrow().is_none(),
        "refused before CRIU ran"
    );
    assert_eq!(only_entries(&dir.join("img")), vec!["notes.txt"]);
    let mode = std::fs::metadata(dir.join("img"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o1777, "the directory's mode is untouched");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_log_of_a_failed_checkpoint_is_kept_where_the_error_says() {
    let (dir, req) = setup("log", "THAWED");
    let freezer = V1Freezer::new(dir.join("freezer"));
    // A CRIU that fails after writing its log.
    struct LogThenFail;
    impl CriuClient for LogThenFail {
        fn version(&self) -> Result<u32, CriuError> {
            Ok(40201)
        }
        fn features(&self, _ask: Features) -> Result<Features, CriuError> {
            Ok(Features::default())
        }
        fn call(&self, call: CriuCall, n: &mut dyn CallObserver) -> Result<CriuOutcome, CriuError> {
            n.notify(Notification {
                script: "pre-dump",
                pid: 0,
                fd: None,
            })
            .unwrap();
            let log = call.work_dir.join("dump.log");
            std::fs::write(
                &log,
                "(00.1) Error (criu/sk-inet.c:191): inet: Connected TCP socket",
            )
            .unwrap();
            Err(CriuError::Failed {
                kind: "DUMP".into(),
                errno: 0,
                msg: String::new(),
                log,
                excerpt: String::new(),
            })
        }
    }
    let e = checkpoint(&req, &LogThenFail, &freezer, &|| false).unwrap_err();
    let kept = e.log.clone().expect("the log is kept");
    assert!(kept.starts_with(&dir), "{kept:?}");
    assert!(std::fs::read_to_string(&kept)
        .unwrap()
        .contains("Connected TCP socket"));
    assert!(
        full(&e).contains(&kept.display().to_string()),
        "{}",
        full(&e)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interrupt_during_dump_thaws() {
    let (dir, req) = setup("intr", "THAWED");
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let e = checkpoint(&req, &criu, &freezer, &|| true).unwrap_err();
    assert!(full(&e).contains("interrupted"), "{}", full(&e));
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    assert!(!dir.join("img").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn paused_container_stays_paused_and_manifest_is_written() {
    let (dir, req) = setup("paused", "FROZEN");
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let report = checkpoint(&req, &criu, &freezer, &|| false).unwrap();
    assert_eq!(freezer.state().unwrap(), FreezerState::Frozen);
    let m = report.manifest.unwrap();
    assert!(m.was_paused && m.leave_running);
    assert_eq!(m.rootfs.kind, "directory");
    assert!(m.rootfs.skipped_because.is_some());
    assert_eq!(*criu.seen_leave_running.borrow(), Some(true));
    assert!(dir.join("img/cryo-manifest.json").exists());
    assert!(dir.join("img/descriptors.json").exists());
    let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["core-1.img", "descriptors.json", "inventory.img"]
    );
    let v = cryo_checkpoint::image::verify_image(&dir.join("img")).unwrap();
    assert_eq!(v.files_checked, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pre_dump_is_refused_before_freezing_with_the_reason() {
    let (dir, mut req) = setup("predump", "THAWED");
    req.flags.pre_dump = true;
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let e = full(&checkpoint(&req, &criu, &freezer, &|| false).unwrap_err());
    assert!(e.contains("CONFIG_MEM_SOFT_DIRTY"), "{e}");
    assert!(
        criu.seen_state.borrow().is_none(),
        "CRIU must not have been called"
    );
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    std::fs::remove_dir_all(&dir).unwrap();
}
