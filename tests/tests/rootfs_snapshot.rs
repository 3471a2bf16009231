//! The filesystem matches at restore: an overlay container's changes travel in the checkpoint
//! and are applied to a fresh overlay (same lower, empty upper) before CRIU runs.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_tests::bundle::busybox_rootfs;
use cryo_tests::tree_digest::{diff_trees, tree_digest};
use cryo_tests::{unique, Bundle, Runtime};

const CHANGES: &str = "echo new > /root/newfile; echo extra >> /etc/passwd; rm /bin/vi; rm -rf /var/log; \
    mkdir -p /data/sub && echo deep > /data/sub/f; ln -s /root/newfile /root/link; ln /root/newfile /root/hard; \
    mkfifo /root/fifo; dd if=/dev/zero of=/root/sparse bs=1 count=0 seek=1G 2>/dev/null; echo tail >> /root/sparse; \
    rm -rf /etc && mkdir /etc && echo fresh > /etc/only; \
    exec 3>>/root/app.log; i=0; while true; do i=$((i+1)); echo $i >&3; echo $i; sleep 0.1; done";

#[test]
fn overlay_changes_are_restored_into_a_fresh_overlay() {
    let rt = Runtime::cryo();
    let lower = std::env::temp_dir().join(unique("cryo-lower"));
    busybox_rootfs(&lower);
    let a = Bundle::overlay(&lower, &["sh", "-c", CHANGES]);
    let (id, id2) = (unique("ovl"), unique("ovl-new"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", a.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let st = std::process::Command::new("setfattr")
        .args(["-n", "user.cryo", "-v", "kept"])
        .arg(a.rootfs().join("root/newfile"))
        .status()
        .unwrap();
    assert!(st.success(), "setfattr failed");
    // File capabilities (security.capability, v2: cap_net_bind_service permitted+effective).
    let st = std::process::Command::new("setfattr")
        .args([
            "-n",
            "security.capability",
            "-v",
            "0x0100000200040000000000000000000000000000",
        ])
        .arg(a.rootfs().join("bin/busybox"))
        .status()
        .unwrap();
    assert!(st.success(), "setfattr security.capability failed");
    // A device node made on the host side (the container has no CAP_MKNOD).
    let st = std::process::Command::new("mknod")
        .arg(a.rootfs().join("root/null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success(), "mknod failed");
    // The tree as the container leaves it: paused, so it is exactly what the checkpoint
    // freezes. (After the checkpoint it would differ by CRIU's own doing: CRIU makes and
    // removes a directory in /tmp while it dumps, which is not the container's and is not
    // in the snapshot.)
    rt.ok(&["pause", &id]);
    let before = tree_digest(&a.rootfs());
    let app_log_at_checkpoint = std::fs::read_to_string(a.rootfs().join("root/app.log")).unwrap();
    let img = a.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(
        img.join("rootfs-diff.tar.zst").exists(),
        "no rootfs snapshot in the image"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("cryo-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rootfs"]["kind"], "overlay");

    let b = Bundle::overlay(&lower, &["sh", "-c", CHANGES]);
    assert!(
        b.rootfs().join("bin/vi").exists(),
        "fresh overlay must start from the lower"
    );
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    let first = restored
        .next(Duration::from_secs(10))
        .expect("restored process printed nothing");
    let last_at_ckpt: u64 = app_log_at_checkpoint
        .lines()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        first.parse::<u64>().unwrap(),
        last_at_ckpt + 1,
        "counter must continue"
    );
    rt.ok(&["pause", &id2]);
    let mut after = tree_digest(&b.rootfs());
    let mut before = before;
    // app.log and /tmp/count keep changing after the restore; app.log is compared below.
    for live in ["/root/app.log", "/tmp/count"] {
        after.remove(live);
        before.remove(live);
    }
    let diff = diff_trees(&before, &after);
    assert!(
        diff.is_empty(),
        "restored tree differs:\n{}",
        diff.join("\n")
    );
    let log = std::fs::read_to_string(b.rootfs().join("root/app.log")).unwrap();
    let nums: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert!(
        nums.windows(2).all(|w| w[1] == w[0] + 1),
        "app.log must continue at the right offset: {nums:?}"
    );
    assert!(*nums.last().unwrap() > last_at_ckpt);
    rt.ok(&["resume", &id2]);
    let _ = std::fs::remove_dir_all(&lower);
}

/// docker bind-mounts /dev/shm from a host directory: its contents travel with the checkpoint.
#[test]
fn host_mounted_dev_shm_is_restored_into_the_new_container() {
    let rt = Runtime::cryo();
    let script = "echo shared-state > /dev/shm/data; i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";
    let b = Bundle::busybox(&["sh", "-c", script]);
    let shm1 = b.dir.join("shm1");
    let shm2 = b.dir.join("shm2");
    std::fs::create_dir_all(&shm1).unwrap();
    std::fs::create_dir_all(&shm2).unwrap();
    let with_shm = |src: &std::path::Path| {
        let src = src.to_str().unwrap().to_string();
        move |v: &mut serde_json::Value| {
            let mounts = v["mounts"].as_array_mut().unwrap();
            mounts.retain(|m| m["destination"] != "/dev/shm");
            mounts.push(serde_json::json!({"destination": "/dev/shm", "type": "bind", "source": src, "options": ["rbind", "rw"]}));
        }
    };
    b.write_config(&["sh", "-c", script], with_shm(&shm1));
    let (id, id2) = (unique("shm"), unique("shm-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(img.join("devshm.tar").exists());
    b.write_config(&["sh", "-c", script], with_shm(&shm2));
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    restored.wait_count(1, Duration::from_secs(10));
    assert_eq!(
        std::fs::read_to_string(shm2.join("data")).unwrap(),
        "shared-state\n"
    );
    assert_eq!(
        rt.ok(&["exec", &id2, "cat", "/dev/shm/data"]),
        "shared-state\n"
    );
}

/// Restoring into the very upper dir that was captured applies nothing.
#[test]
fn restore_in_place_applies_nothing() {
    let rt = Runtime::cryo();
    let lower = std::env::temp_dir().join(unique("cryo-lower"));
    busybox_rootfs(&lower);
    let script = "echo v1 > /root/f; i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";
    let a = Bundle::overlay(&lower, &["sh", "-c", script]);
    let id = unique("inplace");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", a.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = a.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    // A change made after the checkpoint stays: nothing is re-applied over the same upper dir.
    std::fs::write(a.rootfs().join("root/f"), "v2 after the checkpoint\n").unwrap();
    let mut child = rt
        .cmd()
        .args([
            "--debug",
            "restore",
            "-d",
            "--bundle",
            a.dir.to_str().unwrap(),
            "--image-path",
            img.to_str().unwrap(),
            &id,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    let mut stderr = child.stderr.take().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while !err.contains("restored ") && std::time::Instant::now() < end {
        let n = std::io::Read::read(&mut stderr, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        err.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(child.wait().unwrap().success(), "{err}");
    assert!(err.contains("restoring in place"), "{err}");
    assert_eq!(
        std::fs::read_to_string(a.rootfs().join("root/f")).unwrap(),
        "v2 after the checkpoint\n",
        "the snapshot (v1) must not be re-applied over the same upper dir"
    );
    assert_eq!(rt.state(&id)["status"], "running");
    let _ = std::fs::remove_dir_all(&lower);
}

/// Issue 18, forced: the new container's upper dir is a new directory that got the captured
/// upper dir's device and inode number (a tiny ext4 hands the lowest free number out). It is
/// not the same directory, so the changeset must be applied.
#[test]
fn a_new_upper_dir_with_the_old_inode_number_gets_the_changes() {
    let rt = Runtime::cryo();
    let lower = std::env::temp_dir().join(unique("cryo-lower"));
    busybox_rootfs(&lower);
    let fs = TinyExt4::new();
    let (upper, work) = (fs.mnt.join("upper"), fs.mnt.join("work"));
    let script = "echo new > /root/newfile; rm /bin/vi; i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";
    let a = Bundle::overlay_at(&lower, &upper, &work, &["sh", "-c", script]);
    let id = unique("reuse");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", a.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = std::env::temp_dir().join(unique("cryo-reuse-img"));
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("cryo-manifest.json")).unwrap()).unwrap();
    let recorded_ino = manifest["rootfs"]["upper_fingerprint"]["ino"]
        .as_u64()
        .unwrap();
    // The checkpoint ended and deleted the container.
    drop(a);
    // The original container is gone with its upper dir; the next one's upper dir takes
    // the freed inode number.
    let st = std::process::Command::new("rm")
        .arg("-rf")
        .arg(&upper)
        .arg(&work)
        .status()
        .unwrap();
    assert!(st.success());
    let mut reused = false;
    for _ in 0..32 {
        std::fs::create_dir(&upper).unwrap();
        if std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&upper).unwrap()) == recorded_ino
        {
            reused = true;
            break;
        }
        std::fs::remove_dir(&upper).unwrap();
    }
    assert!(
        reused,
        "the tiny ext4 never handed inode {recorded_ino} back"
    );
    let b = Bundle::overlay_at(&lower, &upper, &work, &["sh", "-c", script]);
    assert!(
        b.rootfs().join("bin/vi").exists(),
        "a new upper dir starts empty"
    );
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    restored
        .next(Duration::from_secs(10))
        .expect("restored process printed nothing");
    assert_eq!(
        std::fs::read_to_string(b.rootfs().join("root/newfile")).unwrap_or_default(),
        "new\n",
        "the changeset was skipped: the new upper dir passed for the captured one"
    );
    assert!(!b.rootfs().join("bin/vi").exists());
    rt.ok(&["delete", "--force", &id]);
    drop(b);
    let _ = std::fs::remove_dir_all(&img);
    let _ = std::fs::remove_dir_all(&lower);
}

/// A tiny ext4 (64 inodes, one block group: the lowest free inode number is handed out) on a loop device, mounted in a temp dir; unmounted on drop.
struct TinyExt4 {
    dir: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

impl TinyExt4 {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("cryo-tinyext4"));
        let (img, mnt) = (dir.join("fs.img"), dir.join("mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-N", "64"])
            .arg(&img)
            .status()
            .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
        assert!(ok.success(), "mkfs.ext4 failed");
        let ok = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "loop-mounting an ext4 image failed (this test runs as root)"
        );
        Self { dir, mnt }
    }
}

impl Drop for TinyExt4 {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Without the snapshot a fresh rootfs lacks the file the process holds open: cryo says which,
/// before CRIU fails on it, and leaves nothing behind.
#[test]
fn missing_open_file_is_named_before_criu_runs() {
    let rt = Runtime::cryo();
    let lower = std::env::temp_dir().join(unique("cryo-lower"));
    busybox_rootfs(&lower);
    let script = "exec 3>>/root/app.log; i=0; while true; do i=$((i+1)); echo $i >&3; echo $i; sleep 0.1; done";
    let a = Bundle::overlay(&lower, &["sh", "-c", script]);
    let (id, id2) = (unique("openf"), unique("openf-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", a.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = a.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    let b = Bundle::overlay(&lower, &["sh", "-c", script]);
    let e = rt.fails(&[
        "restore",
        "-d",
        "--no-rootfs-restore",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    assert!(e.contains("/root/app.log") && e.contains("missing"), "{e}");
    assert!(rt.fails(&["state", &id2]).contains("does not exist"));
    let _ok = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    assert_eq!(rt.state(&id2)["status"], "running");
    let _ = std::fs::remove_dir_all(&lower);
}
