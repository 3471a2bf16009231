//! Finding a container's freezer cgroup from its init process.

use std::path::{Path, PathBuf};

use crate::CgroupError;

/// One line of `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroupLine {
    /// Hierarchy id (0 for cgroup v2).
    pub hierarchy: u32,
    /// Controllers (empty for v2).
    pub controllers: Vec<String>,
    /// Path relative to the hierarchy root.
    pub path: String,
}

/// Parse `/proc/<pid>/cgroup`.
pub fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroupLine> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let ctrls = parts.next()?;
            let path = parts.next()?.to_string();
            Some(ProcCgroupLine {
                hierarchy,
                controllers: ctrls
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path,
            })
        })
        .collect()
}

/// Where a container's freezer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezerPath {
    /// A v1 freezer cgroup directory.
    V1(PathBuf),
    /// A v2 cgroup directory.
    V2(PathBuf),
}

/// The cgroup facts cryo needs about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// Its freezer.
    pub freezer: FreezerPath,
}

const V1_FREEZER_ROOT: &str = "/sys/fs/cgroup/freezer";

impl ContainerCgroup {
    /// From the init process: the v1 freezer when mounted (it controls the tasks on a hybrid
    /// machine), else the v2 cgroup.
    pub fn for_pid(pid: i32) -> Result<Self, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        let lines = parse_proc_cgroup(&text);
        if Path::new(V1_FREEZER_ROOT).join("freezer.state").exists()
            || Path::new(V1_FREEZER_ROOT).is_dir()
        {
            if let Some(l) = lines
                .iter()
                .find(|l| l.controllers.iter().any(|c| c == "freezer"))
            {
                return Ok(Self {
                    freezer: FreezerPath::V1(join_rel(Path::new(V1_FREEZER_ROOT), &l.path)),
                });
            }
        }
        let v2 = lines
            .iter()
            .find(|l| l.hierarchy == 0)
            .ok_or_else(|| CgroupError::NotFound {
                pid,
                what: "freezer".into(),
            })?;
        Ok(Self {
            freezer: FreezerPath::V2(join_rel(&cgroup2_mount(), &v2.path)),
        })
    }
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on hybrid machines).
pub fn cgroup2_mount() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_mount_in(&text).unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// Find the cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn join_rel(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_v1_and_v2_lines() {
        let l = parse_proc_cgroup("12:freezer:/cryo/c1\n4:cpu,cpuacct:/cryo/c1\n0::/cryo/c1\n");
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].controllers, vec!["freezer"]);
        assert_eq!(l[1].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(l[2].hierarchy, 0);
        assert_eq!(l[2].path, "/cryo/c1");
    }

    #[test]
    fn finds_cgroup2_mount() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                  31 25 0:27 / /sys/fs/cgroup/freezer rw shared:5 - cgroup cgroup rw,freezer\n";
        assert_eq!(
            cgroup2_mount_in(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in(""), None);
    }
}
