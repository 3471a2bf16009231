//! Hostile, corrupt or truncated changesets are refused before anything is written: the
//! error names the entry and the reason, the target tree is unchanged and nothing appears
//! outside it. Archives are built by hand with the tar crate. Needs root (like every rootfs
//! test: it fails, never skips, without it).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cryo_checkpoint::rootfs::{
    apply_changeset, compress_zstd, ApplyPolicy, DeviceKind, DeviceNode, RootfsError, UndoLocation,
};
use cryo_tests::tree_digest::{diff_trees, tree_digest};
use tar::{EntryType, Header};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the rootfs changeset tests chown and mknod: run them as root \
         (sudo -E cargo test -p cryo-checkpoint rootfs)"
    );
}

/// One hand-made entry: name (raw bytes, so absolute and `..` paths go in as they are),
/// type, link target, data, PAX records.
struct E {
    name: Vec<u8>,
    /// Leave uid/gid/mtime blank (not a number).
    blank_ids: bool,
    ty: EntryType,
    link: Option<&'static str>,
    data: Vec<u8>,
    pax: Vec<(String, Vec<u8>)>,
    /// Device numbers of a char or block entry.
    device: Option<(u32, u32)>,
}

fn e(name: &str, ty: EntryType) -> E {
    E {
        name: name.as_bytes().to_vec(),
        blank_ids: false,
        ty,
        link: None,
        data: Vec::new(),
        pax: Vec::new(),
        device: None,
    }
}

fn file(name: &str, data: &[u8]) -> E {
    E {
        data: data.to_vec(),
        ..e(name, EntryType::Regular)
    }
}

fn link(name: &str, ty: EntryType, target: &'static str) -> E {
    E {
        link: Some(target),
        ..e(name, ty)
    }
}

/// Write `entries` as a tar; names longer than 100 bytes go in a GNU long-name entry.
fn archive(path: &Path, entries: &[E]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for x in entries {
        if !x.pax.is_empty() {
            let recs = x.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
            b.append_pax_extensions(recs).unwrap();
        }
        if x.name.len() > 100 {
            let mut l = Header::new_gnu();
            l.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            l.set_entry_type(EntryType::GNULongName);
            l.set_size(x.name.len() as u64 + 1);
            l.set_cksum();
            let mut n = x.name.clone();
            n.push(0);
            b.append(&l, &n[..]).unwrap();
        }
        let mut h = Header::new_gnu();
        let len = x.name.len().min(100);
        h.as_gnu_mut().unwrap().name[..len].copy_from_slice(&x.name[..len]);
        h.set_entry_type(x.ty);
        h.set_mode(if x.ty == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(x.data.len() as u64);
        if !x.blank_ids {
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
        }
        if let Some(l) = x.link {
            h.set_link_name(l).unwrap();
        }
        if let Some((major, minor)) = x.device {
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
        }
        h.set_cksum();
        b.append(&h, &x.data[..]).unwrap();
    }
    b.finish().unwrap();
}

/// A target root with a file, an in-root absolute symlink, and a symlink leading outside;
/// and an `outside` directory next to it that must stay empty.
struct Target {
    _t: tempfile::TempDir,
    dir: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

fn target() -> Target {
    let t = tempfile::Builder::new()
        .prefix("cryo-hostile-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = t.path().to_path_buf();
    let (root, outside) = (dir.join("root"), dir.join("outside"));
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(root.join("etc/keep"), "keep").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("lnk")).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
    Target {
        _t: t,
        dir,
        root,
        outside,
    }
}

/// Apply `entries` (behind a harmless first entry) and expect a refusal naming `entry` and
/// saying `why`, with nothing written.
fn refused(entries: Vec<E>, entry: &str, why: &str) {
    let t = target();
    let mut all = vec![file("harmless", b"must not be written")];
    all.extend(entries);
    let a = t.dir.join("a.tar");
    archive(&a, &all);
    refused_archive(&t, &a, &ApplyPolicy::default(), entry, why);
}

fn refused_archive(t: &Target, a: &Path, policy: &ApplyPolicy, entry: &str, why: &str) {
    let before = tree_digest(&t.root);
    let err = apply_changeset(a, &t.root, policy, &UndoLocation::default())
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, RootfsError::Refused { .. }), "{msg}");
    assert!(
        msg.contains(entry) && msg.contains(why),
        "want entry {entry:?} and {why:?} in: {msg}"
    );
    let diff = diff_trees(&before, &tree_digest(&t.root));
    assert!(diff.is_empty(), "target changed: {diff:?}");
    assert_eq!(
        fs::read_dir(&t.outside).unwrap().count(),
        0,
        "wrote outside"
    );
    assert!(!Path::new("/etc/cryo-evil").exists());
}

/// Test names carry `rootfs::` so `cargo test -p cryo-checkpoint rootfs` selects them.
mod rootfs {
    use super::*;

    #[test]
    fn absolute_paths_are_refused() {
        require_root();
        refused(
            vec![file("/etc/cryo-evil", b"x")],
            "/etc/cryo-evil",
            "absolute path",
        );
    }

    #[test]
    fn parent_components_are_refused() {
        require_root();
        refused(
            vec![file("a/../../outside/x", b"x")],
            "a/../../outside/x",
            "'..'",
        );
    }

    #[test]
    fn writing_through_a_symlink_the_archive_made_is_refused() {
        require_root();
        let abs = vec![
            link("a", EntryType::Symlink, "/etc"),
            file("a/passwd", b"x"),
        ];
        refused(abs, "a/passwd", "symlink created by the archive");
        let rel = vec![
            link("a", EntryType::Symlink, "../outside"),
            file("a/x", b"x"),
        ];
        refused(rel, "a/x", "symlink created by the archive");
        let dir = vec![
            link("a", EntryType::Symlink, "../outside"),
            e("a/sub", EntryType::Directory),
        ];
        refused(dir, "a/sub", "symlink created by the archive");
    }

    #[test]
    fn a_target_symlink_leading_outside_is_refused() {
        require_root();
        refused(vec![file("escape/x", b"x")], "escape/x", "outside the root");
    }

    #[test]
    fn hard_links_outside_or_to_nothing_are_refused() {
        require_root();
        refused(
            vec![link("h", EntryType::Link, "../outside/x")],
            "h",
            "hard link target: path contains a '..'",
        );
        refused(
            vec![link("h", EntryType::Link, "/etc/passwd")],
            "h",
            "hard link target: absolute path",
        );
        refused(vec![link("h", EntryType::Link, "nothere")], "h", "absent");
        refused(
            vec![link("h", EntryType::Link, "escape/x")],
            "h",
            "outside the root",
        );
    }

    /// A block device like the host's first disk, or a char device the spec does not list,
    /// is refused whatever the image says; one the spec lists is made.
    #[test]
    fn device_nodes_the_runtime_would_not_create_are_refused() {
        require_root();
        let t = target();
        let a = t.dir.join("a.tar");
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]}
        }))
        .unwrap();
        let policy = ApplyPolicy::for_spec(&spec);
        let mut sda = e("dev/sda", EntryType::Block);
        sda.device = Some((8, 0));
        archive(&a, &[sda]);
        refused_archive(
            &t,
            &a,
            &policy,
            "dev/sda",
            "b 8:0 is not one the runtime creates",
        );
        let mut mem = e("dev/mem", EntryType::Char);
        mem.device = Some((1, 1));
        archive(&a, &[file("harmless", b"x"), mem]);
        refused_archive(
            &t,
            &a,
            &policy,
            "dev/mem",
            "c 1:1 is not one the runtime creates",
        );
        // The same numbers as a char device the spec lists, but a block device.
        let mut fuse_b = e("dev/fuse", EntryType::Block);
        fuse_b.device = Some((10, 229));
        archive(&a, &[fuse_b]);
        refused_archive(&t, &a, &policy, "dev/fuse", "b 10:229");
        let mut fuse = e("dev/fuse", EntryType::Char);
        fuse.device = Some((10, 229));
        archive(&a, &[fuse]);
        apply_changeset(&a, &t.root, &policy, &UndoLocation::default())
            .unwrap()
            .commit()
            .unwrap();
        let st = fs::symlink_metadata(t.root.join("dev/fuse")).unwrap();
        assert_eq!(st.rdev(), nix::sys::stat::makedev(10, 229));
        assert!(ApplyPolicy::for_spec(&spec).allows(&DeviceNode {
            kind: DeviceKind::Char,
            major: 10,
            minor: 229
        }));
    }

    #[test]
    fn unknown_types_nul_bytes_and_overlay_xattrs_are_refused() {
        require_root();
        refused(
            vec![e("weird", EntryType::new(b'Z'))],
            "weird",
            "unsupported entry type",
        );
        let mut nul = file("x", b"");
        nul.name = format!("{}\0/etc/passwd", "n".repeat(110)).into_bytes();
        refused(vec![nul], "nnn", "NUL byte");
        let mut opaque = e("d", EntryType::Directory);
        opaque.pax = vec![("SCHILY.xattr.trusted.overlay.opaque".into(), b"y".to_vec())];
        refused(vec![opaque], "d", "overlay-private xattr");
        refused(vec![file("d/.wh...", b"")], "d/.wh...", "invalid name");
        let mut blank = file("blank", b"x");
        blank.blank_ids = true;
        refused(vec![blank], "blank", "bad uid field");
    }

    #[test]
    fn truncated_archives_are_refused() {
        require_root();
        let t = target();
        let a = t.dir.join("a.tar");
        archive(&a, &[file("ok1", b"abc"), file("big", &[7u8; 4096])]);
        let bytes = fs::read(&a).unwrap();
        // Cut in the middle of big's data.
        fs::write(&a, &bytes[..512 + 512 + 512 + 1000]).unwrap();
        refused_archive(&t, &a, &ApplyPolicy::default(), "big", "truncated");
        // Cut in a header.
        fs::write(&a, &bytes[..512 + 512 + 100]).unwrap();
        refused_archive(&t, &a, &ApplyPolicy::default(), "ok1", "truncated");
        // Cut exactly between entries: only the missing end-of-archive blocks tell.
        fs::write(&a, &bytes[..512 + 512 + 512 + 4096]).unwrap();
        refused_archive(&t, &a, &ApplyPolicy::default(), "big", "end-of-archive");
        // A cut zstd frame.
        fs::write(&a, &bytes).unwrap();
        let z = t.dir.join("a.tar.zst");
        compress_zstd(&a, &z, 3, 1).unwrap();
        let zb = fs::read(&z).unwrap();
        fs::write(&z, &zb[..zb.len() - 20]).unwrap();
        refused_archive(&t, &z, &ApplyPolicy::default(), "", "refused");
    }

    /// What is allowed: following a target symlink that stays in the root (the container's
    /// `/etc`, not the host's), and hard links to files the target has.
    #[test]
    fn in_root_symlinks_and_existing_link_targets_are_followed_inside() {
        require_root();
        let t = target();
        let a = t.dir.join("a.tar");
        archive(
            &a,
            &[
                file("lnk/cryo-new", b"inside"),
                link("h", EntryType::Link, "etc/keep"),
            ],
        );
        apply_changeset(
            &a,
            &t.root,
            &ApplyPolicy::default(),
            &UndoLocation::default(),
        )
        .unwrap()
        .commit()
        .unwrap();
        assert_eq!(fs::read(t.root.join("etc/cryo-new")).unwrap(), b"inside");
        assert!(
            !Path::new("/etc/cryo-new").exists(),
            "wrote to the host's /etc"
        );
        let (k, h) = (
            fs::metadata(t.root.join("etc/keep")).unwrap(),
            fs::metadata(t.root.join("h")).unwrap(),
        );
        assert_eq!(k.ino(), h.ino());
        assert_eq!(fs::read_dir(&t.outside).unwrap().count(), 0);
    }
}
