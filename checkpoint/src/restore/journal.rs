//! What a restore has made so far, on disk in the container's state directory, written before
//! each thing is made: a restore that fails undoes it from here, and a restore that was killed
//! is undone from here by its guardian or by the next verb on the id (`delete`, another
//! `restore`), so nothing it made is left for a later verb to trip on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name in the container's state directory.
pub const FILE: &str = "restore-journal.json";

/// The things a restore in progress has made (each recorded before it is made).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The container id.
    pub id: String,
    /// The container's cgroup path (relative to each hierarchy), once cryo creates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<PathBuf>,
    /// The rootfs bind mount CRIU restores into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_root: Option<PathBuf>,
    /// The target rootfs a changeset is being applied to (its undo data lives inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    /// A /dev/shm directory that was empty and is being refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devshm: Option<PathBuf>,
    /// Decompressed page images for CRIU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_images: Option<PathBuf>,
    /// A lazy-pages daemon cryo started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_daemon: Option<i32>,
    /// The pid file, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
}

/// The host's part of undoing a restore: its cgroups.
pub trait CgroupUndo {
    /// Kill every process in the container's cgroups at `cgroup_path` and remove them.
    fn destroy(&self, cgroup_path: &Path);
}

/// A journal kept on disk at `path`.
#[derive(Debug)]
pub struct JournalFile {
    path: PathBuf,
    journal: Journal,
}

impl JournalFile {
    /// Start a journal for `id` at `dir/restore-journal.json`, creating `dir` (0700).
    pub fn create(dir: &Path, id: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let f = Self {
            path: dir.join(FILE),
            journal: Journal {
                id: id.to_string(),
                ..Journal::default()
            },
        };
        f.save()?;
        Ok(f)
    }

    /// Record something about to be made, durably enough to survive cryo's death.
    pub fn record(&mut self, change: impl FnOnce(&mut Journal)) -> std::io::Result<()> {
        change(&mut self.journal);
        self.save()
    }

    /// What is recorded.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn save(&self) -> std::io::Result<()> {
        // Renamed into place (a reader never sees half of it); not fsynced: it only has to
        // outlive cryo's process, and state directories live in /run.
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.journal)?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
        }
        std::fs::rename(&tmp, &self.path)
    }

    /// The restore succeeded: forget the journal.
    pub fn remove(self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Undo everything recorded, then remove the journal.
    pub fn undo(self, cgroups: &dyn CgroupUndo) -> Vec<String> {
        let problems = undo(&self.journal, cgroups);
        let _ = std::fs::remove_file(&self.path);
        problems
    }
}

/// Undo the restore whose journal is in `dir`, if one is there (a killed restore). Returns
/// `Ok(false)` when there was none, and the problems met while undoing.
pub fn undo_pending(dir: &Path, cgroups: &dyn CgroupUndo) -> Result<bool, Vec<String>> {
    let path = dir.join(FILE);
    let journal: Journal = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(j) => j,
            Err(e) => return Err(vec![format!("{} is unreadable: {e}", path.display())]),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
    };
    let problems = JournalFile { path, journal }.undo(cgroups);
    if problems.is_empty() {
        Ok(true)
    } else {
        Err(problems)
    }
}

/// Undo in the reverse order of making: processes and cgroups, the mount, the staged images,
/// the lazy daemon, /dev/shm, the rootfs changes, the pid file.
fn undo(j: &Journal, cgroups: &dyn CgroupUndo) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(cg) = &j.cgroup_path {
        cgroups.destroy(cg);
    }
    if let Some(root) = &j.criu_root {
        super::mount::unmount(root);
        if let Err(e) = std::fs::remove_dir(root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("remove {}: {e}", root.display()));
            }
        }
    }
    if let Some(dir) = &j.staged_images {
        if let Err(e) = cryo_oci::fsutil::remove_tree_same_fs(dir) {
            problems.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if let Some(pid) = j.lazy_daemon {
        // Only a lazy-pages daemon of this restore: check its command line first.
        if super::lazy_daemon_of(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Some(shm) = &j.devshm {
        if let Err(e) = empty_dir(shm) {
            problems.push(format!("empty {}: {e}", shm.display()));
        }
    }
    if let Some(root) = &j.rootfs {
        if let Err(e) = super::rootfs_step::rollback(root) {
            problems.push(format!("rolling back the rootfs {}: {e}", root.display()));
        }
    }
    if let Some(pf) = &j.pid_file {
        let _ = std::fs::remove_file(pf);
    }
    problems
}

/// Remove everything inside `dir` (on its own mount only).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        cryo_oci::fsutil::remove_tree_same_fs(&e?.path())?;
    }
    Ok(())
}
