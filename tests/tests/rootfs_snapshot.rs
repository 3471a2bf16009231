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
    let img = a.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(
        img.join("rootfs-diff.tar.zst").exists(),
        "no rootfs snapshot in the image"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("cryo-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["rootfs"]["kind"], "overlay");
    let before = tree_digest(&a.rootfs(), &["/tmp/count"]);
    let app_log_at_checkpoint = std::fs::read_to_string(a.rootfs().join("root/app.log")).unwrap();

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
    let mut after = tree_digest(&b.rootfs(), &["/tmp/count"]);
    let mut before = before;
    // app.log keeps growing after the restore; compare it separately below.
    after.remove("/root/app.log");
    before.remove("/root/app.log");
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
