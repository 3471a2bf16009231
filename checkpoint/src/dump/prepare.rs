//! Step 1 of a checkpoint: everything that can be refused is refused here, before the
//! container is touched; what this step creates (guardian, staging directory, page receiver,
//! capture) is owned by [`Prepared`] and undone when it is dropped.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::steps::{apply_plan, check_criu, detect};
use super::upper::UpperCapture;
use super::{
    freeze_timeout_for, CheckpointError, DumpEnv, DumpError, DumpRequest, LeftAs, Rendezvous,
};
use crate::criu::{rpc, CallKind, CriuCall};
use crate::guardian::{Guardian, Order};
use crate::image::{ImageTarget, Staging};
use crate::page_receiver::{staging, PageReceiver};
use crate::plan::{dump_plan, DumpPlan};
use crate::rootfs::{self, RootfsKind};
use crate::{descriptors, facts, flags};

/// Room left on top of the estimate: CRIU's small images, logs, the manifest.
const SPACE_MARGIN: u64 = 16 << 20;

/// A checkpoint ready to freeze. Fields drop in order; the guardian goes last, so it outlives
/// every undo that runs before it.
pub(crate) struct Prepared<'r, 'a> {
    pub(super) req: &'r DumpRequest,
    pub(super) env: &'r DumpEnv<'a>,
    pub(super) started: Instant,
    /// CRIU's version as checked before anything was touched.
    pub(super) criu_version: u32,
    pub(super) kind: CallKind,
    pub(super) opts: rpc::Criu_opts,
    pub(super) plan: DumpPlan,
    pub(super) rootfs_kind: Option<RootfsKind>,
    pub(super) work_dir: PathBuf,
    pub(super) freeze_timeout: Duration,
    /// CRIU kills the tasks itself at its end (--tcp-established without --leave-running).
    pub(super) criu_kills: bool,
    /// The tree stays still from CRIU's pre-dump notification to the end of its dump (not
    /// with a GPU: the CUDA plugin has CRIU thaw the cgroup; see [`crate::gpu`]). Otherwise
    /// open files and the rootfs are taken after the dump, when CRIU has frozen it again.
    pub(super) still_at_pre_dump: bool,
    pub(super) receiver: Option<PageReceiver>,
    pub(super) extra_fds: Vec<OwnedFd>,
    pub(super) capture: Option<UpperCapture>,
    /// The other members of a coordinated checkpoint, met in the freeze window.
    pub(super) rendezvous: Option<&'r dyn Rendezvous>,
    pub(super) staging: Staging,
    pub(super) guardian: Guardian,
}

impl<'r, 'a> Prepared<'r, 'a> {
    /// Check, plan and set up; nothing of the container is touched.
    pub(crate) fn new(req: &'r DumpRequest, env: &'r DumpEnv<'a>) -> Result<Self, CheckpointError> {
        let started = Instant::now();
        let fail = |step: &'static str, cause: DumpError| CheckpointError {
            id: req.id.clone(),
            step,
            cause: Box::new(cause),
            left: LeftAs::Untouched,
            log: None,
        };
        let criu_version =
            check_criu(env.criu, &req.flags).map_err(|e| fail("checking CRIU", e.into()))?;
        let target = ImageTarget::inspect(&req.image_dir)
            .map_err(|e| fail("checking the image path", e.into()))?;
        let mut guardian = Guardian::start(env.guardian, env.lock)
            .map_err(|e| fail("starting the guardian", e.into()))?;
        let staging =
            Staging::create(target).map_err(|e| fail("creating the image directory", e.into()))?;
        guardian
            .order(&Order::Remove {
                path: staging.dir().to_path_buf(),
            })
            .map_err(|e| fail("starting the guardian", e.into()))?;
        let dir = staging.dir().to_path_buf();
        let mut opts = flags::dump_opts(&req.flags, &dir, req.pid)
            .map_err(|e| fail("checking options", e.into()))?;
        let work_dir = match &req.work_dir {
            Some(w) => {
                create_private(w).map_err(|e| fail("creating the work directory", e))?;
                w.clone()
            }
            None => dir.clone(),
        };
        let facts = facts::gather_dump_facts(req.pid, &req.spec, &req.rootfs, env.freezer.path())
            .map_err(|e| fail("inspecting the container", DumpError::Inspect(e)))?;
        let plan = dump_plan(&req.spec, &facts, &req.flags.common.empty_ns)
            .map_err(|e| fail("planning the dump", e.into()))?;
        let rootfs_kind = detect(req)
            .map_err(|e| fail("inspecting the root filesystem", DumpError::Inspect(e)))?;
        apply_plan(&mut opts, &plan, &req.spec);
        let kind = if req.flags.pre_dump {
            CallKind::PreDump
        } else {
            CallKind::Dump
        };
        // CRIU always leaves the tasks alive (and frozen, as it found them): cryo stops them
        // only after the image is complete and published, so no failure can lose the
        // container. The one exception is runc's TCP semantics: with --tcp-established and no
        // --leave-running CRIU must kill the tasks itself so the network stays locked for the
        // peers until the restore.
        let criu_kills =
            kind == CallKind::Dump && !req.flags.leave_running && req.flags.common.tcp_established;
        opts.set_leave_running(!criu_kills);
        if kind == CallKind::Dump {
            descriptors::write(&dir, &req.stdio).map_err(|source| {
                fail(
                    "writing descriptors.json",
                    DumpError::Io {
                        step: "write",
                        path: dir.join(descriptors::FILE),
                        source,
                    },
                )
            })?;
        }
        let pids = facts::cgroup_pids(env.freezer.path());
        let estimates = staging::estimate(&pids);
        let memory: u64 = estimates.iter().map(|e| e.bytes).sum();
        // A --lazy-pages image is published as soon as CRIU's page server is ready, before
        // the dump ends: a runc-style image, without manifest or rootfs snapshot.
        let upper = match (&rootfs_kind, kind) {
            (Some(RootfsKind::Overlay { upper_dir, .. }), CallKind::Dump)
                if !req.flags.common.lazy_pages =>
            {
                Some(upper_dir.clone())
            }
            _ => None,
        };
        check_space(req, &dir, memory, upper.as_deref())
            .map_err(|e| fail("checking free space", e))?;

        let mut extra_fds = Vec::new();
        let receiver = if let Some(mode) = receives_pages(req, kind) {
            let replaced = req.parent.is_some();
            let (receiver, criu_end) = PageReceiver::start(&dir, estimates, mode, replaced)
                .map_err(|e| fail("starting the page receiver", e.into()))?;
            let mut ps = rpc::Criu_page_server_info::new();
            ps.set_fd(CriuCall::extra_fd_number(extra_fds.len()));
            opts.ps = protobuf::MessageField::some(ps);
            extra_fds.push(criu_end);
            Some(receiver)
        } else {
            None
        };
        let still_at_pre_dump = req.gpu.as_ref().is_none_or(|g| g.tree_still_at_pre_dump());
        let capture = upper.map(|u| {
            UpperCapture::prepare(
                &u,
                &dir.join(rootfs::RAW_CHANGESET),
                &dir.join(rootfs::COMPRESSED_CHANGESET),
                !req.flags.link_remap && still_at_pre_dump,
            )
        });
        Ok(Self {
            req,
            env,
            started,
            criu_version,
            kind,
            opts,
            plan,
            rootfs_kind,
            work_dir,
            freeze_timeout: req.freeze_timeout.unwrap_or(freeze_timeout_for(memory)),
            criu_kills,
            still_at_pre_dump,
            receiver,
            extra_fds,
            capture,
            rendezvous: None,
            staging,
            guardian,
        })
    }

    /// Make this a member of a coordinated checkpoint ([`crate::group`]): it freezes when
    /// `rendezvous` says so, and CRIU always leaves its tasks alive, even to stop the
    /// container: only once every member's image is published are they stopped
    /// (`Published::finish`).
    pub(crate) fn in_group(mut self, rendezvous: &'r dyn Rendezvous) -> Self {
        self.rendezvous = Some(rendezvous);
        if self.criu_kills {
            self.criu_kills = false;
            self.opts.set_leave_running(true);
        }
        self
    }

    /// A failure of a later step, with CRIU's log kept when it would go with the image.
    pub(super) fn fail(
        &self,
        step: &'static str,
        cause: DumpError,
        left: LeftAs,
    ) -> CheckpointError {
        let log = self.keep_log();
        // CRIU's error names its log where CRIU wrote it; if that goes with the staging
        // directory, name the copy instead.
        let cause = match (cause, &log) {
            (DumpError::Criu(e), Some(kept)) => DumpError::Criu(e.with_log(kept)),
            (other, _) => other,
        };
        CheckpointError {
            id: self.req.id.clone(),
            step,
            cause: Box::new(cause),
            left,
            log,
        }
    }

    /// CRIU's log of this checkpoint, where it will still be after the staging directory is
    /// removed: in the work dir the user gave, or copied to the container's state dir.
    fn keep_log(&self) -> Option<PathBuf> {
        let log = self.work_dir.join(self.kind.log_name());
        if !log.exists() {
            return None;
        }
        if self.work_dir != self.staging.dir() {
            return Some(log);
        }
        let dir = self.req.failure_log_dir.as_ref()?;
        let kept = dir.join(format!("checkpoint-{}", self.kind.log_name()));
        std::fs::copy(&log, &kept).ok().map(|_| kept)
    }
}

/// Whether cryo receives the pages itself, staged how: for a full dump whose pages stay local
/// (not lazy, not sent to a page server of the caller's, not deduplicated against a parent
/// image).
fn receives_pages(req: &DumpRequest, kind: CallKind) -> Option<staging::Mode> {
    req.stage_pages.filter(|_| {
        kind == CallKind::Dump
            && !req.flags.common.lazy_pages
            && req.flags.page_server.is_none()
            && req.flags.parent_path.is_none()
    })
}

fn create_private(dir: &Path) -> Result<(), DumpError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DumpError::Io {
            step: "create",
            path: dir.to_path_buf(),
            source,
        })
}

/// Refuse before the freeze when the image cannot fit: its memory (twice with
/// `--compress-pages`, both forms exist for a moment), and the rootfs changes (raw and
/// compressed changeset side by side).
fn check_space(
    req: &DumpRequest,
    dir: &Path,
    memory: u64,
    upper: Option<&Path>,
) -> Result<(), DumpError> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(|e| DumpError::Io {
        step: "statvfs",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let memory = if req.compress_pages {
        2 * memory
    } else {
        memory
    };
    let rootfs = upper.map(tree_bytes).unwrap_or(0) * 2;
    let needed = memory + rootfs + SPACE_MARGIN;
    if needed > free {
        return Err(DumpError::NoSpace {
            path: req.image_dir.clone(),
            needed,
            memory,
            rootfs,
            free,
        });
    }
    Ok(())
}

/// Bytes a tree occupies (allocated blocks; symlinks not followed).
fn tree_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}
