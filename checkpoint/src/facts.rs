//! Reading the live system for the planner and the engine: the container's mounts, masked
//! files, namespace inodes, the pids in its cgroup.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::plan::{ContainerMount, DumpFacts, CGROUP_ROOT};
use crate::rootfs;

/// Gather what [`crate::plan::dump_plan`] needs about container `pid`.
pub fn gather_dump_facts(
    pid: i32,
    spec: &Spec,
    rootfs_path: &Path,
    freezer: &Path,
) -> Result<DumpFacts, String> {
    let mountinfo_path = format!("/proc/{pid}/mountinfo");
    let text = std::fs::read_to_string(&mountinfo_path)
        .map_err(|e| format!("cannot read {mountinfo_path}: {e} (is the container running?)"))?;
    let mounts = rootfs::parse_mountinfo(&text)
        .into_iter()
        .map(|m| ContainerMount {
            mount_point: m.mount_point.to_string_lossy().into_owned(),
            root: m.root.to_string_lossy().into_owned(),
            fstype: m.fstype,
        })
        .collect();
    let linux = spec.linux().as_ref();
    let masked_files = linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
        .filter(|p| {
            let inside = format!("/proc/{pid}/root{p}");
            std::fs::metadata(inside).is_ok_and(|m| !m.is_dir())
        })
        .cloned()
        .collect();
    let mut ns_inodes = Vec::new();
    for ns in linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        if let Some(path) = ns.path() {
            let md = std::fs::metadata(path)
                .map_err(|e| format!("namespace file {}: {e}", path.display()))?;
            ns_inodes.push((ns.typ(), md.ino()));
        }
    }
    Ok(DumpFacts {
        rootfs: rootfs_path.to_path_buf(),
        mounts,
        masked_files,
        ns_inodes,
        freeze_cgroup: Some(freezer.to_path_buf()),
        own_cgroup_ns: own_cgroup_ns(pid)?,
        cgroup_hierarchies: cryo_cgroup::owned_hierarchies(pid).map_err(|e| e.to_string())?,
    })
}

/// Whether process `pid` runs in a cgroup namespace other than cryo's. CRIU decides the same
/// way whether the container's cgroup mounts are its own (see `plan::dump_plan`).
fn own_cgroup_ns(pid: i32) -> Result<bool, String> {
    let theirs = format!("/proc/{pid}/ns/cgroup");
    let Some(ours) = identity(Path::new("/proc/self/ns/cgroup")) else {
        return Ok(false); // a kernel without cgroup namespaces
    };
    let theirs = std::fs::metadata(&theirs)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| format!("cannot read {theirs}: {e} (is the container running?)"))?;
    Ok(theirs != ours)
}

/// Pids in a cgroup directory (`cgroup.procs` exists in v1 and v2).
pub fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILL every process of a cgroup (frozen tasks die when it thaws).
pub fn kill_cgroup(cgroup: &Path) {
    for pid in cgroup_pids(cgroup) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// (st_dev, st_ino) of a path.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Host cgroup mount points at or below /sys/fs/cgroup: v1 controllers and the cgroup2 mount
/// (`/sys/fs/cgroup/unified` on a hybrid host, `/sys/fs/cgroup` itself on a pure v2 one).
pub fn host_cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    rootfs::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(CGROUP_ROOT))
        .collect()
}

/// The host directory bind-mounted at /dev/shm, if the spec has one (docker's
/// `/var/lib/docker/containers/<id>/mounts/shm`). CRIU treats it as external and does not
/// dump its contents, so cryo snapshots it.
pub fn host_devshm(spec: &Spec) -> Option<PathBuf> {
    spec.mounts().iter().flatten().find_map(|m| {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        (bind && m.destination() == Path::new("/dev/shm"))
            .then(|| m.source().clone())
            .flatten()
            .filter(|p| p.is_dir())
    })
}
