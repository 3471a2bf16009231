//! What the rootfs is: an overlay mount, a plain directory, or something else.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, RootfsError};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Path inside the mounted filesystem.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Super options (`lowerdir=…,upperdir=…`).
    pub super_options: String,
}

/// The kind of root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RootfsKind {
    /// An overlay mount.
    Overlay {
        /// Mount point.
        mount_point: PathBuf,
        /// Upper dir.
        upper_dir: PathBuf,
        /// Lower dirs, top first.
        lower_dirs: Vec<PathBuf>,
        /// Work dir.
        work_dir: PathBuf,
    },
    /// A plain directory.
    Directory {
        /// The path.
        path: PathBuf,
    },
    /// Any other mount.
    Other {
        /// Filesystem type.
        fstype: String,
        /// The path.
        path: PathBuf,
    },
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(oct), 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.splitn(3, ' ').collect();
            Some(MountInfo {
                root: PathBuf::from(unescape(f.get(3)?)),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1).copied().unwrap_or("")),
                super_options: r.get(2).copied().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Split overlay super options on unescaped commas, and lowerdir on unescaped colons.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                if let Some(l) = out.last_mut() {
                    if n != sep {
                        l.push(c);
                    }
                    l.push(n);
                }
                continue;
            }
        }
        if c == sep {
            out.push(String::new());
        } else if let Some(l) = out.last_mut() {
            l.push(c);
        }
    }
    out
}

/// Classify the rootfs at `rootfs`.
pub fn detect_rootfs(rootfs: &Path) -> Result<RootfsKind, RootfsError> {
    let path = rootfs
        .canonicalize()
        .map_err(io_err("resolve rootfs", rootfs))?;
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", "/proc/self/mountinfo"))?;
    Ok(classify(&parse_mountinfo(&text), &path))
}

/// Classify `path` given the mount table (pure).
pub fn classify(mounts: &[MountInfo], path: &Path) -> RootfsKind {
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == path) else {
        return RootfsKind::Directory {
            path: path.to_path_buf(),
        };
    };
    if m.fstype != "overlay" {
        return RootfsKind::Other {
            fstype: m.fstype.clone(),
            path: path.to_path_buf(),
        };
    }
    let mut upper = None;
    let mut lower = Vec::new();
    let mut work = None;
    for opt in split_unescaped(&m.super_options, ',') {
        if let Some(v) = opt.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(unescape(v)));
        } else if let Some(v) = opt.strip_prefix("lowerdir=") {
            lower = split_unescaped(v, ':')
                .into_iter()
                .map(|p| PathBuf::from(unescape(&p)))
                .collect();
        } else if let Some(v) = opt.strip_prefix("workdir=") {
            work = Some(PathBuf::from(unescape(v)));
        }
    }
    match (upper, work) {
        (Some(upper_dir), Some(work_dir)) => RootfsKind::Overlay {
            mount_point: path.to_path_buf(),
            upper_dir,
            lower_dirs: lower,
            work_dir,
        },
        // A read-only overlay (no upper) has no changes to capture.
        _ => RootfsKind::Other {
            fstype: "overlay (read-only, no upperdir)".into(),
            path: path.to_path_buf(),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MI: &str = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
        99 22 0:50 / /var/lib/c/merged\\040x rw,relatime shared:40 - overlay overlay rw,lowerdir=/l/a:/l/b\\:c,upperdir=/u\\,1,workdir=/w\n\
        100 22 0:51 /sub /mnt/bind rw - ext4 /dev/vda rw\n";

    #[test]
    fn parses_escapes_and_overlay_options() {
        let m = parse_mountinfo(MI);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/c/merged x"));
        assert_eq!(m[2].root, PathBuf::from("/sub"));
        let k = classify(&m, Path::new("/var/lib/c/merged x"));
        assert_eq!(
            k,
            RootfsKind::Overlay {
                mount_point: "/var/lib/c/merged x".into(),
                upper_dir: "/u,1".into(),
                lower_dirs: vec!["/l/a".into(), "/l/b:c".into()],
                work_dir: "/w".into(),
            }
        );
        assert!(matches!(
            classify(&m, Path::new("/srv/rootfs")),
            RootfsKind::Directory { .. }
        ));
        assert!(matches!(
            classify(&m, Path::new("/mnt/bind")),
            RootfsKind::Other { .. }
        ));
    }
}
