//! The group checkpoint: each member's checkpoint in a thread of its own, the group's steps
//! (lock, unlock, publish) run at the gate (see the module docs of [`super`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::gate::{Gate, Phase};
use super::manifest::{member_dir, GroupManifest, GroupTimings, MemberRecord, FORMAT};
use super::netlock::{NetLock, Netns};
use super::{tcp_repair, GroupRequest, MemberLeft};
use crate::dump::{
    freeze_timeout_for, CheckpointError, DumpEnv, DumpError, DumpReport, DumpRequest, LeftAs,
    Prepared, Rendezvous,
};
use crate::guardian::{Guardian, GuardianError, GuardianLauncher, Order};
use crate::image::{ImageTarget, PublishError, Staging};
use crate::manifest::Manifest;

/// One container of a group checkpoint.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its checkpoint request, as for a checkpoint of it alone; the group sets its image
    /// path (inside the group's), `--tcp-established`, the network lock (cryo's, not CRIU's)
    /// and the freeze timeout (the group's).
    pub req: DumpRequest,
    /// Its cgroup (its processes, their memory).
    pub cgroup: PathBuf,
}

/// Each member's seams, made in the member's own thread.
pub trait DumpSeams: Sync {
    /// Run `f` with member `member`'s CRIU client, freezer, guardian launcher, container lock
    /// and interrupt flag.
    fn with_env(&self, member: usize, f: &mut dyn FnMut(&DumpEnv<'_>));
}

/// The group's own seams.
pub struct GroupEnv<'a> {
    /// Starts the group's guardian (unlocks the network and removes the staging if cryo dies).
    pub guardian: &'a dyn GuardianLauncher,
    /// Whether SIGINT/SIGTERM/SIGHUP arrived.
    pub interrupted: &'a (dyn Fn() -> bool + Sync),
    /// How the members' network is locked.
    pub netlock: &'a dyn NetLock,
}

/// A successful group checkpoint.
#[derive(Debug)]
pub struct GroupReport {
    /// The group manifest written.
    pub manifest: GroupManifest,
    /// Each member's report (image paths inside the published group).
    pub members: Vec<DumpReport>,
    /// Where the group image is.
    pub image_dir: PathBuf,
    /// What the user should know.
    pub warnings: Vec<String>,
}

/// Why a group checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupCause {
    /// Refused before anything was touched.
    #[error("{0}")]
    Refused(String),
    /// The group's image path.
    #[error(transparent)]
    Image(#[from] Box<PublishError>),
    /// The group's guardian.
    #[error(transparent)]
    Guardian(#[from] GuardianError),
    /// A member's own checkpoint failed (the first one to).
    #[error(transparent)]
    Member(Box<CheckpointError>),
    /// A step of the group's (the network lock, publishing, a member too late).
    #[error("{0}")]
    Group(String),
}

/// A failed group checkpoint: every member was thawed (or left paused) and no group image
/// was published.
#[derive(Debug, thiserror::Error)]
#[error("group checkpoint of {} failed{}", members.join(", "), left_note(left, unlock_problem))]
pub struct GroupCheckpointError {
    /// The members.
    pub members: Vec<String>,
    /// The first cause.
    #[source]
    pub cause: GroupCause,
    /// What became of each member.
    pub left: Vec<MemberLeft>,
    /// The members' network could not be unlocked again (cryo's guardian tried too).
    pub unlock_problem: Option<String>,
}

fn left_note(left: &[MemberLeft], unlock_problem: &Option<String>) -> String {
    let mut note = if left.is_empty() {
        " (no container was touched".to_string()
    } else {
        let parts: Vec<String> = left
            .iter()
            .map(|m| format!("{} {}", m.id, m.left))
            .collect();
        format!(" ({}; no group image was written", parts.join(", "))
    };
    if let Some(p) = unlock_problem {
        note.push_str(&format!("; {p}"));
    }
    note.push(')');
    note
}

fn left_words(left: LeftAs) -> String {
    match left {
        LeftAs::Untouched => "was not touched",
        LeftAs::Thawed => "was thawed and keeps running",
        LeftAs::Paused => "stays paused, as it was",
        LeftAs::Unknown => "could not be thawed (its guardian tries again; check `cryo state`)",
        LeftAs::Died => "was thawed, but its init died of what a killed CRIU left in it",
    }
    .into()
}

/// How one member's thread ended.
enum Outcome {
    Done(Box<DumpReport>),
    /// Its own checkpoint failed (it broke the gate).
    Failed(Box<CheckpointError>),
    /// Another member's failure (or the group's) ended it.
    Aborted(LeftAs),
}

/// What a member leaves for the group manifest once its image is complete.
struct MemberDone {
    record: MemberRecord,
    freeze_start: Instant,
    thawed: Option<Instant>,
}

#[derive(Default)]
struct Progress {
    ready_at: Option<Instant>,
    locked: bool,
    lock_ms: f64,
    unlock_ms: f64,
    dumped_at: Vec<Option<Instant>>,
    done: Vec<Option<MemberDone>>,
    manifest: Option<GroupManifest>,
    warnings: Vec<String>,
}

/// The group's side: its staging, its guardian, the network lock, the manifest.
struct Coordinator<'c> {
    req: &'c GroupRequest,
    members: Vec<Member>,
    netlock: &'c dyn NetLock,
    netns: Vec<Netns>,
    netns_of: Vec<String>,
    guardian: Mutex<Guardian>,
    staging: Mutex<Staging>,
    leave_running: bool,
    freeze_timeout: Duration,
    started: Instant,
    progress: Mutex<Progress>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Take one coordinated checkpoint of `members` into `req.image_dir` (see the module docs).
pub fn checkpoint_group(
    req: &GroupRequest,
    members: Vec<Member>,
    seams: &dyn DumpSeams,
    env: &GroupEnv<'_>,
) -> Result<GroupReport, GroupCheckpointError> {
    let started = Instant::now();
    let names: Vec<String> = members.iter().map(|m| m.req.id.clone()).collect();
    let refused = |cause: GroupCause| GroupCheckpointError {
        members: names.clone(),
        cause,
        left: Vec::new(),
        unlock_problem: None,
    };
    refuse(&members).map_err(|e| refused(GroupCause::Refused(e)))?;
    let (netns, netns_of) =
        namespaces(&members, req.lock_network).map_err(|e| refused(GroupCause::Refused(e)))?;
    let target = ImageTarget::inspect(&req.image_dir).map_err(|e| refused(Box::new(e).into()))?;
    if target.is_mount_point() {
        return Err(refused(GroupCause::Refused(format!(
            "--image-path {} is a mount point: a group image is published by renaming it into \
             place, which a mount point cannot be; use a directory below it",
            target.path().display()
        ))));
    }
    let mut warnings = Vec::new();
    for ns in &netns {
        // Only cryo makes this lock, and every member's lock is ours now: one that is there
        // is left over (a stopped group never restored, or a crash).
        match env.netlock.is_locked(ns) {
            Ok(false) => {}
            Ok(true) => {
                env.netlock
                    .unlock(ns)
                    .map_err(|e| refused(GroupCause::Refused(e)))?;
                warnings.push(format!(
                    "removed a network lock an earlier group checkpoint left in {} (its \
                     members' network was cut off)",
                    ns.name()
                ));
            }
            Err(e) => return Err(refused(GroupCause::Refused(e))),
        }
    }
    let mut guardian = Guardian::start(env.guardian, None).map_err(|e| refused(e.into()))?;
    let staging = Staging::create(target).map_err(|e| refused(Box::new(e).into()))?;
    guardian
        .order(&Order::Remove {
            path: staging.dir().to_path_buf(),
        })
        .map_err(|e| refused(e.into()))?;
    let freeze_timeout = req
        .freeze_timeout
        .unwrap_or_else(|| freeze_timeout_for(members.iter().map(|m| memory(&m.cgroup)).sum()));
    let leave_running = members[0].req.flags.leave_running;
    let members = members
        .into_iter()
        .map(|m| in_group(m, staging.dir(), freeze_timeout))
        .collect();
    let n = names.len();
    let coord = Coordinator {
        req,
        members,
        netlock: env.netlock,
        netns,
        netns_of,
        guardian: Mutex::new(guardian),
        staging: Mutex::new(staging),
        leave_running,
        freeze_timeout,
        started,
        progress: Mutex::new(Progress {
            dumped_at: vec![None; n],
            done: (0..n).map(|_| None).collect(),
            warnings,
            ..Progress::default()
        }),
    };
    let action = |phase: Phase| coord.on(phase);
    let gate = Gate::new(names.clone(), &action, env.interrupted);
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (coord, gate) = (&coord, &gate);
                s.spawn(move || {
                    let mut outcome = None;
                    seams.with_env(i, &mut |denv| outcome = Some(coord.member(i, denv, gate)));
                    outcome.unwrap_or(Outcome::Aborted(LeftAs::Untouched))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Outcome::Aborted(LeftAs::Unknown)))
            .collect()
    });
    let broken = gate.broken();
    drop(gate);
    coord.finish(names, outcomes, broken)
}

/// What a group cannot be: checked before anything is touched.
fn refuse(members: &[Member]) -> Result<(), String> {
    if members.len() < 2 {
        return Err("a group checkpoint needs at least two containers".into());
    }
    let mut seen = std::collections::HashSet::new();
    for m in members {
        let (id, f) = (&m.req.id, &m.req.flags);
        if !seen.insert(id) {
            return Err(format!("container {id} is named twice"));
        }
        let one_container_only = [
            (f.pre_dump, "--pre-dump"),
            (f.common.lazy_pages, "--lazy-pages"),
            (f.page_server.is_some(), "--page-server"),
            (f.parent_path.is_some(), "--parent-path"),
            (f.status_fd.is_some(), "--status-fd"),
        ];
        if let Some((_, flag)) = one_container_only.iter().find(|(on, _)| *on) {
            return Err(format!(
                "{flag} is for the checkpoint of one container; a group checkpoint takes full \
                 images of every member"
            ));
        }
        if m.req.gpu.is_some() {
            return Err(format!(
                "container {id} uses an NVIDIA GPU: group checkpoints of GPU containers are not \
                 supported; checkpoint it alone"
            ));
        }
    }
    Ok(())
}

/// The distinct network namespaces of the members (none without a lock), and each member's.
fn namespaces(members: &[Member], lock: bool) -> Result<(Vec<Netns>, Vec<String>), String> {
    let mut distinct: Vec<Netns> = Vec::new();
    let mut of = Vec::new();
    for m in members {
        let ns = Netns::of_pid(m.req.pid).map_err(|e| {
            format!(
                "cannot open the network namespace of container {} (pid {}): {e}",
                m.req.id, m.req.pid
            )
        })?;
        of.push(ns.name());
        if lock && ns.is_hosts() {
            return Err(format!(
                "container {} uses the host's network namespace: a group checkpoint locks each \
                 member's network, and locking the host's would cut the whole machine off; give \
                 it a network namespace of its own, or pass --network-lock skip if the members \
                 share no TCP connection",
                m.req.id
            ));
        }
        if lock && !distinct.iter().any(|d| d.inode == ns.inode) {
            distinct.push(ns);
        }
    }
    Ok((distinct, of))
}

/// A member's memory, as the page receiver will see it.
fn memory(cgroup: &Path) -> u64 {
    crate::page_receiver::staging::estimate(&crate::facts::cgroup_pids(cgroup))
        .iter()
        .map(|e| e.bytes)
        .sum()
}

/// The member's request as a member of this group.
fn in_group(mut m: Member, staging: &Path, freeze_timeout: Duration) -> Member {
    let r = &mut m.req;
    r.image_dir = staging.join(member_dir(&r.id));
    r.work_dir = r.work_dir.take().map(|w| w.join(&r.id));
    r.flags.common.tcp_established = true;
    r.flags.common.network_lock = Some("skip".into());
    r.freeze_timeout = Some(freeze_timeout);
    m
}

/// A member's side of the freeze window.
struct MemberRendezvous<'x> {
    member: usize,
    gate: &'x Gate<'x>,
    coord: &'x Coordinator<'x>,
}

impl Rendezvous for MemberRendezvous<'_> {
    fn ready_to_freeze(&self) -> Result<(), String> {
        self.gate
            .arrive(self.member, Phase::Ready, self.coord.criu_deadline())
    }

    fn frozen(&self) -> Result<(), String> {
        self.gate
            .arrive(self.member, Phase::Frozen, self.coord.freeze_deadline())
    }
}

impl Coordinator<'_> {
    fn criu_deadline(&self) -> Instant {
        self.started + self.req.criu_timeout
    }

    /// The group's freeze deadline (the CRIU deadline until the members freeze).
    fn freeze_deadline(&self) -> Instant {
        locked(&self.progress)
            .ready_at
            .map_or(self.criu_deadline(), |t| t + self.freeze_timeout)
    }

    /// One member's checkpoint, meeting the others at each phase.
    fn member(&self, i: usize, env: &DumpEnv<'_>, gate: &Gate<'_>) -> Outcome {
        let req = &self.members[i].req;
        let own = |e: CheckpointError| {
            gate.break_with(format!("member {} failed while {}", req.id, e.step));
            Outcome::Failed(Box::new(e))
        };
        let rendezvous = MemberRendezvous {
            member: i,
            gate,
            coord: self,
        };
        let t_start = Instant::now();
        let prepared = match Prepared::new(req, env) {
            Ok(p) => p.in_group(&rendezvous),
            Err(e) => return own(e),
        };
        if gate
            .arrive(i, Phase::Prepared, self.criu_deadline())
            .is_err()
        {
            return Outcome::Aborted(LeftAs::Untouched);
        }
        let dumped = match prepared.dump() {
            Ok(d) => d,
            Err(e) if matches!(*e.cause, DumpError::Group(_)) => return Outcome::Aborted(e.left),
            Err(e) => return own(e),
        };
        locked(&self.progress).dumped_at[i] = Some(Instant::now());
        if gate
            .arrive(i, Phase::Dumped, self.freeze_deadline())
            .is_err()
        {
            return Outcome::Aborted(dumped.left_if_dropped());
        }
        let complete = match dumped.complete() {
            Ok(c) => c,
            Err(e) => return own(e),
        };
        let published = match complete.publish_image() {
            Ok(p) => p,
            Err(e) => return own(e),
        };
        let thawed = (!published.stops()).then(Instant::now);
        match Manifest::read(published.image_dir()) {
            Ok(Some(m)) => {
                let freeze_start =
                    t_start + Duration::from_secs_f64(m.timings.before_freeze_ms / 1000.0);
                let thawed = thawed
                    .map(|_| freeze_start + Duration::from_secs_f64(m.timings.frozen_ms / 1000.0));
                locked(&self.progress).done[i] = Some(MemberDone {
                    record: MemberRecord {
                        id: req.id.clone(),
                        dir: member_dir(&req.id),
                        bundle: req.bundle.clone(),
                        manifest_blake3: m.manifest_blake3,
                        netns: self.netns_of[i].clone(),
                        frozen_ms: 0.0,
                    },
                    freeze_start,
                    thawed,
                });
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    _ => "it has no manifest".into(),
                };
                let left = published.left_if_dropped();
                gate.break_with(format!(
                    "member {}'s image cannot be read back: {why}",
                    req.id
                ));
                return Outcome::Aborted(left);
            }
        }
        let until = if self.leave_running {
            self.criu_deadline()
        } else {
            self.freeze_deadline()
        };
        if gate.arrive(i, Phase::Published, until).is_err() {
            return Outcome::Aborted(published.left_if_dropped());
        }
        let mut silenced = None;
        if published.stops() {
            silenced = Some(tcp_repair::silence(&crate::facts::cgroup_pids(
                published.cgroup(),
            )));
        }
        let mut report = published.finish();
        if let Some(s) = silenced.filter(|s| !s.problems.is_empty()) {
            report.warnings.push(format!(
                "some TCP sockets of {} could not be put in repair mode before it was stopped, \
                 so their peers may have been told the connection ended: {}",
                req.id,
                s.problems.join("; ")
            ));
        }
        Outcome::Done(Box::new(report))
    }

    /// The group's action at `phase` (run by the last member to arrive).
    fn on(&self, phase: Phase) -> Result<(), String> {
        match phase {
            Phase::Ready => {
                locked(&self.progress).ready_at = Some(Instant::now());
                Ok(())
            }
            Phase::Frozen => self.lock_network(),
            Phase::Dumped if self.leave_running => self.unlock_network(),
            Phase::Published => self.publish(),
            _ => Ok(()),
        }
    }

    fn lock_network(&self) -> Result<(), String> {
        if self.netns.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        {
            let mut g = locked(&self.guardian);
            for ns in &self.netns {
                g.order(&Order::NetworkLocked {
                    netns: ns.source.clone(),
                })
                .map_err(|e| e.to_string())?;
            }
        }
        locked(&self.progress).locked = true;
        let errors = self.each_netns(|ns| self.netlock.lock(ns));
        if !errors.is_empty() {
            let _ = self.unlock_network();
            return Err(format!(
                "locking the members' network failed: {}",
                errors.join("; ")
            ));
        }
        locked(&self.progress).lock_ms = ms(t.elapsed());
        Ok(())
    }

    /// Unlock every member's namespace (nothing to do when it is not locked).
    fn unlock_network(&self) -> Result<(), String> {
        if !locked(&self.progress).locked {
            return Ok(());
        }
        let t = Instant::now();
        let errors = self.each_netns(|ns| self.netlock.unlock(ns));
        if !errors.is_empty() {
            return Err(format!(
                "unlocking the members' network failed (cryo's guardian tries again): {}",
                errors.join("; ")
            ));
        }
        let mut g = locked(&self.guardian);
        for ns in &self.netns {
            let _ = g.order(&Order::NetworkReleased {
                netns: ns.source.clone(),
            });
        }
        let mut p = locked(&self.progress);
        p.locked = false;
        p.unlock_ms = ms(t.elapsed());
        Ok(())
    }

    /// `f` on every namespace at once; the errors.
    fn each_netns(&self, f: impl Fn(&Netns) -> Result<(), String> + Sync) -> Vec<String> {
        std::thread::scope(|s| {
            let hs: Vec<_> = self.netns.iter().map(|ns| s.spawn(|| f(ns))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
                .filter_map(Result::err)
                .collect()
        })
    }

    /// Every member's image is complete: write the group manifest last and publish the group.
    fn publish(&self) -> Result<(), String> {
        let now = Instant::now();
        let mut p = locked(&self.progress);
        let ready_at = p.ready_at.unwrap_or(self.started);
        let mut records = Vec::new();
        let mut frozen_until = ready_at;
        for d in p.done.iter().flatten() {
            let until = d.thawed.unwrap_or(now);
            frozen_until = frozen_until.max(until);
            records.push(MemberRecord {
                frozen_ms: ms(until.saturating_duration_since(d.freeze_start)),
                ..d.record.clone()
            });
        }
        if records.len() != self.members.len() {
            return Err("a member's image is missing from the group".into());
        }
        let dump_end = p
            .dumped_at
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(ready_at);
        let manifest = GroupManifest {
            format: FORMAT.into(),
            cryo_version: env!("CARGO_PKG_VERSION").into(),
            created: chrono::Utc::now(),
            group: self.req.name.clone(),
            leave_running: self.leave_running,
            network_lock: if self.req.lock_network {
                "iptables"
            } else {
                "skip"
            }
            .into(),
            members: records,
            timings: GroupTimings {
                frozen_ms: ms(frozen_until.saturating_duration_since(ready_at)),
                lock_ms: p.lock_ms,
                unlock_ms: p.unlock_ms,
                dump_ms: ms(dump_end.saturating_duration_since(ready_at)),
                total_ms: ms(self.started.elapsed()),
            },
            group_blake3: String::new(),
        };
        let mut staging = locked(&self.staging);
        let dir = staging.dir().to_path_buf();
        manifest
            .write(&dir)
            .map_err(|e| format!("writing the group manifest in {}: {e}", dir.display()))?;
        let warning = staging
            .publish()
            .map_err(|e| format!("publishing the group image: {e}"))?;
        let _ = locked(&self.guardian).order(&Order::Keep { path: dir });
        p.warnings.extend(warning);
        p.manifest = Some(manifest);
        Ok(())
    }

    /// After every member's thread: the report, or the undoing and the error.
    fn finish(
        self,
        names: Vec<String>,
        outcomes: Vec<Outcome>,
        broken: Option<String>,
    ) -> Result<GroupReport, GroupCheckpointError> {
        let image_dir = locked(&self.staging).target().path().to_path_buf();
        if broken.is_none() && outcomes.iter().all(|o| matches!(o, Outcome::Done(_))) {
            let mut progress = self
                .progress
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            let mut guardian = self
                .guardian
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            if progress.locked {
                // Stopped members: the lock stays, so that no peer hears of it, until the
                // group is restored.
                for ns in &self.netns {
                    let _ = guardian.order(&Order::NetworkReleased {
                        netns: ns.source.clone(),
                    });
                }
            }
            if let Err(e) = guardian.dismiss() {
                progress
                    .warnings
                    .push(format!("the group's guardian process ended badly: {e}"));
            }
            let members = names
                .iter()
                .zip(outcomes)
                .filter_map(|(id, o)| match o {
                    Outcome::Done(mut r) => {
                        r.image_dir = image_dir.join(member_dir(id));
                        Some(*r)
                    }
                    _ => None,
                })
                .collect();
            let manifest = progress
                .manifest
                .take()
                .ok_or_else(|| GroupCheckpointError {
                    members: names.clone(),
                    cause: GroupCause::Group("the group was never published".into()),
                    left: Vec::new(),
                    unlock_problem: None,
                })?;
            return Ok(GroupReport {
                manifest,
                members,
                image_dir,
                warnings: progress.warnings,
            });
        }
        // Undo the group's part; each member undid its own. The guardian, dropped without
        // dismissal, goes over it again (and finds nothing left).
        let unlock_problem = self.unlock_network().err();
        let mut left = Vec::new();
        let mut first = None;
        for (id, o) in names.iter().zip(outcomes) {
            let l = match o {
                Outcome::Done(r) if r.stopped => "was stopped (its image was not kept)".into(),
                Outcome::Done(_) => left_words(LeftAs::Thawed),
                Outcome::Failed(e) => {
                    let l = left_words(e.left);
                    first.get_or_insert(*e);
                    l
                }
                Outcome::Aborted(l) => left_words(l),
            };
            left.push(MemberLeft {
                id: id.clone(),
                left: l,
            });
        }
        let cause = match (first, broken) {
            (Some(e), _) => GroupCause::Member(Box::new(e)),
            (None, Some(why)) => GroupCause::Group(why),
            (None, None) => GroupCause::Group("a member's thread ended without a result".into()),
        };
        Err(GroupCheckpointError {
            members: names,
            cause,
            left,
            unlock_problem,
        })
    }
}
