//! A deterministic description of a directory tree, to compare two rootfs views (the merged
//! view a container changed, and the one a changeset was applied to).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Unix socket.
    Socket,
}

/// Everything compared about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryDigest {
    /// Type.
    pub kind: EntryKind,
    /// Permission bits with set-id and sticky bits (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (0 for directories, whose size depends on the filesystem's history).
    pub size: u64,
    /// Modification time, whole seconds.
    pub mtime: i64,
    /// Regular files: sha256 (hex) over the data extents (offset and bytes); the holes between
    /// them are zeros by definition and described by `extents`.
    pub sha256: Option<String>,
    /// Regular files: `(offset, length)` of the data regions (SEEK_DATA/SEEK_HOLE), so a
    /// sparse file restored dense (or the reverse) shows.
    pub extents: Option<Vec<(u64, u64)>>,
    /// Symlinks: the target.
    pub link_target: Option<String>,
    /// Device nodes: (major, minor).
    pub device: Option<(u32, u32)>,
    /// Extended attributes (hex values), overlay's private ones excepted.
    pub xattrs: BTreeMap<String, String>,
    /// Files with other hard links in the tree: the first path of the group in sorted order.
    pub hardlink_group: Option<String>,
}

impl fmt::Display for EntryDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} mode={:o} uid={} gid={} size={} mtime={}",
            self.kind, self.mode, self.uid, self.gid, self.size, self.mtime
        )?;
        if let Some(s) = &self.sha256 {
            write!(f, " sha256={}", &s[..16])?;
        }
        if let Some(t) = &self.link_target {
            write!(f, " -> {t}")?;
        }
        if let Some((a, b)) = self.device {
            write!(f, " dev={a}:{b}")?;
        }
        if let Some(g) = &self.hardlink_group {
            write!(f, " link-group={g}")?;
        }
        Ok(())
    }
}

/// Describe every entry below `root` (not `root` itself), keyed by `/relative/path`. Symlinks
/// are not followed. Panics on I/O errors: it is for tests.
pub fn tree_digest(root: &Path) -> BTreeMap<String, EntryDigest> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    for mut paths in inodes.into_values().filter(|p| p.len() > 1) {
        paths.sort();
        for p in &paths {
            if let Some(e) = out.get_mut(p) {
                e.hardlink_group = Some(paths[0].clone());
            }
        }
    }
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, EntryDigest>,
    inodes: &mut HashMap<(u64, u64), Vec<String>>,
) {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
    for e in rd {
        let p = e
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .path();
        let rel = format!("/{}", p.strip_prefix(root).unwrap_or(&p).display());
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {rel}: {e}"));
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_char_device() {
            EntryKind::Char
        } else if ft.is_block_device() {
            EntryKind::Block
        } else if ft.is_socket() {
            EntryKind::Socket
        } else {
            EntryKind::File
        };
        let mut d = EntryDigest {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == EntryKind::Dir { 0 } else { md.size() },
            mtime: md.mtime(),
            sha256: None,
            extents: None,
            link_target: None,
            device: None,
            xattrs: xattrs(&p),
            hardlink_group: None,
        };
        match kind {
            EntryKind::File => {
                let (sha, ext) = content(&p, md.size());
                d.sha256 = Some(sha);
                d.extents = Some(ext);
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            EntryKind::Symlink => {
                let t = std::fs::read_link(&p).unwrap_or_else(|e| panic!("readlink {rel}: {e}"));
                d.link_target = Some(t.to_string_lossy().into_owned());
            }
            EntryKind::Char | EntryKind::Block => {
                d.device = Some((libc::major(md.rdev()), libc::minor(md.rdev())));
            }
            _ => {}
        }
        out.insert(rel, d);
        if kind == EntryKind::Dir {
            walk(root, &p, out, inodes);
        }
    }
}

fn xattrs(p: &Path) -> BTreeMap<String, String> {
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return BTreeMap::new(),
        Err(e) => panic!("list xattrs of {}: {e}", p.display()),
    };
    names
        .filter_map(|n| {
            let name = n.to_string_lossy().into_owned();
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                return None;
            }
            let v = xattr::get(p, &n).ok().flatten().unwrap_or_default();
            Some((name, hex(&v)))
        })
        .collect()
}

/// sha256 over the data extents, and the extents.
fn content(p: &Path, size: u64) -> (String, Vec<(u64, u64)>) {
    let f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let ext = extents(&f, size);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    for (off, len) in &ext {
        h.update(off.to_le_bytes());
        let (mut at, end) = (*off, off + len);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], at)
                .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            h.update(&buf[..n]);
            at += n as u64;
        }
    }
    (hex(&h.finalize()), ext)
}

fn extents(f: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "SEEK_HOLE failed");
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Human-readable differences between two digests (empty when they are equal): entries only
/// in one, and every field that differs.
pub fn diff_trees(
    a: &BTreeMap<String, EntryDigest>,
    b: &BTreeMap<String, EntryDigest>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, x) in a {
        let Some(y) = b.get(k) else {
            d.push(format!("only in first: {k} ({x})"));
            continue;
        };
        let mut f = Vec::new();
        macro_rules! cmp {
            ($field:ident) => {
                if x.$field != y.$field {
                    f.push(format!(
                        "{} {:?} != {:?}",
                        stringify!($field),
                        x.$field,
                        y.$field
                    ));
                }
            };
        }
        cmp!(kind);
        if x.mode != y.mode {
            f.push(format!("mode {:o} != {:o}", x.mode, y.mode));
        }
        cmp!(uid);
        cmp!(gid);
        cmp!(size);
        cmp!(mtime);
        cmp!(sha256);
        cmp!(extents);
        cmp!(link_target);
        cmp!(device);
        cmp!(xattrs);
        cmp!(hardlink_group);
        if !f.is_empty() {
            d.push(format!("{k}: {}", f.join(", ")));
        }
    }
    for (k, y) in b {
        if !a.contains_key(k) {
            d.push(format!("only in second: {k} ({y})"));
        }
    }
    d
}
