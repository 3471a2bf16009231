//! What the rootfs is: an overlay mount, a plain directory, or another mount.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, Result};

/// One line of `/proc/<pid>/mountinfo`, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id.
    pub mount_id: u32,
    /// Parent mount id.
    pub parent_id: u32,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// Path inside the filesystem that is mounted (`/` unless a bind mount of a subtree).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`).
    pub mount_options: String,
    /// Optional fields (`shared:1`, `master:2`...).
    pub optional_fields: Vec<String>,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Super-block options, still escaped (`lowerdir=…,upperdir=…`): split them with
    /// [`MountInfo::overlay_dirs`].
    pub super_options: String,
}

/// The kind of root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RootfsKind {
    /// An overlay mount with an upper dir: its changes can be captured.
    Overlay {
        /// Mount point (the merged view).
        mount_point: PathBuf,
        /// Upper dir.
        upper_dir: PathBuf,
        /// Lower dirs, top first (data-only layers last).
        lower_dirs: Vec<PathBuf>,
        /// Work dir.
        work_dir: PathBuf,
    },
    /// A plain directory, not a mount point of its own.
    Directory {
        /// The canonical path.
        path: PathBuf,
    },
    /// Any other mount (or an overlay without upper dir).
    Other {
        /// Filesystem type.
        fstype: String,
        /// The canonical path.
        path: PathBuf,
    },
}

/// Overlay layer directories named in a super-options string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayDirs {
    /// `upperdir`.
    pub upper: Option<PathBuf>,
    /// `lowerdir` (and `lowerdir+`, then `datadir+`), top first.
    pub lower: Vec<PathBuf>,
    /// `workdir`.
    pub work: Option<PathBuf>,
}

impl MountInfo {
    /// The overlay directories in [`MountInfo::super_options`]. Commas inside a value are
    /// escaped (`\054` by current kernels, `\,` by some), colons inside a lowerdir entry too
    /// (`\:`, which the kernel shows as `\134:`).
    pub fn overlay_dirs(&self) -> OverlayDirs {
        let mut d = OverlayDirs::default();
        for opt in split_unescaped(self.super_options.as_bytes(), b',') {
            let opt = unescape_octal(&opt);
            let Some(eq) = opt.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (key, value) = (&opt[..eq], &opt[eq + 1..]);
            match key {
                b"upperdir" => d.upper = Some(path(unbackslash(value))),
                b"workdir" => d.work = Some(path(unbackslash(value))),
                b"lowerdir" | b"lowerdir+" | b"datadir+" => {
                    if key == b"lowerdir" {
                        d.lower.clear();
                    }
                    // `::` separates data-only layers: an empty item, skipped.
                    d.lower.extend(
                        split_unescaped(value, b':')
                            .into_iter()
                            .filter(|p| !p.is_empty())
                            .map(|p| path(unbackslash(&p))),
                    );
                }
                _ => {}
            }
        }
        d
    }
}

/// Classify the rootfs at `rootfs` from `/proc/self/mountinfo`: the last mount (the one on
/// top) whose mount point is the canonical rootfs path decides.
pub fn detect_rootfs(rootfs: &Path) -> Result<RootfsKind> {
    let path = rootfs
        .canonicalize()
        .map_err(io_err("resolve rootfs", rootfs))?;
    let text =
        std::fs::read("/proc/self/mountinfo").map_err(io_err("read", "/proc/self/mountinfo"))?;
    Ok(classify(&parse_mountinfo_bytes(&text), &path))
}

/// Classify `path` given a mount table.
pub(crate) fn classify(mounts: &[MountInfo], path: &Path) -> RootfsKind {
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
    match m.overlay_dirs() {
        OverlayDirs {
            upper: Some(upper_dir),
            lower,
            work: Some(work_dir),
        } => RootfsKind::Overlay {
            mount_point: path.to_path_buf(),
            upper_dir,
            lower_dirs: lower,
            work_dir,
        },
        // A read-only overlay (no upper dir) has no changes to capture.
        _ => RootfsKind::Other {
            fstype: "overlay (read-only: no upperdir)".into(),
            path: path.to_path_buf(),
        },
    }
}

/// Parse a mountinfo text (see proc(5)): `id parent maj:min root mount-point options
/// [optional fields...] - fstype source super-options`, with `\040`-style octal escapes in
/// the paths. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    parse_mountinfo_bytes(text.as_bytes())
}

/// [`parse_mountinfo`] on raw bytes (paths need not be UTF-8).
pub(crate) fn parse_mountinfo_bytes(text: &[u8]) -> Vec<MountInfo> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let f: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    if f.len() < 10 {
        return None;
    }
    // The optional fields end with a lone "-".
    let sep = 6 + f[6..].iter().position(|x| *x == b"-")?;
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Some(MountInfo {
        mount_id: s(f[0]).parse().ok()?,
        parent_id: s(f[1]).parse().ok()?,
        dev: s(f[2]),
        root: path(unescape_octal(f[3])),
        mount_point: path(unescape_octal(f[4])),
        mount_options: s(f[5]),
        optional_fields: f[6..sep].iter().map(|x| s(x)).collect(),
        fstype: s(f.get(sep + 1)?),
        source: s(&unescape_octal(f.get(sep + 2)?)),
        super_options: f.get(sep + 3).map(|x| s(x)).unwrap_or_default(),
    })
}

fn path(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Undo the kernel's `\ooo` octal escapes (space, tab, newline, backslash, comma...).
fn unescape_octal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = s[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Split on `sep` where it is not preceded by a backslash escape; escapes are kept.
fn split_unescaped(s: &[u8], sep: u8) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < s.len() {
        let cur = out.len() - 1;
        if s[i] == b'\\' && i + 1 < s.len() {
            out[cur].extend_from_slice(&s[i..i + 2]);
            i += 2;
            continue;
        }
        if s[i] == sep {
            out.push(Vec::new());
        } else {
            out[cur].push(s[i]);
        }
        i += 1;
    }
    out
}

/// Drop backslash escapes (`\:` → `:`, `\,` → `,`, `\\` → `\`).
fn unbackslash(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.iter();
    while let Some(&c) = it.next() {
        if c == b'\\' {
            if let Some(&n) = it.next() {
                out.push(n);
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MI: &str = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
        99 22 0:50 / /var/lib/c/merged\\040x rw,relatime shared:40 master:2 - overlay overlay rw,lowerdir=/l/a:/l/b\\:c,upperdir=/u\\,1,workdir=/w\n\
        100 22 0:51 /sub /mnt/bind rw - ext4 /dev/vda rw\n\
        101 22 0:52 / /k rw,relatime - overlay overlay rw,lowerdir=/tmp/l\\134:1:/tmp/l\\134\\0542::/data,upperdir=/tmp/u\\0403,workdir=/tmp/w,uuid=on\n\
        102 22 0:53 / /ro rw - overlay overlay ro,lowerdir=/a:/b\n\
        bogus line\n";

    #[test]
    fn parses_fields_escapes_and_optional_fields() {
        let m = parse_mountinfo(MI);
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].mount_id, 99);
        assert_eq!(m[1].parent_id, 22);
        assert_eq!(m[1].dev, "0:50");
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/c/merged x"));
        assert_eq!(m[1].optional_fields, vec!["shared:40", "master:2"]);
        assert_eq!(m[1].fstype, "overlay");
        assert_eq!(m[2].root, PathBuf::from("/sub"));
        assert!(m[2].optional_fields.is_empty());
        assert_eq!(m[0].super_options, "rw");
    }

    #[test]
    fn overlay_options_with_escaped_separators() {
        let m = parse_mountinfo(MI);
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
        // As Linux 6.x prints `lowerdir=/tmp/l\:1:/tmp/l\,2::/data,upperdir=/tmp/u 3`.
        let d = m[3].overlay_dirs();
        assert_eq!(d.upper, Some("/tmp/u 3".into()));
        assert_eq!(d.work, Some("/tmp/w".into()));
        assert_eq!(
            d.lower,
            vec![PathBuf::from("/tmp/l:1"), "/tmp/l,2".into(), "/data".into()]
        );
    }

    #[test]
    fn classifies_directories_other_mounts_and_read_only_overlays() {
        let m = parse_mountinfo(MI);
        assert!(matches!(
            classify(&m, Path::new("/srv/rootfs")),
            RootfsKind::Directory { .. }
        ));
        assert!(matches!(
            classify(&m, Path::new("/mnt/bind")),
            RootfsKind::Other { ref fstype, .. } if fstype == "ext4"
        ));
        assert!(matches!(
            classify(&m, Path::new("/ro")),
            RootfsKind::Other { ref fstype, .. } if fstype.contains("read-only")
        ));
        // The last mount on a mount point is the visible one.
        let stacked = format!("{MI}103 22 0:54 / /mnt/bind rw - tmpfs tmpfs rw\n");
        assert!(matches!(
            classify(&parse_mountinfo(&stacked), Path::new("/mnt/bind")),
            RootfsKind::Other { ref fstype, .. } if fstype == "tmpfs"
        ));
    }

    #[test]
    fn detects_the_host_root_and_a_plain_directory() {
        assert!(matches!(
            detect_rootfs(Path::new("/")).unwrap(),
            RootfsKind::Other { .. } | RootfsKind::Overlay { .. }
        ));
        let t = tempfile::tempdir().unwrap();
        let k = detect_rootfs(t.path()).unwrap();
        assert_eq!(
            k,
            RootfsKind::Directory {
                path: t.path().canonicalize().unwrap()
            }
        );
    }
}
