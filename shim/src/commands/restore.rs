//! `restore`: the host side of a restore (cgroups via libcgroups, hooks via libcontainer,
//! state via libcontainer's store) around the engine.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use cryo_checkpoint::criu::swrk::SwrkClient;
use cryo_checkpoint::flags::CommonFlags;
use cryo_checkpoint::restore::{self, RestoreFlags, RestoreHost, RestoreRequest};
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
    let id = &a.container_id;
    let bundle = Bundle::load(&a.bundle)?;
    let rootfs = bundle.rootfs()?;
    super::check_pid_file(a.pid_file.as_deref())?;
    let _lock = ctx.store.lock(id)?;
    if ctx.store.exists(id) {
        bail!("container with id {id} already exists: restore under another id or delete it first");
    }
    let image_dir = image_dir(a.image_path.as_deref())?;
    let work_dir = a.work_path.clone().unwrap_or_else(|| image_dir.clone());
    let container_dir = ctx.store.container_dir(id);
    std::fs::create_dir_all(&container_dir)
        .with_context(|| format!("cannot create {}", container_dir.display()))?;
    // runc's cgroup naming (see `cgroups`), through cryo's copy of the spec when the user's
    // names no cgroupsPath (see `run_bundle`): later execs read the copy.
    let run_bundle = RunBundle::write_into_state(&container_dir, id, &bundle)?;
    let mut run_spec = bundle.spec.clone();
    if let Some(mut linux) = run_spec.linux().clone() {
        linux.set_cgroups_path(Some(cgroups_path(&bundle.spec, id)));
        run_spec.set_linux(Some(linux));
    }
    let youki_cfg = YoukiConfig::from_spec(&run_spec, id)?;
    let criu_spec = crate::mounts::as_criu_sees_them(&bundle.spec, &bundle.dir, &rootfs);
    crate::mounts::make_bind_mountpoints(&criu_spec, &rootfs)
        .context("cannot make the bind mounts' mount points")?;
    if !a.detach && !a.no_subreaper {
        // Orphans of the restored tree must come back to us so we can reap them.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    let req = RestoreRequest {
        id: id.clone(),
        bundle: bundle.dir.clone(),
        spec: criu_spec,
        rootfs: rootfs.canonicalize().unwrap_or(rootfs.clone()),
        image_dir: image_dir.clone(),
        work_dir,
        // CRIU finds its root mount by path in mountinfo, which shows resolved paths: docker's
        // --root /var/run/… must become /run/… or CRIU cannot match the mount (as runc does).
        scratch_dir: container_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", container_dir.display()))?,
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
    };
    let mut host = Host::new(id, &bundle.spec, &bundle.dir, youki_cfg.cgroup_path.clone());
    let report = match restore::restore(&req, &SwrkClient::default(), &mut host) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&container_dir);
            return Err(e.into());
        }
    };
    let mut container = Container::new(
        id,
        ContainerStatus::Running,
        Some(report.pid),
        run_bundle.as_deref().unwrap_or(&bundle.dir),
        &container_dir,
    )?;
    container.state.created = Some(chrono::Utc::now());
    container.save()?;
    youki_cfg.save(&container_dir)?;
    ctx.store.save(&ContainerRecord {
        id: id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: req.rootfs.clone(),
        stdio: report.stdio.clone(),
        terminal: bundle
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false),
        created: chrono::Utc::now(),
        restored_from: Some(image_dir),
    })?;
    crate::logging::log(
        "debug",
        &format!(
            "restored {id} as pid {} in {:.1} ms ({})",
            report.pid, report.restore_ms, report.rootfs_note
        ),
    );
    if a.detach {
        return Ok(0);
    }
    drop(_lock);
    let code = wait_forwarding(Pid::from_raw(report.pid));
    let _lock = ctx.store.lock(id)?;
    if let Ok(mut c) = Container::load(container_dir) {
        let _ = super::delete_container(&mut c, true);
    }
    Ok(code)
}

/// cgroups and hooks for the engine.
struct Host {
    id: String,
    spec: Spec,
    bundle: PathBuf,
    cgroup_path: PathBuf,
    manager: Option<AnyCgroupManager>,
    original: Vec<(PathBuf, String)>,
    others: OtherHierarchies,
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
            others: OtherHierarchies::discover().unwrap_or_default(),
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

    fn destroy(&mut self) {
        self.leave_cgroup();
        if let Some(m) = &self.manager {
            if let Ok(pids) = m.get_all_pids() {
                for p in pids {
                    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
                }
            }
            let _ = m.freeze(libcgroups::common::FreezerState::Thawed);
            for _ in 0..100 {
                if m.get_all_pids().map(|p| p.is_empty()).unwrap_or(true) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = m.remove();
        }
        self.others.remove(&self.cgroup_path);
    }
}
