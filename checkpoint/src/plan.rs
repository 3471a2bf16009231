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
    // cgroup v1 controllers that the runtime bind-mounted from the host (no cgroupns): CRIU
    // cannot dump a bind of a host cgroup directory, the restore side provides it again.
    for m in &facts.mounts {
        if (m.fstype == "cgroup" || m.fstype == "cgroup2") && m.root != "/" {
            add(&m.mount_point, &m.mount_point);
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

/// Facts about the restore target.
#[derive(Debug, Clone, Default)]
pub struct RestoreFacts {
    /// Where the target rootfs is bind-mounted for CRIU (CRIU needs a mount point).
    pub criu_root: PathBuf,
    /// Host cgroup mount points (`/sys/fs/cgroup/freezer`, `/sys/fs/cgroup/cpu,cpuacct`, …).
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
            // Offer every host controller: the image only asks for those the runtime
            // bind-mounted at dump time (runc and libcontainer both bind them, with or
            // without a cgroup namespace), and CRIU ignores the rest.
            for host in &facts.host_cgroup_mounts {
                let Some(name) = host.file_name() else {
                    continue;
                };
                let rel = facts
                    .cgroup_path
                    .strip_prefix("/")
                    .unwrap_or(&facts.cgroup_path);
                add(
                    Path::new(&dest).join(name).to_string_lossy().to_string(),
                    host.join(rel).to_string_lossy().to_string(),
                );
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
