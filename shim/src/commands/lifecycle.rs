//! create, start, run, kill, delete, pause, resume.

use anyhow::{bail, Context as _};
use cryo_oci::{Bundle, ContainerRecord, Verb};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;

use super::loopback::{loopback_up, owns_new_netns};
use super::{delete_settling, load_container, load_for, wait_forwarding};
use crate::cgroups::{cgroups_path, OtherHierarchies};
use crate::cli::{CreateArgs, DeleteArgs, KillArgs, RunArgs};
use crate::console::{terminal_mode, ConsoleReceiver, TerminalMode};
use crate::context::Context;
use crate::run_bundle::RunBundle;
use crate::workload::{terminal_size, Workload};

/// A created container and, for a foreground terminal, the socket its pty master arrives on.
struct Created {
    container: Container,
    console: Option<ConsoleReceiver>,
}

fn build(ctx: &Context, a: &CreateArgs, detach: bool) -> anyhow::Result<Created> {
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
    super::spec::check_runnable(&bundle.spec)?;
    super::check_pid_file(a.pid_file.as_deref())?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let mode = terminal_mode(terminal, detach, a.console_socket.as_deref())?;
    let _lock = ctx.store.lock(id)?;
    if ctx.store.exists(id) {
        bail!("container with id {id} already exists: pick another id or `cryo delete {id}`");
    }
    std::fs::create_dir_all(&ctx.root)
        .with_context(|| format!("cannot create root {}", ctx.root.display()))?;
    let console = match mode {
        TerminalMode::Foreground => Some(ConsoleReceiver::bind(&ctx.root)?),
        _ => None,
    };
    let console_socket = match (&mode, &console) {
        (TerminalMode::Socket(p), _) => Some(p.clone()),
        (_, Some(c)) => Some(c.path().to_path_buf()),
        _ => None,
    };
    let mut run_bundle = RunBundle::for_create(&ctx.root, id, &bundle)?;
    let workload = Workload {
        terminal_size: console.as_ref().and_then(|_| terminal_size(0)),
        ..Workload::default()
    };
    let mut container = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&ctx.root)?
        .with_pid_file(a.pid_file.as_ref())?
        .with_console_socket(console_socket.as_ref())
        .with_preserved_fds(a.preserve_fds)
        .with_executor(workload)
        .validate_id()?
        .as_init(run_bundle.dir())
        .with_systemd(false)
        .with_no_pivot(a.no_pivot)
        // libcontainer accepts a console socket only when detached; cryo's own foreground
        // relay is one too.
        .with_detach(detach || console.is_some())
        .build()
        .with_context(|| format!("cannot create container {id}"))?;
    let made = NewContainer {
        id,
        bundle: &bundle,
        rootfs,
        terminal,
    };
    match made.finish(ctx, &mut container, &mut run_bundle) {
        Ok(()) => Ok(Created { container, console }),
        Err(e) => {
            // Nothing half-made: no container left "created" with a network or cgroups it
            // lacks, or without cryo's record.
            discard(container, a.pid_file.as_deref());
            Err(e)
        }
    }
}

/// A container libcontainer just created, and what cryo adds to it.
struct NewContainer<'a> {
    id: &'a str,
    bundle: &'a Bundle,
    rootfs: std::path::PathBuf,
    terminal: bool,
}

impl NewContainer<'_> {
    /// Its state beside libcontainer's, its cgroups in the hierarchies libcgroups leaves alone
    /// (as runc places them), `lo` up in a network namespace of its own, its stdio owned by its
    /// user, and cryo's record.
    fn finish(
        self,
        ctx: &Context,
        container: &mut Container,
        run_bundle: &mut RunBundle,
    ) -> anyhow::Result<()> {
        let pid = container.pid().map(|p| p.as_raw()).unwrap_or(0);
        run_bundle.settle(container, &ctx.store.container_dir(self.id))?;
        OtherHierarchies::discover()?
            .join(&cgroups_path(&self.bundle.spec, self.id), pid)
            .context("cannot place the container in the named and cgroup2 hierarchies")?;
        if owns_new_netns(&self.bundle.spec) {
            loopback_up(pid)?;
        }
        if let Some(p) = self.bundle.spec.process() {
            crate::stdio_owner::fix_for_pid(pid, p.user().uid());
        }
        ctx.store.save(&ContainerRecord {
            id: self.id.to_string(),
            bundle: self.bundle.dir.clone(),
            rootfs: self.rootfs.canonicalize().unwrap_or(self.rootfs.clone()),
            stdio: cryo_checkpoint::descriptors::read_stdio(pid),
            terminal: self.terminal,
            created: chrono::Utc::now(),
            restored_from: None,
        })?;
        Ok(())
    }
}

/// Remove a container that must not stay (its processes, cgroups and state), and the pid
/// file its creation wrote. Failures to clean up are reported, not returned: the caller's
/// error is the one that matters.
fn discard(mut container: Container, pid_file: Option<&std::path::Path>) {
    let id = container.id().to_string();
    if let Err(e) = super::delete_container(&mut container, true) {
        eprintln!("cryo: removing the half-made container {id} failed: {e}");
    }
    if let Some(p) = pid_file {
        let _ = std::fs::remove_file(p);
    }
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

/// `run`: create + start; without --detach wait (relaying the terminal if the process has
/// one) and exit with the container's status, then delete it unless --keep.
pub fn run(ctx: &Context, a: &RunArgs) -> anyhow::Result<i32> {
    let Created {
        container: mut c,
        console,
    } = build(ctx, &a.create, a.detach)?;
    let id = &a.create.container_id;
    {
        let _lock = ctx.store.lock(id)?;
        if let Err(e) = c.start() {
            // As runc's run: a container that did not start does not stay behind.
            discard(c, a.create.pid_file.as_deref());
            return Err(e).with_context(|| format!("cannot start container {id}"));
        }
    }
    if a.detach {
        return Ok(0);
    }
    let pid = c.pid().context("container has no pid")?;
    let code = match console {
        Some(console) => {
            let master = console.receive(std::time::Duration::from_secs(10))?;
            drop(console);
            crate::console::relay(master, pid)
        }
        None => wait_forwarding(pid),
    };
    if !a.keep {
        let _lock = ctx.store.lock(id)?;
        if let Ok((mut c, _)) = load_container(ctx, id) {
            let _ = super::delete_container(&mut c, true);
        }
    }
    Ok(code)
}

/// `kill ID [SIGNAL]`
pub fn kill(ctx: &Context, a: &KillArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    let _lock = ctx.store.lock(id)?;
    let verb = if a.all { Verb::KillAll } else { Verb::Kill };
    let mut c = load_for(ctx, id, verb)?;
    if is_signal_zero(&a.signal) {
        return probe(&c, a.all).map(|()| 0);
    }
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

fn is_signal_zero(signal: &str) -> bool {
    signal.parse::<i32>() == Ok(0)
}

/// Signal 0, which libcontainer cannot send: checks that the process (or, with `--all`, every
/// process in the container's cgroup) can be signalled, and delivers nothing.
fn probe(c: &Container, all: bool) -> anyhow::Result<()> {
    use nix::sys::signal::kill;
    let pids = if all {
        match super::info::pids_of(c) {
            Ok(pids) => pids,
            // An exited container whose cgroups are already gone has no process to check.
            Err(_) if super::status_of(c) == cryo_oci::Status::Stopped => Vec::new(),
            Err(e) => return Err(e),
        }
    } else {
        vec![c.pid().context("the container has no init pid")?.as_raw()]
    };
    for pid in pids {
        match kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => {}
            Err(nix::errno::Errno::ESRCH) if all => {} // exited meanwhile
            Err(e) => bail!("cannot signal process {pid} of container {}: {e}", c.id()),
        }
    }
    Ok(())
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
