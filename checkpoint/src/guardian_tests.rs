#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::*;

/// Records what the guardian did.
#[derive(Default)]
struct Recorder {
    cleaned: Mutex<Vec<String>>,
    log: Mutex<Vec<String>>,
}

impl GuardianHost for Recorder {
    fn cleanup(&self, tag: &str) -> Result<(), String> {
        self.cleaned.lock().unwrap().push(tag.to_string());
        Ok(())
    }
    fn log(&self, message: &str) {
        self.log.lock().unwrap().push(message.to_string());
    }
}

/// A v1-style fake freezer directory whose state file echoes the last write.
fn fake_cgroup(state: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("freezer.state"), state).unwrap();
    d
}

fn state(d: &tempfile::TempDir) -> String {
    std::fs::read_to_string(d.path().join("freezer.state"))
        .unwrap()
        .trim()
        .to_string()
}

fn send(s: &mut UnixStream, o: &Order) {
    let mut line = serde_json::to_vec(o).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
}

/// Run `serve` on a thread; returns cryo's end of the socket and the join handle.
fn guardian(host: std::sync::Arc<Recorder>) -> (UnixStream, std::thread::JoinHandle<Ending>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let h = std::thread::spawn(move || serve(OwnedFd::from(theirs), host.as_ref()));
    (ours, h)
}

fn freezing(cg: &tempfile::TempDir, was_frozen: bool, deadline: Option<u64>) -> Order {
    Order::Freezing {
        cgroup: cg.path().to_path_buf(),
        was_frozen,
        deadline_unix_ms: deadline,
    }
}

#[test]
fn dismissed_guardian_touches_nothing() {
    let cg = fake_cgroup("FROZEN");
    let keep = tempfile::tempdir().unwrap();
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host.clone());
    send(&mut s, &freezing(&cg, false, None));
    send(
        &mut s,
        &Order::Remove {
            path: keep.path().to_path_buf(),
        },
    );
    send(&mut s, &Order::Cleanup { tag: "c1".into() });
    send(&mut s, &Order::Done);
    assert_eq!(h.join().unwrap(), Ending::Dismissed);
    assert_eq!(state(&cg), "FROZEN");
    assert!(keep.path().exists());
    assert!(host.cleaned.lock().unwrap().is_empty());
}

#[test]
fn when_cryo_vanishes_it_thaws_removes_and_cleans_up() {
    let cg = fake_cgroup("FROZEN");
    let parent = tempfile::tempdir().unwrap();
    let staging = parent.path().join(".img.cryo-staging");
    std::fs::create_dir_all(staging.join("sub")).unwrap();
    std::fs::write(staging.join("sub/pages-1.img"), b"x").unwrap();
    let published = parent.path().join("kept");
    std::fs::create_dir_all(&published).unwrap();
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host.clone());
    send(&mut s, &freezing(&cg, false, None));
    send(
        &mut s,
        &Order::Remove {
            path: staging.clone(),
        },
    );
    send(
        &mut s,
        &Order::Remove {
            path: published.clone(),
        },
    );
    send(
        &mut s,
        &Order::Keep {
            path: published.clone(),
        },
    );
    send(&mut s, &Order::Cleanup { tag: "c1".into() });
    send(&mut s, &Order::Cleanup { tag: "c2".into() });
    send(&mut s, &Order::CleanupDone { tag: "c2".into() });
    drop(s); // cryo is gone
    assert_eq!(h.join().unwrap(), Ending::Undid);
    assert_eq!(state(&cg), "THAWED");
    assert!(!staging.exists());
    assert!(published.exists(), "a kept path is not removed");
    assert_eq!(*host.cleaned.lock().unwrap(), vec!["c1".to_string()]);
}

#[test]
fn a_container_paused_before_stays_paused() {
    let cg = fake_cgroup("FROZEN");
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host);
    send(
        &mut s,
        &freezing(&cg, true, Some(deadline_after(Duration::ZERO))),
    );
    drop(s);
    assert_eq!(h.join().unwrap(), Ending::Undid);
    assert_eq!(state(&cg), "FROZEN");
}

#[test]
fn thawed_order_disarms_the_thaw() {
    let cg = fake_cgroup("FROZEN");
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host);
    send(&mut s, &freezing(&cg, false, None));
    send(&mut s, &Order::Thawed);
    // The user (or the next verb) froze it again: not the guardian's business any more.
    drop(s);
    assert_eq!(h.join().unwrap(), Ending::Undid);
    assert_eq!(state(&cg), "FROZEN");
}

#[test]
fn the_deadline_thaws_while_cryo_still_lives() {
    let cg = fake_cgroup("FROZEN");
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host.clone());
    send(
        &mut s,
        &freezing(&cg, false, Some(deadline_after(Duration::from_millis(50)))),
    );
    let start = Instant::now();
    while state(&cg) != "THAWED" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not thawed at the deadline"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    send(&mut s, &Order::Done);
    assert_eq!(h.join().unwrap(), Ending::Dismissed);
    assert!(
        host.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("deadline")),
        "{:?}",
        host.log.lock().unwrap()
    );
}

#[test]
fn a_lingering_criu_is_killed_before_the_thaw() {
    let cg = fake_cgroup("FROZEN");
    let mut criu = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let host = std::sync::Arc::new(Recorder::default());
    let (mut s, h) = guardian(host.clone());
    send(&mut s, &freezing(&cg, false, None));
    send(
        &mut s,
        &Order::Criu {
            pid: criu.id() as i32,
        },
    );
    drop(s);
    let start = Instant::now();
    let status = criu.wait().unwrap();
    assert_eq!(h.join().unwrap(), Ending::Undid);
    assert!(
        !status.success(),
        "the stand-in CRIU was killed: {status:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(state(&cg), "THAWED");
    assert!(host
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("stopping CRIU")));
}

#[test]
fn guardian_client_reports_a_dead_guardian() {
    struct Exits;
    impl GuardianLauncher for Exits {
        fn launch(&self, orders: OwnedFd, _lock: Option<BorrowedFd<'_>>) -> std::io::Result<Child> {
            std::process::Command::new("true")
                .stdin(File::from(orders))
                .spawn()
        }
    }
    let mut g = Guardian::start(&Exits, None).unwrap();
    // Its end is closed once `true` exits; sending must fail, not raise SIGPIPE.
    let mut failed = false;
    for _ in 0..200 {
        if g.order(&Order::Thawed).is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(failed, "orders to a dead guardian must fail");
}
