//! Hostile or corrupt changesets are refused before anything is written.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cryo_checkpoint::rootfs::{apply_changeset, ApplyPolicy};
use tar::{EntryType, Header};

fn header(name: &str, ty: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    let g = h.as_gnu_mut().unwrap();
    g.name = [0; 100];
    g.name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(ty);
    h.set_mode(0o644);
    h.set_size(size);
    h
}

fn archive(dir: &Path, name: &str, entries: &[(Header, Option<&str>, &[u8])]) -> PathBuf {
    let p = dir.join(name);
    let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
    for (h, link, data) in entries {
        let mut h = h.clone();
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
    p
}

fn target(name: &str) -> (PathBuf, PathBuf) {
    let d = std::env::temp_dir().join(format!("cryo-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("root/etc")).unwrap();
    std::fs::write(d.join("root/etc/keep"), "keep").unwrap();
    (d.clone(), d.join("root"))
}

fn listing(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(root)
        .into_iter()
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

fn refused(name: &str, entries: &[(Header, Option<&str>, &[u8])], expect: &str) {
    let (d, root) = target(name);
    let before = listing(&root);
    let outside = d.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let a = archive(&d, "a.tar", entries);
    let e = apply_changeset(&a, &root, &ApplyPolicy::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused") && e.contains(expect), "{name}: {e}");
    assert_eq!(listing(&root), before, "{name}: target changed");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "{name}: wrote outside"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn absolute_paths_are_refused() {
    refused(
        "abs",
        &[(header("/etc/evil", EntryType::Regular, 1), None, b"x")],
        "absolute path",
    );
}

#[test]
fn parent_components_are_refused() {
    refused(
        "dotdot",
        &[(
            header("a/../../outside/x", EntryType::Regular, 1),
            None,
            b"x",
        )],
        "'..'",
    );
}

#[test]
fn writes_through_a_symlink_are_refused() {
    refused(
        "symlink",
        &[
            (header("a", EntryType::Symlink, 0), Some("../outside"), b""),
            (header("a/pwned", EntryType::Regular, 1), None, b"x"),
        ],
        "symlink",
    );
}

#[test]
fn hardlinks_out_of_the_root_are_refused() {
    refused(
        "hardlink",
        &[(header("h", EntryType::Link, 0), Some("../outside/x"), b"")],
        "'..'",
    );
}

#[test]
fn unrecorded_device_nodes_are_refused() {
    refused(
        "dev",
        &[(header("dev/sda", EntryType::Block, 0), None, b"")],
        "device node not recorded",
    );
}

#[test]
fn truncated_archives_are_refused() {
    let (d, root) = target("trunc");
    let before = listing(&root);
    let data = vec![7u8; 4096];
    let a = archive(
        &d,
        "a.tar",
        &[
            (header("ok1", EntryType::Regular, 3), None, b"abc"),
            (header("big", EntryType::Regular, 4096), None, &data),
        ],
    );
    let bytes = std::fs::read(&a).unwrap();
    std::fs::write(&a, &bytes[..1024 + 512 + 1000]).unwrap();
    let e = apply_changeset(&a, &root, &ApplyPolicy::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused"), "{e}");
    assert_eq!(listing(&root), before, "target changed");
    std::fs::remove_dir_all(&d).unwrap();
}
