//! Images are interchangeable with runc's: cryo restores a runc checkpoint and runc restores a
//! cryo checkpoint of the same bundle (runc 1.1.5 from Debian, CRIU 4.2.1).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_tests::{unique, Bundle, Runtime};

const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
];

fn last_number(lines: &[String], fallback: u64) -> u64 {
    lines
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(fallback)
}

fn hand_over(from: &Runtime, to: &Runtime, b: &Bundle) {
    let (id, id2) = (unique("x-from"), unique("x-to"));
    let (_g, _g2) = (from.guard(&id), to.guard(&id2));
    let lines = from.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    let seen = lines.wait_count(3, Duration::from_secs(20));
    let img = b.dir.join(unique("img"));
    from.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    let last = last_number(&lines.drain(Duration::from_secs(3)), seen);
    let restored = to.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    let first: u64 = restored
        .next(Duration::from_secs(10))
        .expect("restored process printed nothing")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        first,
        last + 1,
        "{} -> {}: counter must continue",
        from.bin.display(),
        to.bin.display()
    );
    assert_eq!(to.state(&id2)["status"], "running");
}

/// runc 1.1.5 mounts cgroupfs for a container with a cgroup namespace while libcontainer
/// bind-mounts each v1 controller, so the two only share images for specs without one (runc's
/// default spec, which `cryo spec` writes, has none; this keeps the test independent of that).
fn bundle_without_cgroupns() -> Bundle {
    let b = Bundle::busybox(COUNTER);
    b.write_config(COUNTER, |v| {
        let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "cgroup");
    });
    b
}

#[test]
fn cryo_restores_a_runc_checkpoint() {
    let cryo = Runtime::cryo();
    hand_over(&Runtime::runc(), &cryo, &Bundle::busybox(COUNTER));
}

#[test]
fn runc_restores_a_cryo_checkpoint() {
    let cryo = Runtime::cryo();
    hand_over(&cryo, &Runtime::runc(), &bundle_without_cgroupns());
}
