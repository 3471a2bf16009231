//! A damaged changeset is refused before anything is written: a real compressed changeset
//! (every change `common::change` makes) with one byte flipped at several offsets, cut at
//! several lengths, without its frame checksum, or with data after it; and a target without
//! room for it. Needs root (overlay mounts, tmpfs): it fails, never skips, without it.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{build_lower, change, require_root, Mounts};
use cryo_checkpoint::rootfs::{
    apply_changeset, capture_upper, compress_zstd, verify_changeset, ApplyPolicy, CaptureOptions,
    ChangesetSizes, RootfsError, UndoLocation,
};
use cryo_tests::tree_digest::{diff_trees, tree_digest};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

struct Fixture {
    _t: tempfile::TempDir,
    base: PathBuf,
    lower: PathBuf,
    raw: PathBuf,
    zst: PathBuf,
    sizes: ChangesetSizes,
}

fn fixture() -> Fixture {
    require_root();
    let t = tempfile::Builder::new()
        .prefix("cryo-rootfs-integrity-")
        .tempdir_in("/tmp")
        .unwrap();
    let base = t.path().to_path_buf();
    let lower = base.join("lower");
    build_lower(&lower);
    let mut mounts = Mounts(Vec::new());
    let (upper, merged) = mounts.overlay(&base, &lower, 0);
    change(&merged);
    let raw = base.join("rootfs-diff.tar");
    let rep = capture_upper(&upper, &raw, &CaptureOptions::default()).unwrap();
    let zst = base.join("rootfs-diff.tar.zst");
    compress_zstd(&raw, &zst, 3, 2).unwrap();
    Fixture {
        _t: t,
        base,
        lower,
        raw,
        zst,
        sizes: rep.sizes(),
    }
}

fn policy() -> ApplyPolicy {
    ApplyPolicy::for_spec(&oci_spec::runtime::Spec::default())
}

/// Apply `archive` to `root` and expect a refusal saying `why`, with `root` unchanged.
fn refused(archive: &Path, root: &Path, why: &str, what: &str) {
    let before = tree_digest(root);
    let e = apply_changeset(archive, root, &policy(), &UndoLocation::default())
        .err()
        .unwrap_or_else(|| panic!("{what}: applied"));
    let msg = e.to_string();
    assert!(matches!(e, RootfsError::Refused { .. }), "{what}: {msg}");
    assert!(msg.contains(why), "{what}: want {why:?} in {msg}");
    eprintln!("{what}: {msg}");
    let diff = diff_trees(&before, &tree_digest(root));
    assert!(diff.is_empty(), "{what}: target changed: {diff:?}");
}

mod rootfs {
    use super::*;

    #[test]
    fn a_flipped_byte_or_a_cut_anywhere_in_a_compressed_changeset_is_refused() {
        let fx = fixture();
        let target = fx.base.join("target");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&fx.lower)
            .arg(&target)
            .status()
            .unwrap();
        assert!(st.success());
        let good = fs::read(&fx.zst).unwrap();
        let len = good.len();
        assert!(len > 1024, "{len}");
        let bad = fx.base.join("bad.tar.zst");
        // The frame header's descriptor, the compressed blocks, the checksum at the end.
        // (Byte 5, the window size, is left alone: a larger window decodes the same.)
        let offsets = [
            4,
            12,
            200,
            len / 5,
            len / 3,
            len / 2,
            2 * len / 3,
            len - 100,
            len - 4,
            len - 1,
        ];
        for off in offsets {
            let mut b = good.clone();
            b[off] ^= 0x01;
            fs::write(&bad, &b).unwrap();
            refused(
                &bad,
                &target,
                "refused",
                &format!("byte {off} of {len} flipped"),
            );
        }
        for cut in [len - 1, len - 4, len - 5, len / 2, 100, 5] {
            fs::write(&bad, &good[..cut]).unwrap();
            refused(&bad, &target, "refused", &format!("cut at {cut} of {len}"));
        }
        // Anything after the frame.
        let mut b = good.clone();
        b.extend_from_slice(b"junk");
        fs::write(&bad, &b).unwrap();
        refused(
            &bad,
            &target,
            "data after the zstd frame",
            "junk after the frame",
        );
        // A second frame of zeros after it.
        let mut b = good.clone();
        b.extend_from_slice(&zstd::encode_all(&[0u8; 1024][..], 3).unwrap());
        fs::write(&bad, &b).unwrap();
        refused(&bad, &target, "after the zstd frame", "a second frame");
        // A frame without a checksum.
        let raw = fs::read(&fx.raw).unwrap();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_checksum(false).unwrap();
        enc.write_all(&raw).unwrap();
        fs::write(&bad, enc.finish().unwrap()).unwrap();
        refused(&bad, &target, "no content checksum", "no checksum");
        // Non-zero bytes after a raw archive's end.
        let mut b = raw.clone();
        b.extend_from_slice(b"junk");
        fs::write(&bad, &b).unwrap();
        refused(&bad, &target, "data after the end-of-archive", "raw junk");
        // The intact one verifies (without a target), declaring exactly what the capture
        // counted, and applies.
        let summary = verify_changeset(&fx.zst, &policy().with_declared_sizes(fx.sizes)).unwrap();
        assert_eq!(summary.sizes, fx.sizes);
        assert!(fx.sizes.logical_bytes > common::GIB, "{:?}", fx.sizes);
        let e = verify_changeset(&bad, &policy()).err().unwrap();
        assert!(matches!(e, RootfsError::Refused { .. }), "{e}");
        apply_changeset(&fx.zst, &target, &policy(), &UndoLocation::default())
            .unwrap()
            .commit()
            .unwrap();
    }

    /// A target without room (bytes, then inodes) is refused with the path, what is needed
    /// and what is free; nothing is written.
    #[test]
    fn a_target_without_room_is_refused_before_anything_is_written() {
        require_root();
        let t = tempfile::Builder::new()
            .prefix("cryo-rootfs-room-")
            .tempdir_in("/tmp")
            .unwrap();
        let small = t.path().join("small");
        fs::create_dir(&small).unwrap();
        mount(
            Some("tmpfs"),
            &small,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m,nr_inodes=32"),
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = umount2(&self.0, MntFlags::MNT_DETACH);
            }
        }
        let _u = Unmount(small.clone());
        fs::write(small.join("keep"), b"keep").unwrap();
        let a = t.path().join("a.tar");
        let mut b = tar::Builder::new(fs::File::create(&a).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(2 << 20);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, "big", &vec![7u8; 2 << 20][..])
            .unwrap();
        b.finish().unwrap();
        drop(b);
        let before = tree_digest(&small);
        let e = apply_changeset(&a, &small, &policy(), &UndoLocation::default())
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            matches!(e, RootfsError::NoSpace { what: "bytes", .. }),
            "{msg}"
        );
        assert!(
            msg.contains(&small.display().to_string()) && msg.contains("2097152 bytes"),
            "{msg}"
        );
        assert!(diff_trees(&before, &tree_digest(&small)).is_empty());
        let mut b = tar::Builder::new(fs::File::create(&a).unwrap());
        for i in 0..40 {
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, format!("f{i}"), &[][..]).unwrap();
        }
        b.finish().unwrap();
        drop(b);
        let e = apply_changeset(&a, &small, &policy(), &UndoLocation::default())
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                RootfsError::NoSpace {
                    what: "inodes",
                    needed: 40,
                    ..
                }
            ),
            "{e}"
        );
        assert!(diff_trees(&before, &tree_digest(&small)).is_empty());
    }
}
