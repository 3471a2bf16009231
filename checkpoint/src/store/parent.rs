//! Which generation a new one is an increment of, or why it is a full one.
//!
//! The parent is the newest generation that verifies with its whole chain (digests of every
//! file: a child built on a damaged parent could never be restored). The generation this
//! process wrote last is trusted with a quick look (its files present, of their sizes): it
//! was verified when it was written. A full generation is written instead when none
//! verifies, when the chain would get longer than `--full-every` allows (a restore reads
//! through every generation of it), when the increments since the last full generation add
//! up to more than its pages (a full one then costs no more than the chain already holds),
//! or when the candidate's pages are compressed (not in CRIU's format). Generations that
//! share extents instead of chaining ([`super::shared`]) count towards `--full-every` too: a
//! full one bounds how fragmented their files grow.

use super::check::{check_all, GenerationInfo};
use super::{Generation, ParentImage};
use crate::image::chain::verify_chain;
use crate::image::Thoroughness;

/// How often a full generation is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Every `full_every`-th generation of a chain is a full one (1: all are).
    pub full_every: u32,
}

/// The decision.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The parent, or `None` for a full generation.
    pub parent: Option<ParentImage>,
    /// Why the new generation is full (when it is).
    pub why_full: Option<String>,
    /// Generations passed over, and why.
    pub notes: Vec<String>,
}

/// Choose the parent of a new generation among `gens` (oldest first); `trusted` names the
/// generation this process wrote last, if any.
pub fn choose_parent(gens: &[Generation], trusted: Option<&str>, policy: Policy) -> Choice {
    let infos = check_all(gens, Thoroughness::Sizes);
    let mut notes = Vec::new();
    let full = |why: String, notes: Vec<String>| Choice {
        parent: None,
        why_full: Some(why),
        notes,
    };
    if policy.full_every <= 1 {
        return full("--full-every 1".into(), notes);
    }
    let mut candidate = None;
    for info in infos.iter().rev() {
        if !info.is_good() {
            if let super::GenerationState::Bad(why) = &info.state {
                notes.push(format!(
                    "generation {} is not used as a parent: {why}",
                    info.name
                ));
            }
            continue;
        }
        if trusted != Some(info.name.as_str()) {
            if let Err(e) = verify_chain(&info.dir, Thoroughness::Digests) {
                notes.push(format!(
                    "generation {} is not used as a parent: {e}",
                    info.name
                ));
                continue;
            }
        }
        candidate = Some(info);
        break;
    }
    let Some(c) = candidate else {
        let why = if infos.is_empty() {
            "the store's first generation".to_string()
        } else {
            "no generation of the store verifies".to_string()
        };
        return full(why, notes);
    };
    let Some(m) = c.manifest.clone() else {
        return full("no generation of the store verifies".into(), notes);
    };
    if !m.compressed_pages.is_empty() {
        return full(
            format!("the newest generation, {}, has compressed pages", c.name),
            notes,
        );
    }
    let chain = ChainSize::of(c, &infos);
    if chain.increments + 1 >= policy.full_every {
        return full(
            format!(
                "every {}th generation of a chain is a full one (--full-every)",
                policy.full_every
            ),
            notes,
        );
    }
    if chain.base_pages > 0 && chain.increment_pages >= chain.base_pages {
        return full(
            "the increments since the last full generation add up to its size".into(),
            notes,
        );
    }
    Choice {
        parent: Some(ParentImage {
            name: c.name.clone(),
            dir: c.dir.clone(),
            manifest: m,
        }),
        why_full: None,
        notes,
    }
}

/// What a chain ending at some generation holds.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChainSize {
    /// Incremental generations in it.
    increments: u32,
    /// Bytes of pages they hold.
    increment_pages: u64,
    /// Bytes of pages of the full generation at its root.
    base_pages: u64,
}

impl ChainSize {
    fn of(last: &GenerationInfo, infos: &[GenerationInfo]) -> Self {
        let mut size = Self::default();
        let mut at = Some(last);
        if let Some(s) = last.manifest.as_ref().and_then(|m| m.shares.as_ref()) {
            // Sharing extents, no generation depends on another: only the count matters
            // (the one shared from may be gone).
            size.increments = s.since_full;
            return size;
        }
        while let Some(g) = at {
            let Some(m) = g.manifest.as_ref() else { break };
            match &m.parent {
                Some(p) => {
                    size.increments += 1;
                    size.increment_pages += p.pages_written;
                    at = infos.iter().find(|i| i.name == p.name);
                    if size.increments as usize > super::delta::MAX_CHAIN {
                        break;
                    }
                }
                None => {
                    size.base_pages = m
                        .files
                        .iter()
                        .filter(|f| f.name.starts_with("pages-"))
                        .map(|f| f.size)
                        .sum();
                    at = None;
                }
            }
        }
        size
    }
}
