//! The checkpoint engine against a fake CRIU and a fake freezer: every failure thaws, a paused
//! container stays paused, success writes the manifest last.
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_cgroup::{Freezer, FreezerState, V1Freezer};
use cryo_checkpoint::criu::{
    CallKind, CriuCall, CriuClient, CriuError, CriuOutcome, Features, Notification, NotifyHandler,
};
use cryo_checkpoint::dump::{checkpoint, DumpRequest, SnapshotMode};
use cryo_checkpoint::flags::DumpFlags;

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
    fn call(&self, call: CriuCall, n: &mut NotifyHandler<'_>) -> Result<CriuOutcome, CriuError> {
        assert_eq!(call.kind, CallKind::Dump);
        // As CRIU: the pre-dump notification comes before it looks at the freezer.
        if let Err(e) = n(Notification {
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
        std::fs::write(call.images_dir.join("inventory.img"), b"fake").unwrap();
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
        work_dir: dir.join("img"),
        flags: DumpFlags {
            leave_running: true,
            ..Default::default()
        },
        snapshot: SnapshotMode::Auto,
        compress_pages: false,
        // The fake CRIU does not speak the page-server protocol.
        stage_pages: false,
        freeze_timeout: Duration::from_secs(1),
        gpu: None,
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
    let msg = e.to_string();
    assert!(
        msg.contains("dumping with CRIU") && msg.contains("thawed and keeps running"),
        "{msg}"
    );
    assert!(!dir.join("img/cryo-manifest.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interrupt_during_dump_thaws() {
    let (dir, req) = setup("intr", "THAWED");
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let e = checkpoint(&req, &criu, &freezer, &|| true).unwrap_err();
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    assert!(!dir.join("img/cryo-manifest.json").exists());
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
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pre_dump_is_refused_before_freezing_with_the_reason() {
    let (dir, mut req) = setup("predump", "THAWED");
    req.flags.pre_dump = true;
    let freezer = V1Freezer::new(dir.join("freezer"));
    let criu = fake(&dir, false);
    let e = checkpoint(&req, &criu, &freezer, &|| false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("CONFIG_MEM_SOFT_DIRTY"), "{e}");
    assert!(
        criu.seen_state.borrow().is_none(),
        "CRIU must not have been called"
    );
    assert_eq!(freezer.state().unwrap(), FreezerState::Thawed);
    std::fs::remove_dir_all(&dir).unwrap();
}
