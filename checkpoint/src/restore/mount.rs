//! The target rootfs bind-mounted where CRIU restores into it: CRIU needs its root to be a
//! mount point whose parent is not overmounted.

use std::path::{Path, PathBuf};

/// The bind mount; unmounted (lazily) and its mount point removed on drop.
#[derive(Debug)]
pub(super) struct RootMount {
    target: PathBuf,
}

impl RootMount {
    pub(super) fn bind(source: &Path, target: &Path) -> Result<Self, String> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind {} on {}: {e}", source.display(), target.display()))?;
        // Slave, not private: CRIU copies the dumped root's sharing from this mount
        // (MOVE_MOUNT_SET_GROUP refuses a private source: docker's rootfs was a slave of the
        // host's overlay mount), while nothing CRIU mounts below propagates back to the host.
        let _ = mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        );
        Ok(Self {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for RootMount {
    fn drop(&mut self) {
        unmount(&self.target);
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// Detach every mount at or below `path` (deepest first); never fails.
pub(crate) fn unmount(path: &Path) {
    for m in cryo_oci::fsutil::mounts_below(path) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}
