//! Finding a container's cgroups: its freezer (to stop it for a checkpoint) and every
//! hierarchy path (for CRIU's cgroup roots).

use std::path::{Component, Path, PathBuf};

use crate::mountinfo::{parse_mountinfo, v1_dir, v2_dir, MountInfoEntry};
use crate::CgroupError;

pub use crate::mountinfo::cgroup2_mount_in;

/// How cgroups are mounted on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// Only cgroup v1 hierarchies.
    Legacy,
    /// cgroup v1 controllers plus an (often controller-less) cgroup2 at `/sys/fs/cgroup/unified`.
    Hybrid,
    /// Only cgroup2, at `/sys/fs/cgroup`.
    Unified,
}

/// Detect the cgroup setup (libcgroups already does this well; we only map its answer).
pub fn cgroup_setup() -> Result<Setup, CgroupError> {
    use libcgroups::common::{get_cgroup_setup, CgroupSetup};
    match get_cgroup_setup() {
        Ok(CgroupSetup::Legacy) => Ok(Setup::Legacy),
        Ok(CgroupSetup::Hybrid) => Ok(Setup::Hybrid),
        Ok(CgroupSetup::Unified) => Ok(Setup::Unified),
        Err(source) => Err(CgroupError::Setup { source }),
    }
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroupLine {
    /// Hierarchy id (0 for cgroup v2).
    pub hierarchy: u32,
    /// Controllers, e.g. `["cpu", "cpuacct"]` or `["name=systemd"]` (empty for v2).
    pub controllers: Vec<String>,
    /// Path relative to the hierarchy root, e.g. `/cryo/c1`.
    pub path: String,
}

/// Parse `/proc/<pid>/cgroup`; malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroupLine> {
    text.lines()
        .filter_map(|l| {
            // splitn: the path itself may contain ':'.
            let mut parts = l.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            let path = parts.next()?.to_string();
            Some(ProcCgroupLine {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// Where a container's freezer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezerPath {
    /// A directory in the v1 freezer hierarchy (under `/sys/fs/cgroup/freezer`).
    V1(PathBuf),
    /// A directory in the cgroup2 hierarchy.
    V2(PathBuf),
}

impl FreezerPath {
    /// The cgroup directory, whichever the version.
    pub fn dir(&self) -> &Path {
        match self {
            FreezerPath::V1(p) | FreezerPath::V2(p) => p,
        }
    }
}

/// The cgroup facts cryo needs about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// Its freezer.
    pub freezer: FreezerPath,
}

impl ContainerCgroup {
    /// The freezer of a running process (the container's init): its v1 freezer cgroup when
    /// that hierarchy is mounted, because on a hybrid machine the v1 freezer is what the
    /// container runtime put the tasks in; else its cgroup2 directory.
    pub fn for_pid(pid: i32) -> Result<Self, CgroupError> {
        let lines = read_proc_cgroup(pid)?;
        let mounts = read_mountinfo()?;
        Self::resolve(&lines, &mounts).ok_or_else(|| CgroupError::NotFound {
            pid,
            what: "freezer cgroup of its own (it is in no mounted freezer or cgroup2 \
                   hierarchy, or only in a root cgroup, which cannot be frozen)"
                .into(),
        })
    }

    /// The freezer for a spec's `linux.cgroupsPath`, taken relative to each hierarchy's root
    /// as libcgroups does when it creates the cgroups. The directory is not required to exist.
    pub fn from_cgroups_path(cgroups_path: &Path) -> Result<Self, CgroupError> {
        let rel = validate_cgroups_path(cgroups_path)?;
        let mounts = read_mountinfo()?;
        let freezer = ["freezer".to_string()];
        // Same preference as for_pid: the v1 freezer when mounted.
        if let Some(dir) = v1_dir(&mounts, &freezer, &rel) {
            return Ok(Self {
                freezer: FreezerPath::V1(dir),
            });
        }
        v2_dir(&mounts, &rel)
            .map(|dir| Self {
                freezer: FreezerPath::V2(dir),
            })
            .ok_or(CgroupError::InvalidPath {
                path: cgroups_path.to_path_buf(),
                reason: "neither a cgroup v1 freezer hierarchy nor cgroup2 is mounted \
                         (see /proc/self/mountinfo)",
            })
    }

    /// The pure core of [`ContainerCgroup::for_pid`]. A root cgroup is never chosen: the root
    /// cannot be frozen, and falling back to the other version may still find a real one.
    fn resolve(lines: &[ProcCgroupLine], mounts: &[MountInfoEntry]) -> Option<Self> {
        let freezer = ["freezer".to_string()];
        let v1 = lines
            .iter()
            .filter(|l| l.hierarchy != 0 && l.controllers.iter().any(|c| c == "freezer"))
            .filter(|l| !is_root(&l.path))
            .find_map(|l| v1_dir(mounts, &freezer, &l.path))
            .map(FreezerPath::V1);
        let v2 = || {
            lines
                .iter()
                .filter(|l| l.hierarchy == 0 && !is_root(&l.path))
                .find_map(|l| v2_dir(mounts, &l.path))
                .map(FreezerPath::V2)
        };
        v1.or_else(v2).map(|freezer| Self { freezer })
    }
}

/// Every hierarchy directory of a process, as `(controllers, dir)`: one per mounted v1
/// hierarchy (`"cpu,cpuacct"`, `"freezer"`, `"name=systemd"`) and `("", dir)` for cgroup2, in
/// the order of `/proc/<pid>/cgroup`. Hierarchies not mounted in cryo's mount namespace are left
/// out: there is no directory to name.
pub fn v1_controller_paths(pid: i32) -> Result<Vec<(String, PathBuf)>, CgroupError> {
    let lines = read_proc_cgroup(pid)?;
    let mounts = read_mountinfo()?;
    let paths = controller_paths(&lines, &mounts);
    if paths.is_empty() {
        return Err(CgroupError::NotFound {
            pid,
            what: "cgroup in any mounted hierarchy".into(),
        });
    }
    Ok(paths)
}

/// The hierarchies in which process `pid` has a cgroup of its own, named as
/// `/proc/<pid>/cgroup` names them (`"freezer"`, `"cpu,cpuacct"`, `""` for cgroup2): those
/// mounted in cryo's mount namespace in which it is not in the root cgroup. A runtime puts a
/// container in a cgroup of its own in the hierarchies it manages; where the container sits in
/// the root (the cgroup2 of a hybrid host, `name=systemd` without systemd), or a hierarchy that
/// is not mounted here (v1 hierarchies below a host that mounts only cgroup2) is not one.
pub fn owned_hierarchies(pid: i32) -> Result<Vec<String>, CgroupError> {
    Ok(owned(&read_proc_cgroup(pid)?, &read_mountinfo()?))
}

fn owned(lines: &[ProcCgroupLine], mounts: &[MountInfoEntry]) -> Vec<String> {
    controller_paths(
        &lines
            .iter()
            .filter(|l| !is_root(&l.path))
            .cloned()
            .collect::<Vec<_>>(),
        mounts,
    )
    .into_iter()
    .map(|(controllers, _)| controllers)
    .collect()
}

fn controller_paths(lines: &[ProcCgroupLine], mounts: &[MountInfoEntry]) -> Vec<(String, PathBuf)> {
    lines
        .iter()
        .filter_map(|l| {
            let dir = if l.hierarchy == 0 {
                v2_dir(mounts, &l.path)
            } else {
                v1_dir(mounts, &l.controllers, &l.path)
            };
            if dir.is_none() {
                tracing::debug!(
                    "cgroup hierarchy {} ({:?}) is not mounted",
                    l.hierarchy,
                    l.path
                );
            }
            Some((l.controllers.join(","), dir?))
        })
        .collect()
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on hybrid machines); `/sys/fs/cgroup`,
/// the standard place, when mountinfo cannot be read or shows none.
pub fn cgroup2_mount() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_mount_in(&text).unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

fn is_root(cgroup_path: &str) -> bool {
    Path::new(cgroup_path)
        .components()
        .all(|c| matches!(c, Component::RootDir))
}

/// A cgroups path must name a cgroup below the root and stay inside the hierarchy.
fn validate_cgroups_path(p: &Path) -> Result<String, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: p.to_path_buf(),
        reason,
    };
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid("it must not contain `..`"))
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(invalid("it names the root cgroup, which cannot be frozen"));
    }
    let rel = rel
        .to_str()
        .ok_or_else(|| invalid("it is not valid UTF-8"))?;
    Ok(format!("/{rel}"))
}

fn read_proc_cgroup(pid: i32) -> Result<Vec<ProcCgroupLine>, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse_proc_cgroup(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CgroupError::NotFound {
            pid,
            what: "such process".into(),
        }),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

fn read_mountinfo() -> Result<Vec<MountInfoEntry>, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    std::fs::read_to_string(&path)
        .map(|t| parse_mountinfo(&t))
        .map_err(|source| CgroupError::Read { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HYBRID: &str = "\
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";

    fn resolve(proc: &str, mi: &str) -> Option<FreezerPath> {
        ContainerCgroup::resolve(&parse_proc_cgroup(proc), &parse_mountinfo(mi)).map(|c| c.freezer)
    }

    #[test]
    fn parses_v1_and_v2_lines() {
        let l = parse_proc_cgroup(
            "12:freezer:/cryo/c1\n4:cpu,cpuacct:/cryo/c1\n1:name=systemd:/a:b\n0::/cryo/c1\nbad\n",
        );
        assert_eq!(l.len(), 4);
        assert_eq!(l[0].hierarchy, 12);
        assert_eq!(l[0].controllers, vec!["freezer"]);
        assert_eq!(l[1].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(l[2].controllers, vec!["name=systemd"]);
        assert_eq!(l[2].path, "/a:b");
        assert_eq!(l[3].hierarchy, 0);
        assert!(l[3].controllers.is_empty());
        assert_eq!(l[3].path, "/cryo/c1");
    }

    #[test]
    fn hybrid_prefers_the_v1_freezer() {
        let proc = "6:freezer:/cryo/c1\n0::/cryo/v2\n";
        assert_eq!(
            resolve(proc, HYBRID),
            Some(FreezerPath::V1("/sys/fs/cgroup/freezer/cryo/c1".into()))
        );
    }

    #[test]
    fn falls_back_to_v2() {
        // Pure v2 machine.
        assert_eq!(
            resolve("0::/cryo/c1\n", PURE_V2),
            Some(FreezerPath::V2("/sys/fs/cgroup/cryo/c1".into()))
        );
        // Hybrid, but the process sits in the v1 freezer root: only v2 can freeze it alone.
        assert_eq!(
            resolve("6:freezer:/\n0::/cryo/c1\n", HYBRID),
            Some(FreezerPath::V2("/sys/fs/cgroup/unified/cryo/c1".into()))
        );
        // A freezer line whose hierarchy is not mounted here.
        assert_eq!(
            resolve("6:freezer:/x\n0::/y\n", PURE_V2),
            Some(FreezerPath::V2("/sys/fs/cgroup/y".into()))
        );
    }

    #[test]
    fn root_cgroups_are_never_chosen() {
        assert_eq!(resolve("6:freezer:/\n0::/\n", HYBRID), None);
        assert_eq!(resolve("", HYBRID), None);
    }

    #[test]
    fn lists_every_hierarchy() {
        let proc = "6:freezer:/c\n4:cpu,cpuacct:/c\n3:memory:/c\n0::/c\n";
        let p = controller_paths(&parse_proc_cgroup(proc), &parse_mountinfo(HYBRID));
        let want: Vec<(String, PathBuf)> = vec![
            ("freezer".into(), "/sys/fs/cgroup/freezer/c".into()),
            ("cpu,cpuacct".into(), "/sys/fs/cgroup/cpu,cpuacct/c".into()),
            // memory is not mounted in this mountinfo: left out.
            ("".into(), "/sys/fs/cgroup/unified/c".into()),
        ];
        assert_eq!(p, want);
    }

    #[test]
    fn owned_hierarchies_are_the_mounted_ones_below_the_root() {
        // Hybrid: a container in v1 cgroups of its own, in the roots of cgroup2 and systemd's.
        let proc = "9:name=systemd:/\n6:freezer:/c\n4:cpu,cpuacct:/c\n3:memory:/c\n0::/\n";
        let mi = format!(
            "{HYBRID}40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        );
        assert_eq!(
            owned(&parse_proc_cgroup(proc), &parse_mountinfo(&mi)),
            vec!["freezer", "cpu,cpuacct"]
        );
        // Pure cgroup v2 (also as scripts/pure-v2 emulates it: the v1 lines are there, their
        // hierarchies are not mounted).
        let proc = "6:freezer:/cryo-pure-v2.1\n3:memory:/x\n0::/cryo/c1\n";
        assert_eq!(
            owned(&parse_proc_cgroup(proc), &parse_mountinfo(PURE_V2)),
            vec![""]
        );
        assert!(owned(&parse_proc_cgroup("0::/\n"), &parse_mountinfo(PURE_V2)).is_empty());
    }

    #[test]
    fn cgroups_path_validation() {
        assert_eq!(
            validate_cgroups_path(Path::new("/cryo/c1")).unwrap(),
            "/cryo/c1"
        );
        // Relative paths are relative to the hierarchy root, as libcgroups treats them.
        assert_eq!(
            validate_cgroups_path(Path::new("cryo/./c1")).unwrap(),
            "/cryo/c1"
        );
        for bad in ["/", "", "/a/../../etc"] {
            let e = validate_cgroups_path(Path::new(bad)).unwrap_err();
            assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad}: {e}");
        }
    }

    /// On this machine (hybrid, see the crate docs) libcgroups answers and the answer agrees
    /// with the mounts; on others it must at least not contradict them.
    #[test]
    fn setup_matches_mounts() {
        let setup = cgroup_setup().unwrap();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let v2 = cgroup2_mount_in(&mi);
        match setup {
            Setup::Unified => assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup"))),
            Setup::Hybrid => assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified"))),
            Setup::Legacy => assert!(
                v2.as_deref() != Some(Path::new("/sys/fs/cgroup"))
                    && v2.as_deref() != Some(Path::new("/sys/fs/cgroup/unified"))
            ),
        }
    }
}
