//! `cryo restore`: read the manifest → apply the rootfs snapshot when the target lacks it →
//! verify open files → join the new cgroup → CRIU restore → hooks, pty, pid file. A failed
//! restore leaves no cgroup, mount, process or pid file behind.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_spec::runtime::Spec;

use crate::criu::{rpc, CallKind, CriuCall, CriuClient, Notification};
use crate::dump::MIN_CRIU;
use crate::flags::{self, CommonFlags};
use crate::manifest::Manifest;
use crate::plan::{restore_plan, FdSource, RestoreFacts, RestorePlan};
use crate::{descriptors, facts, rootfs};

/// Restore-only flags.
#[derive(Debug, Clone, Default)]
pub struct RestoreFlags {
    /// Shared flags.
    pub common: CommonFlags,
    /// `--tcp-close`
    pub tcp_close: bool,
    /// `--lsm-profile TYPE:NAME`
    pub lsm_profile: Option<String>,
    /// `--lsm-mount-context`
    pub lsm_mount_context: Option<String>,
    /// `--no-rootfs-restore`
    pub no_rootfs_restore: bool,
}

/// What the restore needs.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// New container id.
    pub id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// Its spec.
    pub spec: Spec,
    /// Host path of the target rootfs.
    pub rootfs: PathBuf,
    /// `--image-path`.
    pub image_dir: PathBuf,
    /// `--work-path`.
    pub work_dir: PathBuf,
    /// A private directory for this container (the rootfs is bind-mounted there for CRIU).
    pub scratch_dir: PathBuf,
    /// `--console-socket`.
    pub console_socket: Option<PathBuf>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// The cgroup path of the new container, relative to each hierarchy root.
    pub cgroup_path: PathBuf,
    /// Flags.
    pub flags: RestoreFlags,
}

/// What the host side does for a restore: cgroups and hooks. The shim implements it with
/// libcgroups and libcontainer; tests with a fake.
pub trait RestoreHost {
    /// Create the container's cgroups and move the calling process in (CRIU inherits them);
    /// returns `(controller, path)` pairs for CRIU's `cg_root`.
    fn join_cgroup(&mut self) -> Result<Vec<(String, String)>, String>;
    /// Move the calling process back where it was.
    fn leave_cgroup(&mut self);
    /// Run prestart and createRuntime hooks for the restored init `pid`.
    fn run_hooks(&mut self, pid: i32) -> Result<(), String>;
    /// Kill whatever runs in the container's cgroups and remove them.
    fn destroy(&mut self);
}

/// A successful restore.
#[derive(Debug)]
pub struct RestoreReport {
    /// The restored init process.
    pub pid: i32,
    /// The manifest, if the image had one (runc images do not).
    pub manifest: Option<Manifest>,
    /// The rootfs snapshot was applied (false: not needed or not present).
    pub rootfs_applied: bool,
    /// Why the snapshot was not applied, if it was not.
    pub rootfs_note: String,
    /// What fds 0-2 of the restored init are now (the new external descriptors).
    pub stdio: Vec<String>,
    /// Milliseconds until the process ran again.
    pub restore_ms: f64,
}

/// A failed restore.
#[derive(Debug, thiserror::Error)]
#[error("restore of container {id} failed while {step}: {detail}")]
pub struct RestoreError {
    /// Container id.
    pub id: String,
    /// The step.
    pub step: &'static str,
    /// What went wrong.
    pub detail: String,
}

/// Restore `req` with `criu`, using `host` for cgroups and hooks.
pub fn restore(
    req: &RestoreRequest,
    criu: &dyn CriuClient,
    host: &mut dyn RestoreHost,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let fail = |step: &'static str, detail: String| RestoreError {
        id: req.id.clone(),
        step,
        detail,
    };
    let manifest =
        Manifest::read(&req.image_dir).map_err(|e| fail("reading the manifest", e.to_string()))?;
    if !req.image_dir.join("inventory.img").exists() {
        return Err(fail(
            "checking the image",
            format!(
                "{} holds no CRIU image (inventory.img is missing): pass the --image-path of a checkpoint",
                req.image_dir.display()
            ),
        ));
    }
    let v = criu
        .version()
        .map_err(|e| fail("checking CRIU", e.to_string()))?;
    if v < MIN_CRIU {
        return Err(fail(
            "checking CRIU",
            format!("CRIU {v} is too old: cryo needs CRIU >= 4.2 on this kernel"),
        ));
    }
    let stdio_keys = descriptors::read(&req.image_dir)
        .map_err(|e| fail("reading descriptors.json", e))?
        .unwrap_or_default();
    let mut opts = rpc::Criu_opts::new();
    flags::apply_common(&mut opts, &req.flags.common)
        .map_err(|e| fail("checking options", e.to_string()))?;
    std::fs::create_dir_all(&req.work_dir).map_err(|e| {
        fail(
            "creating the work dir",
            format!("{}: {e}", req.work_dir.display()),
        )
    })?;

    let (rootfs_applied, rootfs_note) = restore_rootfs(req, manifest.as_ref())
        .map_err(|e| fail("restoring the root filesystem", e))?;
    restore_devshm(req, manifest.as_ref()).map_err(|e| fail("restoring /dev/shm", e))?;

    let criu_root = req.scratch_dir.join("criu-root");
    let facts = RestoreFacts {
        criu_root: criu_root.clone(),
        host_cgroup_mounts: facts::host_cgroup_mounts(),
        cgroup_path: req.cgroup_path.clone(),
    };
    let plan = restore_plan(&req.spec, &facts, &stdio_keys, &req.flags.common.empty_ns)
        .map_err(|e| fail("planning the restore", e.to_string()))?;
    let extra_fds = fill_opts(&mut opts, &plan, req).map_err(|e| fail("preparing", e))?;

    // Compressed page images (--compress-pages) are staged: CRIU reads plain images.
    let compressed = manifest
        .as_ref()
        .map(|m| m.compressed_pages.clone())
        .unwrap_or_default();
    if !compressed.is_empty() && req.flags.common.lazy_pages {
        return Err(fail(
            "checking options",
            "this image's pages are compressed (checkpoint --compress-pages) and --lazy-pages \
             serves pages from the image after the restore returns: restore without \
             --lazy-pages, or checkpoint without --compress-pages"
                .into(),
        ));
    }
    let staged = if compressed.is_empty() {
        None
    } else {
        Some(
            crate::pages::StagedImages::stage(
                &req.image_dir,
                &compressed,
                &req.work_dir.join(".cryo-staged-images"),
            )
            .map_err(|e| fail("decompressing the page images", e))?,
        )
    };
    let images_dir = staged
        .as_ref()
        .map_or_else(|| req.image_dir.clone(), |s| s.dir().to_path_buf());

    // --lazy-pages: memory comes through userfaultfd from a lazy-pages daemon serving the
    // image (killed again on any failure below, left to finish copying on success).
    let lazy = if req.flags.common.lazy_pages {
        criu.lazy_pages_daemon(&req.image_dir, &req.work_dir)
            .map_err(|e| fail("starting CRIU's lazy-pages daemon", e.to_string()))?
    } else {
        None
    };

    // From here on every failure must undo: mount, cgroups, processes, pid file.
    let mount = RootMount::bind(&req.rootfs, &criu_root)
        .map_err(|e| fail("mounting the rootfs for CRIU", e))?;
    let cg_roots = match host.join_cgroup() {
        Ok(r) => r,
        Err(e) => {
            host.destroy();
            return Err(fail("creating the cgroup", e));
        }
    };
    for (ctrl, path) in cg_roots {
        let mut root = rpc::Cgroup_root::new();
        if !ctrl.is_empty() {
            root.set_ctrl(ctrl);
        }
        root.set_path(path);
        opts.cg_root.push(root);
    }
    let call = CriuCall {
        kind: CallKind::Restore,
        opts,
        images_dir,
        work_dir: req.work_dir.clone(),
        extra_fds,
        inherit_stdio: true,
    };
    let mut restored: Option<i32> = None;
    let console = req.console_socket.clone();
    let result = {
        let mut on_notify = |n: Notification<'_>| -> Result<(), String> {
            match n.script {
                "setup-namespaces" => host.run_hooks(n.pid),
                "post-restore" => {
                    restored = Some(n.pid);
                    Ok(())
                }
                "orphan-pts-master" => match (n.fd, &console) {
                    (Some(fd), Some(sock)) => send_console(sock, fd),
                    (_, None) => Err(
                        "the checkpoint has a terminal: pass --console-socket to receive it".into(),
                    ),
                    (None, _) => Err("CRIU sent no pty master".into()),
                },
                _ => Ok(()),
            }
        };
        criu.call(call, &mut on_notify)
    };
    host.leave_cgroup();
    drop(mount);
    drop(staged);
    let pid = match result {
        Ok(outcome) => outcome.restored_pid.or(restored),
        Err(e) => {
            host.destroy();
            return Err(fail("restoring with CRIU", e.to_string()));
        }
    };
    let Some(pid) = pid else {
        host.destroy();
        return Err(fail(
            "restoring with CRIU",
            "CRIU reported no restored pid".into(),
        ));
    };
    if let Some(pf) = &req.pid_file {
        if let Err(e) = cryo_oci::atomic::write_atomic(pf, pid.to_string().as_bytes()) {
            host.destroy();
            return Err(fail(
                "writing the pid file",
                format!("{}: {e}", pf.display()),
            ));
        }
    }
    if let Some(daemon) = lazy {
        daemon.detach();
    }
    Ok(RestoreReport {
        pid,
        manifest,
        rootfs_applied,
        rootfs_note,
        stdio: descriptors::read_stdio(std::process::id() as i32),
        restore_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Apply the image's rootfs snapshot to the target unless it is the very upper dir captured.
fn restore_rootfs(
    req: &RestoreRequest,
    manifest: Option<&Manifest>,
) -> Result<(bool, String), String> {
    let Some(m) = manifest else {
        return Ok((
            false,
            "image has no cryo manifest (made by runc?): rootfs used as is".into(),
        ));
    };
    let check = |applied: bool, note: String| -> Result<(bool, String), String> {
        let files: Vec<rootfs::OpenFile> = m
            .open_files
            .iter()
            .map(|f| rootfs::OpenFile {
                path: f.path.clone(),
                size: f.size,
                deleted: false,
            })
            .collect();
        rootfs::verify_open_files(&req.rootfs, &files).map_err(|e| e.to_string())?;
        Ok((applied, note))
    };
    let Some(snapshot) = &m.rootfs.snapshot else {
        let why = m.rootfs.skipped_because.clone().unwrap_or_default();
        return check(false, format!("no rootfs snapshot in the image ({why})"));
    };
    if req.flags.no_rootfs_restore {
        return check(false, "--no-rootfs-restore".into());
    }
    if let Ok(rootfs::RootfsKind::Overlay { upper_dir, .. }) = rootfs::detect_rootfs(&req.rootfs) {
        if m.rootfs.upper_identity.is_some()
            && facts::identity(&upper_dir) == m.rootfs.upper_identity
        {
            return check(
                false,
                "restoring in place: the rootfs is the upper dir that was captured".into(),
            );
        }
    }
    // Until the engine keeps the transaction open across CRIU: applied and kept at once.
    let policy = rootfs::ApplyPolicy::for_spec(&req.spec).with_legacy_sparse(true);
    let undo = rootfs::UndoLocation::default();
    rootfs::apply_changeset(&req.image_dir.join(snapshot), &req.rootfs, &policy, &undo)
        .and_then(rootfs::AppliedChangeset::commit)
        .map_err(|e| e.to_string())?;
    check(true, "rootfs snapshot applied".into())
}

/// Refill the new container's host-mounted /dev/shm from the image, unless it is the same
/// directory that was captured (restore in place).
fn restore_devshm(req: &RestoreRequest, manifest: Option<&Manifest>) -> Result<(), String> {
    let Some(file) = manifest.and_then(|m| m.devshm.as_ref()) else {
        return Ok(());
    };
    let Some(target) = facts::host_devshm(&req.spec) else {
        return Err(format!(
            "the checkpoint holds a /dev/shm snapshot ({file}) but the new spec bind-mounts no host directory at /dev/shm"
        ));
    };
    let has_entries = std::fs::read_dir(&target)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if has_entries {
        return Ok(()); // the same (or an already filled) shm: keep what is there
    }
    rootfs::apply_changeset(
        &req.image_dir.join(file),
        &target,
        &rootfs::ApplyPolicy::no_devices().with_legacy_sparse(true),
        &rootfs::UndoLocation::default(),
    )
    .and_then(rootfs::AppliedChangeset::commit)
    .map_err(|e| e.to_string())
}

fn fill_opts(
    opts: &mut rpc::Criu_opts,
    plan: &RestorePlan,
    req: &RestoreRequest,
) -> Result<Vec<OwnedFd>, String> {
    opts.set_root(plan.root.to_string_lossy().into_owned());
    opts.set_rst_sibling(true);
    opts.set_evasive_devices(true);
    opts.set_orphan_pts_master(true);
    opts.set_empty_ns(plan.empty_ns);
    opts.set_tcp_close(req.flags.tcp_close);
    if let Some(p) = &req.flags.lsm_profile {
        opts.set_lsm_profile(p.clone());
    }
    if let Some(c) = &req.flags.lsm_mount_context {
        opts.set_lsm_mount_context(c.clone());
    }
    if let Some(cfg) = flags::config_file(req.spec.annotations().as_ref()) {
        opts.set_config_file(cfg);
    }
    for m in &plan.ext_mounts {
        let mut e = rpc::Ext_mount_map::new();
        e.set_key(m.key.clone());
        e.set_val(m.val.clone());
        opts.ext_mnt.push(e);
    }
    let mut extra = Vec::new();
    for f in &plan.inherit_fds {
        let fd = match &f.source {
            FdSource::Stdio(n) => *n,
            FdSource::NsPath(p) => {
                let file = std::fs::File::open(p).map_err(|e| {
                    format!("Requested namespace {} does not exist: {e}", p.display())
                })?;
                extra.push(OwnedFd::from(file));
                CriuCall::extra_fd_number(extra.len() - 1)
            }
        };
        let mut i = rpc::Inherit_fd::new();
        i.set_key(f.key.clone());
        i.set_fd(fd);
        opts.inherit_fd.push(i);
    }
    for (ns, path) in &plan.join_ns {
        let mut j = rpc::Join_namespace::new();
        j.set_ns(ns.clone());
        j.set_ns_file(path.to_string_lossy().into_owned());
        opts.join_ns.push(j);
    }
    Ok(extra)
}

/// The rootfs bind-mounted at a private mount point: CRIU needs its root to be a mount point
/// whose parent is not overmounted. Unmounted (lazily) and removed on drop.
struct RootMount {
    target: PathBuf,
}

impl RootMount {
    fn bind(source: &Path, target: &Path) -> Result<Self, String> {
        use nix::mount::{mount, MsFlags};
        std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind {} on {}: {e}", source.display(), target.display()))?;
        // Slave, not private: CRIU copies the dumped root's sharing from this mount
        // (MOVE_MOUNT_SET_GROUP refuses a private source: docker's rootfs was a slave of the
        // host's overlay mount), while nothing CRIU mounts below propagates back to the host.
        let _ = mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        );
        Ok(Self {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for RootMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// Hand the restored pty master to the caller's console socket (SCM_RIGHTS), as runc does.
fn send_console(socket: &Path, fd: OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{
        connect, sendmsg, socket as mksock, AddressFamily, ControlMessage, MsgFlags, SockFlag,
        SockType, UnixAddr,
    };
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;
    let s = mksock(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("console socket: {e}"))?;
    let addr = UnixAddr::new(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    connect(s.as_raw_fd(), &addr).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let fds = [fd.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("send pty to {}: {e}", socket.display()))?;
    Ok(())
}
