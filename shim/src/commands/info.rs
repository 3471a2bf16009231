//! state, list, ps, events, update, features, spec.

use std::path::Path;

use anyhow::{bail, Context as _};
use cryo_oci::Verb;
use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::{LinuxResources, Spec};

use super::{load_container, load_for, status_of};
use crate::cli::{EventsArgs, ListArgs, PsArgs, SpecArgs, UpdateArgs};
use crate::context::Context;
use cryo_checkpoint::gpu::{GpuLookup, GpuSupport, Problem, PLUGIN_FILE};

fn state_json(ctx: &Context, c: &libcontainer::container::Container) -> serde_json::Value {
    let rootfs = ctx
        .store
        .load(c.id())
        .ok()
        .flatten()
        .map(|r| r.rootfs.display().to_string())
        .unwrap_or_default();
    serde_json::json!({
        "ociVersion": "1.2.0",
        "id": c.id(),
        "pid": c.pid().map(|p| p.as_raw()).unwrap_or(0),
        "status": status_of(c).to_string(),
        "bundle": c.bundle(),
        "rootfs": rootfs,
        "created": c.created().map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)),
        "owner": "",
        "annotations": c.state.annotations.clone().unwrap_or_default(),
    })
}

/// `state`
pub fn state(ctx: &Context, id: &str) -> anyhow::Result<i32> {
    let (c, _) = load_container(ctx, id)?;
    println!("{}", serde_json::to_string_pretty(&state_json(ctx, &c))?);
    Ok(0)
}

/// `list`
pub fn list(ctx: &Context, a: &ListArgs) -> anyhow::Result<i32> {
    let mut rows = Vec::new();
    for id in ctx.store.list()? {
        if let Ok((c, _)) = load_container(ctx, &id) {
            rows.push(state_json(ctx, &c));
        }
    }
    if a.quiet {
        for r in &rows {
            println!("{}", r["id"].as_str().unwrap_or(""));
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
                r["id"].as_str().unwrap_or(""),
                r["pid"],
                r["status"].as_str().unwrap_or(""),
                r["bundle"].as_str().unwrap_or(""),
                r["created"].as_str().unwrap_or("")
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

/// `ps`
pub fn ps(ctx: &Context, a: &PsArgs) -> anyhow::Result<i32> {
    let c = load_for(ctx, &a.container_id, Verb::Ps)?;
    let pids: Vec<i32> = manager(&c)?
        .get_all_pids()?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID\tCMD");
            for p in pids {
                let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ");
                println!("{p}\t{}", cmd.trim());
            }
        }
        f => bail!("invalid format {f:?}: use table or json"),
    }
    Ok(0)
}

/// `events`
pub fn events(ctx: &Context, a: &EventsArgs) -> anyhow::Result<i32> {
    let mut c = load_for(ctx, &a.container_id, Verb::Events)?;
    c.events(a.interval, a.stats)
        .context("cannot read container events")?;
    Ok(0)
}

/// `update`
pub fn update(ctx: &Context, a: &UpdateArgs) -> anyhow::Result<i32> {
    let _lock = ctx.store.lock(&a.container_id)?;
    let c = load_for(ctx, &a.container_id, Verb::Update)?;
    let mut res: LinuxResources = match &a.resources {
        Some(p) if p == Path::new("-") => serde_json::from_reader(std::io::stdin())
            .context("--resources -: stdin is not a JSON LinuxResources object")?,
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a JSON LinuxResources object", p.display()))?,
        None => LinuxResources::default(),
    };
    if let Some(m) = a.memory {
        let mut mem = (*res.memory()).unwrap_or_default();
        mem.set_limit(Some(m));
        res.set_memory(Some(mem));
    }
    if let Some(s) = a.cpu_shares {
        let mut cpu = res.cpu().clone().unwrap_or_default();
        cpu.set_shares(Some(s));
        res.set_cpu(Some(cpu));
    }
    if let Some(p) = a.pids_limit {
        let mut pids = (*res.pids()).unwrap_or_default();
        pids.set_limit(p);
        res.set_pids(Some(pids));
    }
    manager(&c)?.apply(&ControllerOpt {
        resources: &res,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })?;
    Ok(0)
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

/// `spec`
pub fn spec(a: &SpecArgs) -> anyhow::Result<i32> {
    let path = a.bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = Spec::default();
    spec.save(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(0)
}
