//! Undoing what a killed restore left, and removing a container's state directory without
//! ever reaching through a mount (a killed restore leaves the bundle's rootfs bind-mounted at
//! `<root>/<id>/criu-root`; a plain recursive removal would empty the user's rootfs).

use std::path::Path;

use anyhow::{bail, Context as _};
use cryo_checkpoint::restore::journal::{self, CgroupUndo};
use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, FreezerState};

use crate::context::Context;

/// Kills and removes a container's cgroups with libcgroups.
pub struct Cgroups {
    /// The container id (libcgroups names the cgroup from it when the path is relative).
    pub id: String,
}

impl CgroupUndo for Cgroups {
    fn destroy(&self, cgroup_path: &Path) {
        destroy_cgroup(&self.id, cgroup_path);
    }
}

/// Kill whatever runs in the cgroups at `cgroup_path` and remove them, in every hierarchy.
pub fn destroy_cgroup(id: &str, cgroup_path: &Path) {
    let Ok(m) = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.to_path_buf(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    }) else {
        return;
    };
    if let Ok(pids) = m.get_all_pids() {
        for p in pids {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    // Frozen tasks die only once thawed.
    let _ = m.freeze(FreezerState::Thawed);
    for _ in 0..300 {
        if m.get_all_pids().map(|p| p.is_empty()).unwrap_or(true) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = m.remove();
    // And the container's cgroups in the hierarchies libcgroups leaves alone (see `cgroups`).
    if let Ok(others) = crate::cgroups::OtherHierarchies::discover() {
        others.remove(cgroup_path);
    }
}

/// For container `id` whose state directory holds no finished container (no `state.json`):
/// undo a restore journal found there, then remove the directory. The caller holds the lock.
pub fn undo_half_made(ctx: &Context, id: &str) -> anyhow::Result<()> {
    let dir = ctx.store.container_dir(id);
    if !dir.exists() {
        return Ok(());
    }
    if let Err(problems) = journal::undo_pending(&dir, &Cgroups { id: id.to_string() }) {
        bail!(
            "undoing the interrupted restore of {id} left problems: {}",
            problems.join("; ")
        );
    }
    if !ctx.store.exists(id) {
        remove_state_dir(&dir)?;
    }
    Ok(())
}

/// Remove a container's state directory: first detach whatever is mounted below it, then
/// remove it without crossing into any mount that is still there.
pub fn remove_state_dir(dir: &Path) -> anyhow::Result<()> {
    for m in cryo_oci::fsutil::mounts_below(dir) {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).with_context(|| {
            format!(
                "cannot unmount {} before removing {}",
                m.display(),
                dir.display()
            )
        })?;
    }
    cryo_oci::fsutil::remove_tree_same_fs(dir)
        .with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(())
}
