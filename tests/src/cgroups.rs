//! The machine's cgroup layout as the tests see it: a hybrid host (v1 controllers, cgroup2 at
//! `/sys/fs/cgroup/unified`) or a pure cgroup v2 host (`scripts/pure-v2` emulates one), and
//! where a container's cgroups are in it.

use std::path::{Path, PathBuf};

/// How cgroups are mounted where the tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One cgroup2 mount at /sys/fs/cgroup.
    Unified,
    /// v1 hierarchies below a tmpfs at /sys/fs/cgroup (with or without cgroup2 in `unified`).
    Hybrid,
}

impl Layout {
    /// As `CRYO_TEST_CGROUP_LAYOUT` names it.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Unified => "unified",
            Layout::Hybrid => "hybrid",
        }
    }
}

/// The layout of this machine (of this mount namespace).
pub fn layout() -> Layout {
    let fs = nix::sys::statfs::statfs("/sys/fs/cgroup").unwrap();
    if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        Layout::Unified
    } else {
        Layout::Hybrid
    }
}

/// Every cgroup mount (v1 and v2) at or below /sys/fs/cgroup, with its super options.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let opts = r.nth(1).unwrap_or_default().to_string();
            (fstype.starts_with("cgroup") && mount_point.starts_with("/sys/fs/cgroup"))
                .then(|| (PathBuf::from(mount_point), fstype, opts))
        })
        .collect()
}

/// The directory of `cgroup_path` (relative to the hierarchy root) in every hierarchy mounted
/// here.
pub fn dirs_of(cgroup_path: &str) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .map(|(m, _, _)| m.join(cgroup_path.trim_start_matches('/')))
        .collect()
}

/// Fails unless no hierarchy has a cgroup at `cgroup_path`.
pub fn assert_no_cgroup(cgroup_path: &str) {
    let left: Vec<PathBuf> = dirs_of(cgroup_path)
        .into_iter()
        .filter(|d| d.exists())
        .collect();
    assert!(
        left.is_empty(),
        "cgroup {cgroup_path} left behind: {left:?}"
    );
}

/// The cgroup of process `pid` in the hierarchy that freezes it: the v1 freezer where one is
/// mounted (cryo freezes there on a hybrid host), else cgroup2.
pub fn freezer_dir(pid: i64) -> PathBuf {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = cgroup_mounts();
    let v1 = mounts
        .iter()
        .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == "freezer"));
    let (mount, prefix) = match v1 {
        Some((m, _, _)) => (m.clone(), ":freezer:"),
        None => {
            let (m, _, _) = mounts.iter().find(|(_, t, _)| t == "cgroup2").unwrap();
            (m.clone(), "0::")
        }
    };
    let path = cg
        .lines()
        .find_map(|l| {
            if prefix == "0::" {
                l.strip_prefix(prefix)
            } else {
                l.split_once(prefix).map(|(_, p)| p)
            }
        })
        .unwrap_or_else(|| panic!("process {pid} has no {prefix} line: {cg}"));
    mount.join(path.trim_start_matches('/'))
}

/// `FROZEN` or `THAWED`, from the v1 `freezer.state` or cgroup2's `cgroup.events`.
pub fn freezer_state(pid: i64) -> String {
    let dir = freezer_dir(pid);
    let v1 = dir.join("freezer.state");
    if v1.exists() {
        return std::fs::read_to_string(v1).unwrap().trim().to_string();
    }
    let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap();
    if events.lines().any(|l| l == "frozen 1") {
        "FROZEN".into()
    } else {
        "THAWED".into()
    }
}

/// The cgroup path of `pid` in the hierarchy that freezes it (see [`freezer_dir`]), relative to
/// the hierarchy's root.
pub fn cgroup_path_of(pid: i64) -> String {
    let dir = freezer_dir(pid);
    let mount = cgroup_mounts()
        .into_iter()
        .map(|(m, _, _)| m)
        .filter(|m| dir.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .unwrap();
    format!("/{}", dir.strip_prefix(&mount).unwrap().display())
}

/// Whether `controller` can be used for a container's cgroup here: a mounted v1 hierarchy
/// carries it, or the cgroup2 root offers it to its children.
pub fn has_controller(controller: &str) -> bool {
    cgroup_mounts().into_iter().any(|(m, t, o)| {
        if t == "cgroup" {
            o.split(',').any(|x| x == controller)
        } else {
            std::fs::read_to_string(Path::new(&m).join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .any(|c| c == controller)
        }
    })
}
