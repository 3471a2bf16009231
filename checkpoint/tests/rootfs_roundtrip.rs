//! A container's filesystem changes survive capture → apply: an overlay is changed in every
//! way a container can change it, its upper dir captured, and the changeset applied to a
//! fresh overlay over the same lower (raw and zstd) and to a plain copy of the lower; each
//! result must be the same tree. Needs root (overlay mounts, chown, mknod): it fails, never
//! skips, without it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Instant;

use common::{assert_same, build_lower, change, require_root, Mounts, GIB};
use cryo_checkpoint::rootfs::{
    apply_changeset, capture_upper, compress_zstd, ApplyPolicy, CaptureOptions, UndoLocation,
};
use cryo_tests::tree_digest::{diff_trees, tree_digest};
use nix::sys::stat::{mknod, Mode, SFlag};

/// Test names carry `rootfs::` so `cargo test -p cryo-checkpoint rootfs` selects them.
mod rootfs {
    use super::*;

    #[test]
    fn overlay_changes_round_trip_into_fresh_rootfs() {
        require_root();
        let t = tempfile::Builder::new()
            .prefix("cryo-rootfs-rt-")
            .tempdir_in("/tmp")
            .unwrap();
        let base = t.path();
        let lower = base.join("lower");
        build_lower(&lower);
        let mut mounts = Mounts(Vec::new());
        let (upper1, merged1) = mounts.overlay(base, &lower, 1);
        change(&merged1);
        assert_eq!(
            xattr::get(upper1.join("opq"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec()),
            "the test must make an opaque dir"
        );

        let raw = base.join("rootfs-diff.tar");
        let t0 = Instant::now();
        let rep = capture_upper(&upper1, &raw, &CaptureOptions::default()).unwrap();
        let capture_time = t0.elapsed();
        let size = fs::metadata(&raw).unwrap().len();
        eprintln!(
            "capture: {capture_time:?}, {} entries, {} data bytes, archive {size} bytes, {} whiteouts, {} opaque dirs",
            rep.entries, rep.bytes, rep.whiteouts, rep.opaque_dirs
        );
        assert_eq!(rep.device_nodes, vec!["new/null2".to_string()]);
        assert!(rep.whiteouts >= 3, "{rep:?}");
        assert!(rep.opaque_dirs >= 2, "{rep:?}");
        assert!(size < 4 << 20, "a 1 GiB sparse file must cost KiB: {size}");

        let policy = ApplyPolicy::for_spec(&oci_spec::runtime::Spec::default())
            .with_declared_sizes(rep.sizes());
        let undo = UndoLocation::default();
        let (_, merged2) = mounts.overlay(base, &lower, 2);
        assert!(!diff_trees(&tree_digest(&merged1), &tree_digest(&merged2)).is_empty());
        let t0 = Instant::now();
        let ar = apply_changeset(&raw, &merged2, &policy, &undo).unwrap();
        eprintln!(
            "apply (raw) into a fresh overlay: {:?} {:?}",
            t0.elapsed(),
            ar.report()
        );
        ar.commit().unwrap();
        assert_same(&merged1, &merged2, "fresh overlay");
        let sparse = fs::metadata(merged2.join("new/sparse")).unwrap();
        assert_eq!(sparse.len(), GIB);
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "restored sparse file is not sparse: {} blocks",
            sparse.blocks()
        );

        // Applying again changes nothing.
        apply_changeset(&raw, &merged2, &policy, &undo)
            .unwrap()
            .commit()
            .unwrap();
        assert_same(&merged1, &merged2, "second apply");

        // zstd, as the image holds it after the thaw.
        let zst = base.join("rootfs-diff.tar.zst");
        let t0 = Instant::now();
        let zsize = compress_zstd(&raw, &zst, 3, 2).unwrap();
        eprintln!("zstd: {:?}, {size} -> {zsize} bytes", t0.elapsed());
        let (_, merged3) = mounts.overlay(base, &lower, 3);
        apply_changeset(&zst, &merged3, &policy, &undo)
            .unwrap()
            .commit()
            .unwrap();
        assert_same(&merged1, &merged3, "fresh overlay from .tar.zst");

        // Any rootfs: a plain directory copy of the lower.
        let plain = base.join("plain");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&lower)
            .arg(&plain)
            .status()
            .unwrap();
        assert!(st.success());
        apply_changeset(&zst, &plain, &policy, &undo)
            .unwrap()
            .commit()
            .unwrap();
        assert_same(&merged1, &plain, "plain directory");
    }

    /// A device node is made only if the runtime makes it for the target spec: /dev/null's
    /// numbers are runc's defaults; with no devices allowed the same archive is refused.
    #[test]
    fn device_nodes_need_the_target_spec() {
        require_root();
        let t = tempfile::Builder::new()
            .prefix("cryo-rootfs-dev-")
            .tempdir_in("/tmp")
            .unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("dev")).unwrap();
        let dev = nix::sys::stat::makedev(1, 3);
        mknod(
            &src.join("dev/null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            dev,
        )
        .unwrap();
        let raw = t.path().join("a.tar");
        let rep = capture_upper(&src, &raw, &CaptureOptions::default()).unwrap();
        assert_eq!(rep.device_nodes, vec!["dev/null".to_string()]);
        let target = t.path().join("target");
        fs::create_dir_all(&target).unwrap();
        let undo = UndoLocation::default();
        let e = apply_changeset(&raw, &target, &ApplyPolicy::no_devices(), &undo)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("refused") && e.contains("dev/null") && e.contains("c 1:3"),
            "{e}"
        );
        assert!(fs::read_dir(&target).unwrap().next().is_none());
        let policy = ApplyPolicy::for_spec(&oci_spec::runtime::Spec::default());
        apply_changeset(&raw, &target, &policy, &undo)
            .unwrap()
            .commit()
            .unwrap();
        assert_same(&src, &target, "device node");
    }
}
