//! The restore's steps (see the module docs of [`super`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::journal::{CgroupUndo, JournalFile};
use super::mount::RootMount;
use super::rootfs_step;
use super::{
    version_string, RestoreCause, RestoreEnv, RestoreError, RestoreHost, RestoreReport,
    RestoreRequest,
};
use crate::criu::lazy::LazyPagesDaemon;
use crate::criu::{rpc, CallKind, CallObserver, CriuCall, Deadline, Notification};
use crate::dump::MIN_CRIU;
use crate::guardian::{Guardian, Order};
use crate::image::alongside::{AlongsideCheck, AlongsideTimes};
use crate::image::reads::{chain_reads, narrow_to_reads};
use crate::image::{verify_image, verify_image_but_pages, ImageError};
use crate::manifest::Manifest;
use crate::plan::{restore_plan, FdSource, RestoreFacts, RestorePlan};
use crate::{descriptors, facts, flags, rootfs};

/// A restored container whose state the caller has yet to record. Dropped without
/// [`PendingRestore::commit`], everything the restore made is undone, the restored processes
/// included.
pub struct PendingRestore<'h> {
    /// What was restored.
    pub report: RestoreReport,
    id: String,
    journal: Option<JournalFile>,
    lazy: Option<LazyPagesDaemon>,
    cgroups: &'h dyn CgroupUndo,
    guardian: Option<Guardian>,
}

impl PendingRestore<'_> {
    /// The container's state is recorded: keep everything, let the guardian go.
    pub fn commit(mut self) -> RestoreReport {
        if let Some(daemon) = self.lazy.take() {
            daemon.detach();
        }
        let id = self.id.clone();
        if let Some(target) = self
            .journal
            .as_ref()
            .and_then(|j| j.journal().rootfs.clone())
        {
            // Kept before the journal goes: killed in between, the next verb finds the
            // commit done (or finishes it) and undoes nothing of the rootfs.
            if let Err(e) = rootfs_step::commit(&target) {
                self.report.warnings.push(format!(
                    "keeping the applied rootfs changes in {}: {e}",
                    target.display()
                ));
            }
        }
        if let Some(j) = self.journal.take() {
            if let Err(e) = j.remove() {
                self.report
                    .warnings
                    .push(format!("could not remove the restore journal: {e}"));
            }
        }
        if let Some(mut g) = self.guardian.take() {
            let _ = g.order(&Order::CleanupDone { tag: id });
            if let Err(e) = g.dismiss() {
                self.report
                    .warnings
                    .push(format!("the guardian process ended badly: {e}"));
            }
        }
        std::mem::replace(&mut self.report, RestoreReport::empty())
    }
}

impl Drop for PendingRestore<'_> {
    fn drop(&mut self) {
        if let Some(j) = self.journal.take() {
            for p in j.undo(self.cgroups) {
                tracing::error!("undoing an uncommitted restore: {p}");
            }
        }
    }
}

impl RestoreReport {
    fn empty() -> Self {
        Self {
            pid: 0,
            manifest: None,
            rootfs_applied: false,
            rootfs_note: String::new(),
            stdio: Vec::new(),
            restore_ms: 0.0,
            verify_ms: 0.0,
            pages_check: None,
            warnings: Vec::new(),
        }
    }
}

/// Restore `req` through `env`, using `host` for cgroups and hooks.
pub fn restore<'h>(
    req: &RestoreRequest,
    env: &RestoreEnv<'_>,
    host: &'h mut dyn RestoreHost,
) -> Result<PendingRestore<'h>, RestoreError> {
    let started = Instant::now();
    let fail = |step: &'static str, cause: RestoreCause| RestoreError {
        id: req.id.clone(),
        step,
        cause: Box::new(cause),
        undo_problems: Vec::new(),
    };
    // 1. Nothing is touched until the image and CRIU are known good: every file, except that
    // the page images' digests are checked beside CRIU and waited for before any restored
    // task runs (`image::alongside`). --lazy-pages serves pages after the tasks run: there,
    // everything is checked first.
    let mut verified = if req.flags.common.lazy_pages {
        verify_image(&req.image_dir)
    } else {
        verify_image_but_pages(&req.image_dir)
    }
    .map_err(|e| fail("verifying the image", e.into()))?;
    let mut pending = std::mem::take(&mut verified.pages_pending);
    // A chain: of its older generations, only the blocks the restore reads are checked, in
    // the order CRIU reads them (`image::reads`). Should the chain's pagemaps not resolve,
    // every byte is checked and CRIU reports the break.
    let mut order = Vec::new();
    if !verified.ancestors.is_empty() {
        match chain_reads(&req.image_dir).and_then(|r| {
            narrow_to_reads(&r, &mut pending)?;
            Ok(r)
        }) {
            Ok(r) => order = r.in_order,
            Err(e) => tracing::debug!("checking the chain's page images whole: {e}"),
        }
    }
    let pages_check = (!pending.is_empty()).then(|| AlongsideCheck::start(pending, order));
    let manifest = verified.manifest.clone();
    let here = env
        .criu
        .version()
        .map_err(|e| fail("checking CRIU", e.into()))?;
    if here < MIN_CRIU {
        return Err(fail(
            "checking CRIU",
            crate::criu::CriuError::TooOld {
                found: version_string(here),
                needed: "4.2".into(),
            }
            .into(),
        ));
    }
    if let Some(m) = manifest.as_ref().filter(|m| m.criu_version > here) {
        return Err(fail(
            "checking CRIU",
            RestoreCause::CriuOlderThanImage {
                made: version_string(m.criu_version),
                here: version_string(here),
            },
        ));
    }
    let stdio_keys = descriptors::read(&req.image_dir)
        .map_err(|e| fail("reading descriptors.json", RestoreCause::Host(e)))?
        .ok_or_else(|| {
            fail(
                "reading descriptors.json",
                RestoreCause::Host(format!(
                    "{} has no descriptors.json: it is not a complete checkpoint",
                    req.image_dir.display()
                )),
            )
        })?;
    let mut opts = rpc::Criu_opts::new();
    flags::apply_common(&mut opts, &req.flags.common)
        .map_err(|e| fail("checking options", e.into()))?;
    let compressed = manifest
        .as_ref()
        .map(|m| m.compressed_pages.clone())
        .unwrap_or_default();
    if !compressed.is_empty() && req.flags.common.lazy_pages {
        return Err(fail(
            "checking options",
            RestoreCause::Host(
                "this image's pages are compressed (checkpoint --compress-pages) and --lazy-pages \
                 serves pages from the image after the restore returns: restore without \
                 --lazy-pages, or checkpoint without --compress-pages"
                    .into(),
            ),
        ));
    }
    let criu_root = req.scratch_dir.join("criu-root");
    let facts = RestoreFacts {
        criu_root: criu_root.clone(),
        host_cgroup_mounts: facts::host_cgroup_mounts(),
        cgroup_path: req.cgroup_path.clone(),
    };
    let plan = restore_plan(&req.spec, &facts, &stdio_keys, &req.flags.common.empty_ns)
        .map_err(|e| fail("planning the restore", e.into()))?;
    let extra_fds =
        fill_opts(&mut opts, &plan, req).map_err(|e| fail("preparing", RestoreCause::Host(e)))?;

    // 2. From here everything made is recorded first, and undone on failure.
    let mut guardian = Guardian::start(env.guardian, env.lock)
        .map_err(|e| fail("starting the guardian", e.into()))?;
    guardian
        .order(&Order::Cleanup {
            tag: req.id.clone(),
        })
        .map_err(|e| fail("starting the guardian", e.into()))?;
    let journal = JournalFile::create(&req.scratch_dir, &req.id).map_err(|source| {
        fail(
            "writing the restore journal",
            RestoreCause::Io {
                step: "write",
                path: req.scratch_dir.join(super::journal::FILE),
                source,
            },
        )
    })?;
    let mut s = Steps {
        req,
        env,
        journal: Some(journal),
        guardian: Some(guardian),
        started,
        manifest,
        warnings: verified.warnings,
        verify_ms: verified.verify_ms,
        pages_check,
    };
    match s.make(host, opts, extra_fds, &compressed, &criu_root) {
        Ok((report, lazy)) => Ok(PendingRestore {
            report,
            id: req.id.clone(),
            journal: s.journal.take(),
            lazy,
            cgroups: host,
            guardian: s.guardian.take(),
        }),
        Err((step, cause)) => {
            let problems = s.journal.take().map(|j| j.undo(&*host)).unwrap_or_default();
            // Undone: the guardian has nothing left to do.
            if let Some(g) = s.guardian.take() {
                let _ = g.dismiss();
            }
            Err(RestoreError {
                id: req.id.clone(),
                step,
                cause: Box::new(cause),
                undo_problems: problems,
            })
        }
    }
}

type StepError = (&'static str, RestoreCause);

/// The restore from the journal on.
struct Steps<'r, 'e, 'a> {
    req: &'r RestoreRequest,
    env: &'e RestoreEnv<'a>,
    journal: Option<JournalFile>,
    guardian: Option<Guardian>,
    started: Instant,
    manifest: Option<Manifest>,
    warnings: Vec<String>,
    verify_ms: f64,
    /// The page images' digests, being checked beside everything else until CRIU's
    /// `post-restore` waits for them.
    pages_check: Option<AlongsideCheck>,
}

impl Steps<'_, '_, '_> {
    fn record(
        &mut self,
        step: &'static str,
        change: impl FnOnce(&mut super::journal::Journal),
    ) -> Result<(), StepError> {
        let path = self.req.scratch_dir.join(super::journal::FILE);
        self.journal
            .as_mut()
            .map_or(Ok(()), |j| j.record(change))
            .map_err(|source| {
                (
                    step,
                    RestoreCause::Io {
                        step: "write",
                        path,
                        source,
                    },
                )
            })
    }

    fn make(
        &mut self,
        host: &mut dyn RestoreHost,
        mut opts: rpc::Criu_opts,
        extra_fds: Vec<OwnedFd>,
        compressed: &[String],
        criu_root: &Path,
    ) -> Result<(RestoreReport, Option<LazyPagesDaemon>), StepError> {
        let req = self.req;
        create_private_dir(&req.work_dir).map_err(|c| ("creating the work directory", c))?;
        let (rootfs_applied, rootfs_note) = self.restore_rootfs(host)?;
        self.restore_devshm()?;
        let staged = if compressed.is_empty() {
            None
        } else {
            let dir = req.work_dir.join(".cryo-staged-images");
            self.record("decompressing the page images", |j| {
                j.staged_images = Some(dir.clone())
            })?;
            Some(
                crate::pages::StagedImages::stage(&req.image_dir, compressed, &dir)
                    .map_err(|e| ("decompressing the page images", RestoreCause::Host(e)))?,
            )
        };
        let images_dir = staged
            .as_ref()
            .map_or_else(|| req.image_dir.clone(), |s| s.dir().to_path_buf());
        // --lazy-pages: memory comes through userfaultfd from a lazy-pages daemon serving the
        // image (killed again on any failure, left to finish copying on success).
        let lazy = if req.flags.common.lazy_pages {
            let d = self
                .env
                .criu
                .lazy_pages_daemon(&req.image_dir, &req.work_dir)
                .map_err(|e| ("starting CRIU's lazy-pages daemon", e.into()))?;
            if let Some(d) = &d {
                let pid = d.pid();
                self.record("starting CRIU's lazy-pages daemon", |j| {
                    j.lazy_daemon = Some(pid)
                })?;
            }
            d
        } else {
            None
        };
        self.record("mounting the rootfs for CRIU", |j| {
            j.criu_root = Some(criu_root.to_path_buf())
        })?;
        let mount = RootMount::bind(&req.rootfs, criu_root)
            .map_err(|e| ("mounting the rootfs for CRIU", RestoreCause::Host(e)))?;
        self.record("creating the cgroup", |j| {
            j.cgroup_path = Some(req.cgroup_path.clone())
        })?;
        let cg_roots = host
            .join_cgroup()
            .map_err(|e| ("creating the cgroup", RestoreCause::Host(e)))?;
        for (ctrl, path) in cg_roots {
            // Controller "" names cgroup2 (an unset one would be a global root).
            let mut root = rpc::Cgroup_root::new();
            root.set_ctrl(ctrl);
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
            umask: None,
        };
        let t_criu = Instant::now();
        let result = {
            let mut obs = Observer {
                guardian: self.guardian.as_mut(),
                host: &mut *host,
                console: req.console_socket.clone(),
                restored: None,
                pages_check: self.pages_check.take(),
                pages_times: None,
                damaged: None,
                deadline: Deadline {
                    at: t_criu + req.criu_timeout,
                    what: format!(
                        "CRIU worked for longer than --criu-timeout {}s",
                        req.criu_timeout.as_secs()
                    ),
                },
                interrupted: self.env.interrupted,
            };
            let r = self.env.criu.call(call, &mut obs);
            match obs.damaged.take() {
                // CRIU was told to undo the restore at `post-restore`: the damage is the cause.
                Some(e) => Err(("verifying the image", RestoreCause::Image(e))),
                None => Ok((
                    r.map(|o| o.restored_pid.or(obs.restored)),
                    obs.pages_check.take(),
                    obs.pages_times,
                )),
            }
        };
        host.leave_cgroup();
        drop(mount);
        drop(staged);
        let (result, unfinished, mut pages_times) = result?;
        let pid = result
            .map_err(|e| ("restoring with CRIU", e.into()))?
            .ok_or((
                "restoring with CRIU",
                RestoreCause::Host("CRIU reported no restored pid".into()),
            ))?;
        // CRIU always notifies `post-restore`; should one not have, the check still ends
        // before the restore is reported (a failure undoes it, the processes included).
        if let Some(check) = unfinished {
            pages_times = Some(
                check
                    .finish()
                    .map_err(|e| ("verifying the image", RestoreCause::Image(e)))?,
            );
        }
        if let Some(pf) = &req.pid_file {
            self.record("writing the pid file", |j| j.pid_file = Some(pf.clone()))?;
            cryo_oci::atomic::write_atomic(pf, pid.to_string().as_bytes()).map_err(|source| {
                (
                    "writing the pid file",
                    RestoreCause::Io {
                        step: "write",
                        path: pf.clone(),
                        source,
                    },
                )
            })?;
        }
        Ok((
            RestoreReport {
                pid,
                manifest: self.manifest.take(),
                rootfs_applied,
                rootfs_note,
                stdio: descriptors::read_stdio(std::process::id() as i32),
                restore_ms: self.started.elapsed().as_secs_f64() * 1000.0,
                verify_ms: self.verify_ms,
                pages_check: pages_times,
                warnings: std::mem::take(&mut self.warnings),
            },
            lazy,
        ))
    }

    /// Apply the image's rootfs snapshot unless the target is the very upper dir captured,
    /// then check the open files.
    fn restore_rootfs(&mut self, host: &dyn RestoreHost) -> Result<(bool, String), StepError> {
        const STEP: &str = "restoring the root filesystem";
        let req = self.req;
        let Some(m) = self.manifest.clone() else {
            return Ok((
                false,
                "image has no cryo manifest (made by runc?): rootfs used as is".into(),
            ));
        };
        let identity = |p: &Path| host.dir_identity(p);
        let (applied, note) =
            match rootfs_step::decide(&m, &req.rootfs, req.flags.no_rootfs_restore, &identity) {
                Some(why) => (false, why),
                None => {
                    let snapshot = m.rootfs.snapshot.clone().unwrap_or_default();
                    self.record(STEP, |j| j.rootfs = Some(req.rootfs.clone()))?;
                    let policy = rootfs_step::policy(&m, &req.spec);
                    rootfs_step::apply(&req.image_dir.join(snapshot), &req.rootfs, &policy)
                        .map_err(|e| (STEP, e.into()))?;
                    (true, "rootfs snapshot applied".to_string())
                }
            };
        rootfs_step::verify_open_files(&m, &req.rootfs).map_err(|e| (STEP, e.into()))?;
        Ok((applied, note))
    }

    /// Refill the new container's host-mounted /dev/shm from the image, unless it already has
    /// content (the same directory, restore in place).
    fn restore_devshm(&mut self) -> Result<(), StepError> {
        const STEP: &str = "restoring /dev/shm";
        let req = self.req;
        let Some(file) = self.manifest.as_ref().and_then(|m| m.devshm.clone()) else {
            return Ok(());
        };
        let Some(target) = facts::host_devshm(&req.spec) else {
            return Err((
                STEP,
                RestoreCause::Host(format!(
                    "the checkpoint holds a /dev/shm snapshot ({file}) but the new spec bind-mounts no host directory at /dev/shm"
                )),
            ));
        };
        let has_entries = std::fs::read_dir(&target)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if has_entries {
            return Ok(());
        }
        self.record(STEP, |j| j.devshm = Some(target.clone()))?;
        // The directory was empty: the journal's undo empties it again, so the apply's own
        // transaction can end here.
        let legacy = self
            .manifest
            .as_ref()
            .is_some_and(|m| m.format == crate::manifest::FORMAT_V1);
        rootfs::apply_changeset(
            &req.image_dir.join(file),
            &target,
            &rootfs::ApplyPolicy::no_devices().with_legacy_sparse(legacy),
            &rootfs::UndoLocation::default(),
        )
        .and_then(rootfs::AppliedChangeset::commit)
        .map_err(|e| (STEP, e.into()))
    }
}

/// The observer of CRIU's restore: hooks, the restored pid, the pty, the deadline.
struct Observer<'x> {
    guardian: Option<&'x mut Guardian>,
    host: &'x mut dyn RestoreHost,
    console: Option<PathBuf>,
    restored: Option<i32>,
    /// The page images' check, finished at `post-restore`.
    pages_check: Option<AlongsideCheck>,
    pages_times: Option<AlongsideTimes>,
    /// What that check found wrong (CRIU was then told to undo the restore).
    damaged: Option<ImageError>,
    deadline: Deadline,
    interrupted: &'x dyn Fn() -> bool,
}

impl CallObserver for Observer<'_> {
    fn started(&mut self, pid: i32) -> Result<(), String> {
        self.host.criu_started();
        match self.guardian.as_mut() {
            Some(g) => g.order(&Order::Criu { pid }).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn notify(&mut self, n: Notification<'_>) -> Result<(), String> {
        match n.script {
            "setup-namespaces" => self.host.run_hooks(n.pid),
            "post-restore" => {
                self.restored = Some(n.pid);
                // No restored task runs before every page it was given is known good.
                if let Some(check) = self.pages_check.take() {
                    match check.finish() {
                        Ok(t) => self.pages_times = Some(t),
                        Err(e) => {
                            let said = e.to_string();
                            self.damaged = Some(e);
                            return Err(said);
                        }
                    }
                }
                self.host.restored(n.pid)
            }
            "orphan-pts-master" => match (n.fd, &self.console) {
                (Some(fd), Some(sock)) => send_console(sock, fd),
                (_, None) => {
                    Err("the checkpoint has a terminal: pass --console-socket to receive it".into())
                }
                (None, _) => Err("CRIU sent no pty master".into()),
            },
            _ => Ok(()),
        }
    }

    fn deadline(&self) -> Option<Deadline> {
        Some(self.deadline.clone())
    }

    fn interrupted(&self) -> bool {
        (self.interrupted)()
    }
}

fn create_private_dir(dir: &Path) -> Result<(), RestoreCause> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| RestoreCause::Io {
            step: "create",
            path: dir.to_path_buf(),
            source,
        })
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
