//! `cryo checkpoint`: stage page images → freeze → CRIU dump (pages to cryo's receiver, the
//! rootfs captured beside it) → thaw (or stop) → name and sync the images → manifest. The
//! container ends running and thawed exactly as before on every failure path, or paused if it
//! was paused, and what cryo wrote is removed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryo_cgroup::{FreezeGuard, Freezer};
use oci_spec::runtime::Spec;

use crate::criu::{rpc, CallKind, CriuCall, CriuClient, Notification};
use crate::flags::{self, DumpFlags, FlagError};
use crate::manifest::{Manifest, OpenFileRecord, PagesRecord, Timings, FORMAT};
use crate::page_receiver::{staging, PageReceiver};
use crate::plan::{dump_plan, PlanError};
use crate::rootfs::{self, RootfsKind};
use crate::{descriptors, facts};

mod steps;
mod upper;
use steps::{
    apply_plan, check_criu, detect, flush_criu_images, prepare_dirs, rootfs_record,
    signal_status_fd, sync_dir,
};
use upper::UpperCapture;

/// Snapshot of a /dev/shm the client bind-mounts from the host (docker does), in the image dir.
pub const DEVSHM_FILE: &str = "devshm.tar";

/// Oldest CRIU this kernel works with (3.17 and 4.1 fail on Linux ≥ 6.16).
pub const MIN_CRIU: u32 = 40200;

/// `--rootfs-snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Capture an overlay upper dir when the rootfs is overlay; record why not otherwise.
    Auto,
    /// Capture the overlay upper dir; fail (before freezing) if the rootfs is not overlay.
    Overlay,
    /// Never capture.
    None,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "overlay" => Ok(Self::Overlay),
            "none" => Ok(Self::None),
            o => Err(format!(
                "invalid --rootfs-snapshot value {o:?}: use auto, overlay or none"
            )),
        }
    }
}

/// Everything a checkpoint needs to know about the container and the request.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Container id.
    pub id: String,
    /// Init pid.
    pub pid: i32,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Parsed spec.
    pub spec: Spec,
    /// Host path of the rootfs.
    pub rootfs: PathBuf,
    /// What fds 0-2 of the init process were at start (runc's external descriptors).
    pub stdio: Vec<String>,
    /// `--image-path`.
    pub image_dir: PathBuf,
    /// `--work-path` (defaults to the image dir, as CRIU does).
    pub work_dir: PathBuf,
    /// The flags.
    pub flags: DumpFlags,
    /// `--rootfs-snapshot`.
    pub snapshot: SnapshotMode,
    /// `--compress-pages`: zstd the page images after the thaw ([`crate::pages`]).
    pub compress_pages: bool,
    /// Receive the pages from CRIU into images faulted in before the freeze
    /// ([`crate::page_receiver`]); off: CRIU writes them itself (`--no-page-staging`).
    pub stage_pages: bool,
    /// How long the freeze may take.
    pub freeze_timeout: Duration,
}

/// What a successful checkpoint produced.
#[derive(Debug)]
pub struct DumpReport {
    /// The manifest written (none for a pre-dump).
    pub manifest: Option<Manifest>,
    /// Whether the container's processes are gone (checkpoint without --leave-running).
    pub stopped: bool,
}

/// A failed checkpoint: which step, what went wrong, where to look.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint of container {id} failed while {step}: {detail}{after}")]
pub struct DumpError {
    /// Container id.
    pub id: String,
    /// The step.
    pub step: &'static str,
    /// What went wrong (includes paths and the CRIU log excerpt).
    pub detail: String,
    /// What state the container was left in.
    pub after: String,
    /// The CRIU log file, when CRIU was involved.
    pub log: Option<PathBuf>,
}

/// Run a checkpoint. `criu` and `freezer` are the seams tests replace.
pub fn checkpoint(
    req: &DumpRequest,
    criu: &dyn CriuClient,
    freezer: &dyn Freezer,
    interrupted: &dyn Fn() -> bool,
) -> Result<DumpReport, DumpError> {
    let started = Instant::now();
    let fail = |step: &'static str, detail: String| DumpError {
        id: req.id.clone(),
        step,
        detail,
        after: String::new(),
        log: None,
    };
    // Everything that can be refused is refused before the container is touched.
    let mut opts = flags::dump_opts(&req.flags, &req.image_dir, req.pid)
        .map_err(|e: FlagError| fail("checking options", e.to_string()))?;
    check_criu(criu, &req.flags).map_err(|e| fail("checking CRIU", e.to_string()))?;
    prepare_dirs(req).map_err(|e| fail("preparing directories", e))?;
    let facts = facts::gather_dump_facts(req.pid, &req.spec, &req.rootfs, freezer.path())
        .map_err(|e| fail("inspecting the container", e))?;
    let plan = dump_plan(&req.spec, &facts, &req.flags.common.empty_ns)
        .map_err(|e: PlanError| fail("planning the dump", e.to_string()))?;
    let rootfs_kind = detect(req).map_err(|e| fail("inspecting the root filesystem", e))?;
    apply_plan(&mut opts, &plan, &req.spec);
    if !req.flags.pre_dump {
        descriptors::write(&req.image_dir, &req.stdio).map_err(|e| {
            fail(
                "writing descriptors.json",
                format!("{}: {e}", req.image_dir.display()),
            )
        })?;
    }

    let kind = if req.flags.pre_dump {
        CallKind::PreDump
    } else {
        CallKind::Dump
    };
    // CRIU always leaves the tasks alive (and frozen, as it found them): cryo stops them only
    // after the image is complete and durable, so no failure can lose the container. The one
    // exception is runc's TCP semantics: with --tcp-established and no --leave-running CRIU
    // must kill the tasks itself so the network stays locked for the peers until the restore.
    let criu_kills =
        kind == CallKind::Dump && !req.flags.leave_running && req.flags.common.tcp_established;
    opts.set_leave_running(!criu_kills);
    let log = req.work_dir.join(kind.log_name());
    let mut extra_fds = Vec::new();
    let receiver = if receives_pages(req, kind) {
        let pids = facts::cgroup_pids(freezer.path());
        let (receiver, criu_end) = PageReceiver::start(&req.image_dir, staging::estimate(&pids))
            .map_err(|e| fail("starting the page receiver", e))?;
        let mut ps = rpc::Criu_page_server_info::new();
        ps.set_fd(CriuCall::extra_fd_number(extra_fds.len()));
        opts.ps = protobuf::MessageField::some(ps);
        extra_fds.push(criu_end);
        Some(receiver)
    } else {
        None
    };
    let call = CriuCall {
        kind,
        opts,
        images_dir: req.image_dir.clone(),
        work_dir: req.work_dir.clone(),
        extra_fds,
        inherit_stdio: false,
    };

    // ---- freeze window ----
    // cryo freezes when CRIU sends its pre-dump notification: CRIU's own start (probing the
    // kernel, parsing the tree: ~50 ms) runs while the container still runs, and CRIU then
    // finds the cgroup frozen and leaves it so. The open files are listed frozen, before CRIU
    // dumps (with --tcp-established and no --leave-running CRIU kills the tasks at its end).
    let raw_changeset = req.image_dir.join(rootfs::RAW_CHANGESET);
    let mut capture = match (&rootfs_kind, req.flags.pre_dump) {
        (Some(RootfsKind::Overlay { upper_dir, .. }), false) => Some(UpperCapture::prepare(
            upper_dir,
            &raw_changeset,
            &req.image_dir.join(rootfs::COMPRESSED_CHANGESET),
            !req.flags.link_remap,
        )),
        _ => None,
    };
    let t_dump = Instant::now();
    let mut frozen: Option<(FreezeGuard<'_>, Instant, f64)> = None;
    let mut frozen_err: Option<DumpError> = None;
    let mut open_files = Vec::new();
    let mut staging_wait_ms = 0.0;
    let status_fd = req.flags.status_fd;
    let result = {
        let mut on_notify = |n: Notification<'_>| -> Result<(), String> {
            match n.script {
                "pre-dump" if frozen.is_none() => {
                    // What the freeze will write is faulted in first, while the container runs.
                    let t = Instant::now();
                    if let Some(r) = &receiver {
                        r.wait_staged(req.freeze_timeout);
                    }
                    if let Some(c) = capture.as_mut() {
                        c.wait_prepared();
                    }
                    staging_wait_ms = ms(t.elapsed());
                    let t = Instant::now();
                    let g = FreezeGuard::freeze(freezer, req.freeze_timeout).map_err(|e| {
                        let msg = e.to_string();
                        frozen_err = Some(fail("freezing the container", msg.clone()));
                        msg
                    })?;
                    let paused = g.was_frozen_before();
                    frozen = Some((g, t, ms(t.elapsed())));
                    if !req.flags.pre_dump {
                        let pids = facts::cgroup_pids(freezer.path());
                        open_files = rootfs::collect_open_files(&pids, &req.rootfs)
                            .map_err(|e| {
                                let mut err = fail("listing open files", e.to_string());
                                err.after = thawed_or_paused(paused);
                                frozen_err = Some(err);
                                e.to_string()
                            })?
                            .into_iter()
                            .filter(|f| !f.deleted)
                            .map(|f| OpenFileRecord {
                                path: f.path,
                                size: f.size,
                            })
                            .collect();
                    }
                    // The container's tree is still; only CRIU's own temporary directory may
                    // come and go in it (see rootfs::FrozenTop).
                    if let Some(c) = capture.as_mut() {
                        c.start_beside_dump();
                    }
                    if interrupted() {
                        return Err("interrupted by a signal".into());
                    }
                }
                "status-ready" => {
                    if let Some(fd) = status_fd {
                        signal_status_fd(fd)?;
                    }
                }
                _ => {}
            }
            Ok(())
        };
        criu.call(call, &mut on_notify)
    };
    if let Some(e) = frozen_err {
        return Err(e);
    }
    let was_paused = frozen
        .as_ref()
        .is_some_and(|(g, _, _)| g.was_frozen_before());
    let fail_frozen = |step: &'static str, detail: String, log: Option<PathBuf>| DumpError {
        id: req.id.clone(),
        step,
        detail,
        after: thawed_or_paused(was_paused),
        log,
    };
    result.map_err(|e| fail_frozen("dumping with CRIU", e.to_string(), Some(log.clone())))?;
    let Some((guard, t_freeze, freeze_ms)) = frozen else {
        return Err(fail(
            "dumping with CRIU",
            "CRIU finished without sending its pre-dump notification, so the container was \
             never frozen by cryo: use CRIU >= 4.2"
                .into(),
        ));
    };
    let mut guard = Some(guard);
    let dump_ms = ms(t_dump.elapsed());
    // CRIU found the cgroup frozen by cryo: record the state the container had (see the module).
    crate::cgroup_image::record_freezer_state(&req.image_dir, was_paused)
        .map_err(|e| fail_frozen("recording the freezer state", e.to_string(), None))?;
    if interrupted() {
        return Err(fail_frozen(
            "dumping",
            "interrupted by a signal".into(),
            Some(log),
        ));
    }

    // The rootfs capture ran beside CRIU's dump (or runs now), still frozen: files and process
    // state agree.
    let t_capture = Instant::now();
    let mut rootfs_record = rootfs_record(&rootfs_kind, req.snapshot);
    let mut devshm = None;
    let mut rootfs_capture_ms = 0.0;
    if !req.flags.pre_dump {
        if let Some(c) = capture.as_mut() {
            let (report, took_ms) = c.finish();
            let report = report
                .map_err(|e| fail_frozen("capturing the overlay upper dir", e.to_string(), None))?;
            rootfs_capture_ms = took_ms;
            rootfs_record.snapshot = Some(rootfs::RAW_CHANGESET.to_string());
            rootfs_record.device_nodes = report.device_nodes.clone();
            rootfs_record.entries = report.entries;
            rootfs_record.bytes = report.bytes;
        }
        if let Some(src) = facts::host_devshm(&req.spec) {
            rootfs::capture_dir(&src, &req.image_dir.join(DEVSHM_FILE))
                .map_err(|e| fail_frozen("capturing /dev/shm", e.to_string(), None))?;
            devshm = Some(DEVSHM_FILE.to_string());
        }
    }
    let rootfs_wait_ms = ms(t_capture.elapsed());
    if interrupted() {
        return Err(fail_frozen(
            "capturing the rootfs",
            "interrupted by a signal".into(),
            None,
        ));
    }

    let stop = kind == CallKind::Dump && !req.flags.leave_running;
    let mut timings = Timings {
        freeze_ms,
        rootfs_capture_ms,
        rootfs_wait_ms,
        dump_ms,
        staging_wait_ms,
        ..Default::default()
    };
    if !stop {
        if let Some(g) = guard.take() {
            g.release()
                .map_err(|e| fail("thawing the container", e.to_string()))?;
        }
        timings.frozen_ms = ms(t_freeze.elapsed());
    }
    let t_thaw = (!stop).then(Instant::now);
    timings.before_freeze_ms = ms(t_freeze.duration_since(started));
    // ---- after the thaw (or, when stopping, still frozen: nothing is lost if this fails) ----
    // CRIU answered only after the receiver had copied every page: the container may run.
    let pages = match receiver {
        Some(r) => {
            let s = r
                .finish()
                .map_err(|e| fail("receiving the page images", e))?;
            Some(PagesRecord {
                received_bytes: s.bytes,
                staged_bytes: s.staged_bytes,
            })
        }
        None => None,
    };
    // CRIU's images go to disk while the changeset is compressed: the final syncfs then
    // has little left to write.
    let flushed = std::thread::scope(|scope| -> Result<(), DumpError> {
        let flush = scope.spawn(|| flush_criu_images(&req.image_dir, req.compress_pages));
        if let (Some(c), Some(_)) = (capture.as_mut(), &rootfs_record.snapshot) {
            let (size, took) = c.compressed();
            size.map_err(|e| fail("compressing the rootfs snapshot", e.to_string()))?;
            rootfs_record.snapshot = Some(rootfs::COMPRESSED_CHANGESET.to_string());
            timings.compress_ms = took;
        }
        flush
            .join()
            .unwrap_or_else(|_| Err("the flushing thread panicked".into()))
            .map_err(|e| fail("syncing the image", e))
    });
    flushed?;
    let mut compressed_pages = Vec::new();
    if req.compress_pages && kind == CallKind::Dump {
        let t = Instant::now();
        let (names, _) = crate::pages::compress_pages(&req.image_dir, 1, compress_threads())
            .map_err(|e| fail("compressing the page images", e))?;
        compressed_pages = names;
        timings.compress_ms += ms(t.elapsed());
    }
    if kind == CallKind::PreDump {
        return Ok(DumpReport {
            manifest: None,
            stopped: false,
        });
    }
    sync_dir(&req.image_dir).map_err(|e| fail("syncing the image", e))?;
    let spec_sha256 = crate::manifest::sha256_file(&req.bundle.join("config.json"))
        .map_err(|e| fail("hashing config.json", e.to_string()))?;
    timings.total_ms = ms(started.elapsed());
    timings.after_thaw_ms = t_thaw.map_or(0.0, |t| ms(t.elapsed()));
    let manifest = Manifest {
        format: FORMAT.into(),
        cryo_version: env!("CARGO_PKG_VERSION").into(),
        criu_version: criu.version().unwrap_or_default(),
        container_id: req.id.clone(),
        spec_sha256,
        created: chrono::Utc::now(),
        leave_running: req.flags.leave_running,
        was_paused,
        external_mounts: plan.ext_mounts.clone(),
        external_namespaces: plan.externals.clone(),
        rootfs: rootfs_record,
        devshm,
        open_files,
        compressed_pages,
        pages,
        timings,
    };
    manifest
        .write(&req.image_dir)
        .map_err(|e| fail("writing the manifest", e.to_string()))?;
    if stop {
        // The image is complete: now stop the container for good (runc semantics). Tasks are
        // killed while frozen and die as soon as the cgroup thaws.
        facts::kill_cgroup(freezer.path());
        if let Some(g) = guard.take() {
            let _ = g.force_thaw();
        }
    }
    Ok(DumpReport {
        manifest: Some(manifest),
        stopped: stop,
    })
}

/// Whether cryo receives the pages itself: for a full dump whose pages stay local (not lazy,
/// not sent to a page server of the caller's, not deduplicated against a parent image).
fn receives_pages(req: &DumpRequest, kind: CallKind) -> bool {
    req.stage_pages
        && kind == CallKind::Dump
        && !req.flags.common.lazy_pages
        && req.flags.page_server.is_none()
        && req.flags.parent_path.is_none()
}

/// What a failed checkpoint left: the container as it was before.
fn thawed_or_paused(was_paused: bool) -> String {
    if was_paused {
        "; the container was left paused, as it was before".to_string()
    } else {
        "; the container was thawed and keeps running".to_string()
    }
}

fn compress_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
