//! One module per group of verbs. Every verb: lock → load and refresh → check the transition
//! table → act → persist.

pub mod checkpoint;
pub mod cleanup;
pub mod exec;
pub mod group;
pub mod guardian;
pub mod info;
pub mod lifecycle;
mod loopback;
pub mod restore;
pub mod spec;
pub mod store;
pub mod verify;

use anyhow::{bail, Context as _};
use std::time::{Duration, Instant};

use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;

use crate::context::Context;

/// A `--pid-file` must be writable where it is asked for: libcontainer only warns when it is
/// not, runc fails before starting anything.
pub fn check_pid_file(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!(
            "--pid-file {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// libcontainer's status as the transition table's, with the freezer's word on "running":
/// a container whose cgroup is frozen is paused, whoever froze it (as runc reports it), so a
/// container left frozen can be seen and resumed.
pub fn status_of(c: &Container) -> cryo_oci::Status {
    match c.status() {
        ContainerStatus::Creating => cryo_oci::Status::Creating,
        ContainerStatus::Created => cryo_oci::Status::Created,
        ContainerStatus::Running if frozen(c) => cryo_oci::Status::Paused,
        ContainerStatus::Running => cryo_oci::Status::Running,
        ContainerStatus::Paused => cryo_oci::Status::Paused,
        ContainerStatus::Stopped => cryo_oci::Status::Stopped,
    }
}

/// Whether the container's cgroup is frozen.
fn frozen(c: &Container) -> bool {
    let Some(pid) = c.pid() else { return false };
    cryo_cgroup::ContainerCgroup::for_pid(pid.as_raw())
        .map(|cg| cryo_cgroup::freezer_for(&cg).state())
        .is_ok_and(|s| matches!(s, Ok(cryo_cgroup::FreezerState::Frozen)))
}

/// Load a container (status refreshed from /proc).
pub fn load_container(ctx: &Context, id: &str) -> anyhow::Result<(Container, cryo_oci::Status)> {
    cryo_oci::state::validate_id(id)?;
    if !ctx.store.exists(id) {
        bail!("container {id} does not exist");
    }
    let mut c = Container::load(ctx.store.container_dir(id))
        .with_context(|| format!("cannot load the state of container {id}"))?;
    let s = status_of(&c);
    if s == cryo_oci::Status::Paused && c.status() == ContainerStatus::Running {
        // Frozen behind libcontainer's back: let its pause/resume logic see it as paused.
        c.set_status(ContainerStatus::Paused);
    }
    Ok((c, s))
}

/// Load and check that `verb` is allowed.
pub fn load_for(ctx: &Context, id: &str, verb: cryo_oci::Verb) -> anyhow::Result<Container> {
    let (c, s) = load_container(ctx, id)?;
    cryo_oci::check(id, verb, s)?;
    Ok(c)
}

/// Delete container `id` with libcontainer (loaded fresh, `verb` checked), riding out the
/// moments right after its init was killed.
///
/// A killed init stays in its cgroups until its parent reaps it; after a detached run or a
/// restore that parent is whichever reaper adopted it (containerd's shim, conmon), so removing
/// the cgroup can briefly fail with EBUSY, and libcontainer's status check can find
/// `/proc/<pid>` and then lose `/proc/<pid>/stat` to the reaper. Both pass within milliseconds:
/// retry for a while with the state reloaded, as runc does, before reporting the error.
pub fn delete_settling(
    ctx: &Context,
    id: &str,
    verb: cryo_oci::Verb,
    force: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut pause = Duration::from_millis(5);
    let mut wait = || {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    };
    loop {
        // Loading reads the init's /proc/<pid>/stat too, and can lose it to the reaper.
        let mut c = match load_for(ctx, id, verb) {
            Ok(c) => c,
            Err(e) if settling_load(&e) && Instant::now() < deadline => {
                wait();
                continue;
            }
            Err(e) => return Err(e),
        };
        match delete_container(&mut c, force) {
            Ok(()) => return Ok(()),
            Err(e) if settling(&e) && Instant::now() < deadline => wait(),
            Err(e) => return Err(e).with_context(|| format!("cannot delete container {id}")),
        }
    }
}

/// A load that failed on a settling container (see [`settling`]).
fn settling_load(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<LibcontainerError>())
        .any(settling)
}

/// libcontainer's delete, plus what runc's delete also handles:
/// - sub-cgroups the container made (with a writable cgroup mount) or was given (`exec
///   --cgroup`): a cgroup with children cannot be removed, so with `--force` every process is
///   killed first (the devices cgroup lists them all), then the sub-cgroups go, then the
///   container;
/// - the cgroups runc also made that libcgroups does not manage (`name=systemd`, cgroup2 on a
///   hybrid host: see `cgroups`), once the container is gone.
pub fn delete_container(c: &mut Container, force: bool) -> Result<(), LibcontainerError> {
    let path = c.spec().ok().map(|cfg| cfg.cgroup_path);
    if force && status_of(c) != cryo_oci::Status::Stopped {
        let _ = c.kill(nix::sys::signal::Signal::SIGKILL, true);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && info::pids_of(c).is_ok_and(|pids| !pids.is_empty()) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(path) = &path {
        crate::cgroups::remove_sub_cgroups(path);
    }
    c.delete(force)?;
    if let (Some(path), Ok(others)) = (path, crate::cgroups::OtherHierarchies::discover()) {
        others.remove(&path);
    }
    Ok(())
}

/// The errors a dying container gives while its init is being reaped.
fn settling(e: &LibcontainerError) -> bool {
    match e {
        // The init vanished between libcontainer's look at /proc/<pid> and its read of stat.
        LibcontainerError::Procfs(procfs::ProcError::NotFound(_)) => true,
        // libcgroups reports a cgroup it could not rmdir (tasks not yet reaped) this way.
        other => other.to_string().contains("could not delete"),
    }
}

/// Wait for a child, forwarding SIGINT/SIGTERM to it; returns its exit code (128+signal).
pub fn wait_forwarding(pid: nix::unistd::Pid) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    let _ = forward_signals(pid);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}

static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

pub(crate) fn forward_signals(pid: nix::unistd::Pid) -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    FORWARD_TO.store(pid.as_raw(), std::sync::atomic::Ordering::SeqCst);
    let act = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        unsafe { sigaction(s, &act) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vanished_init_or_busy_cgroup_is_worth_a_retry_other_errors_are_not() {
        let vanished =
            LibcontainerError::Procfs(procfs::ProcError::NotFound(Some("/proc/9749/stat".into())));
        assert!(settling(&vanished));
        let busy = LibcontainerError::OtherCgroup("could not delete /sys/fs/cgroup/x".into());
        assert!(settling(&busy));
        let denied = LibcontainerError::Procfs(procfs::ProcError::PermissionDenied(None));
        assert!(!settling(&denied));
        let other = LibcontainerError::OtherCgroup("invalid cgroup path".into());
        assert!(!settling(&other));
    }

    #[test]
    fn a_load_that_lost_the_inits_stat_is_worth_a_retry() {
        let vanished =
            LibcontainerError::Procfs(procfs::ProcError::NotFound(Some("/proc/9749/stat".into())));
        let e = anyhow::Error::new(vanished).context("cannot load the state of container c1");
        assert!(settling_load(&e));
        let e = anyhow::anyhow!("container c1 does not exist");
        assert!(!settling_load(&e));
    }
}
