//! The checkpoint's steps that need no state of the freeze window: checks, directories,
//! rootfs detection and record, CRIU options from the plan, and syncing the image.

use std::path::Path;

use oci_spec::runtime::Spec;

use super::{DumpRequest, SnapshotMode, MIN_CRIU};
use crate::criu::{CriuClient, CriuError, Features};
use crate::facts;
use crate::flags::{self, DumpFlags};
use crate::manifest::RootfsRecord;
use crate::plan::DumpPlan;
use crate::rootfs::{self, RootfsKind};

/// Checks CRIU's version and the features the flags need; returns the version, which the
/// manifest records (asked once: every query is a CRIU process of its own).
pub(super) fn check_criu(criu: &dyn CriuClient, f: &DumpFlags) -> Result<u32, CriuError> {
    let v = criu.version()?;
    if v < MIN_CRIU {
        return Err(CriuError::TooOld {
            found: format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100),
            needed: "4.2".into(),
        });
    }
    let needs_track = f.pre_dump || f.parent_path.is_some();
    if needs_track || f.common.lazy_pages {
        let got = criu.features(Features {
            mem_track: needs_track,
            lazy_pages: f.common.lazy_pages,
        })?;
        if needs_track && !got.mem_track {
            return Err(CriuError::Missing(
                "CRIU is missing features: pre-dump and --parent-path need dirty-memory tracking \
                 (soft-dirty), which this kernel does not provide (CONFIG_MEM_SOFT_DIRTY is off). \
                 Take a full checkpoint instead (omit --pre-dump/--parent-path)."
                    .into(),
            ));
        }
        if f.common.lazy_pages && !got.lazy_pages {
            return Err(CriuError::Missing(
                "CRIU is missing features: --lazy-pages needs userfaultfd support in CRIU and the kernel"
                    .into(),
            ));
        }
    }
    Ok(v)
}

pub(super) fn detect(req: &DumpRequest) -> Result<Option<RootfsKind>, String> {
    if req.snapshot == SnapshotMode::None || req.flags.pre_dump {
        return Ok(None);
    }
    let kind = rootfs::detect_rootfs(&req.rootfs).map_err(|e| e.to_string())?;
    if req.snapshot == SnapshotMode::Overlay && !matches!(kind, RootfsKind::Overlay { .. }) {
        return Err(format!(
            "--rootfs-snapshot overlay was asked, but {} is not an overlay mount ({}); use --rootfs-snapshot auto",
            req.rootfs.display(),
            kind_name(&kind)
        ));
    }
    Ok(Some(kind))
}

fn kind_name(kind: &RootfsKind) -> String {
    match kind {
        RootfsKind::Overlay { .. } => "overlay".into(),
        RootfsKind::Directory { .. } => "directory".into(),
        RootfsKind::Other { fstype, .. } => format!("other:{fstype}"),
    }
}

pub(super) fn rootfs_record(kind: &Option<RootfsKind>, mode: SnapshotMode) -> RootfsRecord {
    let mut r = RootfsRecord {
        kind: kind
            .as_ref()
            .map(kind_name)
            .unwrap_or_else(|| "unknown".into()),
        upper_dir: None,
        upper_identity: None,
        upper_fingerprint: None,
        snapshot: None,
        skipped_because: None,
        device_nodes: Vec::new(),
        entries: 0,
        bytes: 0,
        logical_bytes: None,
    };
    match kind {
        Some(RootfsKind::Overlay { upper_dir, .. }) => {
            r.upper_dir = Some(upper_dir.clone());
            r.upper_identity = facts::identity(upper_dir);
            r.upper_fingerprint = facts::dir_identity(upper_dir);
        }
        Some(RootfsKind::Directory { .. }) => r.skipped_because = Some(
            "the rootfs is a plain directory, not an overlay: its changes cannot be told apart \
                 from the image, so restore needs the same directory"
                .into(),
        ),
        Some(RootfsKind::Other { fstype, .. }) => {
            r.skipped_because = Some(format!("the rootfs is a {fstype} mount, not an overlay"))
        }
        None if mode == SnapshotMode::None => {
            r.skipped_because = Some("--rootfs-snapshot none".into())
        }
        None => r.skipped_because = Some("pre-dump".into()),
    }
    r
}

pub(super) fn apply_plan(opts: &mut crate::criu::rpc::Criu_opts, plan: &DumpPlan, spec: &Spec) {
    opts.set_root(plan.root.to_string_lossy().into_owned());
    for m in &plan.ext_mounts {
        let mut e = crate::criu::rpc::Ext_mount_map::new();
        e.set_key(m.key.clone());
        e.set_val(m.val.clone());
        opts.ext_mnt.push(e);
    }
    opts.external.extend(plan.externals.iter().cloned());
    opts.set_empty_ns(plan.empty_ns);
    if let Some(cg) = &plan.freeze_cgroup {
        opts.set_freeze_cgroup(cg.to_string_lossy().into_owned());
    }
    opts.cgroup_dump_controller
        .extend(plan.cgroup_dump_controllers.iter().cloned());
    if let Some(cfg) = flags::config_file(spec.annotations().as_ref()) {
        opts.set_config_file(cfg);
    }
}

pub(super) fn signal_status_fd(fd: i32) -> Result<(), String> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: --status-fd names an fd the caller opened for us and hands over; we write one
    // byte and close it, as runc does.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(&[0])
        .map_err(|e| format!("writing to --status-fd {fd}: {e}"))
}

/// fdatasync every CRIU image file in `dir`: not cryo's changeset (the raw one is replaced by
/// the compressed one, which is still being written beside this and goes to disk with the
/// final syncfs), nor page images about to be compressed.
pub(super) fn flush_criu_images(dir: &Path, pages_compressed_next: bool) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let skip = name == rootfs::RAW_CHANGESET
            || name == rootfs::COMPRESSED_CHANGESET
            || (pages_compressed_next && crate::pages::is_page_image(&name))
            || !e.file_type().is_ok_and(|t| t.is_file());
        if skip {
            continue;
        }
        let f = std::fs::File::open(e.path()).map_err(|err| format!("{name}: {err}"))?;
        f.sync_data()
            .map_err(|err| format!("fdatasync {name}: {err}"))?;
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), String> {
    let f = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f))
        .map_err(|e| format!("syncfs {}: {e}", dir.display()))
}
