//! Group checkpoints (cryo only): `checkpoint ID1 ID2 …` or `checkpoint --group NAME` takes
//! one coordinated checkpoint of several containers into one group image, and `restore` of a
//! group image brings them all back together (see `cryo_checkpoint::group`).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cryo_cgroup::{freezer_for, ContainerCgroup};
use cryo_checkpoint::criu::swrk::SwrkClient;
use cryo_checkpoint::dump::DumpEnv;
use cryo_checkpoint::group::manifest::{check_group, GroupImageError, GroupManifest};
use cryo_checkpoint::group::netlock::Iptables;
use cryo_checkpoint::group::{
    self, checkpoint_group, DumpSeams, GroupEnv, GroupReport, GroupRequest, GroupRestoreCause,
    GroupRestoreError, Member, RestoreSeams,
};
use cryo_checkpoint::restore::RestoreCause;
use cryo_checkpoint::restore::{RestoreEnv, RestoreHost, RestoreReport};
use cryo_checkpoint::signals::InterruptGuard;
use cryo_oci::{Bundle, StoreLock, Verb};

use super::checkpoint::{image_dir, request_for};
use super::restore::{prepare, Prepared};
use super::{delete_settling, load_container};
use crate::cli::{CheckpointArgs, RestoreArgs};
use crate::context::Context;
use crate::logging;

/// The members named on the command line, or by `--group`.
pub(super) fn member_ids(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<Vec<String>> {
    let Some(name) = &a.group else {
        return Ok(a.container_id.iter().chain(&a.more_ids).cloned().collect());
    };
    let mut ids = Vec::new();
    for id in ctx.store.list()? {
        let Ok((c, _)) = load_container(ctx, &id) else {
            continue;
        };
        let Ok(spec) = cryo_oci::load_spec(c.bundle()) else {
            continue;
        };
        let annotated = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(group::ANNOTATION))
            .is_some_and(|v| v == name);
        if annotated {
            ids.push(id);
        }
    }
    if ids.len() < 2 {
        bail!(
            "group {name:?} has {} container(s) (those whose {} annotation is {name:?}): a group \
             checkpoint needs at least two",
            ids.len(),
            group::ANNOTATION
        );
    }
    Ok(ids)
}

/// Every member's lock, taken in name order (two group verbs on overlapping members cannot
/// deadlock).
fn lock_all(ctx: &Context, ids: &[String]) -> anyhow::Result<HashMap<String, StoreLock>> {
    let mut sorted: Vec<&String> = ids.iter().collect();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != ids.len() {
        bail!("a container is named twice: name each member once");
    }
    let mut locks = HashMap::new();
    for id in sorted {
        locks.insert(id.clone(), ctx.store.lock(id)?);
    }
    Ok(locks)
}

/// Each member's CRIU client, freezer, guardian and lock, made in its own thread.
struct CheckpointSeams<'c> {
    ctx: &'c Context,
    ids: Vec<String>,
    cgroups: Vec<ContainerCgroup>,
    locks: HashMap<String, StoreLock>,
    criu_timeout: u64,
    interrupted: &'c (dyn Fn() -> bool + Sync),
}

impl DumpSeams for CheckpointSeams<'_> {
    fn with_env(&self, member: usize, f: &mut dyn FnMut(&DumpEnv<'_>)) {
        let criu = SwrkClient::new(&self.ctx.criu)
            .with_probe_timeout(Duration::from_secs(self.criu_timeout.min(30)));
        let freezer = freezer_for(&self.cgroups[member]);
        let launcher = super::guardian::Launcher::new(self.ctx);
        let env = DumpEnv {
            criu: &criu,
            freezer: freezer.as_ref(),
            guardian: &launcher,
            lock: self.locks.get(&self.ids[member]).map(|l| l.as_fd()),
            interrupted: self.interrupted,
        };
        f(&env);
    }
}

/// `checkpoint ID1 ID2 …` / `checkpoint --group NAME`
pub fn checkpoint(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<i32> {
    // Every file this verb makes holds the members' memory or files: private.
    // SAFETY: umask only swaps the process's file-mode mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let job = GroupJob::load(ctx, a)?;
    let report = job.run(ctx, a, image_dir(a.image_path.as_deref())?, false)?;
    end_stopped(ctx, &report)?;
    Ok(0)
}

/// A group checkpoint with every member's lock held and its request made (nothing touched).
pub(super) struct GroupJob {
    /// The members' ids, as named.
    pub ids: Vec<String>,
    locks: HashMap<String, StoreLock>,
    members: Vec<Member>,
    cgroups: Vec<ContainerCgroup>,
}

impl GroupJob {
    /// Lock every member and make its request.
    pub fn load(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<Self> {
        let ids = member_ids(ctx, a)?;
        let locks = lock_all(ctx, &ids)?;
        let mut members = Vec::new();
        let mut cgroups = Vec::new();
        for id in &ids {
            // The group sets each member's image path inside its own.
            let (req, cgroup) = request_for(ctx, a, id, std::path::PathBuf::new())?;
            members.push(Member {
                req,
                cgroup: freezer_for(&cgroup).path().to_path_buf(),
            });
            cgroups.push(cgroup);
        }
        Ok(Self {
            ids,
            locks,
            members,
            cgroups,
        })
    }

    /// Take the coordinated checkpoint into `image_dir` (every member left running too when
    /// `leave_running`), log what it did, and release the members' locks.
    pub fn run(
        self,
        ctx: &Context,
        a: &CheckpointArgs,
        image_dir: std::path::PathBuf,
        leave_running: bool,
    ) -> anyhow::Result<GroupReport> {
        let Self {
            ids,
            locks,
            mut members,
            cgroups,
        } = self;
        for m in &mut members {
            m.req.image_dir.clone_from(&image_dir);
            m.req.flags.leave_running |= leave_running;
        }
        let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
        let interrupted = || cryo_checkpoint::signals::interrupted();
        let seams = CheckpointSeams {
            ctx,
            ids: ids.clone(),
            cgroups,
            locks,
            criu_timeout: a.criu_timeout,
            interrupted: &interrupted,
        };
        let netlock = Iptables::default();
        let launcher = super::guardian::Launcher::new(ctx);
        let env = GroupEnv {
            guardian: &launcher,
            interrupted: &interrupted,
            netlock: &netlock,
        };
        let req = GroupRequest {
            image_dir,
            name: a.group.clone(),
            lock_network: a.network_lock.as_deref() != Some("skip"),
            freeze_timeout: a.freeze_timeout.map(Duration::from_secs),
            criu_timeout: Duration::from_secs(a.criu_timeout),
        };
        let report = checkpoint_group(&req, members, &seams, &env)?;
        drop(interrupts);
        for w in report
            .warnings
            .iter()
            .chain(report.members.iter().flat_map(|m| &m.warnings))
        {
            logging::log("warning", w);
        }
        let t = &report.manifest.timings;
        let each: Vec<String> = report
            .manifest
            .members
            .iter()
            .map(|m| format!("{} {:.1} ms", m.id, m.frozen_ms))
            .collect();
        logging::log(
            "debug",
            &format!(
                "checkpointed group {} into {}: frozen {:.1} ms as a group ({}), network lock {:.1} ms, unlock {:.1} ms, dumps {:.1} ms, total {:.1} ms",
                ids.join(", "),
                report.image_dir.display(),
                t.frozen_ms,
                each.join(", "),
                t.lock_ms,
                t.unlock_ms,
                t.dump_ms,
                t.total_ms
            ),
        );
        Ok(report)
    }
}

/// runc semantics: a checkpoint without --leave-running ends the container; each member the
/// group checkpoint stopped is removed.
pub(super) fn end_stopped(ctx: &Context, report: &GroupReport) -> anyhow::Result<()> {
    for (m, r) in report.manifest.members.iter().zip(&report.members) {
        if r.stopped {
            delete_settling(ctx, &m.id, Verb::ForceDelete, true).with_context(|| {
                format!(
                    "group checkpoint done, but removing container {} failed",
                    m.id
                )
            })?;
        }
    }
    Ok(())
}

/// `OLD=NEW` pairs.
fn pairs(values: &[String], flag: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for v in values {
        let (k, val) = v
            .split_once('=')
            .with_context(|| format!("{flag} {v:?}: use {flag} ID=VALUE"))?;
        if out.insert(k.to_string(), val.to_string()).is_some() {
            bail!("{flag} names member {k} twice");
        }
    }
    Ok(out)
}

/// Each member's CRIU client, guardian, lock and host, made in its own thread.
struct RestoreSeamsImpl<'c> {
    ctx: &'c Context,
    members: Vec<Prepared>,
    locks: HashMap<String, StoreLock>,
    criu_timeout: u64,
    interrupted: &'c (dyn Fn() -> bool + Sync),
}

impl RestoreSeams for RestoreSeamsImpl<'_> {
    fn with_env(&self, member: usize, f: &mut dyn FnMut(&RestoreEnv<'_>, &mut dyn RestoreHost)) {
        let m = &self.members[member];
        let criu = SwrkClient::new(&self.ctx.criu)
            .with_probe_timeout(Duration::from_secs(self.criu_timeout.min(30)));
        let launcher = super::guardian::Launcher::new(self.ctx);
        let env = RestoreEnv {
            criu: &criu,
            guardian: &launcher,
            lock: self.locks.get(&m.id).map(|l| l.as_fd()),
            interrupted: self.interrupted,
        };
        let mut host = m.host();
        f(&env, &mut host);
    }

    fn record(&self, member: usize, report: &RestoreReport) -> Result<(), String> {
        self.members[member]
            .record(self.ctx, report)
            .map_err(|e| format!("{e:#}"))
    }
}

/// `restore --image-path GROUP [--rename OLD=NEW]… [--member-bundle ID=DIR]…`: every member
/// of the group image, each under its own id (or its new one) from the bundle it had (or the
/// one named), all running again together.
pub fn restore(ctx: &Context, a: &RestoreArgs, image_dir: &Path) -> anyhow::Result<i32> {
    if let Some(id) = &a.container_id {
        bail!(
            "{} is a group image: its members are restored under their own ids (or those given \
             with --rename OLD=NEW), not as container {id}",
            image_dir.display()
        );
    }
    if !a.detach {
        bail!("a group restore starts several containers: pass --detach (-d)");
    }
    for (given, flag) in [
        (a.pid_file.is_some(), "--pid-file"),
        (a.console_socket.is_some(), "--console-socket"),
        (a.lazy_pages, "--lazy-pages"),
    ] {
        if given {
            bail!("{flag} is for the restore of one container, not of a group image");
        }
    }
    let group = check_group(image_dir)?;
    let renames = pairs(&a.rename, "--rename")?;
    let bundles = pairs(&a.member_bundle, "--member-bundle")?;
    let known = |id: &String| group.manifest.members.iter().any(|m| &m.id == id);
    if let Some(stranger) = renames.keys().chain(bundles.keys()).find(|id| !known(id)) {
        bail!(
            "the group image {} has no member {stranger} (its members: {})",
            image_dir.display(),
            member_list(&group.manifest)
        );
    }
    let new_ids: Vec<String> = group
        .manifest
        .members
        .iter()
        .map(|m| renames.get(&m.id).cloned().unwrap_or_else(|| m.id.clone()))
        .collect();
    let locks = lock_all(ctx, &new_ids)?;
    let mut members = Vec::new();
    for (m, id) in group.manifest.members.iter().zip(&new_ids) {
        let bundle_dir = bundles
            .get(&m.id)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| m.bundle.clone());
        let bundle = Bundle::load(&bundle_dir)
            .with_context(|| format!("member {}: cannot load its bundle", m.id))?;
        let member_image = GroupManifest::member_path(image_dir, &m.id);
        let work_dir = a
            .work_path
            .as_ref()
            .map_or_else(|| member_image.clone(), |w| w.join(id));
        let mut p = prepare(ctx, a, id, bundle, &member_image, work_dir)
            .with_context(|| format!("member {}", m.id))?;
        // The connections between the members are what the group is for; the network lock
        // is the group's (removed once every member is restored), not CRIU's.
        p.req.flags.common.tcp_established = true;
        p.req.flags.common.network_lock = Some("skip".into());
        members.push(p);
    }
    let reqs: Vec<_> = members.iter().map(|m| m.req.clone()).collect();
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let interrupted = || cryo_checkpoint::signals::interrupted();
    let seams = RestoreSeamsImpl {
        ctx,
        members,
        locks,
        criu_timeout: a.criu_timeout,
        interrupted: &interrupted,
    };
    let launcher = super::guardian::Launcher::new(ctx);
    let result = group::restore_group(
        image_dir,
        &reqs,
        &seams,
        &Iptables::default(),
        &launcher,
        &interrupted,
        Duration::from_secs(a.criu_timeout),
    );
    drop(interrupts);
    let restored = match result {
        Ok(r) => r,
        Err(e) => {
            // Every member's restore was undone; the state each one recorded goes too.
            for m in &seams.members {
                m.remove_state_dir();
            }
            return Err(e.into());
        }
    };
    for m in &restored.members {
        for w in &m.report.warnings {
            logging::log("warning", &format!("{}: {w}", m.id));
        }
    }
    let each: Vec<String> = restored
        .members
        .iter()
        .map(|m| {
            format!(
                "{} pid {} in {:.1} ms",
                m.id, m.report.pid, m.report.restore_ms
            )
        })
        .collect();
    logging::log(
        "debug",
        &format!(
            "restored group {} ({}): all running after {:.1} ms, network unlocked in {:.1} ms, resumed within {:.1} ms",
            image_dir.display(),
            each.join(", "),
            restored.restore_ms,
            restored.unlock_ms,
            restored.resume_ms
        ),
    );
    Ok(0)
}

/// Why the group image was refused, when that is why a group restore failed: its group
/// manifest, or a member's image, did not check out, and no member runs from it.
pub(super) fn image_refused(e: &anyhow::Error) -> Option<String> {
    if let Some(g) = e.downcast_ref::<GroupImageError>() {
        return Some(g.to_string());
    }
    let g = e.downcast_ref::<GroupRestoreError>()?;
    match &g.cause {
        GroupRestoreCause::Member(r) => match r.cause.as_ref() {
            RestoreCause::Image(why) => Some(why.to_string()),
            _ => None,
        },
        GroupRestoreCause::Group(_) => None,
    }
}

fn member_list(m: &GroupManifest) -> String {
    m.members
        .iter()
        .map(|m| m.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
