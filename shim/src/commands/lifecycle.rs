//! create, start, run, kill, delete, pause, resume.

use anyhow::{bail, Context as _};
use cryo_oci::{Bundle, ContainerRecord, Verb};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

use super::{delete_settling, load_container, load_for, wait_forwarding};
use crate::cli::{CreateArgs, DeleteArgs, KillArgs, RunArgs};
use crate::context::Context;

fn build(
    ctx: &Context,
    a: &CreateArgs,
    detach: bool,
) -> anyhow::Result<libcontainer::container::Container> {
    let id = &a.container_id;
    let bundle = Bundle::load(&a.bundle)?;
    let rootfs = bundle.rootfs()?;
    if !rootfs.is_dir() {
        bail!(
            "root filesystem {} does not exist: set root.path in {}/config.json",
            rootfs.display(),
            bundle.dir.display()
        );
    }
    let _lock = ctx.store.lock(id)?;
    if ctx.store.exists(id) {
        bail!("container with id {id} already exists: pick another id or `cryo delete {id}`");
    }
    std::fs::create_dir_all(&ctx.root)
        .with_context(|| format!("cannot create root {}", ctx.root.display()))?;
    let container = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&ctx.root)?
        .with_pid_file(a.pid_file.as_ref())?
        .with_console_socket(a.console_socket.as_ref())
        .with_preserved_fds(a.preserve_fds)
        .validate_id()?
        .as_init(&bundle.dir)
        .with_systemd(false)
        .with_detach(detach)
        .build()
        .with_context(|| format!("cannot create container {id}"))?;
    let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
    if owns_new_netns(&bundle.spec) {
        loopback_up(pid)?;
    }
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    ctx.store.save(&ContainerRecord {
        id: id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: rootfs.canonicalize().unwrap_or(rootfs),
        stdio: cryo_checkpoint::descriptors::read_stdio(pid),
        terminal,
        created: chrono::Utc::now(),
        restored_from: None,
    })?;
    Ok(container)
}

/// `create`
pub fn create(ctx: &Context, a: &CreateArgs) -> anyhow::Result<i32> {
    build(ctx, a, true)?;
    Ok(0)
}

/// `start`
pub fn start(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let _lock = ctx.store.lock(id)?;
    let mut c = load_for(ctx, id, Verb::Start)?;
    c.start()
        .with_context(|| format!("cannot start container {id}"))?;
    Ok(0)
}

/// `run`: create + start; without --detach wait and exit with the container's status.
pub fn run(ctx: &Context, a: &RunArgs) -> anyhow::Result<i32> {
    let mut c = build(ctx, &a.create, a.detach)?;
    let id = &a.create.container_id;
    {
        let _lock = ctx.store.lock(id)?;
        c.start()
            .with_context(|| format!("cannot start container {id}"))?;
    }
    if a.detach {
        return Ok(0);
    }
    let pid = c.pid().context("container has no pid")?;
    let code = wait_forwarding(pid);
    let _lock = ctx.store.lock(id)?;
    if let Ok((mut c, _)) = load_container(ctx, id) {
        let _ = c.delete(true);
    }
    Ok(code)
}

/// `kill ID [SIGNAL]`
pub fn kill(ctx: &Context, a: &KillArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    let _lock = ctx.store.lock(id)?;
    let mut c = load_for(ctx, id, Verb::Kill)?;
    let sig = libcontainer::signal::Signal::try_from(a.signal.as_str()).map_err(|_| {
        anyhow::anyhow!(
            "invalid signal {:?}: use a number (9), a name (KILL) or SIGKILL",
            a.signal
        )
    })?;
    c.kill(sig, a.all)
        .with_context(|| format!("cannot signal container {id}"))?;
    Ok(0)
}

/// `delete [--force]`
pub fn delete(ctx: &Context, a: &DeleteArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    let _lock = ctx.store.lock(id)?;
    if !ctx.store.exists(id) && ctx.store.container_dir(id).exists() {
        // No finished container, but a directory: what a killed restore (or an aborted
        // create) left. Undo it and remove it, never through a mount.
        super::cleanup::undo_half_made(ctx, id)?;
        return Ok(0);
    }
    if a.force && !ctx.store.exists(id) {
        // As runc: a forced delete of a container that is already gone succeeds (podman's
        // checkpoint and containerd's cleanup shim both send one after the container went away).
        return Ok(0);
    }
    // Nothing of cryo's is ever mounted in a finished container's directory; if something is
    // (a restore killed after recording the state), it is detached before libcontainer removes
    // the directory.
    for m in cryo_oci::fsutil::mounts_below(&ctx.store.container_dir(id)) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    let verb = if a.force {
        Verb::ForceDelete
    } else {
        Verb::Delete
    };
    delete_settling(ctx, id, verb, a.force)?;
    Ok(0)
}

/// `pause`
pub fn pause(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let _lock = ctx.store.lock(id)?;
    let mut c = load_for(ctx, id, Verb::Pause)?;
    c.pause()
        .with_context(|| format!("cannot pause container {id}"))?;
    Ok(0)
}

/// `resume`
pub fn resume(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let _lock = ctx.store.lock(id)?;
    let mut c = load_for(ctx, id, Verb::Resume)?;
    c.resume()
        .with_context(|| format!("cannot resume container {id}"))?;
    Ok(0)
}

/// The spec asks for a fresh network namespace (no path): the runtime sets it up.
pub(crate) fn owns_new_netns(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
            })
        })
}

/// runc brings `lo` up in a network namespace it creates; libcontainer does not, and a
/// container talking to itself over 127.0.0.1 (and its checkpoints with
/// `--tcp-established`) depends on it.
pub(crate) fn loopback_up(pid: i32) -> anyhow::Result<()> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "link", "set", "lo", "up"])
        .output()
        .context("cannot run nsenter/ip to bring up the container's loopback (install util-linux and iproute2)")?;
    if !out.status.success() {
        bail!(
            "cannot bring up lo in the container's network namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
