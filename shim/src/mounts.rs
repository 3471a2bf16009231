//! A spec's bind mounts the way runc names them to CRIU.
//!
//! At checkpoint and restore runc hands CRIU each bind mount as an external mount keyed by
//! where it is mounted in the container and, at restore, the host path to mount there. Two
//! details of runc's matter for images to restore:
//! - a relative `source` is relative to the bundle (runc runs from the bundle directory; CRIU
//!   does not);
//! - a `destination` through a symlink in the rootfs is mounted where the link leads, and the
//!   container's mount table (what CRIU dumps) shows that path: runc resolves the link inside
//!   the rootfs, never leaving it.
//!
//! And before a restore runc makes the mount points of the bind mounts again: a mount point
//! inside another bind mount lives in that mount's source, where something may have removed
//! it since the checkpoint, and CRIU does not make it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;

/// `spec` with its bind mounts' sources made absolute against `bundle` and their destinations
/// resolved inside `rootfs`.
pub fn as_criu_sees_them(spec: &Spec, bundle: &Path, rootfs: &Path) -> Spec {
    let mut spec = spec.clone();
    let Some(mounts) = spec.mounts().clone() else {
        return spec;
    };
    let mounts = mounts
        .into_iter()
        .map(|mut m| {
            if is_bind(&m) {
                if let Some(src) = m.source().clone().filter(|s| s.is_relative()) {
                    m.set_source(Some(bundle.join(src)));
                }
                let dest = resolve_in_root(rootfs, m.destination());
                m.set_destination(dest);
            }
            m
        })
        .collect();
    spec.set_mounts(Some(mounts));
    spec
}

/// Create the missing mount points of `spec`'s bind mounts (as [`as_criu_sees_them`] names them):
/// in the source of the closest bind mount above, or else in `rootfs`. A directory, or an empty
/// file when the source is a file.
pub fn make_bind_mountpoints(spec: &Spec, rootfs: &Path) -> std::io::Result<()> {
    let binds: Vec<_> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| is_bind(m))
        .filter_map(|m| Some((m.destination().clone(), m.source().clone()?)))
        .collect();
    for (dest, source) in &binds {
        let host = host_path_of(dest, &binds, rootfs);
        if host.symlink_metadata().is_ok() {
            continue;
        }
        if source.is_dir() {
            std::fs::create_dir_all(&host)?;
        } else {
            if let Some(parent) = host.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&host)?;
        }
    }
    Ok(())
}

/// Where container path `dest` is on the host, seen through the deepest bind mount above it
/// (`binds`: destination → source), else through the rootfs.
fn host_path_of(dest: &Path, binds: &[(PathBuf, PathBuf)], rootfs: &Path) -> PathBuf {
    binds
        .iter()
        .filter(|(d, _)| d != dest && dest.starts_with(d))
        .max_by_key(|(d, _)| d.components().count())
        .map(|(d, src)| src.join(dest.strip_prefix(d).unwrap_or(dest)))
        .unwrap_or_else(|| rootfs.join(dest.strip_prefix("/").unwrap_or(dest)))
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// `path` (absolute in the container) with the symlinks on the way followed inside `root`,
/// as a path in the container again. A link that would climb above the root stays at it; a
/// part that does not exist (yet) is taken as it is.
pub fn resolve_in_root(root: &Path, path: &Path) -> PathBuf {
    const MAX_LINKS: usize = 40;
    let mut pending: VecDeque<OsString> = names(path).collect();
    let mut resolved = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let on_host = root.join(candidate.strip_prefix("/").unwrap_or(&candidate));
        match std::fs::read_link(&on_host) {
            Ok(target) if links < MAX_LINKS => {
                links += 1;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for (i, n) in names(&target).enumerate() {
                    pending.insert(i, n);
                }
            }
            _ => resolved = candidate,
        }
    }
    resolved
}

/// The names of a path, `..` kept, `/` and `.` dropped.
fn names(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_followed_inside_the_root_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir_all(r.join("real/conf")).expect("mkdir");
        std::os::unix::fs::symlink("/real/conf", r.join("conf")).expect("abs link");
        std::os::unix::fs::symlink("real", r.join("rel")).expect("rel link");
        std::os::unix::fs::symlink("../../../../etc", r.join("escape")).expect("escape");
        let at = |p: &str| resolve_in_root(r, Path::new(p));
        assert_eq!(at("/conf"), PathBuf::from("/real/conf"));
        assert_eq!(at("/rel/conf"), PathBuf::from("/real/conf"));
        assert_eq!(at("/escape/passwd"), PathBuf::from("/etc/passwd"));
        assert_eq!(at("/not/there"), PathBuf::from("/not/there"));
    }

    #[test]
    fn a_nested_mount_point_is_made_in_the_outer_mounts_source() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (rootfs, outer, inner) = (
            tmp.path().join("rootfs"),
            tmp.path().join("bind1"),
            tmp.path().join("bind2"),
        );
        for d in [&rootfs, &outer, &inner] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(tmp.path().join("file"), "x").expect("file");
        let bind = |dest: &str, src: &Path| {
            oci_spec::runtime::MountBuilder::default()
                .destination(dest)
                .source(src)
                .typ("bind")
                .options(vec!["rw".to_string(), "bind".to_string()])
                .build()
                .expect("mount")
        };
        let mut spec = crate::commands::spec::runc_default_spec_for(false).expect("spec");
        spec.set_mounts(Some(vec![
            bind("/test", &outer),
            bind("/test/for/nested", &inner),
            bind("/etc/f", &tmp.path().join("file")),
        ]));
        make_bind_mountpoints(&spec, &rootfs).expect("mountpoints");
        assert!(rootfs.join("test").is_dir());
        assert!(outer.join("for/nested").is_dir(), "inside the outer source");
        assert!(
            !rootfs.join("test/for").exists(),
            "not under the outer mount point"
        );
        assert!(rootfs.join("etc/f").is_file());
    }

    #[test]
    fn relative_bind_sources_are_the_bundles() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut spec = crate::commands::spec::runc_default_spec_for(false).expect("spec");
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        let bind = oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .source("./data")
            .options(vec!["bind".to_string()])
            .build()
            .expect("mount");
        mounts.push(bind);
        spec.set_mounts(Some(mounts));
        let seen = as_criu_sees_them(&spec, Path::new("/bundle"), root.path());
        let data = seen
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/data"))
            .expect("bind");
        assert_eq!(data.source().as_deref(), Some(Path::new("/bundle/./data")));
        let proc = seen
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/proc"))
            .expect("proc");
        assert_eq!(
            proc.source().as_deref(),
            Some(Path::new("proc")),
            "not a bind"
        );
    }
}
