//! `cryo checkpoint`, as a sequence of types, each owning what must be undone if a later step
//! fails, so that "thaw on every path" and "undo on every failure" are properties of the
//! types rather than of each branch:
//!
//! 1. [`prepare::Prepared`]: every refusal happens here, before the container is touched:
//!    options, CRIU, the image path ([`crate::image::ImageTarget`]), the plan, free space. It
//!    owns the guardian process ([`crate::guardian`]), the private staging directory (removed
//!    on drop), the page receiver and the rootfs capture.
//! 2. [`window::Dumped`]: CRIU's dump. cryo freezes in CRIU's `pre-dump` notification, after
//!    telling the guardian; the freeze is a [`window::Frozen`] (thaws on drop) under a deadline
//!    that cryo keeps ([`crate::criu::CallObserver::deadline`]) and the guardian keeps too.
//! 3. [`complete::Complete`]: thawed (or, without `--leave-running`, still frozen), the images
//!    named, synced and digested, the manifest written last, all still in staging.
//! 4. Published ([`crate::image::Staging::publish`]): the image appears at `--image-path`
//!    whole; then, without `--leave-running`, the container is stopped.
//!
//! SIGINT/SIGTERM/SIGHUP during the verb only raise a flag ([`crate::signals`]): CRIU is
//! stopped at once if it is working, and every step checks the flag.
//!
//! A coordinated checkpoint of several containers ([`crate::group`]) drives the same steps
//! one by one for each member, with a [`Rendezvous`] in the freeze window and the publishing
//! split in two (`Complete::publish_image`, then `Published::finish` once the whole group is
//! published).

mod complete;
mod prepare;
mod steps;
mod upper;
mod window;

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::Duration;

use cryo_cgroup::{CgroupError, Freezer};
use oci_spec::runtime::Spec;

use crate::criu::{CriuClient, CriuError};
use crate::flags::{DumpFlags, FlagError};
use crate::guardian::{GuardianError, GuardianLauncher};
use crate::image::PublishError;
use crate::manifest::Manifest;
use crate::page_receiver::ReceiveError;
use crate::plan::PlanError;
use crate::rootfs::RootfsError;

pub(crate) use prepare::Prepared;

/// Snapshot of a /dev/shm the client bind-mounts from the host (docker does), in the image dir.
pub const DEVSHM_FILE: &str = "devshm.tar";

/// Oldest CRIU this kernel works with (3.17 and 4.1 fail on Linux ≥ 6.16).
pub const MIN_CRIU: u32 = 40200;

/// Default limit on a whole CRIU call (a restore or a dump), past which CRIU is stopped.
pub const DEFAULT_CRIU_TIMEOUT: Duration = Duration::from_secs(600);

/// `--rootfs-snapshot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Capture an overlay upper dir when the rootfs is overlay; record why not otherwise.
    Auto,
    /// Capture the overlay upper dir; fail (before freezing) if the rootfs is not overlay.
    Overlay,
    /// Never capture.
    None,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "overlay" => Ok(Self::Overlay),
            "none" => Ok(Self::None),
            o => Err(format!(
                "invalid --rootfs-snapshot value {o:?}: use auto, overlay or none"
            )),
        }
    }
}

/// Where a member of a coordinated checkpoint ([`crate::group`]) meets the others, from
/// CRIU's `pre-dump` notification: every member freezes at the same moment, and none is
/// dumped before all are frozen and nothing moves between them. An error aborts this member's
/// dump (it thaws, or stays paused).
pub trait Rendezvous {
    /// This member's CRIU is ready and its pages staged; returns when every member's is, so
    /// that they all freeze together.
    fn ready_to_freeze(&self) -> Result<(), String>;
    /// This member is frozen; returns when every member is and the network between them is
    /// locked.
    fn frozen(&self) -> Result<(), String>;
}

/// Everything a checkpoint needs to know about the container and the request.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Container id.
    pub id: String,
    /// Init pid.
    pub pid: i32,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Parsed spec.
    pub spec: Spec,
    /// Host path of the rootfs.
    pub rootfs: PathBuf,
    /// What fds 0-2 of the init process were at start (runc's external descriptors).
    pub stdio: Vec<String>,
    /// `--image-path`.
    pub image_dir: PathBuf,
    /// `--work-path` (`None`: CRIU's logs go with the image, as CRIU's default).
    pub work_dir: Option<PathBuf>,
    /// The flags.
    pub flags: DumpFlags,
    /// `--rootfs-snapshot`.
    pub snapshot: SnapshotMode,
    /// `--compress-pages`: zstd the page images after the thaw ([`crate::pages`]).
    pub compress_pages: bool,
    /// Receive the pages from CRIU into memory faulted in before the freeze, staged as this
    /// says ([`crate::page_receiver`]); `None`: CRIU writes them itself
    /// (`--no-page-staging`).
    pub stage_pages: Option<crate::page_receiver::Mode>,
    /// `--freeze-timeout`: how long the container may stay frozen (`None`: by its size,
    /// [`freeze_timeout_for`]).
    pub freeze_timeout: Option<Duration>,
    /// `--criu-timeout`: how long CRIU may work in all.
    pub criu_timeout: Duration,
    /// Where to keep CRIU's log of a failed checkpoint whose log would go with the image
    /// (the image is removed): the container's state directory.
    pub failure_log_dir: Option<PathBuf>,
    /// How this NVIDIA GPU container's CUDA state is checkpointed (`None`: no GPU). CRIU must
    /// then run as [`crate::gpu::GpuPlan::swrk_client`] sets it up.
    pub gpu: Option<crate::gpu::GpuPlan>,
    /// A store generation to make this image an increment of (`checkpoint --store`): after
    /// the thaw only the pages that changed since it are kept ([`crate::store::delta`]).
    pub parent: Option<crate::store::ParentImage>,
}

/// The seams a checkpoint goes through: CRIU, the freezer, the guardian, the container's lock
/// (handed to the guardian), and the interrupt flag.
pub struct DumpEnv<'a> {
    /// CRIU.
    pub criu: &'a dyn CriuClient,
    /// The container's freezer.
    pub freezer: &'a dyn Freezer,
    /// Starts the guardian process.
    pub guardian: &'a dyn GuardianLauncher,
    /// The container's lock, held by the guardian too while it lives.
    pub lock: Option<BorrowedFd<'a>>,
    /// Whether SIGINT/SIGTERM/SIGHUP arrived.
    pub interrupted: &'a dyn Fn() -> bool,
}

/// What a successful checkpoint produced.
#[derive(Debug)]
pub struct DumpReport {
    /// The manifest written (none for a pre-dump).
    pub manifest: Option<Manifest>,
    /// Whether the container's processes are gone (checkpoint without --leave-running).
    pub stopped: bool,
    /// Where the image is.
    pub image_dir: PathBuf,
    /// Things the user should know that did not fail the checkpoint.
    pub warnings: Vec<String>,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A flag value.
    #[error(transparent)]
    Options(#[from] FlagError),
    /// CRIU failed, was too old, timed out or was stopped.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The image path.
    #[error(transparent)]
    Image(#[from] PublishError),
    /// The guardian.
    #[error(transparent)]
    Guardian(#[from] GuardianError),
    /// Freezing or thawing.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Planning CRIU's externals.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The rootfs capture.
    #[error(transparent)]
    // Boxed: the rootfs errors carry paths and outcomes, and every step returns this.
    Rootfs(#[from] Box<RootfsError>),
    /// cryo's page receiver (its own write errors come before CRIU's broken pipe).
    #[error(transparent)]
    Pages(#[from] ReceiveError),
    /// CRIU failed with the image's filesystem full: it ran out of space while writing (its
    /// own log, kept there too, may be cut short for the same reason).
    #[error(
        "No space left on device in {path} while CRIU wrote the image ({} free when it \
         failed): free some space there or choose another --image-path\n{source}",
        mib(*.free)
    )]
    FilledUp {
        /// The image directory.
        path: PathBuf,
        /// Bytes free after the failure.
        free: u64,
        /// CRIU's error (boxed: every step returns this enum).
        source: Box<CriuError>,
    },
    /// Making the image an increment of a store generation.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Not enough room for the image, found before the freeze.
    #[error(
        "not enough free space in {path}: the checkpoint needs about {} ({} of memory, {} of \
         rootfs changes) and {} are free; free some space there or choose another --image-path",
        mib(*.needed), mib(*.memory), mib(*.rootfs), mib(*.free)
    )]
    NoSpace {
        /// Where the image goes.
        path: PathBuf,
        /// Bytes needed (estimate).
        needed: u64,
        /// Of which memory.
        memory: u64,
        /// Of which rootfs changes.
        rootfs: u64,
        /// Bytes free.
        free: u64,
    },
    /// A file step, with its path.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the container (mounts, namespaces, processes).
    #[error("{0}")]
    Inspect(String),
    /// CRIU ended without ever asking cryo to freeze.
    #[error("CRIU finished without sending its pre-dump notification, so the container was never frozen by cryo: use CRIU >= 4.2")]
    NeverFroze,
    /// SIGINT/SIGTERM/SIGHUP.
    #[error("interrupted by a signal")]
    Interrupted,
    /// Another member of a coordinated checkpoint failed, or the group could not meet.
    #[error("{0}")]
    Group(String),
}

/// `12.3 MiB`.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// How the container was left by a failed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftAs {
    /// Never touched.
    Untouched,
    /// Frozen and thawed again: it keeps running.
    Thawed,
    /// It was paused before and stays paused.
    Paused,
    /// Thawing it failed: the guardian tries again as cryo exits.
    Unknown,
    /// Thawed, and its init died at once: CRIU was killed with its code inside the process.
    Died,
}

/// A failed checkpoint: the step, the cause, what became of the container, where the log is.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint of container {id} failed while {step}{}", left_note(*left))]
pub struct CheckpointError {
    /// Container id.
    pub id: String,
    /// The step.
    pub step: &'static str,
    /// What went wrong (boxed: errors travel up every step's return).
    #[source]
    pub cause: Box<DumpError>,
    /// What state the container was left in.
    pub left: LeftAs,
    /// CRIU's full log, when CRIU was involved and the log was kept.
    pub log: Option<PathBuf>,
}

fn left_note(left: LeftAs) -> &'static str {
    match left {
        LeftAs::Untouched => " (the container was not touched)",
        LeftAs::Thawed => " (the container was thawed and keeps running)",
        LeftAs::Paused => " (the container was left paused, as it was before)",
        LeftAs::Died => {
            " (the container was thawed, but its init died: CRIU ended while its code was inside \
             the process, which kills it under any runtime)"
        }
        LeftAs::Unknown => {
            " (thawing the container failed and cryo's guardian tries again: check it with `cryo state`)"
        }
    }
}

/// How long a container of `memory` bytes may stay frozen by default: long enough that a
/// healthy dump never hits it (dumping runs at hundreds of MiB/s at worst), short enough that a
/// hung one does not freeze a service for good.
pub fn freeze_timeout_for(memory: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(10 * memory.div_ceil(1 << 30))
}

/// Run a checkpoint through `env`'s seams.
pub fn checkpoint(req: &DumpRequest, env: &DumpEnv<'_>) -> Result<DumpReport, CheckpointError> {
    if let Some(why) = req.parent.as_ref().and_then(|_| increment_refusal(req)) {
        return Err(CheckpointError {
            id: req.id.clone(),
            step: "checking options",
            cause: Box::new(DumpError::Store(crate::store::StoreError::Unsupported(why))),
            left: LeftAs::Untouched,
            log: None,
        });
    }
    let prepared = prepare::Prepared::new(req, env)?;
    let dumped = prepared.dump()?;
    let complete = dumped.complete()?;
    complete.publish()
}

/// Why an image with these options cannot be an increment of a parent generation.
fn increment_refusal(req: &DumpRequest) -> Option<String> {
    let flag = if req.compress_pages {
        "--compress-pages (its page images are not CRIU's)"
    } else if req.flags.pre_dump {
        "--pre-dump"
    } else if req.flags.common.lazy_pages {
        "--lazy-pages (the image is read while CRIU still writes it)"
    } else {
        return None;
    };
    Some(format!(
        "a store generation cannot be made with {flag}: drop the flag, or use --image-path"
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn compress_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

impl From<RootfsError> for DumpError {
    fn from(e: RootfsError) -> Self {
        DumpError::Rootfs(Box::new(e))
    }
}
