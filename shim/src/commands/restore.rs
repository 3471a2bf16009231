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
use crate::cgroups::{cgroups_path, OtherHierarchies};
use crate::cli::RestoreArgs;
use crate::context::Context;
use crate::run_bundle::RunBundle;

/// `restore`
pub fn restore(ctx: &Context, a: &RestoreArgs) -> anyhow::Result<i32> {
    super::check_pid_file(a.pid_file.as_deref())?;
    if a.store.is_some() {
        return super::store::restore(ctx, a);
    }
    let image_dir = image_dir(a.image_path.as_deref())?;
    if cryo_checkpoint::group::is_group_image(&image_dir) {
        return super::group::restore(ctx, a, &image_dir);
    }
    let lock = ctx.store.lock(container_id(a)?)?;
    let pid = restore_image(ctx, a, image_dir, &lock)?;
    wait(ctx, a, pid, lock)
}

/// The one container a restore names (a group image names its members itself).
pub fn container_id(a: &RestoreArgs) -> anyhow::Result<&str> {
    a.container_id
        .as_deref()
        .context("restore needs a container id (only a group image restores without one)")
}

/// Why the image was refused, when that is why a restore failed (before anything was
/// touched).
pub fn image_refused(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<restore::RestoreError>()?.cause.as_ref() {
        restore::RestoreCause::Image(why) => Some(why.to_string()),
        _ => None,
    }
}

/// Restore `a.container_id` from the image in `image_dir` and record it; `lock` is the
/// container's, held by the caller. Returns the restored init's pid.
pub fn restore_image(
    ctx: &Context,
    a: &RestoreArgs,
    image_dir: PathBuf,
    lock: &cryo_oci::StoreLock,
) -> anyhow::Result<i32> {
    let id = container_id(a)?;
    let bundle = Bundle::load(&a.bundle)?;
    // An image with CUDA state, or a GPU bundle, that this machine cannot restore is refused
    // here, before anything is created, with every reason.
    let image_gpu = Manifest::read(&image_dir)
        .ok()
        .flatten()
        .and_then(|m| m.gpu);
    let gpu = gpu::restore_preflight(&bundle.spec, image_gpu.as_ref(), &image_dir, &ctx.gpu)
        .with_context(|| format!("cannot restore container {id}"))?;
    let work_dir = a.work_path.clone().unwrap_or_else(|| image_dir.clone());
    let m = prepare(ctx, a, id, bundle, &image_dir, work_dir)?;
    if !a.detach && !a.no_subreaper {
        // Orphans of the restored tree must come back to us so we can reap them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    let mut host = m.host();
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let mut swrk =
        SwrkClient::new(&ctx.criu).with_probe_timeout(Duration::from_secs(a.criu_timeout.min(30)));
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
            "restored {id} as pid {} in {:.1} ms (image verified in {:.1} ms{}; {})",
            report.pid,
            report.restore_ms,
            report.verify_ms,
            report.pages_check.map_or(String::new(), |t| format!(
                ", its pages beside CRIU in {:.1} ms, waited for {:.1} ms, \
                 {} MiB not read by the restore left unchecked",
                t.hashed_ms,
                t.waited_ms,
                t.unread_bytes >> 20
            )),
            report.rootfs_note
        ),
    );
    Ok(report.pid)
}

/// Without `--detach`, wait for the restored container `pid` and exit with its status.
pub fn wait(
    ctx: &Context,
    a: &RestoreArgs,
    pid: i32,
    lock: cryo_oci::StoreLock,
) -> anyhow::Result<i32> {
    if a.detach {
        return Ok(0);
    }
    let id = container_id(a)?;
    let container_dir = ctx.store.container_dir(id);
    drop(lock);
    let code = wait_forwarding(Pid::from_raw(pid));
    let _lock = ctx.store.lock(id)?;
    if let Ok(mut c) = Container::load(container_dir) {
        let _ = super::delete_container(&mut c, true);
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
    manage_cgroups_mode: Option<String>,
}

/// Check that `id` can be restored from `image_dir` into `bundle` (the caller holds its lock)
/// and make the request; nothing is created but the state root and the bind mounts' mount
/// points.
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
    if a.manage_cgroups_mode.as_deref() == Some("ignore") && owns_new_cgroup_ns(&bundle.spec) {
        bail!(
            "--manage-cgroups-mode ignore cannot restore a container with a cgroup namespace: \
             CRIU then restores no cgroup namespace, and the container would see the host's \
             cgroup tree. Restore with soft (the default), full or strict, or remove the cgroup \
             namespace from {}",
            bundle.dir.join("config.json").display()
        );
    }
    let container_dir = ctx.store.container_dir(id);
    // The state dir is made by the restore itself, once its guardian runs (so a kill at any
    // moment leaves none behind); only its parent must exist here, resolved.
    create_private_dir(ctx.store.root())?;
    // runc's cgroup naming (see `cgroups`); cryo's copy of the spec saying so is written with
    // the state (see `run_bundle`): later execs read it.
    let mut run_spec = bundle.spec.clone();
    if let Some(mut linux) = run_spec.linux().clone() {
        linux.set_cgroups_path(Some(cgroups_path(&bundle.spec, id)));
        run_spec.set_linux(Some(linux));
    }
    let youki_cfg = YoukiConfig::from_spec(&run_spec, id)?;
    let criu_spec = crate::mounts::as_criu_sees_them(&bundle.spec, &bundle.dir, &rootfs);
    crate::mounts::make_bind_mountpoints(&criu_spec, &rootfs)
        .context("cannot make the bind mounts' mount points")?;
    let req = RestoreRequest {
        id: id.to_string(),
        bundle: bundle.dir.clone(),
        spec: criu_spec,
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
        manage_cgroups_mode: a.manage_cgroups_mode.clone(),
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
            self.manage_cgroups_mode.as_deref(),
        )
    }

    /// Record the restored container's state (libcontainer's, cryo's copy of the spec, and
    /// cryo's record).
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
        let run_bundle = RunBundle::write_into_state(&self.container_dir, &self.id, &self.bundle)?;
        let mut container = Container::new(
            &self.id,
            ContainerStatus::Running,
            Some(report.pid),
            run_bundle.as_deref().unwrap_or(&self.bundle.dir),
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

/// The spec asks for a cgroup namespace of the container's own (no path).
fn owns_new_cgroup_ns(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup && n.path().is_none()
            })
        })
}

/// cgroups and hooks for the engine.
pub(super) struct Host {
    id: String,
    spec: Spec,
    bundle: PathBuf,
    cgroup_path: PathBuf,
    /// `--manage-cgroups-mode strict`: CRIU makes the container's cgroups (see `join_cgroup`).
    criu_makes_cgroups: bool,
    manager: Option<AnyCgroupManager>,
    /// Where cryo was before joining: (hierarchy directory of its cgroup).
    original: Vec<PathBuf>,
    /// The hierarchies runc also places a container in (see `cgroups`).
    others: OtherHierarchies,
}

impl Host {
    fn new(
        id: &str,
        spec: &Spec,
        bundle: &std::path::Path,
        cgroup_path: PathBuf,
        manage_cgroups_mode: Option<&str>,
    ) -> Self {
        Self {
            id: id.to_string(),
            spec: spec.clone(),
            bundle: bundle.to_path_buf(),
            cgroup_path,
            criu_makes_cgroups: manage_cgroups_mode == Some("strict"),
            manager: None,
            original: Vec::new(),
            others: OtherHierarchies::discover().unwrap_or_default(),
        }
    }

    /// CRIU's `cg_root` for the container's new cgroups, which CRIU is to make: its path in
    /// each hierarchy a container is placed in, named as CRIU names hierarchies. That is
    /// cgroup2 alone on a pure v2 host; elsewhere every mounted hierarchy, since cryo places a
    /// container in the named and cgroup2 hierarchies too, as runc does (see `cgroups`).
    fn new_cgroup_roots(&self) -> Result<Vec<(String, String)>, String> {
        let unified =
            cryo_cgroup::cgroup_setup().map_err(|e| e.to_string())? == cryo_cgroup::Setup::Unified;
        let path = self.cgroup_path.to_string_lossy().into_owned();
        Ok(own_cgroups()
            .into_iter()
            .filter(|c| !unified || c.controllers.is_empty())
            .map(|c| (c.controllers, path.clone()))
            .collect())
    }
}

/// One of cryo's own cgroups, in a hierarchy mounted here.
struct OwnCgroup {
    /// As `/proc/self/cgroup` names the hierarchy (`""` for cgroup2).
    controllers: String,
    /// Path inside the hierarchy.
    path: String,
    /// Its directory.
    dir: PathBuf,
}

/// cryo's own cgroups in every hierarchy mounted in its mount namespace.
fn own_cgroups() -> Vec<OwnCgroup> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let dirs = cryo_cgroup::v1_controller_paths(std::process::id() as i32).unwrap_or_default();
    cryo_cgroup::parse_proc_cgroup(&text)
        .into_iter()
        .filter_map(|l| {
            let controllers = l.controllers.join(",");
            let dir = dirs.iter().find(|(c, _)| *c == controllers)?.1.clone();
            Some(OwnCgroup {
                controllers,
                path: l.path,
                dir,
            })
        })
        .collect()
}

impl RestoreHost for Host {
    fn join_cgroup(&mut self) -> Result<Vec<(String, String)>, String> {
        self.original = own_cgroups().into_iter().map(|c| c.dir).collect();
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| e.to_string())?;
        if self.criu_makes_cgroups {
            // strict: CRIU refuses every cgroup of the image that exists, and makes them with
            // the image's properties. cryo stays out (CRIU moves the restored tasks in) and
            // removes them again on failure or delete.
            self.manager = Some(manager);
            return self.new_cgroup_roots();
        }
        manager
            .add_task(Pid::this())
            .map_err(|e| format!("joining {}: {e}", self.cgroup_path.display()))?;
        // runc's other hierarchies too (name=systemd, cgroup2 on a hybrid host): CRIU puts the
        // restored tasks where cryo is, and a runc image's cgroup mounts name them.
        self.others
            .join(&self.cgroup_path, std::process::id() as i32)
            .map_err(|e| format!("{e:#}"))?;
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
        // CRIU puts the restored tasks back into the cgroups of the image unless told their new
        // root: name ours per hierarchy, cgroup2 (controllers "") included. Without it a
        // restore under a new id on a cgroup v2 host went into the checkpointed container's
        // cgroup, recreated.
        Ok(own_cgroups()
            .into_iter()
            .map(|c| (c.controllers, c.path))
            .collect())
    }

    fn leave_cgroup(&mut self) {
        let me = std::process::id().to_string();
        for dir in &self.original {
            let _ = std::fs::write(dir.join("cgroup.procs"), &me);
        }
    }

    fn run_hooks(&mut self, pid: i32) -> Result<(), String> {
        // CRIU made a fresh, empty network namespace (runc's empty_ns): give it the loopback
        // a created container has, before CRIU reconnects TCP sockets over it.
        if super::loopback::owns_new_netns(&self.spec) {
            super::loopback::loopback_up(pid).map_err(|e| format!("{e:#}"))?;
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
