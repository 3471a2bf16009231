//! The group restore: each member's restore (the same steps as for one container,
//! [`crate::restore`]) in a thread of its own; every CRIU waits at its `post-restore`
//! notification until all members are restored (see the module docs of [`super`]).

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::gate::{Gate, Phase};
use super::netlock::{NetLock, Netns};
use super::MemberLeft;
use crate::facts::DirIdentity;
use crate::guardian::{Guardian, GuardianLauncher, Order};
use crate::restore::journal::CgroupUndo;
use crate::restore::{self, RestoreEnv, RestoreError, RestoreHost, RestoreReport, RestoreRequest};

/// Each member's seams, made in the member's own thread.
pub trait RestoreSeams: Sync {
    /// Run `f` with member `member`'s seams (CRIU client, guardian launcher, container lock,
    /// interrupt flag) and its host (cgroups, hooks).
    fn with_env(&self, member: usize, f: &mut dyn FnMut(&RestoreEnv<'_>, &mut dyn RestoreHost));
    /// Record member `member`'s state, as the restore of one container does before it
    /// commits. A group commits only once every member is recorded; if it does not, the
    /// caller removes what it recorded.
    fn record(&self, member: usize, report: &RestoreReport) -> Result<(), String>;
}

/// A member restored and committed.
#[derive(Debug)]
pub struct MemberRestored {
    /// Its (new) id.
    pub id: String,
    /// Its restore.
    pub report: RestoreReport,
}

/// A successful group restore.
#[derive(Debug)]
pub struct GroupRestored {
    /// Every member.
    pub members: Vec<MemberRestored>,
    /// From the start until every member runs, in milliseconds.
    pub restore_ms: f64,
    /// Removing the network lock while every member waited restored, in milliseconds.
    pub unlock_ms: f64,
    /// From the moment every member was restored (none running) until every one runs.
    pub resume_ms: f64,
}

/// Why a group restore failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupRestoreCause {
    /// A member's own restore failed (the first one to).
    #[error(transparent)]
    Member(Box<RestoreError>),
    /// A step of the group's, or recording a member's state.
    #[error("{0}")]
    Group(String),
}

/// A failed group restore: every member's restore was undone (its processes killed).
#[derive(Debug, thiserror::Error)]
#[error("group restore of {} failed ({}; no member is left running from {})", members.join(", "), left_note(left), image.display())]
pub struct GroupRestoreError {
    /// The members' (new) ids.
    pub members: Vec<String>,
    /// The group image.
    pub image: PathBuf,
    /// The first cause.
    #[source]
    pub cause: GroupRestoreCause,
    /// What undoing each member left (empty notes: nothing).
    pub left: Vec<MemberLeft>,
}

fn left_note(left: &[MemberLeft]) -> String {
    let parts: Vec<String> = left
        .iter()
        .map(|m| format!("{} {}", m.id, m.left))
        .collect();
    parts.join(", ")
}

enum Outcome {
    Done(Box<RestoreReport>),
    /// Its own restore failed (it broke the gate).
    Failed(Box<RestoreError>),
    /// Recording its state failed (it broke the gate).
    NotRecorded(String),
    /// Another member's failure ended it; its restore was undone.
    Aborted,
}

struct Coordinator<'c> {
    reqs: &'c [RestoreRequest],
    netlock: &'c dyn NetLock,
    started: Instant,
    criu_timeout: Duration,
    /// Held from a member's start until its CRIU runs: cryo joins the member's cgroups so that
    /// CRIU starts in them, and nothing else of cryo may start a process meanwhile.
    spawning: Mutex<()>,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    pids: Vec<Option<i32>>,
    restored_at: Option<Instant>,
    running_at: Option<Instant>,
    unlock_ms: f64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Restore every member of the group image `image` (`reqs`, one request per member, each
/// naming its member's image), all together (see the module docs of [`super`]).
pub fn restore_group(
    image: &Path,
    reqs: &[RestoreRequest],
    seams: &dyn RestoreSeams,
    netlock: &dyn NetLock,
    guardian: &dyn GuardianLauncher,
    interrupted: &(dyn Fn() -> bool + Sync),
    criu_timeout: Duration,
) -> Result<GroupRestored, GroupRestoreError> {
    let names: Vec<String> = reqs.iter().map(|r| r.id.clone()).collect();
    let refused = |why: String| GroupRestoreError {
        members: names.clone(),
        image: image.to_path_buf(),
        cause: GroupRestoreCause::Group(why),
        left: names
            .iter()
            .map(|id| MemberLeft {
                id: id.clone(),
                left: "not touched".into(),
            })
            .collect(),
    };
    let mut guardian = Guardian::start(guardian, None)
        .map_err(|e| refused(format!("starting the group's guardian failed: {e}")))?;
    let held = HeldLock::take(reqs, netlock, &mut guardian).map_err(refused)?;
    let result = restore_members(image, reqs, seams, netlock, interrupted, criu_timeout);
    held.release(result.is_ok(), &mut guardian);
    let _ = guardian.dismiss();
    result
}

/// The network lock of members restored into namespaces that already exist (a spec naming a
/// namespace by path: a pod's, or one the operator made again after a node died). Nothing
/// they send may reach a peer before every member is restored: the first bytes CRIU sends
/// for a restored connection would meet no socket there yet and come back as a reset. A
/// namespace already locked (by a group checkpoint that stopped its members) is left to the
/// unlock after the restore.
struct HeldLock<'n> {
    netlock: &'n dyn NetLock,
    locked: Vec<Netns>,
}

impl<'n> HeldLock<'n> {
    fn take(
        reqs: &[RestoreRequest],
        netlock: &'n dyn NetLock,
        guardian: &mut Guardian,
    ) -> Result<Self, String> {
        let mut held = HeldLock {
            netlock,
            locked: Vec::new(),
        };
        let mut seen: Vec<u64> = Vec::new();
        for req in reqs {
            let Some(path) = network_path(req) else {
                continue;
            };
            let ns = Netns::open(&path).map_err(|e| {
                format!(
                    "member {}: cannot open its network namespace {}: {e}",
                    req.id,
                    path.display()
                )
            })?;
            if seen.contains(&ns.inode) || ns.is_hosts() {
                continue;
            }
            seen.push(ns.inode);
            if netlock.is_locked(&ns)? {
                continue;
            }
            // The guardian learns of the lock first: if cryo dies, it removes it.
            guardian
                .order(&Order::NetworkLocked {
                    netns: path.clone(),
                })
                .map_err(|e| format!("telling the guardian of the network lock failed: {e}"))?;
            netlock
                .lock(&ns)
                .map_err(|e| format!("locking the network of {} failed: {e}", path.display()))?;
            held.locked.push(ns);
        }
        Ok(held)
    }

    /// After a failed restore, remove the locks taken here (after a successful one the
    /// unlock at `post-restore` already did); then the guardian forgets them.
    fn release(self, restored: bool, guardian: &mut Guardian) {
        for ns in &self.locked {
            if !restored {
                let _ = self.netlock.unlock(ns);
            }
            let _ = guardian.order(&Order::NetworkReleased {
                netns: ns.source.clone(),
            });
        }
    }
}

/// The network namespace a member's spec names by path, if any.
fn network_path(req: &RestoreRequest) -> Option<PathBuf> {
    req.spec
        .linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

fn restore_members(
    image: &Path,
    reqs: &[RestoreRequest],
    seams: &dyn RestoreSeams,
    netlock: &dyn NetLock,
    interrupted: &(dyn Fn() -> bool + Sync),
    criu_timeout: Duration,
) -> Result<GroupRestored, GroupRestoreError> {
    let names: Vec<String> = reqs.iter().map(|r| r.id.clone()).collect();
    let coord = Coordinator {
        reqs,
        netlock,
        started: Instant::now(),
        criu_timeout,
        spawning: Mutex::new(()),
        progress: Mutex::new(Progress {
            pids: vec![None; reqs.len()],
            ..Progress::default()
        }),
    };
    let action = |phase: Phase| coord.on(phase);
    let gate = Gate::new(names.clone(), &action, interrupted);
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..reqs.len())
            .map(|i| {
                let (coord, gate) = (&coord, &gate);
                s.spawn(move || {
                    let mut outcome = None;
                    seams.with_env(i, &mut |env, host| {
                        outcome = Some(coord.member(i, env, host, gate, seams));
                    });
                    outcome.unwrap_or(Outcome::Aborted)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Outcome::Aborted))
            .collect()
    });
    let broken = gate.broken();
    drop(gate);
    let progress = coord
        .progress
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    if broken.is_none() && outcomes.iter().all(|o| matches!(o, Outcome::Done(_))) {
        let restored_at = progress.restored_at.unwrap_or(coord.started);
        let running_at = progress.running_at.unwrap_or(restored_at);
        return Ok(GroupRestored {
            members: names
                .into_iter()
                .zip(outcomes)
                .filter_map(|(id, o)| match o {
                    Outcome::Done(report) => Some(MemberRestored {
                        id,
                        report: *report,
                    }),
                    _ => None,
                })
                .collect(),
            restore_ms: ms(running_at.saturating_duration_since(coord.started)),
            unlock_ms: progress.unlock_ms,
            resume_ms: ms(running_at.saturating_duration_since(restored_at)),
        });
    }
    let mut left = Vec::new();
    let mut first = None;
    for (id, o) in names.iter().zip(outcomes) {
        let note = match o {
            Outcome::Failed(e) => {
                let note = if e.undo_problems.is_empty() {
                    "failed, undone".to_string()
                } else {
                    format!(
                        "failed, and undoing it left: {}",
                        e.undo_problems.join("; ")
                    )
                };
                first.get_or_insert(GroupRestoreCause::Member(e));
                note
            }
            Outcome::NotRecorded(why) => {
                first.get_or_insert(GroupRestoreCause::Group(format!(
                    "recording the state of {id} failed: {why}"
                )));
                "undone".into()
            }
            Outcome::Done(_) => "committed".into(),
            Outcome::Aborted => "undone".into(),
        };
        left.push(MemberLeft {
            id: id.clone(),
            left: note,
        });
    }
    let cause = first.unwrap_or_else(|| {
        GroupRestoreCause::Group(
            broken.unwrap_or_else(|| "a member's thread ended without a result".into()),
        )
    });
    Err(GroupRestoreError {
        members: names,
        image: image.to_path_buf(),
        cause,
        left,
    })
}

impl Coordinator<'_> {
    fn deadline(&self) -> Instant {
        self.started + self.criu_timeout
    }

    fn member(
        &self,
        i: usize,
        env: &RestoreEnv<'_>,
        host: &mut dyn RestoreHost,
        gate: &Gate<'_>,
        seams: &dyn RestoreSeams,
    ) -> Outcome {
        let req = &self.reqs[i];
        let spawning = RefCell::new(Some(locked(&self.spawning)));
        let aborted = Cell::new(false);
        let mut gated = GatedHost {
            inner: host,
            member: i,
            gate,
            coord: self,
            spawning: &spawning,
            aborted: &aborted,
        };
        let result = restore::restore(req, env, &mut gated);
        spawning.borrow_mut().take();
        let pending = match result {
            Ok(p) => p,
            Err(_) if aborted.get() => return Outcome::Aborted,
            Err(e) => {
                gate.break_with(format!("member {} failed while {}", req.id, e.step));
                return Outcome::Failed(Box::new(e));
            }
        };
        // Dropping `pending` from here undoes this member's restore, its processes included.
        if gate.arrive(i, Phase::Running, self.deadline()).is_err() {
            return Outcome::Aborted;
        }
        if let Err(why) = seams.record(i, &pending.report) {
            gate.break_with(format!("recording the state of {} failed", req.id));
            return Outcome::NotRecorded(why);
        }
        if gate.arrive(i, Phase::Recorded, self.deadline()).is_err() {
            return Outcome::Aborted;
        }
        Outcome::Done(Box::new(pending.commit()))
    }

    fn on(&self, phase: Phase) -> Result<(), String> {
        match phase {
            Phase::Restored => {
                locked(&self.progress).restored_at = Some(Instant::now());
                self.unlock_network()
            }
            Phase::Running => {
                locked(&self.progress).running_at = Some(Instant::now());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Every member is restored and none runs: remove the lock a group checkpoint that
    /// stopped its members left (in a namespace that outlived them, or restored with the
    /// namespace's rules by CRIU).
    fn unlock_network(&self) -> Result<(), String> {
        let t = Instant::now();
        let pids: Vec<i32> = locked(&self.progress)
            .pids
            .iter()
            .flatten()
            .copied()
            .collect();
        let mut distinct: Vec<Netns> = Vec::new();
        for pid in pids {
            let ns = Netns::of_pid(pid).map_err(|e| {
                format!("cannot open the network namespace of restored pid {pid}: {e}")
            })?;
            if !distinct.iter().any(|d| d.inode == ns.inode) && !ns.is_hosts() {
                distinct.push(ns);
            }
        }
        let errors: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = distinct
                .iter()
                .map(|ns| s.spawn(move || self.netlock.unlock(ns)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
                .filter_map(Result::err)
                .collect()
        });
        if !errors.is_empty() {
            return Err(format!(
                "removing the network lock of the group's checkpoint failed: {}",
                errors.join("; ")
            ));
        }
        locked(&self.progress).unlock_ms = ms(t.elapsed());
        Ok(())
    }
}

/// A member's host, meeting the others at `post-restore`.
struct GatedHost<'h, 'c, 'm> {
    inner: &'h mut dyn RestoreHost,
    member: usize,
    gate: &'h Gate<'c>,
    coord: &'h Coordinator<'c>,
    spawning: &'h RefCell<Option<MutexGuard<'m, ()>>>,
    aborted: &'h Cell<bool>,
}

impl CgroupUndo for GatedHost<'_, '_, '_> {
    fn destroy(&self, cgroup_path: &Path) {
        self.inner.destroy(cgroup_path);
    }
}

impl RestoreHost for GatedHost<'_, '_, '_> {
    fn join_cgroup(&mut self) -> Result<Vec<(String, String)>, String> {
        self.inner.join_cgroup()
    }

    fn leave_cgroup(&mut self) {
        self.inner.leave_cgroup();
    }

    fn run_hooks(&mut self, pid: i32) -> Result<(), String> {
        self.inner.run_hooks(pid)
    }

    fn criu_started(&mut self) {
        self.inner.leave_cgroup();
        self.spawning.borrow_mut().take();
    }

    fn restored(&mut self, pid: i32) -> Result<(), String> {
        locked(&self.coord.progress).pids[self.member] = Some(pid);
        self.gate
            .arrive(self.member, Phase::Restored, self.coord.deadline())
            .inspect_err(|_| self.aborted.set(true))
    }

    fn dir_identity(&self, dir: &Path) -> Option<DirIdentity> {
        self.inner.dir_identity(dir)
    }
}
