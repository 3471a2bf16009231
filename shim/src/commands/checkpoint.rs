//! `checkpoint`: gather the container's facts and hand them to the engine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use cryo_cgroup::{freezer_for, ContainerCgroup};
use cryo_checkpoint::criu::swrk::SwrkClient;
use cryo_checkpoint::dump::{self, DumpRequest, SnapshotMode};
use cryo_checkpoint::flags::{CommonFlags, DumpFlags};
use cryo_checkpoint::signals::InterruptGuard;
use cryo_oci::Verb;

use super::{delete_settling, load_for};
use crate::cli::CheckpointArgs;
use crate::context::Context;
use crate::logging;

/// How long a freeze may take before cryo gives up and thaws.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// runc's default: `./checkpoint` relative to the caller's directory.
pub fn image_dir(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    Ok(match arg {
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => cwd.join(p),
        None => cwd.join("checkpoint"),
    })
}

/// `checkpoint`
pub fn checkpoint(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    let snapshot: SnapshotMode = a.rootfs_snapshot.parse().map_err(anyhow::Error::msg)?;
    let _lock = ctx.store.lock(id)?;
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
    let rootfs = match &record {
        Some(r) => r.rootfs.clone(),
        None => cryo_oci::rootfs_path(&bundle, &spec)?,
    };
    let spec = crate::mounts::as_criu_sees_them(&spec, &bundle, &rootfs);
    let stdio = record
        .map(|r| r.stdio)
        .unwrap_or_else(|| cryo_checkpoint::descriptors::read_stdio(pid));
    let image_dir = image_dir(a.image_path.as_deref())?;
    let work_dir = match &a.work_path {
        Some(w) => image_dir
            .parent()
            .map(|_| w.clone())
            .unwrap_or_else(|| w.clone()),
        None => image_dir.clone(),
    };
    let cgroup = ContainerCgroup::for_pid(pid)?;
    let freezer = freezer_for(&cgroup);
    let req = DumpRequest {
        id: id.clone(),
        pid,
        bundle,
        spec,
        rootfs,
        stdio,
        image_dir,
        work_dir,
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
        stage_pages: !a.no_page_staging,
        freeze_timeout: FREEZE_TIMEOUT,
    };
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let report = dump::checkpoint(&req, &SwrkClient::default(), freezer.as_ref(), &|| {
        interrupts.interrupted()
    })?;
    drop(interrupts);
    if let Some(m) = &report.manifest {
        logging::log(
            "debug",
            &format!(
                "checkpointed {id}: frozen {:.1} ms (freeze {:.2} ms, rootfs {:.1} ms, dump {:.1} ms), total {:.1} ms",
                m.timings.frozen_ms, m.timings.freeze_ms, m.timings.rootfs_capture_ms, m.timings.dump_ms, m.timings.total_ms
            ),
        );
    }
    if report.stopped {
        // runc semantics: a checkpoint without --leave-running ends the container.
        // Loaded afresh: CRIU has just ended the processes the record above still shows.
        delete_settling(ctx, id, Verb::ForceDelete, true)
            .with_context(|| format!("checkpoint done, but removing container {id} failed"))?;
    }
    Ok(0)
}
