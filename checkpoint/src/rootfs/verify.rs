//! Files the container's processes hold open: recorded at checkpoint, checked at restore.
//! CRIU reopens each of them and fails, late and cryptically, when one is missing or has
//! another size; checking first lets cryo name the file and say what to do.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, Result, RootfsError};

/// A regular file of the rootfs held open by a checkpointed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    /// Path inside the container (`/var/log/app.log`).
    pub path: String,
    /// Size at checkpoint.
    pub size: u64,
    /// The file was already deleted (CRIU keeps those as ghost files in the image, so the
    /// rootfs need not have them).
    pub deleted: bool,
}

/// Regular files of the container rootfs (`rootfs_host`, as the host sees it) that any of
/// `pids` holds open, by container path, sorted. Call it while the container is frozen, so
/// the sizes are the ones CRIU dumps. Processes that vanished are skipped.
///
/// The link text of `/proc/<pid>/fd/N` is `<rootfs_host>/path` when the rootfs is reachable
/// from the reader's root, and the container path itself when the kernel can only name it
/// inside the container's mount namespace. A container path counts only when it is that
/// very file in the rootfs (same device and inode), so files of bind mounts (`/etc/hosts`, a
/// volume) are left out: they are not part of the rootfs snapshot.
pub fn collect_open_files(pids: &[i32], rootfs_host: &Path) -> Result<Vec<OpenFile>> {
    let root = rootfs_host
        .canonicalize()
        .map_err(io_err("resolve rootfs", rootfs_host))?;
    let root_dev = std::fs::metadata(&root)
        .map_err(io_err("stat", &root))?
        .dev();
    let mut found: BTreeMap<String, OpenFile> = BTreeMap::new();
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let Ok(fds) = std::fs::read_dir(&dir) else {
            continue; // the process is gone
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue; // the fd was closed meanwhile
            };
            let Ok(md) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if !md.is_file() {
                continue;
            }
            let text = link.to_string_lossy();
            let (text, deleted) = match text.strip_suffix(" (deleted)") {
                Some(t) => (t, true),
                None => (text.as_ref(), false),
            };
            if !text.starts_with('/') {
                continue; // anon_inode:, pipe:, socket:...
            }
            let text = Path::new(text);
            let inside = match text.strip_prefix(&root) {
                Ok(rel) => Some(rel.to_path_buf()),
                Err(_) => {
                    let rel = text.strip_prefix("/").unwrap_or(text).to_path_buf();
                    let same = if deleted {
                        md.dev() == root_dev
                    } else {
                        std::fs::symlink_metadata(root.join(&rel))
                            .is_ok_and(|m| (m.dev(), m.ino()) == (md.dev(), md.ino()))
                    };
                    same.then_some(rel)
                }
            };
            let Some(rel) = inside else {
                continue;
            };
            let path = format!("/{}", rel.display());
            found.entry(path.clone()).or_insert(OpenFile {
                path,
                size: md.len(),
                deleted,
            });
        }
    }
    Ok(found.into_values().collect())
}

/// Check every open file (deleted ones excepted: CRIU restores them as ghosts) exists in
/// `target_root` with the size it had at checkpoint; the error names the first that does
/// not.
pub fn verify_open_files(target_root: &Path, files: &[OpenFile]) -> Result<()> {
    for f in files.iter().filter(|f| !f.deleted) {
        let p = target_root.join(f.path.trim_start_matches('/'));
        let problem = match std::fs::metadata(&p) {
            Ok(md) if md.is_file() && md.len() == f.size => continue,
            Ok(md) if md.is_file() => format!(
                "has {} bytes in the target rootfs but {} at checkpoint",
                md.len(),
                f.size
            ),
            Ok(_) => "is not a regular file in the target rootfs".to_string(),
            Err(_) => format!(
                "is missing from the target rootfs {}",
                target_root.display()
            ),
        };
        return Err(RootfsError::OpenFileMismatch {
            path: f.path.clone(),
            problem,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_our_own_open_file_and_checks_sizes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("var/log")).unwrap();
        let p = t.path().join("var/log/app.log");
        std::fs::write(&p, vec![b'x'; 5678]).unwrap();
        let _held = std::fs::File::open(&p).unwrap();
        let gone = t.path().join("gone");
        std::fs::write(&gone, "x").unwrap();
        let _held2 = std::fs::File::open(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        let files = collect_open_files(&[std::process::id() as i32], t.path()).unwrap();
        let app = files.iter().find(|f| f.path == "/var/log/app.log").unwrap();
        assert_eq!((app.size, app.deleted), (5678, false));
        assert!(files.iter().any(|f| f.path == "/gone" && f.deleted));
        verify_open_files(t.path(), &files).unwrap();

        std::fs::write(&p, vec![b'x'; 1234]).unwrap();
        let e = verify_open_files(t.path(), &files).unwrap_err().to_string();
        assert_eq!(
            e,
            "file /var/log/app.log that the checkpointed process holds open has 1234 bytes in \
             the target rootfs but 5678 at checkpoint; restore the rootfs snapshot or use the \
             same rootfs"
        );
        std::fs::remove_file(&p).unwrap();
        let e = verify_open_files(t.path(), &files).unwrap_err().to_string();
        assert!(
            e.contains("/var/log/app.log") && e.contains("missing"),
            "{e}"
        );
    }
}
