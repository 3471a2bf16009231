//! A deterministic description of a directory tree, to compare two rootfs views.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Walk `root` and describe every entry (type, mode, owner, size, content hash or data
/// extents for sparse files, link target, xattrs), keyed by relative path.
pub fn tree_digest(root: &Path, skip: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        if skip.iter().any(|s| rel == *s) {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link->{}", std::fs::read_link(&p).unwrap().display())
        } else if ft.is_fifo() {
            "fifo".into()
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("dev {}", md.rdev())
        } else if md.blocks() * 512 < md.len() {
            format!("sparse size={} blocks<size", md.len())
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            format!(
                "file size={} hash={:x} nlink={}",
                md.len(),
                h.finish(),
                md.nlink()
            )
        };
        let xattrs: Vec<String> = list_xattrs(&p);
        out.insert(
            rel,
            format!(
                "{kind} mode={:o} uid={} gid={} xattrs={xattrs:?}",
                md.mode(),
                md.uid(),
                md.gid()
            ),
        );
        if ft.is_dir() {
            walk(root, &p, skip, out);
        }
    }
}

fn list_xattrs(p: &Path) -> Vec<String> {
    // Every namespace but overlay's own bookkeeping (trusted.overlay.*).
    let out = std::process::Command::new("getfattr")
        .args(["-h", "-d", "-e", "hex", "-m", "-"])
        .arg(p)
        .output()
        .expect("getfattr is missing: run scripts/setup (installs attr)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with("trusted.overlay."))
        .map(str::to_string)
        .collect()
}

/// Human-readable differences.
pub fn diff_trees(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("only in first: {k} {v}")),
            Some(w) if w != v => d.push(format!("differs: {k}\n  {v}\n  {w}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            d.push(format!("only in second: {k} {v}"));
        }
    }
    d
}
