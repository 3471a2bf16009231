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

/// Removes the checkpointed container's cgroup when the test ends: runc 1.1 gives CRIU no
/// cgroup2 root, so on a pure v2 host it restores into that cgroup (recreated) instead of its
/// own, and its delete leaves it.
struct OldCgroup(Option<String>);

impl Drop for OldCgroup {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            for d in cryo_tests::cgroups::dirs_of(path) {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

fn hand_over(from: &Runtime, to: &Runtime, b: &Bundle) {
    let (id, id2) = (unique("x-from"), unique("x-to"));
    let mut old_cgroup = OldCgroup(None);
    let (_g, _g2) = (from.guard(&id), to.guard(&id2));
    let lines = from.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    let seen = lines.wait_count(3, Duration::from_secs(20));
    let pid = from.state(&id)["pid"].as_i64().unwrap();
    old_cgroup.0 = Some(cryo_tests::cgroups::cgroup_path_of(pid));
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

/// Without a cgroup namespace, libcontainer and runc bind each v1 controller's own directory (a
/// hybrid host) or mount the whole cgroup2 tree (a pure v2 one).
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

/// With a cgroup namespace (cryo's and runc's default spec) both leave the namespaced cgroup
/// mounts to CRIU, which mounts them afresh at restore.
#[test]
fn runc_restores_a_cryo_checkpoint() {
    let cryo = Runtime::cryo();
    hand_over(&cryo, &Runtime::runc(), &Bundle::busybox(COUNTER));
}

#[test]
fn runc_restores_a_cryo_checkpoint_without_a_cgroup_namespace() {
    let cryo = Runtime::cryo();
    hand_over(&cryo, &Runtime::runc(), &bundle_without_cgroupns());
}
