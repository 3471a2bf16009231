#![allow(clippy::unwrap_used)]
use super::*;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cryo-freezer-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A v1 "kernel" that completes a freeze on the first request.
#[test]
fn v1_freeze_and_guard_restores_thawed() {
    let d = tmp("v1");
    std::fs::write(d.join("freezer.state"), "THAWED\n").unwrap();
    let f = V1Freezer::new(&d);
    // The fake file holds what we wrote, so FROZEN reads back at once.
    {
        let g = FreezeGuard::freeze(&f, Duration::from_secs(1)).unwrap();
        assert!(!g.was_frozen_before());
        assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    }
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn guard_keeps_a_paused_cgroup_paused() {
    let d = tmp("paused");
    std::fs::write(d.join("freezer.state"), "FROZEN\n").unwrap();
    let f = V1Freezer::new(&d);
    let g = FreezeGuard::freeze(&f, Duration::from_secs(1)).unwrap();
    assert!(g.was_frozen_before());
    drop(g);
    assert_eq!(f.state().unwrap(), FreezerState::Frozen);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A v2 "kernel" whose events file never reports frozen: the freeze times out, is undone,
/// and the error names the path.
#[test]
fn v2_timeout_thaws_and_explains() {
    let d = tmp("v2");
    std::fs::write(d.join("cgroup.freeze"), "0\n").unwrap();
    std::fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let f = V2Freezer::new(&d);
    let e = f.freeze(Duration::from_millis(20)).unwrap_err().to_string();
    assert!(
        e.contains(&d.display().to_string()) && e.contains("thawed again"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
        "0"
    );
    assert_eq!(f.state().unwrap(), FreezerState::Thawed);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn v2_freeze_completes_when_events_say_so() {
    let d = tmp("v2ok");
    std::fs::write(d.join("cgroup.freeze"), "0\n").unwrap();
    std::fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let dd = d.clone();
    let flip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        std::fs::write(dd.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    });
    let s = V2Freezer::new(&d).freeze(Duration::from_secs(2)).unwrap();
    assert!(s.polls >= 1);
    flip.join().unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}
