//! A checkpoint interrupted from outside — SIGTERM to cryo, or CRIU killed mid-dump — leaves the
//! container running, thawed and intact.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use cryo_tests::runtime::freezer_state;
use cryo_tests::{unique, Bundle, Runtime};

/// ~200 MB of shell memory so the dump lasts long enough to be interrupted.
const BIG: &str = "s=$(head -c 200000000 /dev/zero | tr '\\0' x); echo ready; i=0; while true; do i=$((i+1)); echo \"$i ${#s}\"; sleep 0.1; done";

fn start(rt: &Runtime, b: &Bundle, id: &str) -> cryo_tests::runtime::Lines {
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), id]);
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if lines.next(Duration::from_millis(500)).as_deref() == Some("ready") {
            return lines;
        }
    }
    panic!("workload never got ready");
}

fn child_criu(parent: u32) -> Option<i32> {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = stat
            .rsplit_once(')')
            .map(|(_, r)| r.to_string())
            .unwrap_or_default();
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && stat.contains("(criu)") {
            return Some(pid);
        }
    }
    None
}

/// A bundle whose CRIU (through the `org.criu.config` annotation, as a docker user would) runs an
/// action script that, at `post-dump`, touches a marker and sleeps: the pages are dumped, the
/// container is frozen, and CRIU is still running for seconds. That makes the interrupt land
/// inside the freeze deterministically, however short the freeze is.
fn slow_dump_bundle() -> (Bundle, std::path::PathBuf) {
    let b = Bundle::busybox(&["sh", "-c", BIG]);
    let marker = b.dir.join("in-post-dump");
    let script = b.dir.join("slow-post-dump.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\ntouch {}\nsleep 5\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let conf = b.dir.join("criu.conf");
    std::fs::write(&conf, format!("action-script {}\n", script.display())).unwrap();
    let conf = conf.to_str().unwrap().to_string();
    b.write_config(&["sh", "-c", BIG], move |v| {
        v["annotations"] = serde_json::json!({"org.criu.config": conf});
    });
    (b, marker)
}

/// Wait until CRIU sits in its post-dump script, check the container is frozen then, and
/// return the dump's CRIU (a criu child of cryo).
fn wait_for_dump(cryo: u32, pid: i64, marker: &std::path::Path) -> i32 {
    let end = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < end,
            "CRIU never reached its post-dump script"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // CRIU seizes the frozen tasks with ptrace, then thaws the cgroup for the rest of the dump
    // (and re-freezes it at the end, since cryo froze it first): they must be stopped now.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        state == "t" || freezer_state(pid) == "FROZEN",
        "the container must be stopped while CRIU dumps it (state {state})"
    );
    child_criu(cryo).expect("no CRIU child of cryo while it dumps")
}

fn assert_intact(rt: &Runtime, id: &str, lines: &cryo_tests::runtime::Lines) {
    let st = rt.state(id);
    assert_eq!(st["status"], "running");
    assert_eq!(freezer_state(st["pid"].as_i64().unwrap()), "THAWED");
    let n = lines.wait_count(0, Duration::from_secs(10));
    let next = lines.next(Duration::from_secs(5)).unwrap();
    assert!(next.ends_with(" 200000000"), "memory damaged: {next}");
    assert!(
        next.split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > n,
        "counter stopped"
    );
}

#[test]
fn sigterm_to_cryo_during_checkpoint_thaws_the_container() {
    let rt = Runtime::cryo();
    let (b, marker) = slow_dump_bundle();
    let id = unique("sigterm");
    let _g = rt.guard(&id);
    let lines = start(&rt, &b, &id);
    let img = b.dir.join("img");
    let cryo = rt
        .cmd()
        .args(["checkpoint", "--image-path", img.to_str().unwrap(), &id])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the container is frozen and CRIU dumps it, then ask cryo to stop.
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    wait_for_dump(cryo.id(), pid, &marker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cryo.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = cryo.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted checkpoint must fail");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!img.join("cryo-manifest.json").exists());
    assert_intact(&rt, &id, &lines);
}

#[test]
fn criu_killed_mid_dump_leaves_the_container_running() {
    let rt = Runtime::cryo();
    let (b, marker) = slow_dump_bundle();
    let id = unique("criukill");
    let _g = rt.guard(&id);
    let lines = start(&rt, &b, &id);
    let img = b.dir.join("img");
    let cryo = rt
        .cmd()
        .args([
            "checkpoint",
            "--leave-running",
            "--image-path",
            img.to_str().unwrap(),
            &id,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    let criu = wait_for_dump(cryo.id(), pid, &marker);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(criu),
        nix::sys::signal::Signal::SIGKILL,
    );
    let out = cryo.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "checkpoint with a killed CRIU must fail: {err}"
    );
    assert!(err.contains("CRIU") && err.contains("dump.log"), "{err}");
    assert!(!img.join("cryo-manifest.json").exists());
    assert_intact(&rt, &id, &lines);
}
