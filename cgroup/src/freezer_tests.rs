//! The freezers against fake control files in a temp dir; helper threads play the kernel.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::FreezeGuard;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// What a helper thread playing the kernel writes: via rename, so the freezer under test never
/// reads a half-written (truncated, empty) file, which the real kernel never shows either.
fn kernel_sets(p: &Path, content: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

/// A fake v1 cgroup; `state` is its freezer.state content.
fn v1_dir(state: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("freezer.state"), state).unwrap();
    d
}

/// A fake v1 cgroup whose reported state (`reported`) is separate from what we write
/// (`freezer.state`), so it can stay FREEZING after a FROZEN request, like the kernel's.
fn v1_sticky(reported: &str) -> (tempfile::TempDir, PathBuf, V1Freezer) {
    let d = v1_dir("THAWED\n");
    let reported_file = d.path().join("reported");
    std::fs::write(&reported_file, reported).unwrap();
    let f = V1Freezer::with_state_file(d.path(), reported_file.clone());
    (d, reported_file, f)
}

fn v2_dir(freeze: &str, events: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("cgroup.freeze"), freeze).unwrap();
    std::fs::write(d.path().join("cgroup.events"), events).unwrap();
    d
}

#[test]
fn v1_freeze_and_guard_restores_thawed() {
    let d = v1_dir("THAWED\n");
    let f = V1Freezer::new(d.path());
    {
        // A regular file echoes our write, so FROZEN reads back at once.
        let g = FreezeGuard::freeze(&f, Duration::from_secs(1)).unwrap();
        assert!(!g.was_frozen_before());
        assert!(g.stats.polls >= 1);
        assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    }
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
}

#[test]
fn v1_waits_until_the_kernel_reports_frozen() {
    let (d, reported, f) = v1_sticky("FREEZING\n");
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        kernel_sets(&reported, "FROZEN\n");
    });
    let s = f.freeze(Duration::from_secs(5)).unwrap();
    flip.join().unwrap();
    assert!(s.polls > 1, "{s:?}");
    assert_eq!(read(&d.path().join("freezer.state")), "FROZEN");
}

/// The v1 quirk: a freeze stuck in FREEZING is requested again while we wait.
#[test]
fn v1_rerequests_while_freezing() {
    let (d, reported, f) = v1_sticky("FREEZING\n");
    let request = d.path().join("freezer.state");
    let kernel = std::thread::spawn(move || {
        while read(&request) != "FROZEN" {
            std::thread::sleep(Duration::from_micros(100));
        }
        // Forget the first request, then see it come again.
        std::fs::write(&request, "").unwrap();
        while read(&request) != "FROZEN" {
            std::thread::sleep(Duration::from_micros(100));
        }
        kernel_sets(&reported, "FROZEN\n");
    });
    f.freeze(Duration::from_secs(10)).unwrap();
    kernel.join().unwrap();
}

#[test]
fn v1_timeout_thaws_and_explains() {
    let (d, _reported, f) = v1_sticky("FREEZING\n");
    let e = f.freeze(Duration::from_millis(30)).unwrap_err();
    match &e {
        CgroupError::FreezeTimeout {
            path,
            timeout,
            state,
            thaw_error,
        } => {
            assert_eq!(path, d.path());
            assert_eq!(*timeout, Duration::from_millis(30));
            assert_eq!(*state, FreezerState::Freezing);
            assert!(thaw_error.is_none());
        }
        other => panic!("wrong error: {other}"),
    }
    let msg = e.to_string();
    for want in [
        &d.path().display().to_string(),
        "30ms",
        "FREEZING",
        "D state",
        "thawed again",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    assert_eq!(read(&d.path().join("freezer.state")), "THAWED");
}

#[test]
fn v1_unknown_state_is_a_parse_error() {
    let d = v1_dir("MELTING\n");
    let e = V1Freezer::new(d.path()).state().unwrap_err();
    assert!(
        matches!(e, CgroupError::Parse { ref line, .. } if line == "MELTING"),
        "{e}"
    );
}

#[test]
fn missing_cgroup_is_a_write_error_and_creates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let gone = d.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let e = V1Freezer::new(&gone)
        .freeze(Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(e, CgroupError::Write { .. }), "{e}");
    assert!(e.to_string().contains("gone/freezer.state"), "{e}");
    assert!(!gone.join("freezer.state").exists());
}

#[test]
fn v2_freeze_completes_when_events_say_so() {
    let d = v2_dir("0\n", "populated 1\nfrozen 0\n");
    let events = d.path().join("cgroup.events");
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        kernel_sets(&events, "populated 1\nfrozen 1\n");
    });
    let f = V2Freezer::new(d.path());
    let s = f.freeze(Duration::from_secs(5)).unwrap();
    flip.join().unwrap();
    assert!(s.polls > 1, "{s:?}");
    assert_eq!(read(&d.path().join("cgroup.freeze")), "1");
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    f.thaw().unwrap();
    assert_eq!(read(&d.path().join("cgroup.freeze")), "0");
}

#[test]
fn v2_states() {
    let d = v2_dir("1\n", "populated 1\nfrozen 0\n");
    let f = V2Freezer::new(d.path());
    assert_eq!(f.state().unwrap(), FreezerState::Freezing);
    std::fs::write(d.path().join("cgroup.freeze"), "0\n").unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
}

#[test]
fn v2_timeout_thaws_and_explains() {
    let d = v2_dir("0\n", "populated 1\nfrozen 0\n");
    let f = V2Freezer::new(d.path());
    let e = f.freeze(Duration::from_millis(20)).unwrap_err();
    assert!(
        matches!(
            e,
            CgroupError::FreezeTimeout {
                state: FreezerState::Freezing,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&d.path().display().to_string()) && msg.contains("thawed again"));
    assert_eq!(read(&d.path().join("cgroup.freeze")), "0");
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
}

/// A kernel without the v2 freezer has no "frozen" key: a clear error, and no freeze left.
#[test]
fn v2_without_frozen_key_errors_and_thaws() {
    let d = v2_dir("0\n", "populated 1\n");
    let e = V2Freezer::new(d.path())
        .freeze(Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(e, CgroupError::Parse { .. }), "{e}");
    assert_eq!(read(&d.path().join("cgroup.freeze")), "0");
}

#[test]
fn timeout_message_when_thaw_fails_says_so() {
    let e = CgroupError::FreezeTimeout {
        path: "/sys/fs/cgroup/freezer/c".into(),
        timeout: Duration::from_secs(5),
        state: FreezerState::Freezing,
        thaw_error: Some("EBUSY".into()),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("FAILED (EBUSY)") && msg.contains("by hand"),
        "{msg}"
    );
}

#[test]
fn guard_keeps_a_paused_cgroup_paused() {
    let d = v1_dir("FROZEN\n");
    let f = V1Freezer::new(d.path());
    let g = FreezeGuard::freeze(&f, Duration::from_secs(1)).unwrap();
    assert!(g.was_frozen_before());
    assert_eq!(g.stats, FreezeStats::default());
    drop(g);
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    FreezeGuard::freeze(&f, Duration::from_secs(1))
        .unwrap()
        .release()
        .unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    // force_thaw thaws even a cgroup that was paused (killed tasks must thaw to die).
    FreezeGuard::freeze(&f, Duration::from_secs(1))
        .unwrap()
        .force_thaw()
        .unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
}

#[test]
fn guard_release_keep_frozen_and_disarm() {
    let d = v1_dir("THAWED\n");
    let f = V1Freezer::new(d.path());
    FreezeGuard::freeze(&f, Duration::from_secs(1))
        .unwrap()
        .release()
        .unwrap();
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    FreezeGuard::freeze(&f, Duration::from_secs(1))
        .unwrap()
        .keep_frozen();
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    f.thaw().unwrap();
    FreezeGuard::freeze(&f, Duration::from_secs(1))
        .unwrap()
        .disarm();
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
}

#[test]
fn guard_freeze_timeout_leaves_it_thawed() {
    let (d, _reported, f) = v1_sticky("THAWED\n");
    // The reported state stays THAWED whatever we write: the freeze never completes.
    let e = FreezeGuard::freeze(&f, Duration::from_millis(10)).unwrap_err();
    assert!(matches!(e, CgroupError::FreezeTimeout { .. }), "{e}");
    assert_eq!(read(&d.path().join("freezer.state")), "THAWED");
}

#[test]
fn freezer_for_picks_the_version() {
    let v1 = ContainerCgroup {
        freezer: FreezerPath::V1("/a".into()),
    };
    let v2 = ContainerCgroup {
        freezer: FreezerPath::V2("/b".into()),
    };
    assert_eq!(freezer_for(&v1).path(), Path::new("/a"));
    assert_eq!(freezer_for(&v2).path(), Path::new("/b"));
    assert_eq!(v2.freezer.dir(), Path::new("/b"));
}
