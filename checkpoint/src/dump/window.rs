//! Step 2 of a checkpoint: the freeze window. cryo freezes when CRIU sends its `pre-dump`
//! notification, so CRIU's own start (probing the kernel, parsing the tree) runs while the
//! container still runs; CRIU then finds the cgroup frozen and leaves it so. The freeze is a
//! [`Frozen`] value: dropping it thaws, unless the container was paused before.

use std::time::{Duration, Instant};

use cryo_cgroup::{CgroupError, FreezeGuard};

use super::prepare::Prepared;
use super::steps::{rootfs_record, signal_status_fd};
use super::{ms, CheckpointError, DumpError, LeftAs, DEVSHM_FILE};
use crate::criu::{CallKind, CallObserver, CriuCall, Deadline, Notification};
use crate::guardian::{deadline_after, Guardian, Order};
use crate::manifest::{OpenFileRecord, RootfsRecord};
use crate::{facts, rootfs};

/// The container frozen by cryo (or found paused). Dropped, it thaws (a paused container stays
/// paused); [`Frozen::release`] thaws and tells the guardian.
pub(super) struct Frozen<'a> {
    guard: FreezeGuard<'a>,
    /// When the freeze was requested.
    pub(super) since: Instant,
    /// How long the freeze itself took.
    pub(super) freeze_ms: f64,
}

impl Frozen<'_> {
    /// Whether the container was paused before the checkpoint.
    pub(super) fn was_paused(&self) -> bool {
        self.guard.was_frozen_before()
    }

    /// What a failure leaves once this is dropped.
    pub(super) fn left(&self) -> LeftAs {
        if self.was_paused() {
            LeftAs::Paused
        } else {
            LeftAs::Thawed
        }
    }

    /// Thaw now (unless paused before) and tell the guardian there is nothing to thaw.
    pub(super) fn release(self, guardian: &mut Guardian) -> Result<(), CgroupError> {
        self.guard.release()?;
        let _ = guardian.order(&Order::Thawed);
        Ok(())
    }

    /// Thaw whatever the state before: the tasks were just killed and must thaw to die.
    pub(super) fn thaw_to_die(self, guardian: &mut Guardian) {
        let _ = self.guard.force_thaw();
        let _ = guardian.order(&Order::Thawed);
    }
}

/// CRIU's dump done, the container still frozen (or paused), the rootfs captured.
/// `frozen` is declared first: on a failure it thaws before anything else is undone.
pub(crate) struct Dumped<'r, 'a> {
    pub(super) frozen: Frozen<'a>,
    pub(super) p: Prepared<'r, 'a>,
    pub(super) open_files: Vec<OpenFileRecord>,
    pub(super) staging_wait_ms: f64,
    pub(super) dump_ms: f64,
    pub(super) rootfs: RootfsRecord,
    pub(super) devshm: Option<String>,
    pub(super) rootfs_capture_ms: f64,
    pub(super) rootfs_wait_ms: f64,
}

impl Dumped<'_, '_> {
    /// What the container is left as if this is dropped (another member of a group failed).
    pub(crate) fn left_if_dropped(&self) -> LeftAs {
        self.frozen.left()
    }
}

/// The regular files the container's processes hold open (deleted ones left out).
fn list_open_files(
    cgroup: &std::path::Path,
    rootfs: &std::path::Path,
) -> Result<Vec<OpenFileRecord>, rootfs::RootfsError> {
    let pids = facts::cgroup_pids(cgroup);
    Ok(rootfs::collect_open_files(&pids, rootfs)?
        .into_iter()
        .filter(|f| !f.deleted)
        .map(|f| OpenFileRecord {
            path: f.path,
            size: f.size,
        })
        .collect())
}

/// The observer of CRIU's dump: freezes at `pre-dump`, keeps the deadlines, answers
/// `status-ready`.
struct Window<'p, 'r, 'a> {
    p: &'p mut Prepared<'r, 'a>,
    call_deadline: Instant,
    frozen: Option<Frozen<'a>>,
    open_files: Vec<OpenFileRecord>,
    staging_wait_ms: f64,
    /// A failure of cryo's own inside a notification (reported over CRIU's abort).
    cause: Option<(&'static str, DumpError)>,
}

impl CallObserver for Window<'_, '_, '_> {
    fn started(&mut self, pid: i32) -> Result<(), String> {
        self.p
            .guardian
            .order(&Order::Criu { pid })
            .map_err(|e| self.keep("starting CRIU", e.into()))
    }

    fn notify(&mut self, n: Notification<'_>) -> Result<(), String> {
        match n.script {
            "pre-dump" if self.frozen.is_none() => self.freeze(),
            "status-ready" => self.page_server_ready(),
            _ => Ok(()),
        }
    }

    fn deadline(&self) -> Option<Deadline> {
        let call = Deadline {
            at: self.call_deadline,
            what: format!(
                "CRIU worked for longer than --criu-timeout {}s",
                self.p.req.criu_timeout.as_secs()
            ),
        };
        let Some(f) = self.frozen.as_ref().filter(|f| !f.was_paused()) else {
            return Some(call);
        };
        let freeze = Deadline {
            at: f.since + self.p.freeze_timeout,
            what: format!(
                "the container stayed frozen for --freeze-timeout {}s while CRIU was still \
                 dumping (raise it for a container this big)",
                self.p.freeze_timeout.as_secs()
            ),
        };
        Some(if freeze.at < call.at { freeze } else { call })
    }

    fn interrupted(&self) -> bool {
        (self.p.env.interrupted)()
    }
}

impl Window<'_, '_, '_> {
    /// Remember a failure of cryo's own and give CRIU its message.
    fn keep(&mut self, step: &'static str, cause: DumpError) -> String {
        let msg = cause.to_string();
        self.cause.get_or_insert((step, cause));
        msg
    }

    /// `pre-dump`: what the freeze writes is faulted in first, while the container runs; the
    /// guardian learns of the freeze before it happens; then freeze and list the open files.
    /// A member of a group freezes with the others, and returns only once all are frozen.
    fn freeze(&mut self) -> Result<(), String> {
        let t = Instant::now();
        if let Some(r) = &self.p.receiver {
            r.wait_staged();
        }
        if let Some(c) = self.p.capture.as_mut() {
            c.wait_prepared();
        }
        self.staging_wait_ms = ms(t.elapsed());
        if let Some(g) = self.p.rendezvous {
            g.ready_to_freeze()
                .map_err(|e| self.keep("waiting for the group to freeze", DumpError::Group(e)))?;
        }
        let freezer = self.p.env.freezer;
        let was_frozen = freezer
            .state()
            .map_err(|e| self.keep("freezing the container", e.into()))?
            == cryo_cgroup::FreezerState::Frozen;
        let order = Order::Freezing {
            cgroup: freezer.path().to_path_buf(),
            was_frozen,
            // The guardian's backstop comes a little after cryo's own deadline.
            deadline_unix_ms: Some(deadline_after(
                self.p.freeze_timeout + Duration::from_secs(2),
            )),
        };
        self.p
            .guardian
            .order(&order)
            .map_err(|e| self.keep("freezing the container", e.into()))?;
        let since = Instant::now();
        let guard = FreezeGuard::freeze(freezer, self.p.freeze_timeout)
            .map_err(|e| self.keep("freezing the container", e.into()))?;
        self.frozen = Some(Frozen {
            guard,
            since,
            freeze_ms: ms(since.elapsed()),
        });
        if self.p.kind == CallKind::Dump && self.p.still_at_pre_dump {
            self.open_files = list_open_files(freezer.path(), &self.p.req.rootfs)
                .map_err(|e| self.keep("listing open files", e.into()))?;
        }
        // The container's tree is still; only CRIU's own temporary directory may come and go
        // in it (see rootfs::FrozenTop).
        if let Some(c) = self.p.capture.as_mut() {
            c.start_beside_dump();
        }
        if let Some(g) = self.p.rendezvous {
            g.frozen()
                .map_err(|e| self.keep("waiting for the group to freeze", DumpError::Group(e)))?;
        }
        if self.interrupted() {
            return Err(self.keep("freezing the container", DumpError::Interrupted));
        }
        Ok(())
    }

    /// `status-ready` (lazy pages): CRIU's page server waits for the restore side, which
    /// reads the image now: publish it, then tell the caller.
    fn page_server_ready(&mut self) -> Result<(), String> {
        if self.p.req.flags.common.lazy_pages {
            self.p
                .staging
                .publish()
                .map_err(|e| self.keep("publishing the image", e.into()))?;
        }
        if let Some(fd) = self.p.req.flags.status_fd {
            signal_status_fd(fd)
                .map_err(|e| self.keep("signalling --status-fd", DumpError::Inspect(e)))?;
        }
        Ok(())
    }
}

impl<'r, 'a> Prepared<'r, 'a> {
    /// Run CRIU's dump inside the freeze window; on success the container is still frozen
    /// and the rootfs captured.
    pub(crate) fn dump(mut self) -> Result<Dumped<'r, 'a>, CheckpointError> {
        let call = CriuCall {
            kind: self.kind,
            opts: std::mem::take(&mut self.opts),
            images_dir: self.staging.dir().to_path_buf(),
            work_dir: self.work_dir.clone(),
            extra_fds: std::mem::take(&mut self.extra_fds),
            inherit_stdio: false,
            // Every image file holds the container's memory or describes it: private.
            umask: Some(0o077),
        };
        let t_dump = Instant::now();
        let criu = self.env.criu;
        let mut w = Window {
            call_deadline: t_dump + self.req.criu_timeout,
            p: &mut self,
            frozen: None,
            open_files: Vec::new(),
            staging_wait_ms: 0.0,
            cause: None,
        };
        let result = criu.call(call, &mut w);
        let Window {
            frozen,
            open_files,
            staging_wait_ms,
            cause,
            ..
        } = w;
        let dump_ms = ms(t_dump.elapsed());
        let failed = match (result, cause) {
            (_, Some((step, cause))) => Some((step, cause)),
            (Err(e), None) => Some(("dumping with CRIU", self.criu_failure_cause(e))),
            (Ok(_), None) => None,
        };
        if let Some((step, cause)) = failed {
            let mut left = self.undo_freeze(frozen);
            if left == LeftAs::Thawed && init_dies_after_thaw(self.req.pid) {
                left = LeftAs::Died;
            }
            return Err(self.fail(step, cause, left));
        }
        let Some(frozen) = frozen else {
            return Err(self.fail(
                "dumping with CRIU",
                DumpError::NeverFroze,
                LeftAs::Untouched,
            ));
        };
        // CRIU found the cgroup frozen by cryo: record the state the container had (see
        // crate::cgroup_image).
        if let Err(e) =
            crate::cgroup_image::record_freezer_state(self.staging.dir(), frozen.was_paused())
        {
            let left = self.undo_freeze(Some(frozen));
            return Err(self.fail(
                "recording the freezer state",
                DumpError::Inspect(e.to_string()),
                left,
            ));
        }
        let mut open_files = open_files;
        if self.kind == CallKind::Dump && !self.still_at_pre_dump && !self.criu_kills {
            // CRIU froze the tree again before letting its tasks go (a GPU container).
            match list_open_files(self.env.freezer.path(), &self.req.rootfs) {
                Ok(f) => open_files = f,
                Err(e) => {
                    let left = self.undo_freeze(Some(frozen));
                    return Err(self.fail("listing open files", e.into(), left));
                }
            }
        }
        if (self.env.interrupted)() {
            let left = self.undo_freeze(Some(frozen));
            return Err(self.fail("dumping with CRIU", DumpError::Interrupted, left));
        }
        // The rootfs capture ran beside CRIU's dump (or runs now), still frozen: files and
        // process state agree.
        let t_capture = Instant::now();
        let mut record = rootfs_record(&self.rootfs_kind, self.req.snapshot);
        let mut rootfs_capture_ms = 0.0;
        let mut devshm = None;
        if self.kind == CallKind::Dump {
            if let Some(c) = self.capture.as_mut() {
                let (report, took) = c.finish();
                match report {
                    Ok(report) => {
                        rootfs_capture_ms = took;
                        record.snapshot = Some(rootfs::RAW_CHANGESET.to_string());
                        record.device_nodes = report.device_nodes.clone();
                        record.entries = report.entries;
                        record.bytes = report.bytes;
                        record.logical_bytes = Some(report.logical_bytes);
                    }
                    Err(e) => {
                        let left = self.undo_freeze(Some(frozen));
                        return Err(self.fail("capturing the overlay upper dir", e.into(), left));
                    }
                }
            }
            if let Some(src) = facts::host_devshm(&self.req.spec) {
                let dst = self.staging.dir().join(DEVSHM_FILE);
                if let Err(e) = rootfs::capture_dir(&src, &dst) {
                    let left = self.undo_freeze(Some(frozen));
                    return Err(self.fail("capturing /dev/shm", e.into(), left));
                }
                devshm = Some(DEVSHM_FILE.to_string());
            }
        }
        let rootfs_wait_ms = ms(t_capture.elapsed());
        Ok(Dumped {
            frozen,
            p: self,
            open_files,
            staging_wait_ms,
            dump_ms,
            rootfs: record,
            devshm,
            rootfs_capture_ms,
            rootfs_wait_ms,
        })
    }

    /// Thaw (or leave paused) after a failure; what the container is left as.
    pub(super) fn undo_freeze(&mut self, frozen: Option<Frozen<'_>>) -> LeftAs {
        let Some(f) = frozen else {
            return LeftAs::Untouched;
        };
        let left = f.left();
        if let Err(e) = f.release(&mut self.guardian) {
            tracing::error!("after a failed checkpoint, thawing failed: {e}");
        }
        left
    }

    /// CRIU's error, unless cryo's own page receiver failed to write first (a full disk
    /// reaches CRIU only as a broken pipe): then the receiver's error is the cause.
    fn criu_failure_cause(&mut self, criu: crate::criu::CriuError) -> DumpError {
        if let Some(r) = self.receiver.take() {
            if let Err(e) = r.finish() {
                if e.is_write_failure() {
                    return e.into();
                }
            }
        }
        // CRIU says only "errno 0" when a write of its own fails, and its log sits on the
        // same full filesystem: name the full disk when that is what it met.
        let dir = self.staging.dir();
        match nix::sys::statvfs::statvfs(dir) {
            Ok(vfs) if is_full(&vfs) => DumpError::FilledUp {
                path: dir.to_path_buf(),
                free: vfs.blocks_available().saturating_mul(vfs.fragment_size()),
                source: Box::new(criu),
            },
            _ => criu.into(),
        }
    }
}

/// Whether the container's init dies right after the thaw that followed a failed dump. A CRIU
/// killed while its code was inside a task (the parasite, or the syscall it plants to inject
/// it) leaves that task to die of SIGTRAP as soon as it runs: nothing can undo that, but the
/// user must hear it instead of "keeps running".
fn init_dies_after_thaw(pid: i32) -> bool {
    let until = Instant::now() + Duration::from_millis(300);
    loop {
        let gone = match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
            Ok(stat) => matches!(stat.state, 'Z' | 'X' | 'x'),
            Err(_) => true,
        };
        if gone {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A filesystem with less room left than CRIU's next write may need (a page-image chunk).
fn is_full(vfs: &nix::sys::statvfs::Statvfs) -> bool {
    const CRIU_WRITE: u64 = 4 << 20;
    vfs.blocks_available().saturating_mul(vfs.fragment_size()) < CRIU_WRITE
}
