//! `exec`: run a process in a running (or created) container, as runc does.
//!
//! Without `--process`, the process is the container's own (`process` of the config it runs
//! from: user, capabilities, rlimits, environment...) with the command and the flags applied,
//! as runc builds it; cryo writes that to a file for libcontainer's tenant builder, which
//! would otherwise start from an empty process (root, no terminal). Any failure of `exec`
//! itself exits 255, so callers can tell it from the process's own status (runc's rule).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use cryo_oci::Verb;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{Capability, Process};

use super::{load_for, wait_forwarding};
use crate::cgroups::{hierarchies, open_procs, OtherHierarchies};
use crate::cli::ExecArgs;
use crate::console::{terminal_mode, ConsoleReceiver, TerminalMode};
use crate::context::Context;
use crate::workload::{terminal_size, Workload};

/// `exec`
pub fn exec(ctx: &Context, a: &ExecArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    let container = load_for(ctx, id, Verb::Exec)?;
    if super::status_of(&container) == cryo_oci::Status::Paused && !a.ignore_paused {
        bail!("cannot exec in container {id}: it is paused (resume it, or pass --ignore-paused)");
    }
    if a.process.is_none() && a.command.is_empty() {
        bail!("exec needs a command or --process FILE");
    }
    let container_dir = ctx.store.container_dir(id);
    // libcontainer reads the process from a file: cryo's, written from the flags or from the
    // caller's file (which may be a pipe, readable once, and may leave out what Go treats as
    // zero, as runc's callers do).
    let process = match &a.process {
        Some(p) => read_process(p)?,
        None => process_from_flags(&container_config(container.bundle())?, a)?,
    };
    let process_file = ProcessFile::write(&container_dir, &process)?;
    let terminal = process.terminal().unwrap_or(false);
    let mode = terminal_mode(terminal, a.detach, a.console_socket.as_deref())?;
    let console = match mode {
        TerminalMode::Foreground => Some(ConsoleReceiver::bind(&ctx.root)?),
        _ => None,
    };
    let console_socket = match (&mode, &console) {
        (TerminalMode::Socket(p), _) => Some(p.clone()),
        (_, Some(c)) => Some(c.path().to_path_buf()),
        _ => None,
    };
    let cgroups_path = container
        .spec()
        .context("cannot read the container's saved config")?
        .cgroup_path;
    let sub = SubCgroups::parse(&a.cgroup)?;
    // Open before the process starts; it writes itself into them (see `workload`).
    let cgroup_files = sub.procs_files(&cgroups_path)?;
    let owner_fixer = crate::stdio_owner::Fixer::start(process.user().uid())
        .context("cannot set up the stdio ownership handshake")?;
    let workload = Workload {
        cgroup_procs: cgroup_files.iter().map(|f| f.as_raw_fd()).collect(),
        terminal_size: console.as_ref().and_then(|_| terminal_size(0)),
        stdio_owner: Some(owner_fixer.child_fd()),
    };
    super::check_pid_file(a.pid_file.as_deref())?;
    // Held while a created container is presented as running (see `CreatedAsRunning`).
    let _lock = (super::status_of(&container) == cryo_oci::Status::Created)
        .then(|| ctx.store.lock(id))
        .transpose()?;
    let _presented = CreatedAsRunning::present(ctx, id)?;
    let pid = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&ctx.root)?
        .with_console_socket(console_socket.as_ref())
        .with_pid_file(a.pid_file.as_ref())?
        .with_preserved_fds(a.preserve_fds)
        .with_executor(workload)
        .validate_id()?
        .as_tenant()
        .with_detach(a.detach || console.is_some())
        .with_process(Some(&process_file.path))
        .with_sub_cgroup(sub.all.clone())
        .with_ignore_paused(a.ignore_paused)
        .build();
    owner_fixer.finish();
    let pid = pid.with_context(|| format!("cannot exec in container {id}"))?;
    drop(_presented);
    drop(_lock);
    drop(cgroup_files);
    drop(process_file);
    if a.detach {
        return Ok(0);
    }
    match console {
        Some(console) => {
            let master = console.receive(std::time::Duration::from_secs(10))?;
            drop(console);
            Ok(crate::console::relay(master, pid))
        }
        None => Ok(wait_forwarding(pid)),
    }
}

/// runc execs into a created container too (its namespaces exist; its init waits for `start`).
/// libcontainer's tenant builder reads the saved status and accepts only a running container, so
/// for the builder's read a created container's saved status says running, under the container's
/// lock; dropping the guard puts `created` back.
struct CreatedAsRunning {
    container: Option<libcontainer::container::Container>,
}

impl CreatedAsRunning {
    fn present(ctx: &Context, id: &str) -> anyhow::Result<Self> {
        let (mut c, status) = super::load_container(ctx, id)?;
        if status != cryo_oci::Status::Created {
            return Ok(Self { container: None });
        }
        c.set_status(libcontainer::container::ContainerStatus::Running)
            .save()
            .context("cannot update the container's state for exec")?;
        Ok(Self { container: Some(c) })
    }
}

impl Drop for CreatedAsRunning {
    fn drop(&mut self) {
        if let Some(c) = self.container.as_mut() {
            if let Err(e) = c
                .set_status(libcontainer::container::ContainerStatus::Created)
                .save()
            {
                crate::logging::log(
                    "error",
                    &format!(
                        "cannot restore the state of container {} to created: {e}",
                        c.id()
                    ),
                );
            }
        }
    }
}

/// The config.json the container runs from.
fn container_config(bundle: &Path) -> anyhow::Result<oci_spec::runtime::Spec> {
    Ok(cryo_oci::load_spec(bundle)?)
}

fn read_process(path: &Path) -> anyhow::Result<Process> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read process file {}", path.display()))?;
    let mut value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    // runc (Go) takes a missing user as uid 0, gid 0.
    if let Some(obj) = value.as_object_mut() {
        obj.entry("user")
            .or_insert_with(|| serde_json::json!({"uid": 0, "gid": 0}));
    }
    serde_json::from_value(value)
        .with_context(|| format!("{} is not an OCI process", path.display()))
}

/// runc's exec process: the container's, with the command line's changes.
fn process_from_flags(spec: &oci_spec::runtime::Spec, a: &ExecArgs) -> anyhow::Result<Process> {
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(a.command.clone()));
    if let Some(cwd) = &a.cwd {
        p.set_cwd(cwd.clone());
    }
    if let Some(profile) = &a.apparmor {
        p.set_apparmor_profile(Some(profile.clone()));
    }
    if let Some(label) = &a.process_label {
        p.set_selinux_label(Some(label.clone()));
    }
    let mut env = p.env().clone().unwrap_or_default();
    for kv in &a.env {
        let key = kv.split('=').next().unwrap_or(kv);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    p.set_env(Some(env));
    p.set_terminal(Some(a.tty));
    if a.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    let mut user = p.user().clone();
    if let Some(u) = &a.user {
        let (uid, gid) = u.split_once(':').unwrap_or((u.as_str(), ""));
        user.set_uid(
            uid.parse()
                .with_context(|| format!("--user {u:?}: use UID[:GID] (numbers)"))?,
        );
        if !gid.is_empty() {
            user.set_gid(
                gid.parse()
                    .with_context(|| format!("--user {u:?}: use UID[:GID] (numbers)"))?,
            );
        }
    }
    if !a.additional_gids.is_empty() {
        let mut gids = user.additional_gids().clone().unwrap_or_default();
        gids.extend(&a.additional_gids);
        user.set_additional_gids(Some(gids));
    }
    p.set_user(user);
    if !a.cap.is_empty() {
        let mut caps = p.capabilities().clone().unwrap_or_default();
        for name in &a.cap {
            let cap = parse_capability(name)?;
            let add = |s: &Option<oci_spec::runtime::Capabilities>| {
                let mut s = s.clone().unwrap_or_default();
                s.insert(cap);
                Some(s)
            };
            caps.set_bounding(add(caps.bounding()));
            caps.set_effective(add(caps.effective()));
            caps.set_permitted(add(caps.permitted()));
            // Ambient capabilities need inheritable ones; add them only where the spec
            // already has an inheritable set (runc's rule).
            if caps.inheritable().is_some() {
                caps.set_inheritable(add(caps.inheritable()));
                caps.set_ambient(add(caps.ambient()));
            }
        }
        p.set_capabilities(Some(caps));
    }
    Ok(p)
}

/// `CAP_SYSLOG` or `SYSLOG`.
fn parse_capability(name: &str) -> anyhow::Result<Capability> {
    let full = if name.starts_with("CAP_") {
        name.to_string()
    } else {
        format!("CAP_{name}")
    };
    serde_json::from_value(serde_json::Value::String(full.to_uppercase()))
        .map_err(|_| anyhow::anyhow!("unknown capability {name:?} (e.g. CAP_SYSLOG)"))
}

/// The process file handed to libcontainer; removed on drop.
struct ProcessFile {
    path: PathBuf,
}

impl ProcessFile {
    fn write(container_dir: &Path, process: &Process) -> anyhow::Result<Self> {
        let path = container_dir.join(format!(".exec-{}.json", std::process::id()));
        std::fs::write(&path, serde_json::to_vec(process)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for ProcessFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `--cgroup` arguments: one PATH for every hierarchy, and/or CONTROLLER[,CONTROLLER]:PATH.
#[derive(Debug, Default, PartialEq, Eq)]
struct SubCgroups {
    /// For every hierarchy (libcontainer places the process; `None`: the container's own).
    all: Option<String>,
    /// Per controller (the process moves itself, see `workload`); `None`: the container's own.
    by_controller: Vec<(String, Option<String>)>,
}

impl SubCgroups {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut sub = Self::default();
        for arg in args {
            let (controllers, path) = match arg.split_once(':') {
                Some((c, p)) => (Some(c), p),
                None => (None, arg.as_str()),
            };
            check_sub_path(path)?;
            let path = (!path.trim_start_matches('/').is_empty()).then(|| path.to_string());
            match controllers {
                None => {
                    if sub.all.is_some() {
                        bail!("--cgroup PATH given twice: give one, or CONTROLLER:PATH");
                    }
                    sub.all = path;
                }
                Some(list) => {
                    for c in list.split(',').filter(|c| !c.is_empty()) {
                        sub.by_controller.push((c.to_string(), path.clone()));
                    }
                }
            }
        }
        Ok(sub)
    }

    /// The `cgroup.procs` files the process must write itself into: the hierarchies
    /// libcgroups does not place it in, and the per-controller sub-cgroups. A sub-cgroup that
    /// does not exist is an error (runc's rule: exec does not create cgroups).
    fn procs_files(&self, cgroups_path: &Path) -> anyhow::Result<Vec<std::fs::File>> {
        let all = hierarchies()?;
        let mut unified_sub = None;
        if let Some(sub) = &self.all {
            for h in all.iter().filter(|h| !h.controllers.is_empty()) {
                let base = h.dir(cgroups_path)?;
                let managed = h.controllers.iter().all(|c| !c.starts_with("name="));
                if managed && base.is_dir() {
                    open_procs(&base.join(sub.trim_start_matches('/')))?;
                }
            }
            // On a pure cgroup v2 host the one hierarchy is libcgroups' and not among the
            // "other" ones: the process moves itself into the sub-cgroup there.
            if cryo_cgroup::cgroup_setup()? == cryo_cgroup::Setup::Unified {
                if let Some(h) = all.iter().find(|h| h.controllers.is_empty()) {
                    let dir = h.dir(cgroups_path)?.join(sub.trim_start_matches('/'));
                    unified_sub = Some(open_procs(&dir)?);
                }
            }
        }
        let mut files =
            OtherHierarchies::discover()?.procs_files(cgroups_path, self.all.as_deref())?;
        for (controller, path) in &self.by_controller {
            let h = all
                .iter()
                .find(|h| h.controllers.iter().any(|c| c == controller))
                .ok_or_else(|| anyhow::anyhow!("--cgroup: unknown controller {controller}"))?;
            if h.controllers.is_empty() {
                bail!("--cgroup CONTROLLER:PATH works only with cgroup v1 controllers");
            }
            if let Some(path) = path {
                let dir = h.dir(cgroups_path)?.join(path.trim_start_matches('/'));
                files.push(open_procs(&dir)?);
            }
        }
        files.extend(unified_sub);
        Ok(files)
    }
}

/// A sub-cgroup path stays below the container's cgroup.
fn check_sub_path(path: &str) -> anyhow::Result<()> {
    let mut depth: i32 = 0;
    for c in Path::new(path).components() {
        match c {
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::ParentDir => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            bail!("--cgroup {path}: {path} is not a sub cgroup path of the container's");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ExecArgs {
        use clap::Parser;
        let mut argv = vec!["cryo", "exec"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(argv).command {
            Some(crate::cli::Command::Exec(a)) => a,
            other => panic!("not exec: {other:?}"),
        }
    }

    #[test]
    fn the_exec_process_is_the_containers_with_the_flags_applied() {
        let mut spec = crate::commands::spec::runc_default_spec_for(false).expect("spec");
        let mut p = spec.process().clone().expect("process");
        let mut user = p.user().clone();
        user.set_uid(1000);
        user.set_gid(100);
        p.set_user(user);
        spec.set_process(Some(p));
        let a = args(&[
            "--env",
            "TERM=dumb",
            "-g",
            "100",
            "--additional-gids",
            "65534",
            "--cwd",
            "/bin",
            "c1",
            "id",
            "-G",
        ]);
        let p = process_from_flags(&spec, &a).expect("process");
        assert_eq!(p.args().clone().expect("args"), ["id", "-G"]);
        assert_eq!(p.user().uid(), 1000, "the container's user by default");
        assert_eq!(
            p.user().additional_gids().clone().expect("gids"),
            [100, 65534]
        );
        assert_eq!(p.cwd(), Path::new("/bin"));
        assert_eq!(p.terminal(), Some(false), "no terminal without -t");
        let env = p.env().clone().expect("env");
        assert!(env.contains(&"TERM=dumb".to_string()));
        assert!(!env.contains(&"TERM=xterm".to_string()), "{env:?}");
        let p = process_from_flags(&spec, &args(&["-t", "-u", "0:0", "c1", "sh"])).expect("tty");
        assert_eq!(p.terminal(), Some(true));
        assert_eq!((p.user().uid(), p.user().gid()), (0, 0));
    }

    #[test]
    fn an_added_capability_lands_in_the_bounding_effective_and_permitted_sets() {
        let spec = crate::commands::spec::runc_default_spec_for(false).expect("spec");
        let p = process_from_flags(&spec, &args(&["--cap", "CAP_SYSLOG", "c1", "true"]))
            .expect("process");
        let caps = p.capabilities().clone().expect("caps");
        for set in [caps.bounding(), caps.effective(), caps.permitted()] {
            assert!(set.as_ref().expect("set").contains(&Capability::Syslog));
        }
        assert!(process_from_flags(&spec, &args(&["--cap", "CAP_NOPE", "c1", "true"])).is_err());
    }

    #[test]
    fn cgroup_arguments_follow_runcs_syntax() {
        let s = SubCgroups::parse(&["memory:submem".into(), "cpu,cpuacct:subcpu".into()])
            .expect("per controller");
        assert_eq!(s.all, None);
        let sub = |s: &str| Some(s.to_string());
        assert_eq!(
            s.by_controller,
            [
                ("memory".to_string(), sub("submem")),
                ("cpu".to_string(), sub("subcpu")),
                ("cpuacct".to_string(), sub("subcpu"))
            ]
        );
        assert_eq!(
            SubCgroups::parse(&["whaaat:/".into()])
                .expect("root")
                .by_controller,
            [("whaaat".to_string(), None)],
            "kept, so that the controller is checked"
        );
        assert_eq!(SubCgroups::parse(&["/".into()]).expect("root").all, None);
        assert_eq!(
            SubCgroups::parse(&["a/b".into()])
                .expect("path")
                .all
                .as_deref(),
            Some("a/b")
        );
        let err = SubCgroups::parse(&["..".into()]).expect_err("escapes");
        assert!(
            err.to_string().contains(" .. is not a sub cgroup path"),
            "{err}"
        );
        assert!(SubCgroups::parse(&["a/../../b".into()]).is_err());
        assert!(SubCgroups::parse(&["a".into(), "b".into()]).is_err());
    }
}
