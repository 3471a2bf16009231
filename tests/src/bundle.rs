//! Busybox bundles for tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A bundle directory with a busybox rootfs; removed (and unmounted) on drop.
pub struct Bundle {
    /// Bundle directory.
    pub dir: PathBuf,
    overlay: Option<PathBuf>,
}

/// Populate `root` with busybox, /etc/passwd, /etc/group and the usual mount points.
pub fn busybox_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let st = Command::new("chroot")
        .arg(root)
        .args(["/bin/busybox", "--install", "-s", "/bin"])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "busybox --install failed in {}",
        root.display()
    );
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

impl Bundle {
    /// A bundle with a plain-directory rootfs running `args`.
    pub fn busybox(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("cryo-bundle"));
        busybox_rootfs(&dir.join("rootfs"));
        let b = Self { dir, overlay: None };
        b.write_config(args, |_| {});
        b
    }

    /// A bundle whose rootfs is an overlay of `lower` with a fresh upper dir.
    pub fn overlay(lower: &Path, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("cryo-ovl"));
        Self::overlay_with(lower, &dir.join("upper"), &dir.join("work"), &dir, args)
    }

    /// An overlay bundle in a new directory whose upper and work dirs are `upper` and `work`
    /// (made if missing; not removed on drop), e.g. on a filesystem a test controls.
    pub fn overlay_at(lower: &Path, upper: &Path, work: &Path, args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("cryo-ovl"));
        Self::overlay_with(lower, upper, work, &dir, args)
    }

    fn overlay_with(lower: &Path, upper: &Path, work: &Path, dir: &Path, args: &[&str]) -> Self {
        for d in [&dir.join("rootfs"), upper, work] {
            std::fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(dir.join("rootfs"))
            .status()
            .unwrap();
        assert!(st.success(), "overlay mount failed");
        let b = Self {
            dir: dir.to_path_buf(),
            overlay: Some(dir.join("rootfs")),
        };
        b.write_config(args, |_| {});
        b
    }

    /// Rewrite config.json with `args`, then let `edit` change the JSON.
    pub fn write_config(&self, args: &[&str], edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.dir.join("config.json");
        let _ = std::fs::remove_file(&path);
        let st = Command::new(crate::cryo_bin())
            .arg("spec")
            .arg("--bundle")
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "cryo spec failed");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["process"]["terminal"] = false.into();
        v["process"]["args"] = args
            .iter()
            .map(|a| serde_json::Value::from(*a))
            .collect::<Vec<_>>()
            .into();
        v["root"]["readonly"] = false.into();
        edit(&mut v);
        std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    /// The rootfs path.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The overlay upper dir (overlay bundles).
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Some(m) = &self.overlay {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
