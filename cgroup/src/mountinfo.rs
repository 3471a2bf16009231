//! A pure parser for `/proc/self/mountinfo`, limited to what cgroup discovery needs.
//!
//! We parse it ourselves (rather than through libcgroups' procfs-based helpers) because
//! discovery needs each mount's root and super options together, and because a pure function of
//! the text can be unit-tested with the layouts of machines we do not run on.

use std::path::{Component, Path, PathBuf};

/// One mount from `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfoEntry {
    /// The directory of the mounted filesystem that is mounted here (`/` unless a sub-tree is
    /// bind-mounted or the reader is in a cgroup namespace).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type (`cgroup`, `cgroup2`, ...).
    pub fs_type: String,
    /// The per-superblock options; for cgroup v1 they name the hierarchy's controllers
    /// (`rw,cpu,cpuacct`, `rw,name=systemd`).
    pub super_options: Vec<String>,
}

impl MountInfoEntry {
    /// The directory, under this mount, of a cgroup given as a path relative to its hierarchy
    /// root (as in `/proc/<pid>/cgroup`), or `None` when the mount shows a different sub-tree.
    pub fn dir_of(&self, cgroup_path: &str) -> Option<PathBuf> {
        let rel = Path::new(cgroup_path).strip_prefix(&self.root).ok()?;
        // Never let a `..` in a path climb out of the hierarchy.
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return None;
        }
        Some(self.mount_point.join(rel))
    }

    fn is_v1_with(&self, controllers: &[String]) -> bool {
        self.fs_type == "cgroup"
            && !controllers.is_empty()
            && controllers.iter().all(|c| self.super_options.contains(c))
    }
}

/// Parse a mountinfo text; malformed lines are skipped (the kernel writes none, and one bad
/// line must not hide the cgroup mounts).
pub fn parse_mountinfo(text: &str) -> Vec<MountInfoEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfoEntry> {
    // The optional fields before " - " vary in number, so split there first.
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let root = unescape(left.nth(3)?);
    let mount_point = PathBuf::from(unescape(left.next()?));
    let mut right = right.split(' ');
    let fs_type = right.next()?.to_string();
    let _source = right.next()?;
    let super_options = right
        .next()?
        .split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect();
    Some(MountInfoEntry {
        root,
        mount_point,
        fs_type,
        super_options,
    })
}

/// The kernel escapes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point in a mountinfo text (`/sys/fs/cgroup/unified` on hybrid machines,
/// `/sys/fs/cgroup` on pure v2 ones). The first one wins: later ones are bind mounts (e.g.
/// into containers).
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    parse_mountinfo(mountinfo)
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// The directory of `cgroup_path` in the cgroup v2 hierarchy, if cgroup2 is mounted.
pub(crate) fn v2_dir(mounts: &[MountInfoEntry], cgroup_path: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .find_map(|m| m.dir_of(cgroup_path))
}

/// The directory of `cgroup_path` in the v1 hierarchy that carries all of `controllers`.
pub(crate) fn v1_dir(
    mounts: &[MountInfoEntry],
    controllers: &[String],
    cgroup_path: &str,
) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.is_v1_with(controllers))
        .find_map(|m| m.dir_of(cgroup_path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// This machine's layout: v1 controllers plus cgroup2 at /sys/fs/cgroup/unified.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_v2() {
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v2 = "25 20 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                  99 80 0:22 / /ctr/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount_in(""), None);
        assert_eq!(cgroup2_mount_in("garbage\n"), None);
    }

    #[test]
    fn parses_fields_and_optional_tags() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m[1].fs_type, "cgroup");
        assert_eq!(m[1].super_options, vec!["rw", "cpu", "cpuacct"]);
        assert_eq!(m[3].super_options, vec!["rw", "xattr", "name=systemd"]);
    }

    #[test]
    fn resolves_v1_and_v2_dirs() {
        let m = parse_mountinfo(HYBRID);
        let ctl = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            v1_dir(&m, &ctl("freezer"), "/cryo/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/cryo/c1"))
        );
        assert_eq!(
            v1_dir(&m, &ctl("cpu,cpuacct"), "/"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            v1_dir(&m, &ctl("name=systemd"), "/a"),
            Some(PathBuf::from("/sys/fs/cgroup/systemd/a"))
        );
        // Options match whole: "cpu" is in "rw,cpu,cpuacct", but nothing carries "cpus".
        assert!(v1_dir(&m, &ctl("cpu"), "/").is_some());
        assert_eq!(v1_dir(&m, &ctl("cpus"), "/a"), None);
        assert_eq!(v1_dir(&m, &ctl("memory"), "/a"), None);
        assert_eq!(
            v2_dir(&m, "/cryo/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/cryo/c1"))
        );
    }

    #[test]
    fn mount_root_is_stripped_and_escapes_refused() {
        let m = parse_mountinfo("50 1 0:34 /docker /mnt/fr rw - cgroup cgroup rw,freezer\n");
        let f = vec!["freezer".to_string()];
        assert_eq!(
            v1_dir(&m, &f, "/docker/abc"),
            Some(PathBuf::from("/mnt/fr/abc"))
        );
        // A cgroup outside the bind-mounted sub-tree is not reachable through this mount.
        assert_eq!(v1_dir(&m, &f, "/other"), None);
        assert_eq!(v1_dir(&m, &f, "/docker/../x"), None);
    }

    #[test]
    fn unescapes_octal() {
        let m = parse_mountinfo("1 2 0:1 / /mnt/a\\040b\\134c rw - cgroup2 none rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b\\c"));
        assert_eq!(unescape("plain\\9"), "plain\\9");
    }
}
