//! `checkpoint`: gather the container's facts and hand them to the engine.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use cryo_cgroup::{freezer_for, ContainerCgroup, Freezer, FreezerState};
use cryo_checkpoint::criu::swrk::SwrkClient;
use cryo_checkpoint::criu::CriuClient;
use cryo_checkpoint::dump::{self, DumpEnv, DumpRequest, SnapshotMode};
use cryo_checkpoint::flags::{CommonFlags, DumpFlags};
use cryo_checkpoint::gpu;
use cryo_checkpoint::page_receiver::Mode as StagingMode;
use cryo_checkpoint::signals::InterruptGuard;
use cryo_oci::Verb;

use super::{delete_settling, load_for};
use crate::cli::CheckpointArgs;
use crate::context::Context;
use crate::logging;

/// runc's default: `./checkpoint` relative to the caller's directory.
pub fn image_dir(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(match arg {
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => cwd.join(p),
        None => cwd.join("checkpoint"),
    })
}

/// After a failed checkpoint of a GPU container: bring back the CUDA state CRIU's plugin could
/// not (CRIU killed mid-dump), unless the container is paused (the tool would wait on frozen
/// processes); what was done joins the error.
fn recover_gpu(
    plan: &gpu::GpuPlan,
    freezer: &dyn Freezer,
    e: dump::CheckpointError,
) -> anyhow::Error {
    let frozen = freezer.state().map_or(true, |s| s != FreezerState::Thawed);
    let notes = if frozen {
        vec![
            "the container is paused: its CUDA state was not checked (resume it, then run \
              `cuda-checkpoint --get-state --pid <pid>` on its processes)"
                .to_string(),
        ]
    } else {
        plan.recover(&cryo_checkpoint::facts::cgroup_pids(freezer.path()))
    };
    let e = anyhow::Error::from(e);
    if notes.is_empty() {
        return e;
    }
    e.context(format!("GPU state after the failure: {}", notes.join("; ")))
}

/// `checkpoint`
pub fn checkpoint(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<i32> {
    // Every file this verb makes holds the container's memory or files: private.
    // SAFETY: umask only swaps the process's file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    if a.store.is_some() {
        return super::store::checkpoint(ctx, a);
    }
    if a.group.is_some() || !a.more_ids.is_empty() {
        return super::group::checkpoint(ctx, a);
    }
    let image_dir = image_dir(a.image_path.as_deref())?;
    let job = Job::load(ctx, a, image_dir)?;
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let report = job.run(ctx, &|| interrupts.interrupted())?;
    drop(interrupts);
    if report.stopped {
        // runc semantics: a checkpoint without --leave-running ends the container.
        // Loaded afresh: CRIU has just ended the processes the record above still shows.
        let id = &job.req.id;
        delete_settling(ctx, id, Verb::ForceDelete, true)
            .with_context(|| format!("checkpoint done, but removing container {id} failed"))?;
    }
    Ok(0)
}

/// The one container a checkpoint names (a group checkpoint names several).
pub fn container_id(a: &CheckpointArgs) -> anyhow::Result<&str> {
    a.container_id
        .as_deref()
        .context("checkpoint needs a container id")
}

/// The checkpoint request for container `id` (whose lock the caller holds), into `image_dir`,
/// and the container's cgroup.
pub(super) fn request_for(
    ctx: &Context,
    a: &CheckpointArgs,
    id: &str,
    image_dir: PathBuf,
) -> anyhow::Result<(DumpRequest, ContainerCgroup)> {
    let snapshot: SnapshotMode = a.rootfs_snapshot.parse().map_err(anyhow::Error::msg)?;
    let container = load_for(ctx, id, Verb::Checkpoint)?;
    let pid = container
        .pid()
        .context("the container has no init pid")?
        .as_raw();
    let record = ctx.store.load(id)?;
    // The user's bundle (libcontainer's may be cryo's copy of the spec, see `run_bundle`).
    let bundle = record
        .as_ref()
        .map(|r| r.bundle.clone())
        .unwrap_or_else(|| container.bundle().clone());
    let spec = cryo_oci::load_spec(&bundle)?;
    // A GPU container this machine cannot checkpoint is refused here, before anything is
    // touched, with every reason.
    let gpu = gpu::preflight(&spec, &ctx.gpu)
        .with_context(|| format!("cannot checkpoint container {id}"))?;
    if gpu.is_some() && a.pre_dump {
        bail!(
            "cannot pre-dump container {id}: it uses an NVIDIA GPU, and CRIU's CUDA plugin \
             does not take part in pre-dumps; take a full checkpoint"
        );
    }
    let rootfs = match &record {
        Some(r) => r.rootfs.clone(),
        None => cryo_oci::rootfs_path(&bundle, &spec)?,
    };
    let spec = crate::mounts::as_criu_sees_them(&spec, &bundle, &rootfs);
    let stdio = record
        .map(|r| r.stdio)
        .unwrap_or_else(|| cryo_checkpoint::descriptors::read_stdio(pid));
    let cgroup = ContainerCgroup::for_pid(pid)?;
    let req = DumpRequest {
        id: id.to_string(),
        pid,
        bundle,
        spec,
        rootfs,
        stdio,
        image_dir,
        work_dir: a.work_path.clone(),
        flags: DumpFlags {
            common: CommonFlags {
                tcp_established: a.tcp_established,
                ext_unix_sk: a.ext_unix_sk,
                shell_job: a.shell_job,
                file_locks: a.file_locks,
                manage_cgroups_mode: a.manage_cgroups_mode.clone(),
                empty_ns: a.empty_ns.clone(),
                auto_dedup: a.auto_dedup,
                lazy_pages: a.lazy_pages,
                network_lock: a.network_lock.clone(),
            },
            leave_running: a.leave_running,
            tcp_skip_in_flight: a.tcp_skip_in_flight,
            link_remap: a.link_remap,
            pre_dump: a.pre_dump,
            parent_path: a.parent_path.clone(),
            page_server: a.page_server.clone(),
            status_fd: a.status_fd,
        },
        snapshot,
        compress_pages: a.compress_pages,
        // Page-cache staging where the images are read whole right after the dump.
        stage_pages: (!a.no_page_staging).then_some(if a.compress_pages {
            StagingMode::PageCache
        } else {
            StagingMode::Memory
        }),
        freeze_timeout: a.freeze_timeout.map(Duration::from_secs),
        criu_timeout: Duration::from_secs(a.criu_timeout),
        failure_log_dir: Some(ctx.store.container_dir(id)),
        gpu,
        parent: None,
    };
    Ok((req, cgroup))
}

/// A container loaded for one checkpoint, its lock held until this is dropped. The request
/// is complete but for where the image goes (`req.image_dir`, `req.parent`).
pub struct Job {
    /// What the engine gets.
    pub req: DumpRequest,
    freezer: Box<dyn Freezer>,
    lock: cryo_oci::StoreLock,
}

impl Job {
    /// Lock and load container `a.container_id` and gather what its checkpoint needs.
    pub fn load(ctx: &Context, a: &CheckpointArgs, image_dir: PathBuf) -> anyhow::Result<Self> {
        let id = container_id(a)?;
        let lock = ctx.store.lock(id)?;
        let (req, cgroup) = request_for(ctx, a, id, image_dir)?;
        let freezer = freezer_for(&cgroup);
        Ok(Self { req, freezer, lock })
    }

    /// Run the checkpoint; `interrupted` says whether SIGINT/SIGTERM/SIGHUP arrived.
    pub fn run(
        &self,
        ctx: &Context,
        interrupted: &dyn Fn() -> bool,
    ) -> anyhow::Result<dump::DumpReport> {
        let req = &self.req;
        let id = &req.id;
        let criu_timeout = req.criu_timeout.as_secs();
        let mut swrk = SwrkClient::new(&ctx.criu)
            .with_probe_timeout(Duration::from_secs(criu_timeout.min(30)));
        if let Some(plan) = &req.gpu {
            swrk = plan.swrk_client(swrk);
        }
        let gpu_criu = gpu::GpuCriu::new(&swrk);
        let criu: &dyn CriuClient = if req.gpu.is_some() { &gpu_criu } else { &swrk };
        let launcher = super::guardian::Launcher::new(ctx);
        let env = DumpEnv {
            criu,
            freezer: self.freezer.as_ref(),
            guardian: &launcher,
            lock: Some(self.lock.as_fd()),
            interrupted,
        };
        let report = match (dump::checkpoint(req, &env), &req.gpu) {
            (Ok(r), _) => r,
            (Err(e), Some(plan)) => return Err(recover_gpu(plan, self.freezer.as_ref(), e)),
            (Err(e), None) => return Err(e.into()),
        };
        for w in &report.warnings {
            logging::log("warning", w);
        }
        if let Some(m) = &report.manifest {
            logging::log(
                "debug",
                &format!(
                    "checkpointed {id} into {}: frozen {:.1} ms (freeze {:.2} ms, rootfs {:.1} ms, dump {:.1} ms), digests {:.1} ms, total {:.1} ms",
                    report.image_dir.display(), m.timings.frozen_ms, m.timings.freeze_ms, m.timings.rootfs_capture_ms, m.timings.dump_ms, m.timings.digest_ms, m.timings.total_ms
                ),
            );
        }
        Ok(report)
    }
}
