//! Files the container's processes hold open: recorded at checkpoint, checked at restore
//! (CRIU reopens them and fails, late and cryptically, when one is missing or resized).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::RootfsError;

/// A regular file held open by a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    /// Path inside the container.
    pub path: String,
    /// Size at checkpoint.
    pub size: u64,
    /// The file was already deleted (CRIU keeps those as ghost files in the image).
    pub deleted: bool,
}

/// Regular files below `rootfs_host` open in any of `pids`.
pub fn collect_open_files(pids: &[i32], rootfs_host: &Path) -> Result<Vec<OpenFile>, RootfsError> {
    let mut out: Vec<OpenFile> = Vec::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let text = link.to_string_lossy();
            let (text, deleted) = match text.strip_suffix(" (deleted)") {
                Some(t) => (t.to_string(), true),
                None => (text.into_owned(), false),
            };
            // Links of a process inside the container's mount namespace read as container paths.
            if !text.starts_with('/') {
                continue;
            }
            let Ok(md) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if !md.is_file() {
                continue;
            }
            let path = Path::new(&text)
                .strip_prefix(rootfs_host)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or(text);
            if !out.iter().any(|f| f.path == path) {
                out.push(OpenFile {
                    path,
                    size: md.len(),
                    deleted,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Every non-deleted file must exist in `target_root` with its recorded size.
pub fn verify_open_files(target_root: &Path, files: &[OpenFile]) -> Result<(), RootfsError> {
    for f in files.iter().filter(|f| !f.deleted) {
        let p = target_root.join(f.path.trim_start_matches('/'));
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.len() == f.size => {}
            Ok(md) => {
                return Err(RootfsError::Mismatch(format!(
                    "file {} that the checkpointed process holds open has {} bytes in the target rootfs but {} at checkpoint; restore the rootfs snapshot (drop --no-rootfs-restore) or use the same rootfs",
                    f.path, md.len(), f.size
                )))
            }
            Err(_) => {
                return Err(RootfsError::Mismatch(format!(
                    "file {} that the checkpointed process holds open is missing from the target rootfs {}; restore the rootfs snapshot (drop --no-rootfs-restore) or use the same rootfs",
                    f.path,
                    target_root.display()
                )))
            }
        }
    }
    Ok(())
}
