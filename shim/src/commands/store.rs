//! Checkpoint stores on the command line ([`cryo_checkpoint::store`]): `checkpoint --store`
//! (one generation, or one every `--every`), `restore --store` (the newest generation that
//! verifies, falling back to older ones) and `store ls`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cryo_checkpoint::dump::DumpReport;
use cryo_checkpoint::group::GroupReport;
use cryo_checkpoint::image::Thoroughness;
use cryo_checkpoint::signals::InterruptGuard;
use cryo_checkpoint::store::check::check_all;
use cryo_checkpoint::store::prune::{prune, Pruned};
use cryo_checkpoint::store::{
    choose_parent, own_bytes, GenerationInfo, GenerationState, Holds, LockMode, Policy, Store,
};
use cryo_oci::state::lock_timeout;

use super::checkpoint::Job;
use super::group::GroupJob;
use crate::cli::{CheckpointArgs, RestoreArgs, StoreCommand, StoreLsArgs};
use crate::context::Context;
use crate::logging;

/// `checkpoint --store DIR [--keep N] [--every DURATION] [--full-every N] ID…`: one
/// container's generations, or a group's (several ids, or `--group`).
pub fn checkpoint(ctx: &Context, a: &CheckpointArgs) -> anyhow::Result<i32> {
    let dir = a.store.as_deref().context("--store is missing")?;
    refuse_unsupported(a)?;
    let holds = if a.group.is_some() || !a.more_ids.is_empty() {
        Holds::Group
    } else {
        Holds::Container
    };
    let what = match (holds, &a.group) {
        (Holds::Group, Some(name)) => format!("group {name}"),
        (Holds::Group, None) => "the group".to_string(),
        (Holds::Container, _) => format!("container {}", super::checkpoint::container_id(a)?),
    };
    let every = a.every.as_deref().map(parse_duration).transpose()?;
    let store =
        Store::create(dir).with_context(|| format!("cannot checkpoint {what} into a store"))?;
    store.check_holds(holds)?;
    let interrupts = InterruptGuard::install().context("cannot install signal handlers")?;
    let mut w = Writer {
        ctx,
        a,
        store,
        holds,
        trusted: None,
        periodic: every.is_some(),
    };
    let Some(every) = every else {
        let g = w.generation(&|| interrupts.interrupted())?;
        println!("{}", g.summary());
        g.end_stopped(ctx)?;
        return Ok(0);
    };
    w.periodic(every, &interrupts)
}

/// Flags that make no sense for a store generation, refused before anything is touched.
fn refuse_unsupported(a: &CheckpointArgs) -> anyhow::Result<()> {
    let flag = if a.pre_dump {
        "--pre-dump"
    } else if a.lazy_pages {
        "--lazy-pages"
    } else if a.compress_pages {
        "--compress-pages"
    } else if a.parent_path.is_some() {
        "--parent-path (the store chooses the parent)"
    } else if a.page_server.is_some() {
        "--page-server"
    } else if a.work_path.is_some() && a.every.is_some() {
        "--work-path with --every (each generation keeps its CRIU log beside it)"
    } else {
        if a.keep == Some(0) {
            bail!("--keep 0 would remove every generation: keep at least 1");
        }
        if a.full_every == 0 {
            bail!("--full-every 0 is not a period: use 1 to make every generation full");
        }
        return Ok(());
    };
    bail!("checkpoint --store cannot be combined with {flag}")
}

/// `30s`, `5m`, `1h`, `500ms`, or plain seconds.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad_duration(text))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad_duration(text)),
    };
    if !secs.is_finite() || secs < 0.1 {
        bail!("--every {text}: the interval must be at least 100ms");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn bad_duration(text: &str) -> anyhow::Error {
    anyhow::anyhow!("invalid --every {text:?}: give a number with s, m, h or ms (e.g. 30s, 5m)")
}

/// Writes generations into a store.
struct Writer<'c> {
    ctx: &'c Context,
    a: &'c CheckpointArgs,
    store: Store,
    /// One container's generations, or a group's.
    holds: Holds,
    /// The generation this process wrote last (verified when written).
    trusted: Option<String>,
    /// `--every`: the container is always left running.
    periodic: bool,
}

/// A checkpoint loaded (its containers locked), waiting for the store to name its generation.
enum Loaded {
    Container(Box<Job>),
    Group(GroupJob),
}

/// One generation written.
struct Written {
    name: String,
    /// "full (…)", "incremental over …", "group of a, b".
    kind: String,
    frozen_ms: f64,
    bytes: u64,
    created: Option<chrono::DateTime<chrono::Utc>>,
    /// The containers the checkpoint stopped (none with --leave-running).
    stopped: Vec<String>,
    pruned: Pruned,
    took: Duration,
}

impl Writer<'_> {
    /// Write one generation: the containers' locks, then the store's, then choose the parent,
    /// checkpoint, prune.
    fn generation(&mut self, interrupted: &dyn Fn() -> bool) -> anyhow::Result<Written> {
        let t = Instant::now();
        let loaded = match self.holds {
            Holds::Container => Loaded::Container(Box::new(Job::load(
                self.ctx,
                self.a,
                self.store.dir().join("pending"),
            )?)),
            Holds::Group => Loaded::Group(GroupJob::load(self.ctx, self.a)?),
        };
        let _lock = self.store.lock(LockMode::Exclusive, lock_timeout())?;
        for d in self.store.remove_debris() {
            logging::log(
                "debug",
                &format!("removed {d}, left by a cryo that was killed"),
            );
        }
        // Under the lock: another writer may have written the other kind meanwhile.
        self.store.check_holds(self.holds)?;
        let gens = self.store.generations()?;
        let name = Store::next_name(&gens, chrono::Utc::now());
        let image_dir = self.store.dir().join(&name);
        let mut written = match loaded {
            Loaded::Container(job) => self.container(*job, &gens, image_dir, interrupted)?,
            Loaded::Group(job) => {
                let report = job.run(self.ctx, self.a, image_dir, self.periodic)?;
                Written::of_group(&report)
            }
        };
        written.name.clone_from(&name);
        self.trusted = Some(name.clone());
        if let Some(keep) = self.a.keep {
            written.pruned = prune(&self.store, keep).with_context(|| {
                format!("generation {name} was written, but pruning the store failed")
            })?;
        }
        written.took = t.elapsed();
        Ok(written)
    }

    /// One container's generation, an increment of the parent the store chooses.
    fn container(
        &self,
        mut job: Job,
        gens: &[cryo_checkpoint::store::Generation],
        image_dir: std::path::PathBuf,
        interrupted: &dyn Fn() -> bool,
    ) -> anyhow::Result<Written> {
        let choice = choose_parent(
            gens,
            self.trusted.as_deref(),
            Policy {
                full_every: self.a.full_every,
            },
        );
        for n in &choice.notes {
            logging::log("warning", n);
        }
        job.req.image_dir = image_dir;
        job.req.parent = choice.parent;
        // The next generation reads this one's pages to compare: keep them in the page cache.
        job.req.stage_pages = job
            .req
            .stage_pages
            .map(|_| cryo_checkpoint::page_receiver::Mode::PageCache);
        if self.periodic {
            job.req.flags.leave_running = true;
        }
        let report = job.run(self.ctx, interrupted)?;
        Ok(Written::of_container(&report, choice.why_full.as_deref()))
    }

    /// `--every`: a generation per interval until a container stops or a signal arrives.
    fn periodic(&mut self, every: Duration, interrupts: &InterruptGuard) -> anyhow::Result<i32> {
        let mut written = 0u64;
        loop {
            let started = Instant::now();
            if let Some(why) = self.ended()? {
                println!("{why}: periodic checkpoints end ({written} written)");
                return Ok(0);
            }
            match self.generation(&|| interrupts.interrupted()) {
                Ok(g) => {
                    written += 1;
                    println!("{}", g.summary());
                }
                Err(e) if interrupts.interrupted() => {
                    // One line, as every line of this mode (the error names its log on a
                    // line of its own).
                    let why = format!("{e:#}").replace('\n', "; ");
                    println!(
                        "stopped by a signal: the checkpoint in flight was abandoned ({why}); \
                         {written} written"
                    );
                    return Ok(0);
                }
                Err(e) => {
                    if let Some(why) = self.ended()? {
                        println!("{why}: periodic checkpoints end ({written} written)");
                        return Ok(0);
                    }
                    if written == 0 {
                        // A first failure is most likely the setup: say so at once.
                        return Err(e);
                    }
                    logging::log(
                        "error",
                        &format!("a generation failed, the next one is tried in {every:?}: {e:#}"),
                    );
                }
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let next = started + every;
            while Instant::now() < next {
                if interrupts.interrupted() {
                    println!("stopped by a signal: {written} written");
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_millis(50).min(next - Instant::now()));
            }
            if interrupts.interrupted() {
                println!("stopped by a signal: {written} written");
                return Ok(0);
            }
        }
    }

    /// Why the periodic checkpoints end (a container, or a group member, is gone or stopped).
    fn ended(&self) -> anyhow::Result<Option<String>> {
        let ids = match self.holds {
            Holds::Container => vec![super::checkpoint::container_id(self.a)?.to_string()],
            Holds::Group => super::group::member_ids(self.ctx, self.a)?,
        };
        Ok(ids
            .iter()
            .find_map(|id| ended(self.ctx, id).map(|why| format!("container {id} {why}"))))
    }
}

/// Why the container can no longer be checkpointed (gone, or stopped), if so.
fn ended(ctx: &Context, id: &str) -> Option<&'static str> {
    match super::load_container(ctx, id) {
        Err(_) => Some("is gone"),
        Ok((_, cryo_oci::Status::Stopped)) => Some("stopped"),
        Ok(_) => None,
    }
}

impl Written {
    fn of_container(report: &DumpReport, why_full: Option<&str>) -> Self {
        let m = report.manifest.as_ref();
        let kind = match (
            m.and_then(|m| m.parent.as_ref()),
            m.and_then(|m| m.shares.as_ref()),
        ) {
            (Some(p), _) => format!(
                "incremental over {} ({} changed, {} in the parent)",
                p.name,
                size(p.pages_written),
                size(p.pages_in_parent)
            ),
            (None, Some(s)) => format!(
                "full, sharing the extents of {} ({} changed, {} shared)",
                s.name,
                size(s.pages_written),
                size(s.pages_shared)
            ),
            (None, None) => format!("full ({})", why_full.unwrap_or("no parent")),
        };
        Self {
            name: String::new(),
            kind,
            frozen_ms: m.map_or(0.0, |m| m.timings.frozen_ms),
            bytes: m.map_or(0, own_bytes),
            created: m.map(|m| m.created),
            stopped: if report.stopped {
                m.map(|m| m.container_id.clone()).into_iter().collect()
            } else {
                Vec::new()
            },
            pruned: Pruned::default(),
            took: Duration::ZERO,
        }
    }

    fn of_group(report: &GroupReport) -> Self {
        let ids: Vec<&str> = report
            .manifest
            .members
            .iter()
            .map(|m| m.id.as_str())
            .collect();
        let each: Vec<String> = report
            .manifest
            .members
            .iter()
            .map(|m| format!("{} {:.0} ms", m.id, m.frozen_ms))
            .collect();
        Self {
            name: String::new(),
            kind: format!(
                "group of {} (each frozen: {})",
                ids.join(", "),
                each.join(", ")
            ),
            frozen_ms: report.manifest.timings.frozen_ms,
            bytes: report
                .members
                .iter()
                .filter_map(|r| r.manifest.as_ref())
                .map(own_bytes)
                .sum(),
            created: Some(report.manifest.created),
            stopped: report
                .manifest
                .members
                .iter()
                .zip(&report.members)
                .filter(|(_, r)| r.stopped)
                .map(|(m, _)| m.id.clone())
                .collect(),
            pruned: Pruned::default(),
            took: Duration::ZERO,
        }
    }

    /// runc semantics: a checkpoint without --leave-running ends the containers it stopped.
    fn end_stopped(&self, ctx: &Context) -> anyhow::Result<()> {
        for id in &self.stopped {
            super::delete_settling(ctx, id, cryo_oci::Verb::ForceDelete, true)
                .with_context(|| format!("checkpoint done, but removing container {id} failed"))?;
        }
        Ok(())
    }

    /// One line: the generation, what it is, the freeze, the bytes written, the time.
    fn summary(&self) -> String {
        let mut line = format!(
            "{}: {}; frozen {:.0} ms, wrote {}, took {:.2} s, at {}",
            self.name,
            self.kind,
            self.frozen_ms,
            size(self.bytes),
            self.took.as_secs_f64(),
            self.created.map_or_else(String::new, |c| c
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        if !self.pruned.removed.is_empty() {
            line.push_str(&format!("; pruned {}", self.pruned.removed.join(", ")));
        }
        line
    }
}

/// `restore --store DIR`: the newest generation that verifies; each newer one passed over is
/// named with the reason.
pub fn restore(ctx: &Context, a: &RestoreArgs) -> anyhow::Result<i32> {
    let dir = a.store.as_deref().context("--store is missing")?;
    if Store::open(dir)?.holds()? == Some(Holds::Group) {
        return restore_group(ctx, a, dir);
    }
    let lock = ctx.store.lock(super::restore::container_id(a)?)?;
    let store = Store::open(dir)?;
    // Shared: no writer prunes a generation while it is verified and read.
    let store_lock = store.lock(LockMode::Shared, lock_timeout())?;
    let gens = store.generations()?;
    if gens.is_empty() {
        bail!(
            "checkpoint store {} holds no generation: nothing to restore (write one with \
             `cryo checkpoint --store {}`)",
            store.dir().display(),
            store.dir().display()
        );
    }
    let (mut passed, mut reasons) = (Vec::new(), Vec::new());
    for info in check_all(&gens, Thoroughness::Sizes).iter().rev() {
        let why = match &info.state {
            GenerationState::Bad(why) => why.clone(),
            GenerationState::Good => {
                match super::restore::restore_image(ctx, a, info.dir.clone(), &lock) {
                    Ok(pid) => {
                        drop(store_lock);
                        if !passed.is_empty() {
                            logging::log(
                                "warning",
                                &format!(
                                    "restored generation {}, not the newest: {} could not be \
                                     restored",
                                    info.name,
                                    passed.join(", ")
                                ),
                            );
                        }
                        logging::log("debug", &format!("restored generation {}", info.name));
                        return super::restore::wait(ctx, a, pid, lock);
                    }
                    Err(e) => match super::restore::image_refused(&e) {
                        Some(why) => why,
                        None => {
                            return Err(e.context(format!(
                                "restoring generation {} of store {}",
                                info.name,
                                store.dir().display()
                            )))
                        }
                    },
                }
            }
        };
        logging::log(
            "warning",
            &format!(
                "generation {} cannot be restored, falling back to the one before it: {why}",
                info.name
            ),
        );
        reasons.push(format!("{}: {why}", info.name));
        passed.push(info.name.clone());
    }
    bail!(
        "no generation of checkpoint store {} can be restored ({}); nothing was changed",
        store.dir().display(),
        reasons.join("; ")
    )
}

/// `restore --store DIR -d` of a group store: the newest group generation that checks out
/// and restores, every member together ([`super::group::restore`]); a generation whose image
/// is refused (before any member runs from it) is passed over, with the reason.
fn restore_group(ctx: &Context, a: &RestoreArgs, dir: &Path) -> anyhow::Result<i32> {
    let store = Store::open(dir)?;
    // Shared: no writer prunes a generation while it is verified and read. (The members'
    // locks are taken inside, after this one: a writer takes them before the store's, and
    // both waits are bounded, so the two never hang on each other.)
    let store_lock = store.lock(LockMode::Shared, lock_timeout())?;
    let gens = store.generations()?;
    let mut reasons = Vec::new();
    for info in check_all(&gens, Thoroughness::Sizes).iter().rev() {
        let why = match &info.state {
            GenerationState::Bad(why) => why.clone(),
            GenerationState::Good => match super::group::restore(ctx, a, &info.dir) {
                Ok(code) => {
                    drop(store_lock);
                    if !reasons.is_empty() {
                        logging::log(
                            "warning",
                            &format!(
                                "restored generation {}, not the newest: {}",
                                info.name,
                                reasons.join("; ")
                            ),
                        );
                    }
                    logging::log("debug", &format!("restored generation {}", info.name));
                    return Ok(code);
                }
                Err(e) => match super::group::image_refused(&e) {
                    Some(why) => why,
                    None => {
                        return Err(e.context(format!(
                            "restoring generation {} of store {}",
                            info.name,
                            store.dir().display()
                        )))
                    }
                },
            },
        };
        logging::log(
            "warning",
            &format!(
                "generation {} cannot be restored, falling back to the one before it: {why}",
                info.name
            ),
        );
        reasons.push(format!("{}: {why}", info.name));
    }
    bail!(
        "no generation of checkpoint store {} can be restored ({}); nothing was changed",
        store.dir().display(),
        if reasons.is_empty() {
            "it holds none".to_string()
        } else {
            reasons.join("; ")
        }
    )
}

/// `store …`
pub fn store(c: StoreCommand) -> anyhow::Result<i32> {
    match c {
        StoreCommand::Ls(a) => ls(&a),
    }
}

fn ls(a: &StoreLsArgs) -> anyhow::Result<i32> {
    if a.format != "table" && a.format != "json" {
        bail!("invalid --format {:?}: use table or json", a.format);
    }
    let store = Store::open(&a.dir)?;
    let _lock = store.lock(LockMode::Shared, lock_timeout())?;
    let how = if a.quick {
        Thoroughness::Sizes
    } else {
        Thoroughness::Digests
    };
    let infos = check_all(&store.generations()?, how);
    if a.format == "json" {
        let rows: Vec<serde_json::Value> = infos.iter().map(json_row).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    print_table(store.dir(), &infos, a.quick);
    Ok(0)
}

fn json_row(g: &GenerationInfo) -> serde_json::Value {
    let m = g.manifest.as_ref();
    serde_json::json!({
        "generation": g.name,
        "seq": g.seq,
        "created": g.created(),
        "kind": kind(g),
        "parent": g.parent(),
        "bytes": g.bytes,
        "frozen_ms": g.frozen_ms(),
        "pages_written": m.and_then(|m| {
            m.parent.as_ref().map(|p| p.pages_written)
                .or(m.shares.as_ref().map(|s| s.pages_written))
        }),
        "pages_in_parent": m.and_then(|m| m.parent.as_ref()).map(|p| p.pages_in_parent),
        "shares_with": m.and_then(|m| m.shares.as_ref()).map(|s| s.name.clone()),
        "pages_shared": m.and_then(|m| m.shares.as_ref()).map(|s| s.pages_shared),
        "container": m.map(|m| m.container_id.clone()),
        "containers": g.containers(),
        "verified": g.is_good(),
        "problem": match &g.state {
            GenerationState::Good => None,
            GenerationState::Bad(why) => Some(why.clone()),
        },
    })
}

fn kind(g: &GenerationInfo) -> &'static str {
    if g.group.is_some() {
        return "group";
    }
    match (&g.manifest, g.parent()) {
        (None, _) => "?",
        (Some(_), Some(_)) => "incremental",
        (Some(m), None) if m.shares.is_some() => "shared",
        (Some(_), None) => "full",
    }
}

fn print_table(dir: &Path, infos: &[GenerationInfo], quick: bool) {
    if infos.is_empty() {
        println!("{}: no generations", dir.display());
        return;
    }
    let head = if quick { "COMPLETE" } else { "VERIFIED" };
    let rows: Vec<[String; 7]> = infos
        .iter()
        .map(|g| {
            [
                g.name.clone(),
                g.created().map_or("-".into(), |c| {
                    c.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                }),
                kind(g).into(),
                g.parent().unwrap_or("-").into(),
                size(g.bytes),
                g.frozen_ms().map_or("-".into(), |f| format!("{f:.0} ms")),
                match &g.state {
                    GenerationState::Good => "yes".into(),
                    GenerationState::Bad(why) => format!("no: {why}"),
                },
            ]
        })
        .collect();
    let titles = [
        "GENERATION",
        "CREATED",
        "KIND",
        "PARENT",
        "SIZE",
        "FROZEN",
        head,
    ];
    let mut widths = titles.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()).take(6) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 6 {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                out.push_str(c);
            }
        }
        out
    };
    println!("{}", line(titles));
    for r in &rows {
        println!("{}", line(r.each_ref().map(String::as_str)));
    }
}

/// `12.3 MiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "10 parsecs", "-1s", "10ms"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(53 << 20), "53.0 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
    }
}
