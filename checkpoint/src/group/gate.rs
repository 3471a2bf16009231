//! Where the members of a group meet. Each member works in a thread of its own and arrives at
//! each [`Phase`] in turn; the last to arrive runs the group's action for that phase (lock the
//! network, publish the group) and then all go on together. A member that fails breaks the
//! gate: every member waiting, and every member arriving later, gets the reason and undoes its
//! own part. Waits have a deadline and give way to SIGINT/SIGTERM/SIGHUP.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The points where members wait for each other, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checkpoint: every member's checkpoint is prepared (nothing was refused).
    Prepared,
    /// Checkpoint: every member's CRIU is ready to dump and its pages staged: all freeze now.
    Ready,
    /// Checkpoint: every member is frozen (the action locks the network).
    Frozen,
    /// Checkpoint: every member's CRIU dump is done (the action unlocks the network when the
    /// members keep running).
    Dumped,
    /// Checkpoint: every member's image is complete (the action publishes the group).
    Published,
    /// Restore: every member's tasks are restored, none runs yet (the action unlocks the
    /// network).
    Restored,
    /// Restore: every member's CRIU returned: the members run.
    Running,
    /// Restore: every member's state is recorded: the restore is committed.
    Recorded,
}

const PHASES: usize = 8;

impl Phase {
    fn index(self) -> usize {
        self as usize
    }

    /// What the members wait for at this phase (for messages).
    pub fn waiting_for(self) -> &'static str {
        match self {
            Phase::Prepared => "to be prepared",
            Phase::Ready => "to be ready to freeze",
            Phase::Frozen => "to freeze",
            Phase::Dumped => "to be dumped",
            Phase::Published => "to complete their images",
            Phase::Restored => "to be restored",
            Phase::Running => "to run",
            Phase::Recorded => "to be recorded",
        }
    }
}

/// How often a waiting member looks at the interrupt flag.
const SLICE: Duration = Duration::from_millis(50);

struct State {
    arrived: [Vec<bool>; PHASES],
    passed: [bool; PHASES],
    broken: Option<String>,
}

/// The group's action for a phase, run by the last member to arrive.
pub type Action<'c> = &'c (dyn Fn(Phase) -> Result<(), String> + Sync);

/// The meeting points of one group.
pub struct Gate<'c> {
    names: Vec<String>,
    state: Mutex<State>,
    changed: Condvar,
    action: Action<'c>,
    interrupted: &'c (dyn Fn() -> bool + Sync),
}

impl<'c> Gate<'c> {
    /// A gate for the members `names` (member `i` arrives as `i`).
    pub fn new(
        names: Vec<String>,
        action: Action<'c>,
        interrupted: &'c (dyn Fn() -> bool + Sync),
    ) -> Self {
        let n = names.len();
        Self {
            names,
            state: Mutex::new(State {
                arrived: std::array::from_fn(|_| vec![false; n]),
                passed: [false; PHASES],
                broken: None,
            }),
            changed: Condvar::new(),
            action,
            interrupted,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Member `member` arrives at `phase`; returns once every member has and the phase's
    /// action succeeded. An error (the gate broke, `until` passed, a signal came) means the
    /// group is abandoned: the member undoes its part.
    pub fn arrive(&self, member: usize, phase: Phase, until: Instant) -> Result<(), String> {
        let p = phase.index();
        let mut st = self.lock();
        if let Some(why) = &st.broken {
            return Err(why.clone());
        }
        st.arrived[p][member] = true;
        if st.arrived[p].iter().all(|a| *a) {
            drop(st);
            let result = (self.action)(phase);
            let mut st = self.lock();
            match result {
                Ok(()) if st.broken.is_none() => st.passed[p] = true,
                Ok(()) => {}
                Err(e) => {
                    st.broken.get_or_insert(e);
                }
            }
            self.changed.notify_all();
            return match &st.broken {
                Some(why) => Err(why.clone()),
                None => Ok(()),
            };
        }
        loop {
            if let Some(why) = &st.broken {
                return Err(why.clone());
            }
            if st.passed[p] {
                return Ok(());
            }
            let now = Instant::now();
            let why = if (self.interrupted)() {
                Some("interrupted by a signal".to_string())
            } else if now >= until {
                let missing: Vec<&str> = self
                    .names
                    .iter()
                    .zip(&st.arrived[p])
                    .filter(|(_, a)| !**a)
                    .map(|(n, _)| n.as_str())
                    .collect();
                Some(format!(
                    "{} waited too long for {} {}",
                    self.names[member],
                    missing.join(", "),
                    phase.waiting_for()
                ))
            } else {
                None
            };
            if let Some(why) = why {
                st.broken = Some(why.clone());
                self.changed.notify_all();
                return Err(why);
            }
            let slice = SLICE.min(until - now);
            st = self
                .changed
                .wait_timeout(st, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The group is abandoned for `why` (the first reason given is kept).
    pub fn break_with(&self, why: String) {
        let mut st = self.lock();
        st.broken.get_or_insert(why);
        self.changed.notify_all();
    }

    /// Why the group was abandoned, if it was.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn all_pass_together_and_the_action_runs_once_per_phase() {
        let runs = AtomicUsize::new(0);
        let action = |_: Phase| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let never = || false;
        let gate = Gate::new(names(3), &action, &never);
        let until = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|s| {
            for m in 0..3 {
                let gate = &gate;
                s.spawn(move || {
                    gate.arrive(m, Phase::Prepared, until).unwrap();
                    gate.arrive(m, Phase::Ready, until).unwrap();
                });
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_action_or_member_releases_everyone_with_the_reason() {
        let action = |p: Phase| match p {
            Phase::Frozen => Err("locking failed".to_string()),
            _ => Ok(()),
        };
        let never = || false;
        let gate = Gate::new(names(2), &action, &never);
        let until = Instant::now() + Duration::from_secs(10);
        let errors: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|m| {
                    let gate = &gate;
                    s.spawn(move || gate.arrive(m, Phase::Frozen, until).unwrap_err())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errors, vec!["locking failed"; 2]);

        let ok = |_: Phase| Ok(());
        let gate = Gate::new(names(2), &ok, &never);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| gate.arrive(0, Phase::Dumped, until));
            std::thread::sleep(Duration::from_millis(50));
            gate.break_with("m1: CRIU failed".into());
            assert_eq!(waiter.join().unwrap().unwrap_err(), "m1: CRIU failed");
        });
        // A member arriving after the break does not wait.
        assert_eq!(
            gate.arrive(1, Phase::Published, until).unwrap_err(),
            "m1: CRIU failed"
        );
    }

    #[test]
    fn a_wait_past_its_deadline_names_who_is_missing() {
        let ok = |_: Phase| Ok(());
        let never = || false;
        let gate = Gate::new(names(3), &ok, &never);
        let e = gate
            .arrive(1, Phase::Frozen, Instant::now() + Duration::from_millis(20))
            .unwrap_err();
        assert_eq!(e, "m1 waited too long for m0, m2 to freeze");
        assert_eq!(gate.broken().as_deref(), Some(e.as_str()));
        let signalled = || true;
        let gate = Gate::new(names(2), &ok, &signalled);
        let e = gate
            .arrive(0, Phase::Ready, Instant::now() + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(e, "interrupted by a signal");
    }
}
