//! Removing old generations without breaking the ones kept.
//!
//! The newest `keep` generations that check out are kept, with every generation they depend
//! on; what is older and not depended on goes, newest first (a child before its parent, so no
//! generation is ever left whose parent is gone). Damaged generations newer than the oldest
//! kept one are left for the user to look at; fewer than `keep` good generations, and nothing
//! is removed.

use std::collections::HashSet;

use super::check::{check_all, GenerationInfo};
use super::{Store, StoreError};
use crate::image::Thoroughness;

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Generations removed, newest first.
    pub removed: Vec<String>,
    /// Generations kept only because a kept one depends on them.
    pub kept_as_parents: Vec<String>,
}

/// Prune `store` to its `keep` newest good generations (and what they depend on).
pub fn prune(store: &Store, keep: usize) -> Result<Pruned, StoreError> {
    let gens = store.generations()?;
    let infos = check_all(&gens, Thoroughness::Sizes);
    let plan = plan(&infos, keep);
    for name in &plan.removed {
        if let Some(g) = gens.iter().find(|g| &g.name == name) {
            store.remove(g)?;
        }
    }
    Ok(plan)
}

/// Which generations go (pure: from the infos, oldest first).
fn plan(infos: &[GenerationInfo], keep: usize) -> Pruned {
    let kept: Vec<&GenerationInfo> = infos
        .iter()
        .rev()
        .filter(|i| i.is_good())
        .take(keep)
        .collect();
    let Some(oldest_kept) = kept.last().filter(|_| kept.len() == keep && keep > 0) else {
        return Pruned::default();
    };
    let mut needed: HashSet<&str> = kept.iter().map(|i| i.name.as_str()).collect();
    let mut kept_as_parents = Vec::new();
    for k in &kept {
        let mut at = k.parent();
        while let Some(name) = at {
            if needed.insert(name) {
                kept_as_parents.push(name.to_string());
            }
            at = infos
                .iter()
                .find(|i| i.name == name)
                .and_then(|i| i.parent());
        }
    }
    let removed = infos
        .iter()
        .rev()
        .filter(|i| i.seq < oldest_kept.seq && !needed.contains(i.name.as_str()))
        .map(|i| i.name.clone())
        .collect();
    Pruned {
        removed,
        kept_as_parents,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::check::GenerationState;
    use crate::store::ParentRecord;

    fn info(seq: u64, parent: Option<u64>, good: bool) -> GenerationInfo {
        let mut m = crate::manifest::tests::sample();
        m.parent = parent.map(|p| ParentRecord {
            name: format!("g{p}"),
            manifest_blake3: String::new(),
            pages_written: 0,
            pages_in_parent: 0,
            shared_files: vec![],
        });
        GenerationInfo {
            name: format!("g{seq}"),
            seq,
            dir: format!("g{seq}").into(),
            manifest: Some(m),
            group: None,
            state: if good {
                GenerationState::Good
            } else {
                GenerationState::Bad("damaged".into())
            },
            bytes: 0,
        }
    }

    #[test]
    fn keeps_what_the_kept_ones_depend_on() {
        // 1 full, 2..4 increments of the chain before, 5 full, 6 and 7 on it.
        let infos = vec![
            info(1, None, true),
            info(2, Some(1), true),
            info(3, Some(2), true),
            info(4, Some(3), true),
            info(5, None, true),
            info(6, Some(5), true),
            info(7, Some(6), true),
        ];
        let p = plan(&infos, 3);
        assert_eq!(p.removed, ["g4", "g3", "g2", "g1"]);
        let p = plan(&infos[..4], 2);
        assert_eq!(p.removed, Vec::<String>::new(), "g3 and g4 need g1 and g2");
        assert_eq!(p.kept_as_parents, ["g2", "g1"]);
    }

    #[test]
    fn damaged_ones_do_not_count_and_too_few_good_ones_remove_nothing() {
        let infos = vec![
            info(1, None, true),
            info(2, None, true),
            info(3, None, false),
            info(4, None, true),
        ];
        // Kept: 4 and 2 (3 is damaged); 1 goes, 3 stays for the user to look at.
        assert_eq!(plan(&infos, 2).removed, ["g1"]);
        assert_eq!(plan(&infos, 4).removed, Vec::<String>::new());
        assert_eq!(plan(&infos, 0).removed, Vec::<String>::new());
    }
}
