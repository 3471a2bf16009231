//! Checkpoint and restore on the machine's cgroup layout, whichever it is (`scripts/test` runs
//! the suite on the hybrid host and again on an emulated pure cgroup v2 host): with and
//! without a cgroup namespace, in place and under a new id, with every
//! `--manage-cgroups-mode`. The restored process continues, sits in the new container's
//! cgroup (the old one is not recreated), and sees that cgroup through its `/sys/fs/cgroup`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cryo_tests::cgroups::{self, assert_no_cgroup, Layout};
use cryo_tests::{unique, Bundle, Runtime};

const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
];

/// A counter bundle whose container lives at `cgroups_path`, with or without a cgroup
/// namespace of its own.
fn configure(b: &Bundle, cgroups_path: &str, cgroupns: bool) {
    b.write_config(COUNTER, |v| {
        v["linux"]["cgroupsPath"] = cgroups_path.into();
        // `cryo spec` writes runc's default, which has no cgroup namespace.
        let ns = v["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "cgroup");
        if cgroupns {
            ns.push(serde_json::json!({ "type": "cgroup" }));
        }
    });
}

/// Removes the parent cgroup the test's containers lived in (libcgroups, like runc, leaves
/// the parents of a container's cgroup).
struct Parent(String);

impl Drop for Parent {
    fn drop(&mut self) {
        for d in cgroups::dirs_of(&self.0) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn number(line: &str) -> u64 {
    line.trim().parse().unwrap()
}

/// One round: run `from` at `<parent>/a`, checkpoint it (stopping it) with `mode`, restore it
/// with `mode` as `to` (the same id, or a new one at `<parent>/b`), and check where and how it
/// continues.
fn round(cgroupns: bool, new_id: bool, mode: Option<&str>) {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(COUNTER);
    let parent = Parent(format!("/{}", unique("cryo-cg")));
    let (from, from_cg) = (unique("cg-a"), format!("{}/a", parent.0));
    let (to, to_cg) = if new_id {
        (unique("cg-b"), format!("{}/b", parent.0))
    } else {
        (from.clone(), from_cg.clone())
    };
    let (_g, _g2) = (rt.guard(&from), rt.guard(&to));
    configure(&b, &from_cg, cgroupns);
    let mode_args: Vec<&str> = mode
        .map(|m| vec!["--manage-cgroups-mode", m])
        .unwrap_or_default();

    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &from]);
    let seen = lines.wait_count(3, Duration::from_secs(20));
    let pid = rt.state(&from)["pid"].as_i64().unwrap();
    assert_eq!(cgroups::cgroup_path_of(pid), from_cg);
    let img = b.dir.join("img");
    let mut args = vec!["checkpoint"];
    args.extend(&mode_args);
    args.extend(["--image-path", img.to_str().unwrap(), &from]);
    rt.ok(&args);
    let last = lines
        .drain(Duration::from_secs(3))
        .last()
        .map(|l| number(l))
        .unwrap_or(seen);
    assert_no_cgroup(&from_cg);

    configure(&b, &to_cg, cgroupns);
    let mut args = vec!["restore", "-d"];
    args.extend(&mode_args);
    args.extend([
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &to,
    ]);
    let restored = rt.spawn_with_pipe(&args);
    let first = restored
        .next(Duration::from_secs(10))
        .expect("the restored process printed nothing");
    assert_eq!(number(&first), last + 1, "the counter must continue");
    let st = rt.state(&to);
    assert_eq!(st["status"], "running");
    let pid = st["pid"].as_i64().unwrap();
    assert_eq!(
        cgroups::cgroup_path_of(pid),
        to_cg,
        "restored into the wrong cgroup"
    );
    if new_id {
        assert_no_cgroup(&from_cg);
    }
    assert_sees_own_cgroup(&rt, &to, &to_cg, cgroupns);

    rt.ok(&["kill", &to, "KILL"]);
    std::thread::sleep(Duration::from_millis(300));
    rt.ok(&["delete", &to]);
    assert_no_cgroup(&to_cg);
}

/// Inside the container, its init (pid 1) is listed in the cgroup its `/sys/fs/cgroup` shows as
/// its own: the namespace's root with a cgroup namespace, its path below the host's root
/// without one (cgroup2 shows the whole tree then; libcontainer binds v1 controllers' own
/// directories).
fn assert_sees_own_cgroup(rt: &Runtime, id: &str, cgroup_path: &str, cgroupns: bool) {
    let hierarchy = match cgroups::layout() {
        Layout::Unified => "/sys/fs/cgroup".to_string(),
        Layout::Hybrid => "/sys/fs/cgroup/freezer".to_string(),
    };
    let own = if cgroupns || cgroups::layout() == Layout::Hybrid {
        hierarchy
    } else {
        format!("{hierarchy}{cgroup_path}")
    };
    let procs = rt.ok(&["exec", id, "cat", &format!("{own}/cgroup.procs")]);
    assert!(
        procs.lines().any(|l| l.trim() == "1"),
        "{own}/cgroup.procs inside {id} lacks its init: {procs:?}"
    );
    let inside = rt.ok(&["exec", id, "cat", "/proc/1/cgroup"]);
    let want = if cgroupns { "/" } else { cgroup_path };
    let line = match cgroups::layout() {
        Layout::Unified => format!("0::{want}"),
        Layout::Hybrid => format!(":freezer:{want}"),
    };
    assert!(
        inside.lines().any(|l| l.ends_with(&line)),
        "/proc/1/cgroup inside {id} lacks {line:?}: {inside}"
    );
}

#[test]
fn with_a_cgroup_namespace_restores_under_a_new_id_into_the_new_cgroup() {
    round(true, true, None);
}

#[test]
fn with_a_cgroup_namespace_restores_in_place() {
    round(true, false, None);
}

#[test]
fn without_a_cgroup_namespace_restores_under_a_new_id_into_the_new_cgroup() {
    round(false, true, None);
}

#[test]
fn without_a_cgroup_namespace_restores_in_place() {
    round(false, false, None);
}

#[test]
fn manage_cgroups_mode_soft() {
    round(true, true, Some("soft"));
}

/// full rewrites the properties of existing cgroups from the image, the freezer state among
/// them: the image records the container as it was before cryo froze it (running), so the
/// restored container runs (it froze, and CRIU with it, before).
#[test]
fn manage_cgroups_mode_full() {
    round(true, true, Some("full"));
}

/// strict refuses every cgroup of the image that exists: cryo leaves the container's cgroups
/// to CRIU, and the image names only the container's own (not every cgroup of the host).
#[test]
fn manage_cgroups_mode_strict() {
    round(true, true, Some("strict"));
}

#[test]
fn manage_cgroups_mode_ignore_without_a_cgroup_namespace() {
    round(false, true, Some("ignore"));
}

/// CRIU restores no cgroup namespace when it ignores cgroups: refused before anything is made.
#[test]
fn manage_cgroups_mode_ignore_is_refused_for_a_cgroup_namespace() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(COUNTER);
    let id = unique("cg-ign");
    let img = b.dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    configure(&b, &format!("/{id}"), true);
    let e = rt.fails(&[
        "restore",
        "-d",
        "--manage-cgroups-mode",
        "ignore",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    assert!(
        e.contains("cgroup namespace") && e.contains("soft"),
        "unclear refusal: {e}"
    );
    assert!(rt.fails(&["state", &id]).contains("does not exist"));
    assert!(!rt.root.join(&id).exists());
    for name in [format!("/{id}"), format!("/:youki:{id}")] {
        assert_no_cgroup(&name);
    }
}

/// What the image asks CRIU to manage: only the hierarchies the container has cgroups of its
/// own in (on a pure v2 host cgroup2 alone), so a restore never walks, recreates or rewrites
/// every cgroup of the host.
#[test]
fn the_image_holds_only_the_containers_own_cgroups() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(COUNTER);
    let parent = Parent(format!("/{}", unique("cryo-cg")));
    let id = unique("cg-img");
    let _g = rt.guard(&id);
    configure(&b, &format!("{}/a", parent.0), true);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(2, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    let dumped = dumped_cgroup_names(&img.join("cgroup.img"));
    match cgroups::layout() {
        Layout::Unified => assert_eq!(dumped, vec![String::new()], "{dumped:?}"),
        Layout::Hybrid => {
            // cryo places a container in every hierarchy, as runc does: each one the image
            // names must hold a cgroup of the container's own, never the host's root.
            let pid = rt.state(&id)["pid"].as_i64().unwrap();
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(dumped.contains(&"freezer".to_string()), "{dumped:?}");
            for c in &dumped {
                let line = own
                    .lines()
                    .find(|l| l.split(':').nth(1) == Some(c.as_str()))
                    .unwrap_or_else(|| panic!("the image names {c:?}, the container is not in it"));
                assert!(
                    line.ends_with(&format!(":{}/a", parent.0)),
                    "the image names {c:?}, where the container is at {line}"
                );
            }
        }
    }
}

/// The controller names of a CRIU cgroup image (`cg_controller_entry.cnames`, joined).
fn dumped_cgroup_names(path: &Path) -> Vec<String> {
    // Two magic numbers, the entry's size, then the cgroup_entry (CRIU's images/cgroup.proto).
    let bytes = std::fs::read(path).unwrap();
    let entry = &bytes[12..];
    let mut names = Vec::new();
    for controller in fields(entry, 2) {
        let cnames: Vec<String> = fields(controller, 1)
            .into_iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.push(cnames.join(","));
    }
    names
}

/// The length-delimited fields numbered `number` of a protobuf message.
fn fields(msg: &[u8], number: u64) -> Vec<&[u8]> {
    let varint = |at: &mut usize| {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = msg[*at];
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return v;
            }
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let key = varint(&mut at);
        match key & 7 {
            0 => {
                varint(&mut at);
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let len = varint(&mut at) as usize;
                if key >> 3 == number {
                    out.push(&msg[at..at + len]);
                }
                at += len;
            }
            t => panic!("wire type {t}"),
        }
    }
    out
}
