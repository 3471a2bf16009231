//! Pure planning: which mounts and namespaces CRIU must treat as external, for a dump and for
//! a restore, computed from the spec and a few facts gathered from the live system.
//!
//! The keys follow runc exactly (ext-mount key = container path, namespace keys
//! `extRootNetNS`/`extRootPidNS`, stdio keys `pipe:[ino]`) so images move between runc and
//! cryo both ways. Nothing here touches the system: facts come in, a plan comes out.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

/// CLONE_NEWNET: runc always asks CRIU to leave the network namespace's contents alone (the
/// runtime or the client owns network setup), and so do we, to keep images interchangeable.
pub const CLONE_NEWNET: u32 = 0x4000_0000;

/// A mount as seen in the container's `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMount {
    /// Mount point, as the container sees it.
    pub mount_point: String,
    /// Path inside the mounted filesystem (`/` unless it is a bind of a subdirectory).
    pub root: String,
    /// Filesystem type.
    pub fstype: String,
}

/// Facts about the live container the dump plan needs.
#[derive(Debug, Clone, Default)]
pub struct DumpFacts {
    /// Host path of the root filesystem.
    pub rootfs: PathBuf,
    /// The container's mounts.
    pub mounts: Vec<ContainerMount>,
    /// Masked paths that exist in the container as non-directories (they are /dev/null binds).
    pub masked_files: Vec<String>,
    /// Inode of each namespace the spec gives by path: (type, inode).
    pub ns_inodes: Vec<(LinuxNamespaceType, u64)>,
    /// The container's freezer cgroup directory.
    pub freeze_cgroup: Option<PathBuf>,
    /// The container has a cgroup namespace of its own (not the one cryo runs in).
    pub own_cgroup_ns: bool,
    /// The cgroup hierarchies the container has cgroups of its own in, as `/proc/<pid>/cgroup`
    /// names them (`""` for cgroup2; see `cryo_cgroup::owned_hierarchies`).
    pub cgroup_hierarchies: Vec<String>,
}

/// One CRIU external mount: key and value as the RPC wants them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtMount {
    /// Dump: mount point in the container. Restore: the external id.
    pub key: String,
    /// Dump: the external id. Restore: the host path to mount there.
    pub val: String,
}

/// What the dump request carries besides the flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpPlan {
    /// Root of the process tree's filesystem.
    pub root: PathBuf,
    /// Mounts CRIU must not dump but expect to be provided at restore.
    pub ext_mounts: Vec<ExtMount>,
    /// `--external` entries (namespaces given by path).
    pub externals: Vec<String>,
    /// Namespaces whose contents CRIU leaves alone.
    pub empty_ns: u32,
    /// Freezer cgroup CRIU uses (already frozen by us).
    pub freeze_cgroup: Option<PathBuf>,
    /// The only cgroup hierarchies CRIU dumps (all when empty).
    pub cgroup_dump_controllers: Vec<String>,
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The spec has no linux section.
    #[error("config.json has no linux section; cryo checkpoints Linux containers only")]
    NoLinux,
    /// A namespace we cannot hand to CRIU.
    #[error("the spec joins an existing {0} namespace by path; CRIU cannot restore into it (remove its path or use a private one)")]
    UnsupportedNamespace(String),
    /// Unsupported --empty-ns value.
    #[error("namespace {0:?} is not supported by --empty-ns: only \"network\" is")]
    EmptyNs(String),
}

/// Plan a dump.
pub fn dump_plan(
    spec: &Spec,
    facts: &DumpFacts,
    empty_ns: &[String],
) -> Result<DumpPlan, PlanError> {
    let linux = spec.linux().as_ref().ok_or(PlanError::NoLinux)?;
    let mut plan = DumpPlan {
        root: facts.rootfs.clone(),
        empty_ns: empty_ns_mask(empty_ns)?,
        freeze_cgroup: facts.freeze_cgroup.clone(),
        // CRIU dumps (and at restore recreates, and with --manage-cgroups-mode full rewrites)
        // every cgroup below the task's in each hierarchy it is in: for a hierarchy where the
        // container sits in the root that is every cgroup of the host. Only the container's own.
        cgroup_dump_controllers: facts.cgroup_hierarchies.clone(),
        ..Default::default()
    };
    let mut add = |key: &str, val: &str| {
        if !plan.ext_mounts.iter().any(|m| m.key == key) {
            plan.ext_mounts.push(ExtMount {
                key: key.to_string(),
                val: val.to_string(),
            });
        }
    };
    for m in spec.mounts().iter().flatten() {
        if is_bind(m) {
            let dest = m.destination().to_string_lossy();
            add(&dest, &dest);
        }
    }
    // Without a cgroup namespace of its own, a cgroup mount below a hierarchy's root is a bind
    // of the container's host cgroup directory (libcontainer binds each v1 controller so): CRIU
    // cannot dump it, the restore side binds the new container's cgroup there. With one, the
    // runtime mounted cgroupfs itself inside the namespace; CRIU then treats those mounts as
    // rooted (the root it reads is ours, not the container's) and mounts them afresh in the
    // restored namespace, so they must not be external: a restore (ours or runc's, which makes
    // them real mounts on cgroup v2 or with a cgroup namespace) would have no mapping for them.
    if !facts.own_cgroup_ns {
        for m in &facts.mounts {
            if (m.fstype == "cgroup" || m.fstype == "cgroup2") && m.root != "/" {
                add(&m.mount_point, &m.mount_point);
            }
        }
    }
    for p in &facts.masked_files {
        add(p, "/dev/null");
    }
    for d in linux.devices().iter().flatten() {
        let p = d.path().to_string_lossy();
        add(&p, &p);
    }
    for (ty, ino) in &facts.ns_inodes {
        match ty {
            LinuxNamespaceType::Network => plan.externals.push(format!("net[{ino}]:extRootNetNS")),
            LinuxNamespaceType::Pid => plan.externals.push(format!("pid[{ino}]:extRootPidNS")),
            _ => {}
        }
    }
    Ok(plan)
}

/// Where one inherited fd of a restore comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdSource {
    /// The caller's fd 0, 1 or 2 (CRIU inherits them as its own).
    Stdio(i32),
    /// A namespace file to open and pass along.
    NsPath(PathBuf),
}

/// One `inherit_fd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritFd {
    /// CRIU's key (`pipe:[123]`, `extRootNetNS`).
    pub key: String,
    /// Where the fd comes from.
    pub source: FdSource,
}

/// Where the host mounts its cgroup hierarchies (cgroup2 itself on a pure v2 host, a tmpfs of
/// v1 controllers and often `unified` on others), and where a container sees them.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Facts about the restore target.
#[derive(Debug, Clone, Default)]
pub struct RestoreFacts {
    /// Where the target rootfs is bind-mounted for CRIU (CRIU needs a mount point).
    pub criu_root: PathBuf,
    /// Host cgroup mount points at or below [`CGROUP_ROOT`] (`/sys/fs/cgroup` on a pure v2
    /// host; `/sys/fs/cgroup/freezer`, `/sys/fs/cgroup/cpu,cpuacct`, … on a v1 or hybrid one).
    pub host_cgroup_mounts: Vec<PathBuf>,
    /// The new container's cgroup path (relative to each hierarchy root).
    pub cgroup_path: PathBuf,
}

/// What the restore request carries besides the flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestorePlan {
    /// Root to restore into.
    pub root: PathBuf,
    /// External mounts: id → host path.
    pub ext_mounts: Vec<ExtMount>,
    /// Fds CRIU must plug in.
    pub inherit_fds: Vec<InheritFd>,
    /// Namespaces to join by path: (CRIU's name, path).
    pub join_ns: Vec<(String, PathBuf)>,
    /// Namespaces whose contents CRIU leaves alone.
    pub empty_ns: u32,
}

/// Plan a restore of an image whose `descriptors.json` is `descriptors` into `spec`.
pub fn restore_plan(
    spec: &Spec,
    facts: &RestoreFacts,
    descriptors: &[String],
    empty_ns: &[String],
) -> Result<RestorePlan, PlanError> {
    let linux = spec.linux().as_ref().ok_or(PlanError::NoLinux)?;
    let mut plan = RestorePlan {
        root: facts.criu_root.clone(),
        empty_ns: empty_ns_mask(empty_ns)?,
        ..Default::default()
    };
    let mut add = |key: String, val: String| {
        if !plan.ext_mounts.iter().any(|m| m.key == key) {
            plan.ext_mounts.push(ExtMount { key, val });
        }
    };
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination().to_string_lossy().to_string();
        if is_bind(m) {
            let src = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| dest.clone());
            add(dest, src);
        } else if m.typ().as_deref() == Some("cgroup") {
            // Offer every host hierarchy, at the same place below the container's cgroup mount
            // as below the host's: the image only asks for those that were binds of host
            // cgroup directories at dump time (no cgroup namespace; and images of cryo before
            // it left namespaced cgroup mounts to CRIU), and CRIU ignores the rest.
            let rel = facts
                .cgroup_path
                .strip_prefix("/")
                .unwrap_or(&facts.cgroup_path);
            for host in &facts.host_cgroup_mounts {
                let Ok(below) = host.strip_prefix(CGROUP_ROOT) else {
                    continue;
                };
                add(join_below(Path::new(&dest), below), join_below(host, rel));
            }
        }
    }
    if linux.masked_paths().as_ref().is_some_and(|m| !m.is_empty()) {
        add("/dev/null".into(), "/dev/null".into());
    }
    for d in linux.devices().iter().flatten() {
        let p = d.path().to_string_lossy().to_string();
        add(p.clone(), p);
    }
    for (i, d) in descriptors.iter().enumerate().take(3) {
        if d.contains("pipe:") {
            plan.inherit_fds.push(InheritFd {
                key: d.clone(),
                source: FdSource::Stdio(i as i32),
            });
        }
    }
    for ns in linux.namespaces().iter().flatten() {
        let Some(path) = ns.path() else { continue };
        match ns.typ() {
            LinuxNamespaceType::Network => plan.inherit_fds.push(InheritFd {
                key: "extRootNetNS".into(),
                source: FdSource::NsPath(path.clone()),
            }),
            LinuxNamespaceType::Pid => plan.inherit_fds.push(InheritFd {
                key: "extRootPidNS".into(),
                source: FdSource::NsPath(path.clone()),
            }),
            LinuxNamespaceType::Cgroup => {
                return Err(PlanError::UnsupportedNamespace("cgroup".into()))
            }
            other => plan
                .join_ns
                .push((criu_ns_name(other).to_string(), path.clone())),
        }
    }
    Ok(plan)
}

/// `--empty-ns` values → CRIU mask; network is always in it (see [`CLONE_NEWNET`]).
pub fn empty_ns_mask(values: &[String]) -> Result<u32, PlanError> {
    for v in values {
        if v != "network" {
            return Err(PlanError::EmptyNs(v.clone()));
        }
    }
    Ok(CLONE_NEWNET)
}

/// `base/below` without the trailing `/` that joining an empty path gives.
fn join_below(base: &Path, below: &Path) -> String {
    if below.as_os_str().is_empty() {
        base.to_string_lossy().into_owned()
    } else {
        base.join(below).to_string_lossy().into_owned()
    }
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

fn criu_ns_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
