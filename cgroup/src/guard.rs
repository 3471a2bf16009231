//! [`FreezeGuard`]: freeze for the length of a scope and put the cgroup back as it was.

use std::time::Duration;

use crate::freezer::{FreezeStats, Freezer, FreezerState};
use crate::CgroupError;

/// Freezes on creation and, when dropped or released, restores the state found before: thaws
/// a cgroup that was running, leaves frozen one that was already frozen. That matters because
/// containerd and docker `pause` a container before asking for its checkpoint, and expect it
/// still paused afterwards.
///
/// A cgroup found FREEZING (a freeze in progress or stuck) counts as running, as in runc,
/// where only a completed freeze makes a container "paused": restoring it means thawing.
#[must_use = "dropping the guard at once thaws the cgroup again"]
pub struct FreezeGuard<'a> {
    freezer: &'a dyn Freezer,
    was_frozen: bool,
    armed: bool,
    /// How the freeze went (zeros when the cgroup was already frozen).
    pub stats: FreezeStats,
}

impl<'a> FreezeGuard<'a> {
    /// Freeze `freezer` within `timeout`, remembering whether it was already frozen (then
    /// nothing is written). On error nothing is left to undo: a failed freeze thaws itself.
    pub fn freeze(freezer: &'a dyn Freezer, timeout: Duration) -> Result<Self, CgroupError> {
        let was_frozen = freezer.state()? == FreezerState::Frozen;
        let stats = if was_frozen {
            FreezeStats::default()
        } else {
            freezer.freeze(timeout)?
        };
        Ok(Self {
            freezer,
            was_frozen,
            armed: true,
            stats,
        })
    }

    /// Whether the cgroup was already frozen (paused) before the guard.
    pub fn was_frozen_before(&self) -> bool {
        self.was_frozen
    }

    /// Restore the previous state now and report a failed thaw (a drop can only log it).
    pub fn release(mut self) -> Result<(), CgroupError> {
        self.armed = false;
        if self.was_frozen {
            Ok(())
        } else {
            self.freezer.thaw()
        }
    }

    /// Thaw whatever the previous state was: tasks that were just killed must thaw to die.
    pub fn force_thaw(mut self) -> Result<(), CgroupError> {
        self.armed = false;
        self.freezer.thaw()
    }

    /// Leave the cgroup frozen for good, e.g. to hand a frozen container to the next step.
    pub fn keep_frozen(mut self) {
        self.armed = false;
    }

    /// Stop guarding without touching the cgroup: the caller takes charge of its state from
    /// here (same effect as [`FreezeGuard::keep_frozen`], named for code paths that go on to
    /// thaw or kill it themselves).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for FreezeGuard<'_> {
    fn drop(&mut self) {
        if self.armed && !self.was_frozen {
            if let Err(e) = self.freezer.thaw() {
                tracing::error!(
                    "could not thaw {} again: {e}",
                    self.freezer.path().display()
                );
            }
        }
    }
}

impl std::fmt::Debug for FreezeGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreezeGuard")
            .field("path", &self.freezer.path())
            .field("was_frozen", &self.was_frozen)
            .field("armed", &self.armed)
            .field("stats", &self.stats)
            .finish()
    }
}
