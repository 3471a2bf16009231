//! The shim's settings. containerd hands a runtime's options to the shim as a protobuf `Any`,
//! on the stdin of `start` and again in `CreateTaskRequest.options`. Two kinds are understood:
//!
//! - `containerd.runc.v1.Options`, what the runc shim takes (`BinaryName`, `Root`,
//!   `SystemdCgroup`, `CriuImagePath`, `CriuWorkPath`, …): a runtime entry written for runc
//!   works unchanged, `BinaryName` naming the cryo binary;
//! - `runtimeoptions.v1.Options`, what containerd 1.6 sends for every other runtime type (the
//!   CRI plugin's `[…runtimes.NAME.options] ConfigPath = …`, `ctr run --runtime-config-path`):
//!   `ConfigPath` names a TOML file with cryo's settings ([`ConfigFile`]).
//!
//! The effective settings are written into the bundle at create ([`ShimOptions::save`]), so
//! that the `delete` action, run after the shim is gone, finds the same state root and binary.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::{Message, UnknownValueRef};
use containerd_shim::protos::shim::oci::Options as RuncOptions;
use serde::{Deserialize, Serialize};

/// Type of the runc shim's options.
pub const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";
/// Type containerd 1.6 gives the options of a runtime that is not runc (CRI, ctr).
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Where the effective options of a container are kept, inside its bundle.
const SAVED_OPTIONS_FILE: &str = "cryo-shim-options.json";
/// The state root the runc shim uses is `/run/containerd/runc`; cryo's sits beside it.
const DEFAULT_ROOT: &str = "/run/containerd/cryo";

/// Errors reading the runtime's options.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// An options type the shim does not know.
    #[error(
        "containerd-shim-cryo-v1 does not understand runtime options of type {type_url:?}: \
         give {RUNC_OPTIONS_TYPE} (BinaryName, Root, …) or {RUNTIME_OPTIONS_TYPE} whose \
         ConfigPath names a cryo shim config file"
    )]
    UnknownType {
        /// The type URL containerd sent.
        type_url: String,
    },
    /// The options did not decode as their type.
    #[error("cannot decode the runtime options ({type_url}): {source}")]
    Decode {
        /// The type URL containerd sent.
        type_url: String,
        /// protobuf's error.
        source: containerd_shim::protos::protobuf::Error,
    },
    /// The config file named by `ConfigPath` could not be read.
    #[error("cannot read the cryo shim config {path} (runtime option ConfigPath): {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("the cryo shim config {path} is not valid: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A path that must be absolute is not.
    #[error("{what} must be an absolute path, got {path:?}")]
    NotAbsolute {
        /// Which setting.
        what: &'static str,
        /// Its value.
        path: PathBuf,
    },
    /// The saved options of a bundle could not be read or written.
    #[error("{action} {path}: {source}")]
    Saved {
        /// "read" or "write".
        action: &'static str,
        /// The file in the bundle.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// `--rootfs-snapshot` of `cryo checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsSnapshot {
    /// Capture the overlay upper dir when the rootfs is an overlay.
    #[default]
    Auto,
    /// Require an overlay rootfs and capture it.
    Overlay,
    /// Capture nothing.
    None,
}

impl RootfsSnapshot {
    /// The flag's value.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Overlay => "overlay",
            Self::None => "none",
        }
    }
}

/// cryo's checkpoint settings that the runtime's config chooses for all its containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointDefaults {
    /// Capture the rootfs changes into the image (`--rootfs-snapshot`).
    pub rootfs_snapshot: RootfsSnapshot,
    /// cryo receives the pages into images prepared before the freeze (off:
    /// `--no-page-staging`).
    pub page_staging: bool,
    /// Store the page images zstd-compressed (`--compress-pages`).
    pub compress_pages: bool,
}

impl Default for CheckpointDefaults {
    fn default() -> Self {
        Self {
            rootfs_snapshot: RootfsSnapshot::Auto,
            page_staging: true,
            compress_pages: false,
        }
    }
}

/// The TOML file named by `ConfigPath`. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The cryo binary.
    pub cryo: Option<PathBuf>,
    /// cryo's state root; the containerd namespace is appended.
    pub root: Option<PathBuf>,
    /// The CRIU binary cryo runs.
    pub criu: Option<PathBuf>,
    /// Pass `--systemd-cgroup` to cryo.
    pub systemd_cgroup: Option<bool>,
    /// Checkpoint defaults.
    #[serde(default)]
    pub checkpoint: CheckpointDefaults,
}

/// The effective settings of one container's shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimOptions {
    /// The cryo binary the shim runs for every operation.
    pub cryo: PathBuf,
    /// State root; the namespace is appended ([`Self::state_root`]).
    pub root: PathBuf,
    /// The CRIU binary (None: `criu` on PATH).
    pub criu: Option<PathBuf>,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// `--no-pivot` at create and restore.
    pub no_pivot_root: bool,
    /// `--no-new-keyring` at create.
    pub no_new_keyring: bool,
    /// Owner of the stdio pipes.
    pub io_uid: u32,
    /// Group of the stdio pipes.
    pub io_gid: u32,
    /// Cgroup the shim process moves into (runc's `ShimCgroup`).
    pub shim_cgroup: Option<String>,
    /// Work path of restores (runc's `CriuWorkPath`); default `<bundle>/work`.
    pub criu_work_path: Option<PathBuf>,
    /// Checkpoint defaults.
    pub checkpoint: CheckpointDefaults,
}

impl Default for ShimOptions {
    fn default() -> Self {
        Self {
            cryo: default_cryo_binary(),
            root: PathBuf::from(DEFAULT_ROOT),
            criu: None,
            systemd_cgroup: false,
            no_pivot_root: false,
            no_new_keyring: false,
            io_uid: 0,
            io_gid: 0,
            shim_cgroup: None,
            criu_work_path: None,
            checkpoint: CheckpointDefaults::default(),
        }
    }
}

/// `cryo` beside the shim's own binary when it is there (both are installed together), else
/// `cryo` on PATH.
fn default_cryo_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("cryo")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("cryo"))
}

/// The message name of an `Any`'s type URL (`type.googleapis.com/x.y.Z` or just `x.y.Z`).
fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

impl ShimOptions {
    /// The settings from containerd's options (`None` or an empty `Any`: the defaults).
    pub fn from_any(any: Option<&Any>) -> Result<Self, OptionsError> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
            return Ok(Self::default());
        };
        let decode = |source| OptionsError::Decode {
            type_url: any.type_url.clone(),
            source,
        };
        match message_name(&any.type_url) {
            RUNC_OPTIONS_TYPE => {
                let runc = RuncOptions::parse_from_bytes(&any.value).map_err(decode)?;
                Self::from_runc(&runc)
            }
            RUNTIME_OPTIONS_TYPE => {
                let config_path = runtime_options_config_path(&any.value).map_err(decode)?;
                match config_path {
                    Some(path) => Self::from_config_file(&path),
                    None => Ok(Self::default()),
                }
            }
            _ => Err(OptionsError::UnknownType {
                type_url: any.type_url.clone(),
            }),
        }
    }

    /// The runc shim's options, read the way the runc shim reads them.
    fn from_runc(runc: &RuncOptions) -> Result<Self, OptionsError> {
        let mut options = Self::default();
        if !runc.binary_name.is_empty() {
            options.cryo = PathBuf::from(&runc.binary_name);
        }
        if !runc.root.is_empty() {
            options.root = absolute("Root", PathBuf::from(&runc.root))?;
        }
        if !runc.criu_work_path.is_empty() {
            options.criu_work_path = Some(absolute(
                "CriuWorkPath",
                PathBuf::from(&runc.criu_work_path),
            )?);
        }
        options.systemd_cgroup = runc.systemd_cgroup;
        options.no_pivot_root = runc.no_pivot_root;
        options.no_new_keyring = runc.no_new_keyring;
        options.io_uid = runc.io_uid;
        options.io_gid = runc.io_gid;
        options.shim_cgroup = Some(runc.shim_cgroup.clone()).filter(|c| !c.is_empty());
        Ok(options)
    }

    /// The settings of a cryo shim config file.
    pub fn from_config_file(path: &Path) -> Result<Self, OptionsError> {
        let text = fs::read_to_string(path).map_err(|source| OptionsError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ConfigFile =
            toml::from_str(&text).map_err(|source| OptionsError::ParseConfig {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        Self::from_config(file)
    }

    /// The settings of a parsed config file.
    pub fn from_config(file: ConfigFile) -> Result<Self, OptionsError> {
        let mut options = Self::default();
        if let Some(cryo) = file.cryo {
            options.cryo = cryo;
        }
        if let Some(root) = file.root {
            options.root = absolute("root", root)?;
        }
        if let Some(criu) = file.criu {
            options.criu = Some(absolute("criu", criu)?);
        }
        options.systemd_cgroup = file.systemd_cgroup.unwrap_or(false);
        options.checkpoint = file.checkpoint;
        Ok(options)
    }

    /// cryo's `--root` for a containerd namespace (as the runc shim: `<Root>/<namespace>`).
    pub fn state_root(&self, namespace: &str) -> PathBuf {
        self.root.join(namespace)
    }

    /// Keep these settings in the bundle.
    pub fn save(&self, bundle: &Path) -> Result<(), OptionsError> {
        let path = bundle.join(SAVED_OPTIONS_FILE);
        let json = serde_json::to_vec(self).map_err(|e| OptionsError::Saved {
            action: "encode",
            path: path.clone(),
            source: e.into(),
        })?;
        fs::write(&path, json).map_err(|source| OptionsError::Saved {
            action: "write",
            path,
            source,
        })
    }

    /// The settings saved in a bundle; the defaults when none were saved (the shim died
    /// before create got that far).
    pub fn load(bundle: &Path) -> Result<Self, OptionsError> {
        let path = bundle.join(SAVED_OPTIONS_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| OptionsError::Saved {
                action: "decode",
                path,
                source: e.into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(OptionsError::Saved {
                action: "read",
                path,
                source,
            }),
        }
    }
}

fn absolute(what: &'static str, path: PathBuf) -> Result<PathBuf, OptionsError> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(OptionsError::NotAbsolute { what, path })
    }
}

/// `config_path` (field 2) of a `runtimeoptions.v1.Options`. The shim has no generated type
/// for it: the message is parsed as `Empty`, which keeps every field as an unknown one.
fn runtime_options_config_path(
    value: &[u8],
) -> Result<Option<PathBuf>, containerd_shim::protos::protobuf::Error> {
    const CONFIG_PATH_FIELD: u32 = 2;
    let parsed = Empty::parse_from_bytes(value)?;
    let path = parsed
        .special_fields
        .unknown_fields()
        .get(CONFIG_PATH_FIELD)
        .and_then(|v| match v {
            UnknownValueRef::LengthDelimited(bytes) => {
                Some(PathBuf::from(String::from_utf8_lossy(bytes).into_owned()))
            }
            _ => None,
        })
        .filter(|p| !p.as_os_str().is_empty());
    Ok(path)
}

#[cfg(test)]
#[path = "options_tests.rs"]
mod tests;
