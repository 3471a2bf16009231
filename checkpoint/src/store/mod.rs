//! Checkpoint stores (`checkpoint --store DIR`): a directory of *generations*, each a
//! complete cryo image published whole, named `gen-<seq>-<UTC time>` so that `ls` lists them
//! oldest first.
//!
//! - A generation is written like any image ([`crate::image::Staging`]: a private staging
//!   directory beside it, published by one rename) under the store's lock ([`lock`]), so a
//!   generation appears complete or not at all, and two writers never interleave.
//! - It is *incremental* when it has a parent ([`delta`]): only the pages that changed since
//!   the parent generation are written, the rest are marked as in the parent (CRIU's
//!   `PE_PARENT`, found through a `parent` link to `../<parent>`), and the manifest records
//!   the parent and its manifest digest and requires `parent-chain`. Verifying a generation
//!   verifies its whole chain ([`crate::image::verify_image`]).
//! - Which generation is a parent, and when a full one is written instead: [`parent`].
//! - Pruning keeps the newest N generations that check out and every generation they depend
//!   on ([`prune`]); a removed generation is first renamed out of the namespace (one rename),
//!   so a killed prune leaves debris, never a generation that looks complete and is not.
//! - Listing with the state of each generation: [`check`].
//! - A store holds one container's generations or one group's ([`Holds`]): a group generation
//!   is a group image ([`crate::group`]), always full, restored as a group.

pub mod check;
pub mod delta;
pub mod extents;
pub mod lock;
pub mod pagemap;
pub mod parent;
pub mod prune;
pub mod shared;

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

pub use check::{GenerationInfo, GenerationState};
pub use lock::{LockMode, StoreLock};
pub use parent::{choose_parent, Policy};

/// The link in an incremental generation that names its parent (CRIU's name for it).
pub const PARENT_LINK: &str = "parent";
/// Generation directories start with this.
pub const GEN_PREFIX: &str = "gen-";
/// Prefix of a generation being removed (renamed out of the namespace first).
const TRASH_PREFIX: &str = ".cryo-trash-";

/// What an incremental generation's manifest says about its parent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRecord {
    /// The parent generation's directory name (a sibling; the `parent` link is `../<name>`).
    pub name: String,
    /// The parent's manifest digest (`manifest_blake3`) when this generation was made: the
    /// parent must still be that very image.
    pub manifest_blake3: String,
    /// Bytes of pages that changed since the parent, held by this generation.
    pub pages_written: u64,
    /// Bytes of pages left to the parent chain.
    pub pages_in_parent: u64,
    /// Files that are hard links to the parent's (identical content).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_files: Vec<String>,
}

/// What a generation that shares page extents with the one before it records
/// ([`shared`]). Informational: the generation is a full image, restored on its own, and
/// the one it names may be gone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharesRecord {
    /// The generation it was made from.
    pub name: String,
    /// Bytes of pages that changed since, written.
    pub pages_written: u64,
    /// Bytes of pages that share that generation's extents (written by no one).
    pub pages_shared: u64,
    /// Generations since the last one written whole, this one included (`--full-every`).
    pub since_full: u32,
    /// Files that are hard links to that generation's (identical content).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_files: Vec<String>,
}

/// Bytes a generation's image wrote itself: its files, less those that are hard links to the
/// generation before and the page extents it shares with it.
pub fn own_bytes(m: &Manifest) -> u64 {
    let (linked, shared_pages): (&[String], u64) = match (&m.parent, &m.shares) {
        (Some(p), _) => (&p.shared_files, 0),
        (None, Some(s)) => (&s.shared_files, s.pages_shared),
        (None, None) => (&[], 0),
    };
    m.files
        .iter()
        .filter(|f| !linked.contains(&f.name))
        .map(|f| f.size)
        .sum::<u64>()
        .saturating_sub(shared_pages)
}

/// The generation a new one is made an increment of.
#[derive(Debug, Clone)]
pub struct ParentImage {
    /// Its directory name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem step.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a store (missing, a file, or holding something else).
    #[error("{dir} is not a checkpoint store: {reason}")]
    NotAStore {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another cryo holds the store.
    #[error("checkpoint store {dir} is busy: {holder}")]
    Busy {
        /// The store.
        dir: PathBuf,
        /// Who holds it, and what to do.
        holder: String,
    },
    /// A pagemap image could not be read.
    #[error(transparent)]
    Pagemap(#[from] pagemap::PagemapError),
    /// A generation's chain of parents is broken.
    #[error("generation {dir} cannot serve as a parent: {reason}")]
    Chain {
        /// The generation.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A request the store cannot honour.
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    pub(crate) fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { step, path, source }
    }
}

/// One generation directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Its name, `gen-<seq>-<time>`.
    pub name: String,
    /// Its sequence number (order of creation).
    pub seq: u64,
    /// Its path.
    pub dir: PathBuf,
}

/// What a store's generations are checkpoints of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// One container (`checkpoint --store DIR ID`).
    Container,
    /// A group (`checkpoint --store DIR ID1 ID2 …`).
    Group,
}

impl Holds {
    /// What it is, in words, for messages.
    pub fn words(self) -> &'static str {
        match self {
            Self::Container => "one container's checkpoints",
            Self::Group => "a group's checkpoints",
        }
    }
}

/// A store directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open an existing store.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let meta = std::fs::metadata(dir).map_err(|e| StoreError::NotAStore {
            dir: dir.to_path_buf(),
            reason: format!("{e}; pass the --store of earlier checkpoints"),
        })?;
        if !meta.is_dir() {
            return Err(StoreError::NotAStore {
                dir: dir.to_path_buf(),
                reason: "it is a file, not a directory".into(),
            });
        }
        let dir = dir.canonicalize().map_err(StoreError::io("resolve", dir))?;
        Ok(Self { dir })
    }

    /// Open a store, creating its directory (0700) if missing. A directory holding anything
    /// but generations and cryo's own files is refused: the store removes what it prunes.
    pub fn create(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(StoreError::io("create", dir))?;
        let store = Self::open(dir)?;
        let stranger = std::fs::read_dir(&store.dir)
            .map_err(StoreError::io("list", &store.dir))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find(|n| !n.starts_with('.') && parse_seq(n).is_none());
        if let Some(name) = stranger {
            return Err(StoreError::NotAStore {
                dir: store.dir,
                reason: format!(
                    "it holds {name}, which is not a generation: give --store a directory of \
                     its own (new or empty)"
                ),
            });
        }
        Ok(store)
    }

    /// The store's directory (resolved).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The generations, oldest first. Staging and trash directories are not generations.
    pub fn generations(&self) -> Result<Vec<Generation>, StoreError> {
        let mut gens: Vec<Generation> = std::fs::read_dir(&self.dir)
            .map_err(StoreError::io("list", &self.dir))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let seq = parse_seq(&name)?;
                Some(Generation {
                    dir: self.dir.join(&name),
                    name,
                    seq,
                })
            })
            .collect();
        gens.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.name.cmp(&b.name)));
        Ok(gens)
    }

    /// What the newest generation with a manifest holds (`None`: none has one yet). A
    /// generation without any manifest (damaged) says nothing.
    pub fn holds(&self) -> Result<Option<Holds>, StoreError> {
        Ok(self.generations()?.iter().rev().find_map(|g| {
            if crate::group::is_group_image(&g.dir) {
                Some(Holds::Group)
            } else if g.dir.join(crate::manifest::FILE).exists() {
                Some(Holds::Container)
            } else {
                None
            }
        }))
    }

    /// Refuse to write a generation of `kind` into a store that holds the other kind: a
    /// restore from the store must know whether it restores one container or a group.
    pub fn check_holds(&self, kind: Holds) -> Result<(), StoreError> {
        match self.holds()? {
            Some(found) if found != kind => Err(StoreError::Unsupported(format!(
                "checkpoint store {} holds {}, not {}: give this checkpoint a store of its own",
                self.dir.display(),
                found.words(),
                kind.words()
            ))),
            _ => Ok(()),
        }
    }

    /// The name of the next generation: one past the highest sequence number, and the time.
    pub fn next_name(gens: &[Generation], now: DateTime<Utc>) -> String {
        let seq = gens.iter().map(|g| g.seq).max().map_or(1, |s| s + 1);
        format!("{GEN_PREFIX}{seq:08}-{}", now.format("%Y%m%dT%H%M%SZ"))
    }

    /// Take the store's lock (see [`lock`]).
    pub fn lock(
        &self,
        mode: LockMode,
        timeout: std::time::Duration,
    ) -> Result<StoreLock, StoreError> {
        StoreLock::take(&self.dir, mode, timeout)
    }

    /// Remove what killed writers left: staging directories of generations and generations
    /// half removed. Call with the exclusive lock held: no other writer is at work then.
    pub fn remove_debris(&self) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return removed;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let staging =
                name.starts_with(&format!(".{GEN_PREFIX}")) && name.contains(".cryo-new-");
            if (staging || name.starts_with(TRASH_PREFIX))
                && cryo_oci::fsutil::remove_tree_same_fs(&e.path()).is_ok()
            {
                removed.push(name);
            }
        }
        removed
    }

    /// Remove a generation: first renamed out of the namespace (so it stops being a
    /// generation at once), then deleted.
    pub fn remove(&self, g: &Generation) -> Result<(), StoreError> {
        let trash = self
            .dir
            .join(format!("{TRASH_PREFIX}{}-{}", std::process::id(), g.name));
        std::fs::rename(&g.dir, &trash).map_err(StoreError::io("rename", &g.dir))?;
        sync_dir(&self.dir)?;
        cryo_oci::fsutil::remove_tree_same_fs(&trash)
            .map(|_| ())
            .map_err(StoreError::io("remove", &trash))
    }
}

/// The sequence number of a generation name, `None` for anything else.
pub fn parse_seq(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(GEN_PREFIX)?;
    let (digits, _) = rest.split_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(StoreError::io("sync", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_sort_by_age_and_parse_back() {
        let t = DateTime::parse_from_rfc3339("2026-12-05T10:22:33Z")
            .unwrap()
            .with_timezone(&Utc);
        let first = Store::next_name(&[], t);
        assert_eq!(first, "gen-00000001-20261205T102233Z");
        let g = |name: &str| Generation {
            name: name.into(),
            seq: parse_seq(name).unwrap(),
            dir: PathBuf::from(name),
        };
        let next = Store::next_name(&[g(&first), g("gen-00000009-20261205T102233Z")], t);
        assert_eq!(next, "gen-00000010-20261205T102233Z");
        assert!(next > first);
        for bad in [
            "gen-",
            "gen-x-1",
            "gen-12",
            ".gen-00000001-x.cryo-new-5",
            "checkpoint",
        ] {
            assert_eq!(parse_seq(bad), None, "{bad}");
        }
    }

    #[test]
    fn create_refuses_a_directory_of_other_things() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("gen-00000001-20261205T102233Z")).unwrap();
        std::fs::create_dir(d.path().join(".gen-00000002-x.cryo-new-1")).unwrap();
        let s = Store::create(d.path()).unwrap();
        let gens = s.generations().unwrap();
        assert_eq!(gens.len(), 1);
        assert_eq!(
            s.remove_debris(),
            vec![".gen-00000002-x.cryo-new-1".to_string()]
        );
        std::fs::write(d.path().join("notes.txt"), "mine").unwrap();
        let e = Store::create(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("notes.txt") && e.contains("directory of its own"),
            "{e}"
        );
    }

    #[test]
    fn a_removed_generation_is_gone_at_once() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::create(d.path()).unwrap();
        let dir = d.path().join("gen-00000001-20261205T102233Z");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("inventory.img"), "x").unwrap();
        let g = s.generations().unwrap().remove(0);
        s.remove(&g).unwrap();
        assert!(s.generations().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_store_holds_one_kind() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::create(d.path()).unwrap();
        assert_eq!(s.holds().unwrap(), None);
        s.check_holds(Holds::Group).unwrap();
        // A generation with no manifest (damaged) says nothing.
        std::fs::create_dir(d.path().join("gen-00000001-20261205T102233Z")).unwrap();
        assert_eq!(s.holds().unwrap(), None);
        let group = d.path().join("gen-00000002-20261205T102234Z");
        std::fs::create_dir(&group).unwrap();
        std::fs::write(group.join(crate::group::manifest::FILE), "{}").unwrap();
        assert_eq!(s.holds().unwrap(), Some(Holds::Group));
        s.check_holds(Holds::Group).unwrap();
        let e = s.check_holds(Holds::Container).unwrap_err().to_string();
        assert!(
            e.contains("holds a group's checkpoints") && e.contains("a store of its own"),
            "{e}"
        );
    }
}
