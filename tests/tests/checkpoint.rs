//! Checkpoint and restore through the `cryo` binary with real CRIU: the process continues
//! from its checkpointed state, failures leave the container running and thawed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cryo_tests::bundle::busybox_rootfs;
use cryo_tests::runtime::freezer_state;
use cryo_tests::{unique, Bundle, Runtime};

/// A counter plus a 1 MB string in shell memory whose length is printed with every line.
const WORKLOAD: &[&str] = &[
    "sh",
    "-c",
    "s=$(head -c 1000000 /dev/zero | tr '\\0' x); i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo \"$i ${#s}\"; sleep 0.1; done",
];

fn count(line: &str) -> u64 {
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// Run WORKLOAD as `id`, let it count to 5, checkpoint it (stopping it) into `<bundle>/img`
/// with `flags`; returns the image dir and the last count it printed.
fn run_and_checkpoint(rt: &Runtime, b: &Bundle, id: &str, flags: &[&str]) -> (PathBuf, u64) {
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), id]);
    let seen = lines.wait_count(5, Duration::from_secs(20));
    let img = b.dir.join("img");
    let mut args = vec!["checkpoint"];
    args.extend_from_slice(flags);
    args.extend(["--image-path", img.to_str().unwrap(), id]);
    rt.ok(&args);
    let before = lines.drain(Duration::from_secs(5));
    let last = before.last().map(|l| count(l)).unwrap_or(seen);
    (img, last)
}

/// The page images came through cryo's receiver, mostly into pages staged before the freeze
/// (the shell's 1 MB string among them), and no staging file is left in the image.
fn assert_pages_received_by_cryo(img: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("cryo-manifest.json")).unwrap()).unwrap();
    let pages = &manifest["pages"];
    let received = pages["received_bytes"].as_u64().unwrap_or(0);
    let staged = pages["staged_bytes"].as_u64().unwrap_or(0);
    assert!(received >= 1_000_000, "pages: {pages}");
    assert!(
        staged * 2 >= received,
        "most pages should land staged: {pages}"
    );
    let names: Vec<String> = std::fs::read_dir(img)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("pagemap-")), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with(".cryo-pages")),
        "{names:?}"
    );
    assert_timings_add_up(&manifest);
}

/// The manifest's step timings split the wall time: before the freeze, frozen and after the
/// thaw (both 0 when the checkpoint stopped the container instead), none beyond the whole.
fn assert_timings_add_up(manifest: &serde_json::Value) {
    let t = &manifest["timings"];
    let part = |k: &str| t[k].as_f64().unwrap_or(-1.0);
    let (before, frozen, after, total) = (
        part("before_freeze_ms"),
        part("frozen_ms"),
        part("after_thaw_ms"),
        part("total_ms"),
    );
    assert!(before > 0.0, "timings: {t}");
    if manifest["leave_running"].as_bool() == Some(true) {
        assert!(frozen > 0.0 && after > 0.0, "timings: {t}");
    } else {
        assert!(frozen == 0.0 && after == 0.0, "timings: {t}");
    }
    assert!(before + frozen + after <= total + 1.0, "timings: {t}");
}

/// `restore --detach [extra] --bundle B --image-path IMG ID`.
fn restore_args<'a>(b: &'a Bundle, img: &'a Path, id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["restore", "--detach"];
    args.extend_from_slice(extra);
    args.extend([
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        id,
    ]);
    args
}

#[test]
fn checkpoint_stops_and_restore_continues_counter_and_memory_on_new_pipes() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let (id, id2) = (unique("ck"), unique("ck-restored"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    let seen = lines.wait_count(5, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(
        rt.fails(&["state", &id]).contains("does not exist"),
        "checkpoint without --leave-running must end the container"
    );
    let before = lines.drain(Duration::from_secs(5));
    let last = before.last().map(|l| count(l)).unwrap_or(seen);
    assert!(img.join("cryo-manifest.json").exists() && img.join("descriptors.json").exists());
    assert_pages_received_by_cryo(&img);
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "--detach",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    let first = restored
        .next(Duration::from_secs(10))
        .expect("no output from the restored process on its new stdout");
    assert_eq!(
        count(&first),
        last + 1,
        "the counter must continue from the checkpoint, not restart"
    );
    assert!(first.ends_with(" 1000000"), "memory lost: {first}");
    assert_eq!(rt.state(&id2)["status"], "running");
    // The shell rewrites /tmp/count (truncate, then write): read until a whole number shows.
    let now = (0..50)
        .find_map(|_| {
            let out = rt.ok(&["exec", &id2, "cat", "/tmp/count"]);
            let n = out.trim().parse::<u64>().ok();
            if n.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
        .expect("exec never read /tmp/count");
    assert!(now > last);
    rt.ok(&["kill", &id2, "KILL"]);
    std::thread::sleep(Duration::from_millis(300));
    rt.ok(&["delete", &id2]);
}

#[test]
fn without_page_staging_criu_writes_the_pages_and_restore_continues() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let (id, id2) = (unique("nostage"), unique("nostage-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let (img, last) = run_and_checkpoint(&rt, &b, &id, &["--no-page-staging"]);
    let manifest = std::fs::read_to_string(img.join("cryo-manifest.json")).unwrap();
    assert!(!manifest.contains("received_bytes"), "{manifest}");
    let restored = rt.spawn_with_pipe(&restore_args(&b, &img, &id2, &[]));
    let first = restored
        .next(Duration::from_secs(10))
        .expect("no output after restore");
    assert_eq!(count(&first), last + 1);
    assert!(first.ends_with(" 1000000"), "memory lost: {first}");
}

#[test]
fn leave_running_keeps_original_and_restores_a_copy_under_new_id() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let (id, id2) = (unique("lr"), unique("lr-copy"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    let st = rt.state(&id);
    assert_eq!(st["status"], "running");
    assert_eq!(freezer_state(st["pid"].as_i64().unwrap()), "THAWED");
    assert_pages_received_by_cryo(&img);
    let after = lines.wait_count(0, Duration::from_secs(5));
    lines.wait_count(after + 2, Duration::from_secs(10));
    let copy = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    assert!(copy.next(Duration::from_secs(10)).is_some());
    assert_eq!(rt.state(&id2)["status"], "running");
    assert_ne!(rt.state(&id)["pid"], rt.state(&id2)["pid"]);
}

#[test]
fn paused_container_is_checkpointed_and_stays_paused() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let id = unique("paused");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(2, Duration::from_secs(20));
    rt.ok(&["pause", &id]);
    let img = b.dir.join("img");
    rt.ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    let st = rt.state(&id);
    assert_eq!(st["status"], "paused");
    assert_eq!(freezer_state(st["pid"].as_i64().unwrap()), "FROZEN");
    rt.ok(&["resume", &id]);
    assert_eq!(freezer_state(st["pid"].as_i64().unwrap()), "THAWED");
}

#[test]
fn failed_checkpoints_leave_the_container_running_and_thawed() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let id = unique("fail");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(2, Duration::from_secs(20));
    let img = b.dir.join("img");
    let img = img.to_str().unwrap();
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    let intact = |what: &str| {
        assert_eq!(rt.state(&id)["status"], "running", "after {what}");
        assert_eq!(freezer_state(pid), "THAWED", "after {what}");
        let n = lines.wait_count(0, Duration::from_secs(5));
        lines.wait_count(n + 1, Duration::from_secs(5));
    };
    let e = rt.fails(&[
        "checkpoint",
        "--image-path",
        img,
        "--manage-cgroups-mode",
        "bogus",
        &id,
    ]);
    assert!(e.contains("invalid manage-cgroups-mode"), "{e}");
    intact("a bad option");
    let e = rt.fails(&["checkpoint", "--image-path", img, "--pre-dump", &id]);
    assert!(e.contains("soft-dirty"), "{e}");
    intact("pre-dump");
    let e = rt.fails(&[
        "checkpoint",
        "--image-path",
        img,
        "--rootfs-snapshot",
        "overlay",
        &id,
    ]);
    assert!(e.contains("not an overlay"), "{e}");
    intact("--rootfs-snapshot overlay on a directory rootfs");
    // A CRIU failure inside the freeze: an external unix socket CRIU refuses without
    // --ext-unix-sk is simplest to get with a host file on stdout, which CRIU cannot map.
    // An overlay rootfs, so the rootfs capture (beside the dump) and the page receiver run
    // and must clean up after CRIU fails.
    let id2 = unique("fail-criu");
    let _g2 = rt.guard(&id2);
    let lower = std::env::temp_dir().join(unique("cryo-lower"));
    busybox_rootfs(&lower);
    let b2 = Bundle::overlay(&lower, WORKLOAD);
    let host_file = b2.dir.join("out.txt");
    let f = std::fs::File::create(&host_file).unwrap();
    let st = rt
        .cmd()
        .args(["run", "-d", "--bundle", b2.dir.to_str().unwrap(), &id2])
        .stdout(f)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(500));
    let e = rt.fails(&[
        "checkpoint",
        "--image-path",
        b2.dir.join("img").to_str().unwrap(),
        &id2,
    ]);
    assert!(e.contains("criu failed") && e.contains("dump.log"), "{e}");
    assert!(e.contains("thawed and keeps running"), "{e}");
    let pid2 = rt.state(&id2)["pid"].as_i64().unwrap();
    assert_eq!(rt.state(&id2)["status"], "running");
    assert_eq!(freezer_state(pid2), "THAWED");
    assert!(
        !b2.dir.join("img").exists(),
        "a failed checkpoint leaves no image directory"
    );
    let left: Vec<String> = std::fs::read_dir(&b2.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".cryo-"))
        .collect();
    assert!(left.is_empty(), "the failed checkpoint left {left:?}");
    drop(b2);
    let _ = std::fs::remove_dir_all(&lower);
}

#[test]
fn failed_restore_leaves_nothing_behind() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let id = unique("rfail");
    let empty = b.dir.join("empty-img");
    std::fs::create_dir_all(&empty).unwrap();
    let e = rt.fails(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        empty.to_str().unwrap(),
        &id,
    ]);
    assert!(e.contains("inventory.img"), "{e}");
    assert!(rt.fails(&["state", &id]).contains("does not exist"));
    assert!(!rt.root.join(&id).exists());
    // cryo names a container's cgroups as runc does (`/<id>`); libcontainer's own name never appears.
    for name in [format!("/{id}"), format!("/:youki:{id}")] {
        cryo_tests::cgroups::assert_no_cgroup(&name);
    }
}

/// `restore --lazy-pages`: cryo starts CRIU's lazy-pages daemon on the image itself; the process
/// runs before its memory is back, and every page still arrives (the 1 MB string is intact,
/// the counter continues), after which the daemon exits by itself.
#[test]
fn lazy_restore_continues_with_memory_intact_and_the_daemon_finishes() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let (id, id2) = (unique("lazy"), unique("lazy-restored"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let (img, last) = run_and_checkpoint(&rt, &b, &id, &[]);
    let restored = rt.spawn_with_pipe(&restore_args(&b, &img, &id2, &["--lazy-pages"]));
    let first = restored
        .next(Duration::from_secs(10))
        .expect("no output from the lazily restored process");
    assert_eq!(count(&first), last + 1, "the counter must continue");
    assert!(first.ends_with(" 1000000"), "memory lost: {first}");
    let log = std::fs::read_to_string(img.join("lazy-pages.log")).unwrap();
    assert!(
        log.contains("uffd"),
        "the lazy-pages daemon served no page: {log}"
    );
    // The daemon copies the rest in the background and then exits.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while lazy_daemon_alive(&img) {
        assert!(
            std::time::Instant::now() < end,
            "lazy-pages daemon still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let next = restored.next(Duration::from_secs(5)).unwrap();
    assert!(
        next.ends_with(" 1000000") && count(&next) > last + 1,
        "{next}"
    );
}

fn lazy_daemon_alive(img: &Path) -> bool {
    let want = img.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            return false;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        !zombie && cmd.contains("lazy-pages") && cmd.contains(&want)
    })
}

/// `checkpoint --compress-pages`: the page images are stored zstd-compressed (the 1 MB string
/// shrinks to almost nothing), the restore stages them and the process continues with its
/// memory intact; a lazy restore of such an image is refused with the reason, leaving nothing.
#[test]
fn compressed_pages_restore_intact_and_lazy_restore_of_them_is_refused() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(WORKLOAD);
    let (id, id2, id3) = (unique("zpg"), unique("zpg-restored"), unique("zpg-lazy"));
    let (_g, _g2, _g3) = (rt.guard(&id), rt.guard(&id2), rt.guard(&id3));
    let (img, last) = run_and_checkpoint(&rt, &b, &id, &["--compress-pages"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("cryo-manifest.json")).unwrap()).unwrap();
    let names: Vec<String> = manifest["compressed_pages"]
        .as_array()
        .expect("manifest lists the compressed page images")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!names.is_empty());
    let mut zst_bytes = 0;
    for n in &names {
        assert!(!img.join(n).exists(), "{n} must be stored compressed");
        zst_bytes += std::fs::metadata(img.join(format!("{n}.zst")))
            .unwrap()
            .len();
    }
    assert!(
        zst_bytes < 500_000,
        "1 MB of 'x' must compress: {zst_bytes} bytes"
    );

    let e = rt.fails(&restore_args(&b, &img, &id3, &["--lazy-pages"]));
    assert!(
        e.contains("compressed") && e.contains("--lazy-pages"),
        "{e}"
    );
    assert!(rt.fails(&["state", &id3]).contains("does not exist"));

    let restored = rt.spawn_with_pipe(&restore_args(&b, &img, &id2, &[]));
    let first = restored
        .next(Duration::from_secs(10))
        .expect("no output from the restored process");
    assert_eq!(count(&first), last + 1, "the counter must continue");
    assert!(first.ends_with(" 1000000"), "memory lost: {first}");
    assert!(
        !img.join(".cryo-staged-images").exists(),
        "the staged images are removed after the restore"
    );
}
