//! Hostile, corrupt or truncated changesets are refused before anything is written: the
//! error names the entry and the reason, the target tree is unchanged and nothing appears
//! outside it. Archives are built by hand with the tar crate. Needs root (like every rootfs
//! test: it fails, never skips, without it).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cryo_checkpoint::rootfs::{
    apply_changeset, compress_zstd, ApplyPolicy, ChangesetSizes, DeviceKind, DeviceNode,
    RootfsError, UndoLocation,
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

/// Write `entries` as a tar; names and link targets longer than 100 bytes go in GNU
/// long-name and long-link entries.
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
        if let Some(l) = x.link.filter(|l| l.len() > 100) {
            let mut k = Header::new_gnu();
            k.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            k.set_entry_type(EntryType::GNULongLink);
            k.set_size(l.len() as u64 + 1);
            k.set_cksum();
            let mut n = l.as_bytes().to_vec();
            n.push(0);
            b.append(&k, &n[..]).unwrap();
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
        if let Some(l) = x.link.filter(|l| l.len() <= 100) {
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

/// A regular entry in GNU tar's PAX sparse 0.1 format: `data` holds the extents of `map`.
fn pax_sparse(name: &str, size: u64, map: &[(u64, u64)], data: &[u8]) -> E {
    let text: Vec<String> = map.iter().map(|(o, l)| format!("{o},{l}")).collect();
    E {
        pax: vec![
            ("GNU.sparse.size".into(), size.to_string().into_bytes()),
            (
                "GNU.sparse.numblocks".into(),
                map.len().to_string().into_bytes(),
            ),
            ("GNU.sparse.map".into(), text.join(",").into_bytes()),
        ],
        ..file(name, data)
    }
}

/// An archive with one old-GNU sparse entry (type `S`, as format-1 images hold them): at
/// most 4 extents, in the header.
fn legacy_sparse_archive(path: &Path, name: &str, size: u64, map: &[(u64, u64)], data: &[u8]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    let g = h.as_gnu_mut().unwrap();
    for (slot, (off, len)) in g.sparse.iter_mut().zip(map) {
        slot.set_offset(*off);
        slot.set_length(*len);
    }
    g.set_real_size(size);
    h.set_cksum();
    b.append(&h, data).unwrap();
    b.finish().unwrap();
}

/// Run `f` on another thread and fail if it is still busy after `secs`: a hang guard for
/// work that used to take hours, not a timing measurement.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what}: still busy after {secs} s"))
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

    /// The kernel's limits are checked before anything is written (a 4096-byte name used to
    /// fail midway through the apply, leaving the entries before it applied).
    #[test]
    fn names_and_paths_beyond_the_kernels_limits_are_refused() {
        require_root();
        let n256 = format!("d/{}", "n".repeat(256));
        refused(
            vec![file(&n256, b"x")],
            "nnnn",
            "path component of 256 bytes",
        );
        let n4096 = "n".repeat(4096);
        refused(
            vec![file(&n4096, b"x")],
            "nnnn",
            "path component of 4096 bytes",
        );
        let deep = format!("{}/f", vec!["d".repeat(200); 21].join("/"));
        refused(vec![file(&deep, b"x")], "dddd", "a path of 4223 bytes");
        let long: &'static str = Box::leak("t".repeat(4096).into_boxed_str());
        refused(
            vec![link("s", EntryType::Symlink, long)],
            "s",
            "symlink target of 4096 bytes",
        );
        let mut big = file("x", b"");
        big.pax = vec![("SCHILY.xattr.user.big".into(), vec![0u8; 70_000])];
        refused(vec![big], "x", "xattr user.big of 70000 bytes");
        // At the limits: applied.
        let t = target();
        let a = t.dir.join("a.tar");
        let n255 = format!("d/{}", "n".repeat(255));
        let deep = format!("{}/f", vec!["d".repeat(200); 20].join("/"));
        archive(&a, &[file(&n255, b"ok"), file(&deep, b"ok")]);
        apply_changeset(
            &a,
            &t.root,
            &ApplyPolicy::default(),
            &UndoLocation::default(),
        )
        .unwrap()
        .commit()
        .unwrap();
        assert_eq!(fs::read(t.root.join(&n255)).unwrap(), b"ok");
    }

    /// No entry, hard link or target symlink reaches cryo's undo directory.
    #[test]
    fn cryos_undo_directory_is_out_of_reach() {
        require_root();
        let undo = UndoLocation::DEFAULT_NAME;
        let inside = format!("{undo}/journal");
        refused(vec![file(&inside, b"x")], &inside, "undo directory");
        refused(vec![e(undo, EntryType::Directory)], undo, "undo directory");
        let to: &'static str = Box::leak(inside.clone().into_boxed_str());
        refused(vec![link("h", EntryType::Link, to)], "h", "undo directory");
        let t = target();
        std::os::unix::fs::symlink(format!("/{undo}"), t.root.join("into-undo")).unwrap();
        let a = t.dir.join("a.tar");
        archive(&a, &[file("into-undo/x", b"x")]);
        let p = ApplyPolicy::default();
        refused_archive(&t, &a, &p, "into-undo/x", "undo directory");
    }

    /// An archive may not declare more than the capture recorded.
    #[test]
    fn sizes_beyond_the_capture_record_are_refused() {
        require_root();
        let t = target();
        let a = t.dir.join("a.tar");
        archive(
            &a,
            &[
                file("a", &[1u8; 100]),
                pax_sparse("s", 1 << 30, &[(0, 10)], &[2u8; 10]),
            ],
        );
        let recorded = |data_bytes, logical_bytes| {
            ApplyPolicy::default().with_declared_sizes(ChangesetSizes {
                data_bytes,
                logical_bytes,
            })
        };
        let p = recorded(50, 1 << 31);
        refused_archive(&t, &a, &p, "a", "more file data than the capture recorded");
        let p = recorded(110, 1000);
        refused_archive(&t, &a, &p, "s", "larger than the capture recorded");
        apply_changeset(
            &a,
            &t.root,
            &recorded(110, (1 << 30) + 100),
            &UndoLocation::default(),
        )
        .unwrap()
        .commit()
        .unwrap();
    }

    /// A small archive declaring a huge sparse file costs its extents, not its size: 1 TiB
    /// with 10 bytes at the end is applied sparse; 1 PiB (beyond ext4's largest file) fails
    /// at its length and is rolled back; with the capture's record it is refused outright.
    #[test]
    fn huge_sparse_files_cost_their_extents_not_their_size() {
        require_root();
        const TIB: u64 = 1 << 40;
        const PIB: u64 = 1 << 50;
        let t = target();
        let (root, a) = (t.root.clone(), t.dir.join("a.tar"));
        archive(
            &a,
            &[pax_sparse("big", TIB, &[(TIB - 10, 10)], b"0123456789")],
        );
        assert!(fs::metadata(&a).unwrap().len() < 8192);
        let (r, ar) = (root.clone(), a.clone());
        within(120, "1 TiB sparse file", move || {
            apply_changeset(&ar, &r, &ApplyPolicy::default(), &UndoLocation::default())
                .unwrap()
                .commit()
                .unwrap()
        });
        let md = fs::metadata(root.join("big")).unwrap();
        assert_eq!(md.len(), TIB);
        assert!(md.blocks() < 64, "{} blocks", md.blocks());
        let mut tail = [0u8; 10];
        std::os::unix::fs::FileExt::read_exact_at(
            &fs::File::open(root.join("big")).unwrap(),
            &mut tail,
            TIB - 10,
        )
        .unwrap();
        assert_eq!(&tail, b"0123456789");

        archive(
            &a,
            &[
                file("first", b"1"),
                pax_sparse("huge", PIB, &[(0, 5), (PIB, 0)], b"hello"),
            ],
        );
        let before = tree_digest(&root);
        let (r, ar) = (root.clone(), a.clone());
        let e = within(120, "1 PiB sparse file", move || {
            apply_changeset(&ar, &r, &ApplyPolicy::default(), &UndoLocation::default())
                .err()
                .unwrap()
        });
        assert!(matches!(e, RootfsError::Apply { .. }), "{e}");
        assert!(e.to_string().contains("File too large"), "{e}");
        assert!(diff_trees(&before, &tree_digest(&root)).is_empty());
        let p = ApplyPolicy::default().with_declared_sizes(ChangesetSizes {
            data_bytes: 6,
            logical_bytes: 6,
        });
        refused_archive(&t, &a, &p, "huge", "larger than the capture recorded");
    }

    /// Sparse maps are checked before anything is written.
    #[test]
    fn bad_sparse_maps_are_refused() {
        require_root();
        refused(
            vec![pax_sparse("s", 100, &[(50, 10), (0, 10)], &[1u8; 20])],
            "s",
            "precedes",
        );
        refused(
            vec![pax_sparse("s", 100, &[(95, 10)], &[1u8; 10])],
            "s",
            "past the file's size",
        );
        refused(
            vec![pax_sparse("s", 100, &[(0, 10)], &[1u8; 20])],
            "s",
            "entry holds 20",
        );
    }

    /// Old-GNU sparse entries (format-1 images): refused unless the image is declared of
    /// that format; then applied, and bounded.
    #[test]
    fn old_gnu_sparse_entries_only_for_format_1_and_bounded() {
        require_root();
        let t = target();
        let a = t.dir.join("a.tar");
        let mut data = vec![b'a'; 512];
        data.extend_from_slice(&[b'b'; 512]);
        let map = [(0, 512), (512 * 1024, 512), (1 << 20, 0)];
        legacy_sparse_archive(&a, "old", 1 << 20, &map, &data);
        refused_archive(
            &t,
            &a,
            &ApplyPolicy::default(),
            "old",
            "old-GNU sparse entry",
        );
        let legacy = ApplyPolicy::default().with_legacy_sparse(true);
        apply_changeset(&a, &t.root, &legacy, &UndoLocation::default())
            .unwrap()
            .commit()
            .unwrap();
        let got = fs::read(t.root.join("old")).unwrap();
        assert_eq!(got.len(), 1 << 20);
        assert!(got[..512].iter().all(|b| *b == b'a'));
        assert!(got[512..512 * 1024].iter().all(|b| *b == 0));
        assert!(got[512 * 1024..512 * 1025].iter().all(|b| *b == b'b'));
        const PIB: u64 = 1 << 50;
        legacy_sparse_archive(&a, "old2", PIB, &[(0, 512), (PIB, 0)], &[b'c'; 512]);
        let p = legacy.clone();
        let t2 = within(120, "old-GNU 1 PiB", move || {
            refused_archive(&t, &a, &p, "old2", "may declare at most");
            t
        });
        drop(t2);
    }
}
