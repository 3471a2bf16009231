//! state, list, ps, events, update, features: what runc prints, in runc's shapes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cryo_oci::Verb;
use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxPidsBuilder, LinuxResources};
use serde::Serialize;

use super::{load_container, load_for, status_of};
use crate::cli::{EventsArgs, ListArgs, PsArgs, UpdateArgs};
use crate::context::Context;
use cryo_checkpoint::gpu::{GpuLookup, GpuSupport, Problem, PLUGIN_FILE};

/// A container's state, with runc's fields in runc's order (callers match on the line).
#[derive(Debug, Serialize)]
struct ContainerState {
    #[serde(rename = "ociVersion")]
    oci_version: &'static str,
    id: String,
    pid: i32,
    status: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    created: Option<String>,
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    annotations: std::collections::HashMap<String, String>,
    owner: String,
}

fn state_of(ctx: &Context, c: &libcontainer::container::Container) -> ContainerState {
    let record = ctx.store.load(c.id()).ok().flatten();
    let status = status_of(c);
    ContainerState {
        oci_version: "1.2.0",
        id: c.id().to_string(),
        // As runc: a stopped container has no pid (its number may belong to another process).
        pid: match status {
            cryo_oci::Status::Stopped => 0,
            _ => c.pid().map(|p| p.as_raw()).unwrap_or(0),
        },
        status: status.to_string(),
        // The user's bundle: libcontainer's may be cryo's copy (see `run_bundle`).
        bundle: record
            .as_ref()
            .map(|r| r.bundle.clone())
            .unwrap_or_else(|| c.bundle().clone()),
        rootfs: record.map(|r| r.rootfs).unwrap_or_default(),
        created: c
            .created()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        annotations: c.state.annotations.clone().unwrap_or_default(),
        owner: String::new(),
    }
}

/// `state`
pub fn state(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let (c, _) = load_container(ctx, id)?;
    println!("{}", serde_json::to_string_pretty(&state_of(ctx, &c))?);
    Ok(0)
}

/// `list`
pub fn list(ctx: &Context, a: &ListArgs) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for id in ctx.store.list()? {
        if let Ok((c, _)) = load_container(ctx, &id) {
            rows.push(state_of(ctx, &c));
        }
    }
    if a.quiet {
        for r in &rows {
            println!("{}", r.id);
        }
    } else if a.format == "json" {
        println!("{}", serde_json::to_string(&rows)?);
    } else if a.format == "table" {
        println!(
            "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
            "ID", "PID", "STATUS", "BUNDLE", "CREATED"
        );
        for r in &rows {
            println!(
                "{:<20} {:<8} {:<10} {:<40} {:<32} root",
                r.id,
                r.pid,
                r.status,
                r.bundle.display(),
                r.created.as_deref().unwrap_or("")
            );
        }
    } else {
        bail!("invalid format {:?}: use table or json", a.format);
    }
    Ok(0)
}

fn manager(
    c: &libcontainer::container::Container,
) -> anyhow::Result<libcgroups::common::AnyCgroupManager> {
    let cfg = c
        .spec()
        .context("cannot read the container's saved config")?;
    Ok(create_cgroup_manager(CgroupConfig {
        cgroup_path: cfg.cgroup_path,
        systemd_cgroup: false,
        container_name: c.id().to_string(),
    })?)
}

/// The processes in the container's cgroup.
pub fn pids_of(c: &libcontainer::container::Container) -> anyhow::Result<Vec<i32>> {
    Ok(manager(c)?
        .get_all_pids()?
        .into_iter()
        .map(|p| p.as_raw())
        .collect())
}

/// `ps [--format table|json] ID [PS OPTIONS]`: the host's ps(1) (default `-ef`), its header
/// and the lines of the container's processes, as runc does.
pub fn ps(ctx: &Context, a: &PsArgs) -> anyhow::Result<i32> {
    let c = load_for(ctx, &a.container_id, Verb::Ps)?;
    let pids = pids_of(&c)?;
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            let args = if a.ps_args.is_empty() {
                vec!["-ef".to_string()]
            } else {
                a.ps_args.clone()
            };
            let out = std::process::Command::new("ps")
                .args(&args)
                .output()
                .context("cannot run ps (install procps)")?;
            if !out.status.success() {
                bail!(
                    "ps {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            print!(
                "{}",
                container_lines(&String::from_utf8_lossy(&out.stdout), &pids)?
            );
        }
        f => bail!("invalid format {f:?}: use table or json"),
    }
    Ok(0)
}

/// ps's header and the lines whose PID column is one of `pids`.
fn container_lines(ps_output: &str, pids: &[i32]) -> anyhow::Result<String> {
    let mut lines = ps_output.lines();
    let header = lines.next().unwrap_or_default();
    let column = header
        .split_whitespace()
        .position(|f| f == "PID")
        .ok_or_else(|| anyhow::anyhow!("ps output has no PID column: {header:?}"))?;
    let mut out = format!("{header}\n");
    for line in lines {
        let pid = line
            .split_whitespace()
            .nth(column)
            .and_then(|p| p.parse::<i32>().ok());
        if pid.is_some_and(|p| pids.contains(&p)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// One line of `events`, runc's shape.
#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

/// `events [--stats] [--interval D] ID`: stats every interval, and an `oom` event when the
/// kernel kills a process of the container for memory. Ends when the container is deleted.
pub fn events(ctx: &Context, a: &EventsArgs) -> anyhow::Result<i32> {
    let id = a.container_id.as_str();
    let interval = parse_duration(&a.interval)?;
    let c = load_for(ctx, id, Verb::Events)?;
    let manager = manager(&c)?;
    let cgroups_path = c
        .spec()
        .context("cannot read the container's saved config")?
        .cgroup_path;
    // What the cgroup has: a cgroup2 cgroup without some controllers still has its cpu stats.
    let stats_line = |m: &libcgroups::common::AnyCgroupManager| -> anyhow::Result<String> {
        let (stats, _) = cryo_cgroup::stats::read(m, &cgroups_path)
            .map_err(|e| anyhow::anyhow!("cannot read the container's cgroup stats: {e}"))?;
        Ok(serde_json::to_string(&Event {
            kind: "stats",
            id,
            data: Some(stats),
        })?)
    };
    if a.stats {
        println!("{}", stats_line(&manager)?);
        return Ok(0);
    }
    let mut oom = OomCounter::find(&cgroups_path);
    let step = interval.min(Duration::from_millis(100));
    let mut next_stats = Instant::now();
    while ctx.store.exists(id) {
        if Instant::now() >= next_stats {
            match stats_line(&manager) {
                Ok(line) => println!("{line}"),
                Err(_) if !ctx.store.exists(id) => break,
                Err(e) => crate::logging::log("error", &format!("{e:#}")),
            }
            next_stats += interval;
        }
        if oom.as_mut().is_some_and(OomCounter::increased) {
            println!(
                "{}",
                serde_json::to_string(&Event::<()> {
                    kind: "oom",
                    id,
                    data: None
                })?
            );
        }
        std::thread::sleep(step);
    }
    Ok(0)
}

/// The kernel's count of OOM kills in the container's memory cgroup (`oom_kill` in v1's
/// `memory.oom_control`, v2's `memory.events`).
struct OomCounter {
    file: PathBuf,
    seen: u64,
}

impl OomCounter {
    fn find(cgroups_path: &Path) -> Option<Self> {
        let all = crate::cgroups::hierarchies().ok()?;
        let (h, name) = match all
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == "memory"))
        {
            Some(h) => (h, "memory.oom_control"),
            None => (
                all.iter().find(|h| h.controllers.is_empty())?,
                "memory.events",
            ),
        };
        let file = h.dir(cgroups_path).ok()?.join(name);
        let seen = Self::read(&file).unwrap_or(0);
        Some(Self { file, seen })
    }

    fn read(file: &Path) -> Option<u64> {
        oom_kills(&std::fs::read_to_string(file).ok()?)
    }

    fn increased(&mut self) -> bool {
        match Self::read(&self.file) {
            Some(n) if n > self.seen => {
                self.seen = n;
                true
            }
            _ => false,
        }
    }
}

fn oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// A Go-style duration (`5s`, `100ms`, `1m30s`, `1.5s`); a bare number is seconds.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let bad = || anyhow::anyhow!("invalid duration {text:?}: use e.g. 5s, 1s, 100ms or 1m30s");
    if let Ok(secs) = text.parse::<f64>() {
        return positive(Duration::try_from_secs_f64(secs).map_err(|_| bad())?, text);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    positive(Duration::try_from_secs_f64(total).map_err(|_| bad())?, text)
}

fn positive(d: Duration, text: &str) -> anyhow::Result<Duration> {
    if d.is_zero() {
        bail!("duration {text:?} must be more than zero");
    }
    Ok(d)
}

/// runc's size syntax for memory flags: bytes, or a number with a binary unit (`50M`, `1g`,
/// `512KiB`); `-1` for no limit.
fn parse_bytes(flag: &str, text: &str) -> anyhow::Result<i64> {
    if text == "-1" {
        return Ok(-1);
    }
    let bad = || anyhow::anyhow!("--{flag} {text:?}: use bytes, or a size such as 50M or 1g");
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let value: f64 = lower[..digits].parse().map_err(|_| bad())?;
    let unit = lower[digits..].trim_end_matches("ib").trim_end_matches('b');
    let scale: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024f64.powi(2),
        "g" => 1024f64.powi(3),
        "t" => 1024f64.powi(4),
        "p" => 1024f64.powi(5),
        _ => return Err(bad()),
    };
    Ok((value * scale) as i64)
}

/// `update`: the limits given, applied to the container's cgroups; the others stay as they
/// are (as with runc, a value of 0 or a flag left out changes nothing).
pub fn update(ctx: &Context, a: &UpdateArgs) -> anyhow::Result<i32> {
    let _lock = ctx.store.lock(&a.container_id)?;
    let c = load_for(ctx, &a.container_id, Verb::Update)?;
    let res = resources_of(a)?;
    let manager = manager(&c)?;
    let apply = |res: &LinuxResources| {
        manager.apply(&ControllerOpt {
            resources: res,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
    };
    if let Err(e) = apply(&res) {
        // libcgroups writes the CFS period before the quota. The kernel refuses a shorter
        // period while the old quota over it would exceed a parent's limit; runc then sets the
        // quota first and the period after. So does cryo.
        let Some(quota_first) = quota_alone(&res) else {
            return Err(e.into());
        };
        apply(&quota_first)?;
        apply(&res)?;
    }
    Ok(0)
}

/// Only the CPU quota of `res`, when it sets both the quota and the period.
fn quota_alone(res: &LinuxResources) -> Option<LinuxResources> {
    let cpu = res.cpu().as_ref()?;
    let (quota, _) = (cpu.quota()?, cpu.period()?);
    let mut only = LinuxCpu::default();
    only.set_quota(Some(quota));
    let mut out = LinuxResources::default();
    out.set_cpu(Some(only));
    Some(out)
}

/// `-r FILE` (or `-r -`, stdin) with the flags on top.
fn resources_of(a: &UpdateArgs) -> anyhow::Result<LinuxResources> {
    let mut res: LinuxResources = match &a.resources {
        Some(p) if p == Path::new("-") => serde_json::from_reader(std::io::stdin())
            .context("--resources -: stdin is not a JSON LinuxResources object")?,
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a JSON LinuxResources object", p.display()))?,
        None => LinuxResources::default(),
    };
    if let Some(w) = a.blkio_weight {
        let mut blkio: LinuxBlockIo = res.block_io().clone().unwrap_or_default();
        blkio.set_weight(Some(w));
        res.set_block_io(Some(blkio));
    }
    let cpu_flags = a.cpu_period.is_some()
        || a.cpu_quota.is_some()
        || a.cpu_shares.is_some()
        || a.cpu_rt_period.is_some()
        || a.cpu_rt_runtime.is_some()
        || a.cpuset_cpus.is_some()
        || a.cpuset_mems.is_some();
    if cpu_flags {
        let mut cpu: LinuxCpu = res.cpu().clone().unwrap_or_default();
        if let Some(v) = a.cpu_period {
            cpu.set_period(Some(v));
        }
        if let Some(v) = a.cpu_quota {
            cpu.set_quota(Some(v));
        }
        if let Some(v) = a.cpu_shares {
            cpu.set_shares(Some(v));
        }
        if let Some(v) = a.cpu_rt_period {
            cpu.set_realtime_period(Some(v));
        }
        if let Some(v) = a.cpu_rt_runtime {
            cpu.set_realtime_runtime(Some(v));
        }
        if let Some(v) = &a.cpuset_cpus {
            cpu.set_cpus(Some(v.clone()));
        }
        if let Some(v) = &a.cpuset_mems {
            cpu.set_mems(Some(v.clone()));
        }
        res.set_cpu(Some(cpu));
    }
    let memory_flags = [
        ("memory", &a.memory),
        ("memory-reservation", &a.memory_reservation),
        ("memory-swap", &a.memory_swap),
        ("kernel-memory", &a.kernel_memory),
        ("kernel-memory-tcp", &a.kernel_memory_tcp),
    ];
    if memory_flags.iter().any(|(_, v)| v.is_some()) {
        let mut mem: LinuxMemory = (*res.memory()).unwrap_or_default();
        let value = |(flag, v): (&str, &Option<String>)| -> anyhow::Result<Option<i64>> {
            v.as_deref().map(|t| parse_bytes(flag, t)).transpose()
        };
        if let Some(v) = value(memory_flags[0])? {
            mem.set_limit(Some(v));
        }
        if let Some(v) = value(memory_flags[1])? {
            mem.set_reservation(Some(v));
        }
        if let Some(v) = value(memory_flags[2])? {
            mem.set_swap(Some(v));
        }
        if let Some(v) = value(memory_flags[3])? {
            mem.set_kernel(Some(v));
        }
        if let Some(v) = value(memory_flags[4])? {
            mem.set_kernel_tcp(Some(v));
        }
        res.set_memory(Some(mem));
    }
    if let Some(p) = a.pids_limit {
        res.set_pids(Some(LinuxPidsBuilder::default().limit(p).build()?));
    }
    Ok(res)
}

/// `features`
pub fn features(ctx: &Context) -> anyhow::Result<i32> {
    let gpu = gpu_annotations(&ctx.gpu);
    let mut v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "private", "rprivate", "shared", "rshared", "slave", "rslave"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"],
            "capabilities": caps::all().iter().map(|c| format!("{c}")).collect::<Vec<_>>(),
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
        },
        "annotations": {
            "org.opencontainers.runc.checkpoint.enabled": "true",
            "io.cryo.checkpoint.rootfs-snapshot": "true",
            "io.cryo.version": env!("CARGO_PKG_VERSION"),
        },
        "potentiallyUnsafeConfigAnnotations": ["org.criu.config"],
    });
    if let Some(a) = v["annotations"].as_object_mut() {
        a.extend(gpu);
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// GPU checkpointing (`io.cryo.checkpoint.gpu`: "available" or "unavailable: <every reason>"),
/// and what was found for each requirement.
fn gpu_annotations(lookup: &GpuLookup) -> serde_json::Map<String, serde_json::Value> {
    let s = GpuSupport::probe(lookup);
    let show = |r: Result<String, &Problem>| r.unwrap_or_else(|p| format!("missing: {p}"));
    let problems = s.problems();
    let summary = if problems.is_empty() {
        "available".to_string()
    } else {
        let reasons: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        format!("unavailable: {}", reasons.join("; "))
    };
    let driver = show(s.driver.as_ref().map(|v| v.to_string()));
    let tool = show(s.tool.as_ref().map(|p| p.display().to_string()));
    let plugin = show(
        s.plugin_dir
            .as_ref()
            .map(|d| d.join(PLUGIN_FILE).display().to_string()),
    );
    [
        ("io.cryo.checkpoint.gpu", summary),
        ("io.cryo.checkpoint.gpu.driver", driver),
        ("io.cryo.checkpoint.gpu.cuda-checkpoint", tool),
        ("io.cryo.checkpoint.gpu.criu-plugin", plugin),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_goes_first_only_when_both_quota_and_period_are_set() {
        let mut cpu = LinuxCpu::default();
        cpu.set_quota(Some(3000));
        cpu.set_period(Some(10000));
        let mut res = LinuxResources::default();
        res.set_cpu(Some(cpu));
        let first = quota_alone(&res).expect("both set");
        let c = first.cpu().clone().expect("cpu");
        assert_eq!((c.quota(), c.period()), (Some(3000), None));
        let mut only_period = LinuxCpu::default();
        only_period.set_period(Some(10000));
        res.set_cpu(Some(only_period));
        assert!(quota_alone(&res).is_none());
    }

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(parse_duration("5s").expect("5s"), Duration::from_secs(5));
        assert_eq!(
            parse_duration("100ms").expect("ms"),
            Duration::from_millis(100)
        );
        assert_eq!(
            parse_duration("1m30s").expect("m s"),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_duration("1.5s").expect("frac"),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("2").expect("bare"), Duration::from_secs(2));
        for bad in ["", "s", "5x", "0s", "-1s", "1s5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_read_as_runc_reads_them() {
        assert_eq!(parse_bytes("memory", "67108864").expect("bytes"), 67108864);
        assert_eq!(parse_bytes("memory", "50M").expect("M"), 52428800);
        assert_eq!(parse_bytes("memory", "30m").expect("m"), 31457280);
        assert_eq!(parse_bytes("memory", "1g").expect("g"), 1 << 30);
        assert_eq!(parse_bytes("memory", "512KiB").expect("KiB"), 524288);
        assert_eq!(parse_bytes("memory", "-1").expect("unlimited"), -1);
        assert!(parse_bytes("memory", "lots").is_err());
    }

    #[test]
    fn ps_keeps_the_header_and_the_containers_lines() {
        let out = "UID PID PPID C STIME TTY TIME CMD\n\
                   root 1 0 0 10:00 ? 00:00:01 /sbin/init\n\
                   root 4242 4240 0 10:01 pts/0 00:00:00 sh\n\
                   root 4243 4242 0 10:01 pts/0 00:00:00 sleep 1d\n";
        let got = container_lines(out, &[4242, 4243]).expect("lines");
        assert_eq!(
            got,
            "UID PID PPID C STIME TTY TIME CMD\n\
             root 4242 4240 0 10:01 pts/0 00:00:00 sh\n\
             root 4243 4242 0 10:01 pts/0 00:00:00 sleep 1d\n"
        );
        let bsd = "  PID TTY      STAT   TIME COMMAND\n 4242 pts/0    Ss     0:00 sh\n";
        assert!(container_lines(bsd, &[4242])
            .expect("bsd")
            .contains("4242 pts/0"));
        assert!(container_lines("USER COMMAND\n", &[1]).is_err());
    }

    #[test]
    fn json_state_has_runcs_fields_in_runcs_order() {
        let s = ContainerState {
            oci_version: "1.2.0",
            id: "c1".into(),
            pid: 42,
            status: "running".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: Some("2026-01-01T00:00:00.000000001Z".into()),
            annotations: Default::default(),
            owner: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            r#"{"ociVersion":"1.2.0","id":"c1","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2026-01-01T00:00:00.000000001Z","owner":""}"#
        );
    }

    #[test]
    fn events_are_runcs_lines() {
        let oom = serde_json::to_string(&Event::<()> {
            kind: "oom",
            id: "c1",
            data: None,
        })
        .expect("json");
        assert_eq!(oom, r#"{"type":"oom","id":"c1"}"#);
        let stats = serde_json::to_string(&Event {
            kind: "stats",
            id: "c1",
            data: Some(1),
        })
        .expect("json");
        assert!(stats.starts_with(r#"{"type":"stats","id":"c1","data":"#));
    }

    #[test]
    fn the_oom_kill_count_is_read_from_v1_and_v2_files() {
        assert_eq!(
            oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            Some(3)
        );
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n"),
            Some(2)
        );
        assert_eq!(oom_kills("oom_kill_disable 0\n"), None);
    }
}
