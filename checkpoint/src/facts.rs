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

/// Who a directory is, beyond its inode number, which the filesystem hands to the next
/// directory created once this one is removed: its birth time and its inode generation
/// (which ext4, xfs and btrfs change on every reuse of an inode). A copy, a re-creation or a
/// reused inode differs in at least one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirIdentity {
    /// st_dev.
    pub dev: u64,
    /// st_ino.
    pub ino: u64,
    /// Birth time (seconds, nanoseconds), when the filesystem records one.
    pub btime: Option<(i64, u32)>,
    /// Inode generation (FS_IOC_GETVERSION), when the filesystem has one.
    pub generation: Option<u64>,
}

impl DirIdentity {
    /// Whether this identity can prove sameness: a bare (dev, ino) cannot.
    pub fn is_conclusive(&self) -> bool {
        self.btime.is_some() || self.generation.is_some()
    }
}

/// The [`DirIdentity`] of a directory.
pub fn dir_identity(path: &Path) -> Option<DirIdentity> {
    use std::os::fd::AsRawFd;
    let meta = std::fs::metadata(path).ok()?;
    let dir = std::fs::File::open(path).ok()?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx fills the zeroed buffer on success; AT_EMPTY_PATH with an open fd.
    let r = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            stx.as_mut_ptr(),
        )
    };
    // SAFETY: zero-initialised, then possibly filled by statx: every field is initialised.
    let stx = unsafe { stx.assume_init() };
    let btime = (r == 0 && stx.stx_mask & libc::STATX_BTIME != 0)
        .then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec));
    let mut generation: libc::c_long = 0;
    // FS_IOC_GETVERSION = _IOR('v', 1, long).
    const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;
    // SAFETY: the ioctl writes one long into `generation`, which outlives the call.
    let g = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETVERSION, &mut generation) };
    Some(DirIdentity {
        dev: meta.dev(),
        ino: meta.ino(),
        btime,
        generation: (g == 0).then_some(generation as u64),
    })
}

/// Host cgroup mount points under /sys/fs/cgroup (v1 controllers and the v2 mount).
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

#[cfg(test)]
mod identity_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A tiny ext4 (16 inodes) mounted in a temp dir, so a freed inode number must come back.
    struct TinyExt4 {
        _dir: tempfile::TempDir,
        mnt: std::path::PathBuf,
    }

    impl TinyExt4 {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("fs.img");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            std::fs::File::create(&img)
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
            let ok = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-N", "16"])
                .arg(&img)
                .status()
                .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
            assert!(ok.success());
            let ok = std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)
                .status()
                .unwrap();
            assert!(
                ok.success(),
                "loop-mounting an ext4 image (this test runs as root)"
            );
            Self { _dir: dir, mnt }
        }
    }

    impl Drop for TinyExt4 {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.mnt).status();
        }
    }

    /// The case of issue 18: a directory removed and a new one made in its place, which
    /// ext4 gives the freed inode number, must not pass for the old one.
    #[test]
    fn a_reused_inode_is_not_the_same_directory() {
        let fs = TinyExt4::new();
        let a = fs.mnt.join("upper");
        std::fs::create_dir(&a).unwrap();
        let old = dir_identity(&a).unwrap();
        assert!(
            old.is_conclusive(),
            "ext4 records birth time and generation"
        );
        assert_eq!(dir_identity(&a), Some(old), "the same directory is itself");
        // With 16 inodes in all, the freed number comes back within a few tries.
        let mut reused = None;
        for _ in 0..16 {
            std::fs::remove_dir(&a).unwrap();
            std::fs::create_dir(&a).unwrap();
            let new = dir_identity(&a).unwrap();
            if new.ino == old.ino {
                reused = Some(new);
                break;
            }
        }
        let new = reused.expect("a 16-inode ext4 never reused the inode number");
        assert_eq!((new.dev, new.ino), (old.dev, old.ino));
        assert_ne!(
            new, old,
            "a re-created directory with the old inode number passed for the old one"
        );
        // A renamed directory is still itself.
        let b = fs.mnt.join("moved");
        std::fs::rename(&a, &b).unwrap();
        assert_eq!(dir_identity(&b), Some(new));
    }
}
