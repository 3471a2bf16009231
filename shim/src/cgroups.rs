//! Where a container's processes go in the cgroup hierarchies: where runc puts them.
//!
//! - The path: the spec's `linux.cgroupsPath`, else `/<id>` (libcontainer alone would use
//!   `:youki:<id>`). One naming for both runtimes lets a checkpoint taken by either restore
//!   under the other: CRIU finds the container's cgroups by these paths.
//! - The hierarchies: libcgroups' v1 manager places a container in the v1 controllers it
//!   knows. runc also places it in the named v1 hierarchies (`name=systemd`) and, on a hybrid
//!   host, in the cgroup2 hierarchy. [`OtherHierarchies`] does that part, so that every line of
//!   a container process's `/proc/self/cgroup` ends in the container's path, as under runc.
//!
//! On a pure cgroup v2 host libcgroups manages the only hierarchy and there are none of these.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cryo_cgroup::{parse_mountinfo, parse_proc_cgroup, MountInfoEntry, ProcCgroupLine};
use oci_spec::runtime::Spec;

/// runc's cgroup path for container `id`: the spec's `linux.cgroupsPath`, else `/<id>`.
pub fn cgroups_path(spec: &Spec, id: &str) -> PathBuf {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .unwrap_or_else(|| default_cgroups_path(id))
}

/// `/<id>`, runc's path when the spec names none.
pub fn default_cgroups_path(id: &str) -> PathBuf {
    Path::new("/").join(id)
}

/// A cgroups path as a relative path below a hierarchy's root (libcgroups, too, takes even a
/// relative `cgroupsPath` from the root). `..` is refused: it would leave the hierarchy.
fn below_root(path: &Path) -> anyhow::Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            _ => bail!("cgroup path {} leaves its hierarchy (`..`)", path.display()),
        }
    }
    Ok(rel)
}

/// One cgroup hierarchy of this host: its controllers as `/proc/self/cgroup` lists them
/// (`["cpu", "cpuacct"]`, `["name=systemd"]`, `[]` for cgroup2) and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Controllers; empty for cgroup2.
    pub controllers: Vec<String>,
    /// Mount point (host view: the mount whose root is the hierarchy's root).
    pub mount: PathBuf,
}

impl Hierarchy {
    /// The directory of `cgroups_path` in this hierarchy.
    pub fn dir(&self, cgroups_path: &Path) -> anyhow::Result<PathBuf> {
        Ok(self.mount.join(below_root(cgroups_path)?))
    }

    fn is_named(&self) -> bool {
        !self.controllers.is_empty() && self.controllers.iter().all(|c| c.starts_with("name="))
    }
}

/// Every mounted hierarchy, in `/proc/self/cgroup` order.
pub fn hierarchies() -> anyhow::Result<Vec<Hierarchy>> {
    let cgroup =
        std::fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(hierarchies_in(
        &parse_proc_cgroup(&cgroup),
        &parse_mountinfo(&mountinfo),
    ))
}

fn hierarchies_in(lines: &[ProcCgroupLine], mounts: &[MountInfoEntry]) -> Vec<Hierarchy> {
    lines
        .iter()
        .filter_map(|l| {
            let mount = mounts.iter().find(|m| {
                m.root == "/"
                    && if l.hierarchy == 0 {
                        m.fs_type == "cgroup2"
                    } else {
                        m.fs_type == "cgroup"
                            && l.controllers.iter().all(|c| m.super_options.contains(c))
                    }
            })?;
            Some(Hierarchy {
                controllers: l.controllers.clone(),
                mount: mount.mount_point.clone(),
            })
        })
        .collect()
}

/// The hierarchies runc joins and libcgroups' v1 manager leaves alone: named v1 hierarchies
/// and, when v1 controllers are mounted too (hybrid), cgroup2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherHierarchies(Vec<Hierarchy>);

impl OtherHierarchies {
    /// This host's.
    pub fn discover() -> anyhow::Result<Self> {
        Ok(Self::among(hierarchies()?))
    }

    fn among(all: Vec<Hierarchy>) -> Self {
        let has_v1 = all.iter().any(|h| !h.controllers.is_empty());
        Self(
            all.into_iter()
                .filter(|h| h.is_named() || (has_v1 && h.controllers.is_empty()))
                .collect(),
        )
    }

    /// Create `cgroups_path` in each of them and move `pid` there.
    pub fn join(&self, cgroups_path: &Path, pid: i32) -> anyhow::Result<()> {
        for h in &self.0 {
            let dir = h.dir(cgroups_path)?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create cgroup {}", dir.display()))?;
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .with_context(|| format!("cannot move pid {pid} into {}", procs.display()))?;
        }
        Ok(())
    }

    /// `cgroup.procs` of `cgroups_path` (plus `sub`) in each of them, opened for a process that
    /// moves itself in (see `workload`). A hierarchy where the container has no directory
    /// (made by an older cryo) is left out; a missing `sub` is an error, as under runc.
    pub fn procs_files(&self, cgroups_path: &Path, sub: Option<&str>) -> anyhow::Result<Vec<File>> {
        let mut files = Vec::new();
        for h in &self.0 {
            let base = h.dir(cgroups_path)?;
            if !base.is_dir() {
                tracing::debug!("{} does not exist; not joining it", base.display());
                continue;
            }
            let dir = match sub {
                Some(s) => base.join(below_root(Path::new(s))?),
                None => base,
            };
            files.push(open_procs(&dir)?);
        }
        Ok(files)
    }

    /// Remove `cgroups_path` (and any sub-cgroups made inside it) from each of them, riding
    /// out a moment of EBUSY while the last tasks are reaped. Failures are logged, not
    /// returned: the container is gone either way, as with runc.
    pub fn remove(&self, cgroups_path: &Path) {
        for h in &self.0 {
            let Ok(dir) = h.dir(cgroups_path) else {
                continue;
            };
            if dir == h.mount {
                continue; // never the hierarchy's root
            }
            if let Err(e) = remove_tree(&dir) {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// Remove the sub-cgroups below `cgroups_path` in every hierarchy, keeping its own directory;
/// failures are logged (the caller's next step reports what is left).
pub fn remove_sub_cgroups(cgroups_path: &Path) {
    let Ok(all) = hierarchies() else { return };
    for h in all {
        let Ok(dir) = h.dir(cgroups_path) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Err(e) = remove_tree(&entry.path()) {
                    tracing::warn!("cannot remove cgroup {}: {e}", entry.path().display());
                }
            }
        }
    }
}

/// `dir/cgroup.procs`, opened for writing (close-on-exec), with runc's wording when missing.
pub fn open_procs(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
                _ => e.to_string(),
            };
            anyhow::anyhow!(
                "adding pid to cgroup: open {}: {why} (create the cgroup first)",
                path.display()
            )
        })
}

/// rmdir `dir` and what is below it, deepest first (cgroup directories hold only control
/// files, which rmdir takes with them).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_CGROUP: &str =
        "9:name=systemd:/\n6:freezer:/\n4:memory:/x\n2:cpu,cpuacct:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
90 80 0:28 /c1 /ctr/sys/fs/cgroup/systemd ro - cgroup cgroup rw,xattr,name=systemd
";

    fn all(cgroup: &str, mounts: &str) -> Vec<Hierarchy> {
        hierarchies_in(&parse_proc_cgroup(cgroup), &parse_mountinfo(mounts))
    }

    #[test]
    fn runc_names_the_cgroup_after_the_id_when_the_spec_does_not() {
        let mut spec = Spec::default();
        assert_eq!(cgroups_path(&spec, "c1"), PathBuf::from("/c1"));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some("/docker/abc".into()));
        spec.set_linux(Some(linux));
        assert_eq!(cgroups_path(&spec, "c1"), PathBuf::from("/docker/abc"));
    }

    #[test]
    fn on_a_hybrid_host_the_others_are_the_named_hierarchies_and_cgroup2() {
        let others = OtherHierarchies::among(all(HYBRID_CGROUP, HYBRID_MOUNTS));
        let mounts: Vec<_> = others.0.iter().map(|h| h.mount.clone()).collect();
        assert_eq!(
            mounts,
            [
                PathBuf::from("/sys/fs/cgroup/systemd"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    #[test]
    fn on_a_pure_v2_host_there_are_none() {
        let mounts = "31 25 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(OtherHierarchies::among(all("0::/user.slice\n", mounts))
            .0
            .is_empty());
    }

    #[test]
    fn a_mount_of_a_sub_tree_is_not_the_hierarchy() {
        let mounts =
            "90 80 0:28 /c1 /ctr/sys/fs/cgroup/systemd ro - cgroup cgroup rw,name=systemd\n";
        assert!(all("9:name=systemd:/\n", mounts).is_empty());
    }

    #[test]
    fn paths_stay_inside_their_hierarchy() {
        let h = Hierarchy {
            controllers: vec!["name=systemd".into()],
            mount: "/sys/fs/cgroup/systemd".into(),
        };
        assert_eq!(
            h.dir(Path::new("/c1")).expect("dir"),
            PathBuf::from("/sys/fs/cgroup/systemd/c1")
        );
        assert_eq!(
            h.dir(Path::new("pod/c1")).expect("dir"),
            PathBuf::from("/sys/fs/cgroup/systemd/pod/c1")
        );
        assert!(h.dir(Path::new("/c1/../../etc")).is_err());
    }

    #[test]
    fn a_missing_cgroup_is_named_with_runcs_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = open_procs(&dir.path().join("nonexistent")).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("adding pid "), "{msg}");
        assert!(
            msg.contains("/nonexistent/cgroup.procs: no such file "),
            "{msg}"
        );
    }

    #[test]
    fn removing_takes_sub_directories_first_and_ignores_what_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = dir.path().join("c1");
        std::fs::create_dir_all(c.join("foo/bar")).expect("mkdir");
        remove_tree(&c).expect("remove");
        assert!(!c.exists());
        remove_tree(&c).expect("gone already");
    }
}
