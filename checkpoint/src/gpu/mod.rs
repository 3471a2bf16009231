//! GPU (NVIDIA CUDA) containers: CRIU 4.2's CUDA plugin (`cuda_plugin.so`) checkpoints a
//! process's CUDA state by running NVIDIA's `cuda-checkpoint` on it: *lock* (new CUDA calls
//! block, submitted work completes) while the process still runs, *checkpoint* (device memory
//! copied into the process's host memory, the GPU released) once CRIU has seized it, and at
//! the end *restore* + *unlock* (also after a failed dump, or with `--leave-running`). CRIU then
//! dumps that host memory like any other: **the GPU memory ends up in the image**. At restore
//! the plugin runs *restore* + *unlock* on the restored process before it resumes.
//!
//! What this means for cryo:
//! - [`preflight`] (before anything touches the container) finds out whether the spec uses an
//!   NVIDIA GPU and, if so, whether this machine can checkpoint it: the driver (>= 550), a GPU
//!   listed by it (the plugin disables itself otherwise), `cuda-checkpoint` offering
//!   `--action`, and the plugin. A GPU container on a machine without them is refused with
//!   every reason, instead of CRIU failing on the device mappings inside the freeze.
//! - CRIU runs with the plugin's directory in `CRIU_LIBS_DIR` (CRIU's RPC has no `libdir`
//!   option) and `cuda-checkpoint` on its PATH ([`GpuPlan::swrk_client`]); only for GPU
//!   containers, since a loaded CUDA plugin changes how CRIU seizes every container (below).
//! - [`GpuCriu`] wraps that client: after a restore it fails the restore when the plugin could
//!   not bring the GPU state back (CRIU itself only logs that and reports success).
//! - The plugin switches CRIU to seizing tasks one by one with ptrace, and CRIU thaws a frozen
//!   cgroup for that ("unfreezing cgroup for plugin compatibility") so the lock can complete.
//!   cryo still freezes in CRIU's pre-dump notification, so CRIU re-freezes the cgroup before it
//!   lets the tasks go; but the tree is not still between those two moments. For a GPU
//!   container cryo therefore lists open files and captures the rootfs after CRIU's dump
//!   ([`GpuPlan::tree_still_at_pre_dump`]), and the `frozen_ms` of the manifest includes the
//!   lock, during which the container ran with its CUDA calls blocked.
//! - The plugin's own steps are timed from its lines in CRIU's log ([`plugin_log`]) and kept
//!   in the manifest ([`GpuRecord`]).
//! - After a failed checkpoint cryo brings back the CUDA state of any process left locked or
//!   checkpointed ([`GpuPlan::recover`]): CRIU killed before its plugin could resume it, or
//!   CRIU 4.2.1's plugin itself after a failed checkpoint step (it tries a restore on a process
//!   that is only locked, which fails, and skips the unlock).

mod client;
pub mod plugin_log;
mod tool;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

pub use client::GpuCriu;
pub use plugin_log::{PluginLog, PluginTimings};

/// NVIDIA's tool; CRIU's plugin runs it by this name from CRIU's PATH.
pub const TOOL_NAME: &str = "cuda-checkpoint";
/// CRIU's CUDA plugin.
pub const PLUGIN_FILE: &str = "cuda_plugin.so";
/// The oldest driver `cuda-checkpoint` works with.
pub const MIN_DRIVER_MAJOR: u32 = 550;
/// Names `cuda-checkpoint` when it is not on PATH (a `--cuda-checkpoint` flag wins).
pub const ENV_TOOL: &str = "CRYO_CUDA_CHECKPOINT";
/// Names the directory holding `cuda_plugin.so` (a `--criu-plugin-dir` flag wins).
pub const ENV_PLUGIN_DIR: &str = "CRYO_CRIU_PLUGIN_DIR";
/// Where cryo looks for the plugin: scripts/setup's install first, then CRIU's own default
/// and a local install.
pub const DEFAULT_PLUGIN_DIRS: [&str; 3] = [
    "/opt/cryo/criu/plugins",
    "/usr/lib/criu",
    "/usr/local/lib/criu",
];
/// The environment variable CRIU loads its plugins from when no `--libdir` is given.
pub const CRIU_LIBS_DIR: &str = "CRIU_LIBS_DIR";
/// The NVIDIA driver's proc directory.
pub const PROC_NVIDIA: &str = "/proc/driver/nvidia";

/// Where to look for what GPU checkpointing needs. [`GpuLookup::system`] is the real machine;
/// tests point it at directories of their own.
#[derive(Debug, Clone)]
pub struct GpuLookup {
    /// The driver's proc directory (`version`, `gpus/`).
    pub proc_dir: PathBuf,
    /// `cuda-checkpoint` as named by a flag or [`ENV_TOOL`]; `None`: search `search_path`.
    pub tool: Option<PathBuf>,
    /// The PATH searched for `cuda-checkpoint`.
    pub search_path: Option<OsString>,
    /// The plugin directory as named by a flag or [`ENV_PLUGIN_DIR`]; `None`: the defaults.
    pub plugin_dir: Option<PathBuf>,
    /// The directories searched when no plugin directory is named.
    pub default_plugin_dirs: Vec<PathBuf>,
}

impl GpuLookup {
    /// This machine: the flags given (else the environment variables), PATH, the defaults.
    pub fn system(tool_flag: Option<PathBuf>, plugin_dir_flag: Option<PathBuf>) -> Self {
        let from_env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            proc_dir: PathBuf::from(PROC_NVIDIA),
            tool: tool_flag.or_else(|| from_env(ENV_TOOL)),
            search_path: std::env::var_os("PATH"),
            plugin_dir: plugin_dir_flag.or_else(|| from_env(ENV_PLUGIN_DIR)),
            default_plugin_dirs: DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// One reason GPU checkpointing is not available here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No driver loaded.
    #[error("no NVIDIA driver is loaded ({0} is missing): GPU checkpointing needs the NVIDIA kernel driver >= {MIN_DRIVER_MAJOR}")]
    NoDriver(PathBuf),
    /// The version file says something we cannot read.
    #[error("cannot read the NVIDIA driver's version from {path}: {detail}")]
    DriverUnreadable {
        /// The version file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Driver older than [`MIN_DRIVER_MAJOR`].
    #[error("the NVIDIA driver {0} is too old: cuda-checkpoint needs driver >= {MIN_DRIVER_MAJOR}; upgrade the driver")]
    DriverTooOld(String),
    /// The driver lists no GPU (CRIU's plugin then disables itself).
    #[error(
        "the NVIDIA driver lists no GPU in {0}: CRIU's CUDA plugin stays disabled without one"
    )]
    NoGpu(PathBuf),
    /// `cuda-checkpoint` not found.
    #[error("{TOOL_NAME} was not found {where_}: install NVIDIA's {TOOL_NAME} (github.com/NVIDIA/cuda-checkpoint) on PATH, or name it with --cuda-checkpoint or {ENV_TOOL}")]
    ToolMissing {
        /// Where we looked.
        where_: String,
    },
    /// Named, but CRIU's plugin could not run it under that name.
    #[error("{0} is not named {TOOL_NAME}: CRIU's CUDA plugin runs it by that name from PATH; rename it or link it as {TOOL_NAME}")]
    ToolMisnamed(PathBuf),
    /// Found but not usable (does not run, or lacks `--action`).
    #[error("{path} cannot serve CRIU's CUDA plugin: {detail}")]
    ToolUnusable {
        /// The tool.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// No `cuda_plugin.so`.
    #[error("CRIU's CUDA plugin ({PLUGIN_FILE}) is not in {where_}: scripts/setup builds it into {} (make cuda_plugin in CRIU's source); or name its directory with --criu-plugin-dir or {ENV_PLUGIN_DIR}", DEFAULT_PLUGIN_DIRS[0])]
    PluginMissing {
        /// Where we looked.
        where_: String,
    },
}

/// A GPU container that cannot be checkpointed or restored here.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The machine lacks what GPU checkpointing needs.
    #[error("the container uses an NVIDIA GPU ({devices}), but GPU checkpointing is not available on this machine: {}", join(problems))]
    Unavailable {
        /// The GPU devices the spec gives the container.
        devices: String,
        /// Every reason.
        problems: Vec<Problem>,
    },
    /// The image holds CUDA state, the new bundle gives no GPU.
    #[error("the checkpoint in {image} holds CUDA state (made with CRIU's CUDA plugin), but the bundle gives the container no /dev/nvidia* device: cuda-checkpoint could not bring the GPU state back; restore into a bundle with the NVIDIA devices (see examples/gpu-bundle.sh)")]
    BundleHasNoGpu {
        /// The image directory.
        image: PathBuf,
    },
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The NVIDIA GPU devices a spec gives its container: device nodes and mounts under
/// `/dev/nvidia*` (the NVIDIA container toolkit's CDI specs add both), and the toolkit's
/// legacy prestart hook (which adds them itself when the container starts).
pub fn gpu_devices(spec: &Spec) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut add = |p: String| {
        if !found.contains(&p) {
            found.push(p);
        }
    };
    let is_nvidia =
        |p: &Path| p.starts_with("/dev") && p.to_string_lossy().starts_with("/dev/nvidia");
    if let Some(linux) = spec.linux() {
        for d in linux.devices().iter().flatten() {
            if is_nvidia(d.path()) {
                add(d.path().display().to_string());
            }
        }
    }
    for m in spec.mounts().iter().flatten() {
        if is_nvidia(m.destination()) {
            add(m.destination().display().to_string());
        }
    }
    if let Some(hooks) = spec.hooks() {
        let lists = [hooks.prestart(), hooks.create_runtime()];
        for h in lists.into_iter().flatten().flatten() {
            if h.path().to_string_lossy().contains("nvidia-container") {
                add(format!("{} hook", h.path().display()));
            }
        }
    }
    found
}

/// What this machine offers for GPU checkpointing, item by item (`cryo features`).
#[derive(Debug, Clone)]
pub struct GpuSupport {
    /// The driver's version, or why none is usable.
    pub driver: Result<String, Problem>,
    /// `cuda-checkpoint`, or why none is usable.
    pub tool: Result<PathBuf, Problem>,
    /// The plugin's directory, or why none was found.
    pub plugin_dir: Result<PathBuf, Problem>,
}

impl GpuSupport {
    /// Look at this machine (runs `cuda-checkpoint --help` when the driver is there).
    pub fn probe(lookup: &GpuLookup) -> Self {
        let driver = driver_version(&lookup.proc_dir);
        let tool = find_tool(lookup).and_then(|path| {
            // Without a driver the tool cannot even load libcuda: say what is missing first.
            if driver.is_ok() {
                tool::check_help(&path)?;
            }
            Ok(path)
        });
        Self {
            driver,
            tool,
            plugin_dir: find_plugin_dir(lookup),
        }
    }

    /// Every reason GPU checkpointing is unavailable (empty: available).
    pub fn problems(&self) -> Vec<Problem> {
        [
            self.driver.as_ref().err(),
            self.tool.as_ref().err(),
            self.plugin_dir.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// How a GPU container is checkpointed and restored on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPlan {
    /// The driver's version.
    pub driver_version: String,
    /// `cuda-checkpoint`.
    pub tool: PathBuf,
    /// The directory CRIU loads plugins from (`CRIU_LIBS_DIR`): holds `cuda_plugin.so`.
    pub plugin_dir: PathBuf,
    /// The GPU devices the spec gives the container.
    pub devices: Vec<String>,
}

/// Before a checkpoint: `Ok(None)` for a container without a GPU; a plan for one this
/// machine can checkpoint; every reason why not otherwise. Touches nothing.
pub fn preflight(spec: &Spec, lookup: &GpuLookup) -> Result<Option<GpuPlan>, GpuError> {
    let devices = gpu_devices(spec);
    if devices.is_empty() {
        return Ok(None);
    }
    plan_for(devices, lookup).map(Some)
}

/// Before a restore of `image_dir` into a bundle with `spec`: a plan when the image holds CUDA
/// state (its manifest has a [`GpuRecord`]) or the bundle gives a GPU, refused when the image
/// holds CUDA state and the bundle gives no GPU or this machine cannot restore it.
pub fn restore_preflight(
    spec: &Spec,
    image_record: Option<&GpuRecord>,
    image_dir: &Path,
    lookup: &GpuLookup,
) -> Result<Option<GpuPlan>, GpuError> {
    let devices = gpu_devices(spec);
    match (image_record, devices.is_empty()) {
        (None, true) => Ok(None),
        (Some(r), true) if r.cuda_pids > 0 => Err(GpuError::BundleHasNoGpu {
            image: image_dir.to_path_buf(),
        }),
        (Some(_), true) => Ok(None),
        (_, false) => plan_for(devices, lookup).map(Some),
    }
}

fn plan_for(devices: Vec<String>, lookup: &GpuLookup) -> Result<GpuPlan, GpuError> {
    let support = GpuSupport::probe(lookup);
    match support {
        GpuSupport {
            driver: Ok(driver_version),
            tool: Ok(tool),
            plugin_dir: Ok(plugin_dir),
        } => Ok(GpuPlan {
            driver_version,
            tool,
            plugin_dir,
            devices,
        }),
        s => Err(GpuError::Unavailable {
            devices: devices.join(", "),
            problems: s.problems(),
        }),
    }
}

impl GpuPlan {
    /// Whether the container's tree is still from CRIU's pre-dump notification (cryo's
    /// freeze) to the end of its dump. Not for a GPU container: the CUDA plugin has CRIU thaw
    /// the cgroup to lock CUDA and seize the tasks one by one; CRIU freezes it again only
    /// before letting the tasks go. Open files and the rootfs are then taken after the dump.
    pub fn tree_still_at_pre_dump(&self) -> bool {
        false
    }

    /// CRIU's PATH for this plan: `cuda-checkpoint`'s directory first, unless it already
    /// comes first on `current` (`None`: leave PATH as it is).
    pub fn criu_path(&self, current: Option<&std::ffi::OsStr>) -> Option<OsString> {
        let dir = self.tool.parent()?;
        let on_path = current
            .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
            .unwrap_or_default();
        let first = on_path
            .iter()
            .find(|d| d.join(TOOL_NAME).is_file())
            .map(|d| d.join(TOOL_NAME));
        if first.as_deref() == Some(self.tool.as_path()) {
            return None;
        }
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(on_path);
        std::env::join_paths(dirs).ok()
    }

    /// `base` set up for this plan: `criu swrk` loading the plugins of
    /// [`GpuPlan::plugin_dir`] (`CRIU_LIBS_DIR`), with `cuda-checkpoint` on its PATH. Wrap it
    /// in a [`GpuCriu`].
    pub fn swrk_client(
        &self,
        base: crate::criu::swrk::SwrkClient,
    ) -> crate::criu::swrk::SwrkClient {
        let client = base.with_env(CRIU_LIBS_DIR, self.plugin_dir.as_os_str());
        match self.criu_path(std::env::var_os("PATH").as_deref()) {
            Some(path) => client.with_env("PATH", path),
            None => client,
        }
    }

    /// The manifest's record of a dump whose CRIU log is `dump_log`.
    pub fn record(&self, dump_log: &Path) -> GpuRecord {
        let log = PluginLog::read(dump_log);
        GpuRecord {
            driver_version: self.driver_version.clone(),
            devices: self.devices.clone(),
            cuda_pids: log.cuda_pids.len() as u32,
            plugin_timings: log.timings,
        }
    }

    /// After a failed checkpoint of a running (not paused) container: bring back the CUDA
    /// state of any of `pids` that was left locked or checkpointed (CRIU's plugin does this
    /// itself when CRIU fails; not when CRIU was killed). Returns what it did or could not do,
    /// one note per process touched.
    pub fn recover(&self, pids: &[i32]) -> Vec<String> {
        tool::recover(&self.tool, pids)
    }
}

/// What the manifest keeps about a GPU container's checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpuRecord {
    /// The NVIDIA driver at checkpoint (a restore needs a compatible one and similar GPUs).
    pub driver_version: String,
    /// The GPU devices the container had.
    pub devices: Vec<String>,
    /// Processes whose CUDA state CRIU's plugin checkpointed (0: none had CUDA initialised).
    pub cuda_pids: u32,
    /// The plugin's steps, from CRIU's log (absent when the log has no timestamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_timings: Option<PluginTimings>,
}

/// The driver's version from `<proc_dir>/version`, checked against [`MIN_DRIVER_MAJOR`], and a
/// GPU listed in `<proc_dir>/gpus`.
pub fn driver_version(proc_dir: &Path) -> Result<String, Problem> {
    let path = proc_dir.join("version");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Problem::NoDriver(path.clone()),
        _ => Problem::DriverUnreadable {
            path: path.clone(),
            detail: e.to_string(),
        },
    })?;
    let version = parse_driver_version(&text).ok_or_else(|| Problem::DriverUnreadable {
        path: path.clone(),
        detail: format!(
            "no version in its NVRM line ({:?})",
            text.lines().next().unwrap_or("")
        ),
    })?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < MIN_DRIVER_MAJOR {
        return Err(Problem::DriverTooOld(version));
    }
    let gpus = proc_dir.join("gpus");
    let any_gpu = std::fs::read_dir(&gpus)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !any_gpu {
        return Err(Problem::NoGpu(gpus));
    }
    Ok(version)
}

/// `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar 5 …` → `550.54.15`
/// (also the open module's `… Open Kernel Module for x86_64  580.159.04  Release Build …`).
pub fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|t| {
            let parts: Vec<&str> = t.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

fn find_tool(lookup: &GpuLookup) -> Result<PathBuf, Problem> {
    if let Some(named) = &lookup.tool {
        if !is_executable(named) {
            return Err(Problem::ToolMissing {
                where_: format!(
                    "at {} (named by --cuda-checkpoint or {ENV_TOOL})",
                    named.display()
                ),
            });
        }
        if named.file_name() != Some(std::ffi::OsStr::new(TOOL_NAME)) {
            return Err(Problem::ToolMisnamed(named.clone()));
        }
        return Ok(std::path::absolute(named).unwrap_or_else(|_| named.clone()));
    }
    let dirs: Vec<PathBuf> = lookup
        .search_path
        .as_deref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.iter()
        .map(|d| d.join(TOOL_NAME))
        .find(|p| p.is_absolute() && is_executable(p))
        .ok_or_else(|| Problem::ToolMissing {
            where_: format!(
                "on PATH ({})",
                lookup
                    .search_path
                    .as_deref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        })
}

fn find_plugin_dir(lookup: &GpuLookup) -> Result<PathBuf, Problem> {
    let candidates: Vec<PathBuf> = match &lookup.plugin_dir {
        Some(d) => vec![d.clone()],
        None => lookup.default_plugin_dirs.clone(),
    };
    candidates
        .iter()
        .find(|d| d.join(PLUGIN_FILE).is_file())
        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
        .ok_or_else(|| Problem::PluginMissing {
            where_: candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests;
