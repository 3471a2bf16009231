//! The bundle directory libcontainer runs a container from.
//!
//! libcontainer reads the spec from `<bundle>/config.json`, at create and again at every
//! `exec`, and names the container's cgroups from it. Two things runc makes of a spec that
//! libcontainer would take literally:
//! - no `cgroupsPath`: runc's `/<id>`, where libcontainer would choose `:youki:<id>`;
//! - device cgroup rules: runc writes only the rules that change something (its "minimal
//!   transition"); a deny rule after "deny everything" and before any allow changes nothing,
//!   and libcgroups would write it, which the kernel refuses when its access has letters other
//!   than r, w, m.
//!
//! For such a spec cryo gives libcontainer a copy that says what runc does (with an absolute
//! `root.path`), kept with the container's state as runc keeps its config: staged at `<root>/.bundle-<id>/` for the create,
//! then moved to `<root>/<id>/bundle/`, where it goes with the container's state directory when the
//! container is deleted. The user's bundle is never written to. A spec that names its
//! `cgroupsPath` (docker, podman and containerd always do) runs from the user's bundle as is.
//!
//! `state`, `list` and checkpoints report the user's bundle (cryo's record keeps it); hooks run
//! while the container is created see the staged copy's directory.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cryo_oci::Bundle;

const STATE_SUBDIR: &str = "bundle";

/// Where libcontainer reads the spec.
#[derive(Debug)]
pub enum RunBundle {
    /// The user's bundle.
    User(PathBuf),
    /// cryo's copy naming runc's cgroup path, staged outside the container's state directory
    /// until libcontainer has made that directory.
    Staged {
        /// `<root>/.bundle-<id>`.
        dir: PathBuf,
        /// Removed on drop unless settled.
        settled: bool,
    },
}

impl RunBundle {
    /// The bundle for creating container `id` under state root `root`.
    pub fn for_create(root: &Path, id: &str, bundle: &Bundle) -> anyhow::Result<Self> {
        if !needs_copy(bundle) {
            return Ok(Self::User(bundle.dir.clone()));
        }
        let dir = root.join(format!(".bundle-{id}"));
        let _ = std::fs::remove_dir_all(&dir); // what a killed create left
        write_copy(&dir, id, bundle)?;
        Ok(Self::Staged {
            dir,
            settled: false,
        })
    }

    /// Write the copy straight into an existing container state directory (restore makes that
    /// directory itself); `None` when the user's bundle serves as is.
    pub fn write_into_state(
        container_dir: &Path,
        id: &str,
        bundle: &Bundle,
    ) -> anyhow::Result<Option<PathBuf>> {
        if !needs_copy(bundle) {
            return Ok(None);
        }
        let dir = container_dir.join(STATE_SUBDIR);
        write_copy(&dir, id, bundle)?;
        Ok(Some(dir))
    }

    /// The directory to hand libcontainer.
    pub fn dir(&self) -> &Path {
        match self {
            Self::User(d) | Self::Staged { dir: d, .. } => d,
        }
    }

    /// After libcontainer made `container_dir`: move a staged copy there and point the
    /// container's state at it, so that later `exec`s read it.
    pub fn settle(
        &mut self,
        container: &mut libcontainer::container::Container,
        container_dir: &Path,
    ) -> anyhow::Result<()> {
        let Self::Staged { dir, settled } = self else {
            return Ok(());
        };
        let target = container_dir.join(STATE_SUBDIR);
        std::fs::rename(&*dir, &target)
            .with_context(|| format!("cannot move {} to {}", dir.display(), target.display()))?;
        *settled = true;
        container.state.bundle = target;
        container
            .save()
            .context("cannot record the container's bundle copy")?;
        Ok(())
    }
}

impl Drop for RunBundle {
    fn drop(&mut self) {
        if let Self::Staged {
            dir,
            settled: false,
        } = self
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn needs_copy(bundle: &Bundle) -> bool {
    let Some(linux) = bundle.spec.linux().as_ref() else {
        return false;
    };
    let devices = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    let as_json: Vec<serde_json::Value> = devices
        .iter()
        .filter_map(|d| serde_json::to_value(d).ok())
        .collect();
    linux.cgroups_path().is_none() || minimal_device_rules(&as_json).len() != as_json.len()
}

/// The device rules without the deny rules that follow "deny everything" before any allow
/// rule: they change nothing.
fn minimal_device_rules(rules: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let is_deny = |r: &serde_json::Value| r["allow"] == false;
    let is_everything = |r: &serde_json::Value| {
        matches!(r["type"].as_str(), None | Some("a"))
            && r["major"].is_null()
            && r["minor"].is_null()
            && r["access"]
                .as_str()
                .is_none_or(|a| "rwm".chars().all(|c| a.contains(c)))
    };
    let mut out = Vec::with_capacity(rules.len());
    let mut all_denied = false;
    for r in rules {
        if is_deny(r) && all_denied {
            continue;
        }
        if is_deny(r) && is_everything(r) {
            all_denied = true;
        } else if !is_deny(r) {
            all_denied = false;
        }
        out.push(r.clone());
    }
    out
}

/// The user's config.json, as JSON (fields cryo does not model are kept), with runc's
/// cgroup path and the root resolved against the user's bundle.
fn copy_of(id: &str, bundle: &Bundle) -> anyhow::Result<serde_json::Value> {
    let path = bundle.dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let rootfs = bundle.rootfs()?;
    if let Some(root) = config.get_mut("root").and_then(|r| r.as_object_mut()) {
        root.insert("path".into(), rootfs.display().to_string().into());
    }
    if let Some(linux) = config.get_mut("linux").and_then(|l| l.as_object_mut()) {
        if linux.get("cgroupsPath").is_none_or(|p| p.is_null()) {
            linux.insert(
                "cgroupsPath".into(),
                crate::cgroups::default_cgroups_path(id)
                    .display()
                    .to_string()
                    .into(),
            );
        }
        if let Some(rules) = linux
            .get_mut("resources")
            .and_then(|r| r.get_mut("devices"))
            .and_then(|d| d.as_array_mut())
        {
            *rules = minimal_device_rules(rules);
        }
    }
    Ok(config)
}

fn write_copy(dir: &Path, id: &str, bundle: &Bundle) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config = copy_of(id, bundle)?;
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with(config: serde_json::Value) -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rootfs")).expect("rootfs");
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec(&config).expect("json"),
        )
        .expect("write");
        let b = Bundle::load(dir.path()).expect("bundle");
        (dir, b)
    }

    fn spec_json() -> serde_json::Value {
        serde_json::to_value(crate::commands::spec::runc_default_spec_for(false).expect("spec"))
            .expect("json")
    }

    #[test]
    fn a_spec_without_a_cgroup_path_runs_from_a_copy_naming_runcs() {
        let (user, bundle) = bundle_with(spec_json());
        let before = std::fs::read(user.path().join("config.json")).expect("read");
        let root = tempfile::tempdir().expect("root");
        let rb = RunBundle::for_create(root.path(), "c1", &bundle).expect("stage");
        let copy: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rb.dir().join("config.json")).expect("copy"))
                .expect("json");
        assert_eq!(copy["linux"]["cgroupsPath"], "/c1");
        assert_eq!(
            copy["root"]["path"],
            bundle.dir.join("rootfs").display().to_string()
        );
        let process = |v: &serde_json::Value| {
            serde_json::from_value::<oci_spec::runtime::Process>(v["process"].clone())
                .expect("process")
        };
        assert_eq!(process(&copy), process(&spec_json()));
        assert_eq!(
            std::fs::read(user.path().join("config.json")).expect("read"),
            before,
            "the user's config.json is untouched"
        );
        let staged = rb.dir().to_path_buf();
        drop(rb);
        assert!(!staged.exists(), "an unsettled copy is removed");
    }

    #[test]
    fn deny_rules_after_deny_everything_are_left_out_until_an_allow() {
        let rules = serde_json::json!([
            {"allow": false, "access": "rwm"},
            {"allow": false, "type": "c", "major": 1, "minor": 11, "access": "rwa"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}
        ]);
        let rules = rules.as_array().expect("array");
        let kept = minimal_device_rules(rules);
        assert_eq!(kept, [rules[0].clone(), rules[2].clone(), rules[3].clone()]);
        let mut config = spec_json();
        config["linux"]["cgroupsPath"] = "/pod/c1".into();
        config["linux"]["resources"]["devices"] = serde_json::Value::Array(rules.to_vec());
        let (_user, bundle) = bundle_with(config);
        let root = tempfile::tempdir().expect("root");
        let rb = RunBundle::for_create(root.path(), "c1", &bundle).expect("stage");
        let copy: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rb.dir().join("config.json")).expect("copy"))
                .expect("json");
        assert_eq!(
            copy["linux"]["cgroupsPath"], "/pod/c1",
            "the spec's own path kept"
        );
        assert_eq!(
            copy["linux"]["resources"]["devices"]
                .as_array()
                .map(Vec::len),
            Some(3)
        );
    }

    #[test]
    fn a_spec_with_a_cgroup_path_runs_from_the_users_bundle() {
        let mut config = spec_json();
        config["linux"]["cgroupsPath"] = "/docker/abc".into();
        let (_user, bundle) = bundle_with(config);
        let root = tempfile::tempdir().expect("root");
        let rb = RunBundle::for_create(root.path(), "c1", &bundle).expect("bundle");
        assert_eq!(rb.dir(), bundle.dir);
        assert!(RunBundle::write_into_state(root.path(), "c1", &bundle)
            .expect("restore")
            .is_none());
    }
}
