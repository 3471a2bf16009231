//! `restore`: the host side of a restore (cgroups via libcgroups, hooks via libcontainer,
//! state via libcontainer's store) around the engine.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cryo_checkpoint::criu::{swrk::SwrkClient, CriuClient};
use cryo_checkpoint::flags::CommonFlags;
use cryo_checkpoint::gpu;
use cryo_checkpoint::manifest::Manifest;
use cryo_checkpoint::restore::journal::CgroupUndo;
use cryo_checkpoint::restore::{
    self, RestoreEnv, RestoreFlags, RestoreHost, RestoreReport, RestoreRequest,
};
use cryo_checkpoint::signals::InterruptGuard;
use cryo_oci::{Bundle, ContainerRecord};
use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus, State};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Spec};

use super::checkpoint::image_dir;
use super::wait_forwarding;
use crate::cli::RestoreArgs;
use crate::context::Context;

/// `restore`
pub fn restore(ctx: &Context, a: &RestoreArgs) -> anyhow::Result<i32> {
    let image_dir = image_dir(a.image_path.as_deref())?;
    if cryo_checkpoint::group::is_group_image(&image_dir) {
        return super::group::restore(ctx, a, &image_dir);
    }
    let id = a
        .container_id
        .as_ref()
        .context("restore needs a container id")?;
    let bundle = Bundle::load(&a.bundle)?;
    let lock = ctx.store.lock(id)?;
    let work_dir = a.work_path.clone().unwrap_or_else(|| image_dir.clone());
    let m = prepare(ctx, a, id, bundle, &image_dir, work_dir)?;
    // An image with CUDA state, or a GPU bundle, that this machine cannot restore is refused
    // here, before anything is created, with every reason.
    let image_gpu = Manifest::read(&image_dir)
        .ok()
        .flatten()
        .and_then(|m| m.gpu);
    let gpu = gpu::restore_preflight(&m.bundle.spec, image_gpu.as_ref(), &image_dir, &ctx.gpu)
        .with_context(|| format!("cannot restore container {id}"))?;
    if !a.detach && !a.no_subreaper {
        // Orphans of the restored tree must come back to us so we can reap them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    let mut host = m.host();
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let mut swrk = SwrkClient::new(&ctx.criu)
        .with_probe_timeout(Duration::from_secs(a.criu_timeout.min(30)));
    if let Some(plan) = &gpu {
        swrk = plan.swrk_client(swrk);
    }
    let gpu_criu = gpu::GpuCriu::new(&swrk);
    let criu: &dyn CriuClient = if gpu.is_some() { &gpu_criu } else { &swrk };
    let launcher = super::guardian::Launcher::new(ctx);
    let env = RestoreEnv {
        criu,
        guardian: &launcher,
        lock: Some(lock.as_fd()),
        interrupted: &|| interrupts.interrupted(),
    };
    let pending = match restore::restore(&m.req, &env, &mut host) {
        Ok(p) => p,
        Err(e) => {
            // Everything the restore made is undone; the directory it started from goes too.
            m.remove_state_dir();
            return Err(e.into());
        }
    };
    // The state first, then the commit: a restore is committed only once the container is
    // on record (dropping `pending` on an error here undoes it, the process included).
    if let Err(e) = m.record(ctx, &pending.report) {
        drop(pending);
        m.remove_state_dir();
        return Err(e.context(format!(
            "restored {id}, but recording its state failed; the restore was undone"
        )));
    }
    let report = pending.commit();
    drop(interrupts);
    if let Some(plugin) = gpu_criu.last_plugin_log() {
        crate::logging::log(
            "debug",
            &format!(
                "CRIU's CUDA plugin resumed {} process(es): {:.1} ms",
                plugin.cuda_pids.len(),
                plugin.timings.map_or(0.0, |t| t.resume_ms)
            ),
        );
    }
    for w in &report.warnings {
        crate::logging::log("warning", w);
    }
    crate::logging::log(
        "debug",
        &format!(
            "restored {id} as pid {} in {:.1} ms (image verified in {:.1} ms; {})",
            report.pid, report.restore_ms, report.verify_ms, report.rootfs_note
        ),
    );
    if a.detach {
        return Ok(0);
    }
    drop(lock);
    let code = wait_forwarding(Pid::from_raw(report.pid));
    let _lock = ctx.store.lock(id)?;
    if let Ok(mut c) = Container::load(m.container_dir.clone()) {
        let _ = c.delete(true);
    }
    Ok(code)
}

/// A restore of container `id` ready to run: the checks done, the request made.
pub(super) struct Prepared {
    /// The container's id.
    pub id: String,
    /// Its bundle.
    pub bundle: Bundle,
    /// The engine's request.
    pub req: RestoreRequest,
    youki_cfg: YoukiConfig,
    container_dir: PathBuf,
}

/// Check that `id` can be restored from `image_dir` into `bundle` (the caller holds its lock)
/// and make the request; nothing is created but the state root.
pub(super) fn prepare(
    ctx: &Context,
    a: &RestoreArgs,
    id: &str,
    bundle: Bundle,
    image_dir: &std::path::Path,
    work_dir: PathBuf,
) -> anyhow::Result<Prepared> {
    let rootfs = bundle.rootfs()?;
    if ctx.store.exists(id) {
        bail!("container with id {id} already exists: restore under another id or delete it first");
    }
    // What an earlier restore of this id left when it was killed goes first.
    super::cleanup::undo_half_made(ctx, id)?;
    let container_dir = ctx.store.container_dir(id);
    // The state dir is made by the restore itself, once its guardian runs (so a kill at any
    // moment leaves none behind); only its parent must exist here, resolved.
    create_private_dir(ctx.store.root())?;
    let youki_cfg = YoukiConfig::from_spec(&bundle.spec, id)?;
    let req = RestoreRequest {
        id: id.to_string(),
        bundle: bundle.dir.clone(),
        spec: bundle.spec.clone(),
        rootfs: rootfs.canonicalize().unwrap_or(rootfs.clone()),
        image_dir: image_dir.to_path_buf(),
        work_dir,
        // CRIU finds its root mount by path in mountinfo, which shows resolved paths: docker's
        // --root /var/run/… must become /run/… or CRIU cannot match the mount (as runc does).
        scratch_dir: ctx
            .store
            .root()
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", ctx.store.root().display()))?
            .join(id),
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        cgroup_path: youki_cfg.cgroup_path.clone(),
        flags: RestoreFlags {
            common: CommonFlags {
                tcp_established: a.tcp_established,
                ext_unix_sk: a.ext_unix_sk,
                shell_job: a.shell_job,
                file_locks: a.file_locks,
                manage_cgroups_mode: a.manage_cgroups_mode.clone(),
                empty_ns: a.empty_ns.clone(),
                auto_dedup: false,
                lazy_pages: a.lazy_pages,
                network_lock: a.network_lock.clone(),
            },
            tcp_close: a.tcp_close,
            lsm_profile: a.lsm_profile.clone(),
            lsm_mount_context: a.lsm_mount_context.clone(),
            no_rootfs_restore: a.no_rootfs_restore,
        },
        criu_timeout: Duration::from_secs(a.criu_timeout),
    };
    Ok(Prepared {
        id: id.to_string(),
        bundle,
        req,
        youki_cfg,
        container_dir,
    })
}

impl Prepared {
    /// The cgroups and hooks of this restore.
    pub fn host(&self) -> Host {
        Host::new(
            &self.id,
            &self.bundle.spec,
            &self.bundle.dir,
            self.youki_cfg.cgroup_path.clone(),
        )
    }

    /// Record the restored container's state (libcontainer's and cryo's).
    pub fn record(&self, ctx: &Context, report: &RestoreReport) -> anyhow::Result<()> {
        let record = ContainerRecord {
            id: self.id.clone(),
            bundle: self.bundle.dir.clone(),
            rootfs: self.req.rootfs.clone(),
            stdio: report.stdio.clone(),
            terminal: self
                .bundle
                .spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false),
            created: chrono::Utc::now(),
            restored_from: Some(self.req.image_dir.clone()),
        };
        let mut container = Container::new(
            &self.id,
            ContainerStatus::Running,
            Some(report.pid),
            &self.bundle.dir,
            &self.container_dir,
        )?;
        container.state.created = Some(chrono::Utc::now());
        container.save()?;
        self.youki_cfg.save(&self.container_dir)?;
        ctx.store.save(&record)?;
        Ok(())
    }

    /// Remove the state directory of a restore that was undone.
    pub fn remove_state_dir(&self) {
        if let Err(rm) = super::cleanup::remove_state_dir(&self.container_dir) {
            crate::logging::log("warning", &format!("{rm:#}"));
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// cgroups and hooks for the engine.
pub(super) struct Host {
    id: String,
    spec: Spec,
    bundle: PathBuf,
    cgroup_path: PathBuf,
    manager: Option<AnyCgroupManager>,
    original: Vec<(PathBuf, String)>,
}

impl Host {
    fn new(id: &str, spec: &Spec, bundle: &std::path::Path, cgroup_path: PathBuf) -> Self {
        Self {
            id: id.to_string(),
            spec: spec.clone(),
            bundle: bundle.to_path_buf(),
            cgroup_path,
            manager: None,
            original: Vec::new(),
        }
    }
}

/// Our own cgroup memberships as (hierarchy mount dir, path inside it).
fn own_cgroups() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cryo_cgroup::parse_proc_cgroup(&text)
        .into_iter()
        .filter_map(|l| {
            let ctrls = l.controllers.join(",");
            let mount = if l.hierarchy == 0 {
                cryo_cgroup::discovery::cgroup2_mount()
            } else {
                let name = ctrls.strip_prefix("name=").unwrap_or(&ctrls);
                PathBuf::from("/sys/fs/cgroup").join(name)
            };
            mount.is_dir().then_some((mount, l.path, ctrls))
        })
        .collect()
}

impl RestoreHost for Host {
    fn join_cgroup(&mut self) -> Result<Vec<(String, String)>, String> {
        self.original = own_cgroups().into_iter().map(|(m, p, _)| (m, p)).collect();
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| e.to_string())?;
        manager
            .add_task(Pid::this())
            .map_err(|e| format!("joining {}: {e}", self.cgroup_path.display()))?;
        let default = LinuxResources::default();
        let resources = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .unwrap_or(&default);
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| format!("applying resources: {e}"))?;
        self.manager = Some(manager);
        // CRIU puts the restored tasks below the cgroups it runs in: name them per controller.
        Ok(own_cgroups()
            .into_iter()
            .filter(|(_, _, ctrls)| !ctrls.is_empty())
            .map(|(_, path, ctrls)| (ctrls, path))
            .collect())
    }

    fn leave_cgroup(&mut self) {
        let me = std::process::id().to_string();
        for (mount, path) in &self.original {
            let _ = std::fs::write(
                mount
                    .join(path.trim_start_matches('/'))
                    .join("cgroup.procs"),
                &me,
            );
        }
    }

    fn run_hooks(&mut self, pid: i32) -> Result<(), String> {
        // CRIU made a fresh, empty network namespace (runc's empty_ns): give it the loopback
        // a created container has, before CRIU reconnects TCP sockets over it.
        if super::lifecycle::owns_new_netns(&self.spec) {
            super::lifecycle::loopback_up(pid).map_err(|e| format!("{e:#}"))?;
        }
        let Some(hooks) = self.spec.hooks().as_ref() else {
            return Ok(());
        };
        let state = State::new(
            &self.id,
            ContainerStatus::Created,
            Some(pid),
            self.bundle.clone(),
        );
        for list in [hooks.prestart(), hooks.create_runtime()] {
            libcontainer::hooks::run_hooks(
                list.as_ref(),
                Some(&state),
                Some(&self.bundle),
                Some(Pid::from_raw(pid)),
                None,
            )
            .map_err(|e| format!("hook failed: {e}"))?;
        }
        Ok(())
    }
}

impl CgroupUndo for Host {
    fn destroy(&self, cgroup_path: &std::path::Path) {
        super::cleanup::destroy_cgroup(&self.id, cgroup_path);
    }
}
