//! Loading an OCI bundle with errors a user can act on.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// A bundle directory and its parsed `config.json`.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    /// The parsed runtime spec.
    pub spec: Spec,
}

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory does not exist.
    #[error(
        "bundle directory {0} does not exist: pass the directory holding config.json with --bundle"
    )]
    MissingDir(PathBuf),
    /// No config.json in the bundle.
    #[error("{0} not found: a bundle needs a config.json (create one with `cryo spec`)")]
    MissingConfig(PathBuf),
    /// config.json is not a valid runtime spec.
    #[error("{path} is not a valid OCI runtime spec: {reason}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// The spec has no root.
    #[error("{0}: the spec has no root.path; set root.path to the container's root filesystem")]
    NoRoot(PathBuf),
}

impl Bundle {
    /// Load `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::MissingDir(dir.to_path_buf()));
        }
        let dir = dir
            .canonicalize()
            .map_err(|_| BundleError::MissingDir(dir.to_path_buf()))?;
        let spec = load_spec(&dir)?;
        Ok(Self { dir, spec })
    }

    /// The root filesystem as a host path.
    pub fn rootfs(&self) -> Result<PathBuf, BundleError> {
        rootfs_path(&self.dir, &self.spec)
    }
}

/// Parse `bundle/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, BundleError> {
    let path = bundle.join("config.json");
    if !path.is_file() {
        return Err(BundleError::MissingConfig(path));
    }
    Spec::load(&path).map_err(|e| BundleError::BadConfig {
        reason: e.to_string(),
        path,
    })
}

/// `root.path` resolved against the bundle (relative paths are relative to the bundle).
pub fn rootfs_path(bundle: &Path, spec: &Spec) -> Result<PathBuf, BundleError> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| BundleError::NoRoot(bundle.join("config.json")))?;
    let p = root.path();
    Ok(if p.is_absolute() {
        p.clone()
    } else {
        bundle.join(p)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_name_the_problem_and_the_fix() {
        let dir = std::env::temp_dir().join(format!("cryo-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Bundle::load(&dir).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("cryo spec"), "{e}");
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        let e = Bundle::load(&dir).unwrap_err().to_string();
        assert!(e.contains("not a valid OCI runtime spec"), "{e}");
        let e = Bundle::load(&dir.join("nope")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_root_is_relative_to_bundle() {
        let spec = Spec::default();
        let p = rootfs_path(Path::new("/b"), &spec).unwrap();
        assert_eq!(p, PathBuf::from("/b/rootfs"));
    }
}
