//! Task stats as containerd expects them from a runc-style shim: the container cgroup's
//! metrics as `io.containerd.cgroups.v1.Metrics` on a cgroup v1 (or hybrid) host and
//! `io.containerd.cgroups.v2.Metrics` on a pure cgroup v2 host, read by youki's libcgroups.
//! Read in the shim itself: stats are polled often (the CRI plugin asks every few seconds),
//! they only read cgroup files, and no container state is involved.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use cryo_cgroup::stats::Offered;
use libcgroups::common::{create_cgroup_manager, get_cgroup_setup, CgroupConfig, CgroupSetup};
use libcgroups::stats::{BlkioDeviceStat, MemoryData, Stats};

/// Reading stats failed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The container's cgroup is not known (it never ran).
    #[error("container {0} has no cgroup (it never ran)")]
    NoCgroup(String),
    /// libcgroups failed.
    #[error("cannot read the stats of cgroup {path}: {detail}")]
    Read {
        /// The cgroup.
        path: PathBuf,
        /// libcgroups' error.
        detail: String,
    },
}

/// The cgroup of `pid`, relative to the hierarchy roots (v1: the memory controller's, which
/// cryo places with the others; v2: the unified one).
pub fn cgroup_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let unified = matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified));
    cgroup_in(&text, unified)
}

/// On a unified host the `0::` line names the cgroup even where v1 hierarchies still list the
/// process (they may exist unmounted below a cgroup2 `/sys/fs/cgroup`).
fn cgroup_in(proc_cgroup: &str, unified: bool) -> Option<PathBuf> {
    let lines = cryo_cgroup::discovery::parse_proc_cgroup(proc_cgroup);
    let wanted = |l: &&cryo_cgroup::discovery::ProcCgroupLine| {
        if unified {
            l.hierarchy == 0 && l.controllers.is_empty()
        } else {
            l.controllers.iter().any(|c| c == "memory")
        }
    };
    let line = lines.iter().find(wanted).or_else(|| {
        lines
            .iter()
            .find(|l| l.hierarchy == 0 && l.controllers.is_empty())
    })?;
    Some(PathBuf::from(&line.path))
}

/// The metrics of the cgroup at `path`, as the `Any` containerd decodes.
pub fn metrics(path: &Path) -> Result<Any, StatsError> {
    let read_error = |detail: String| StatsError::Read {
        path: path.to_path_buf(),
        detail,
    };
    let manager = create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_path_buf(),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| read_error(e.to_string()))?;
    let unified = matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified));
    let (stats, offered) = cryo_cgroup::stats::read(&manager, path).map_err(read_error)?;
    let message: Box<dyn MessageDyn> = if unified {
        Box::new(to_v2(&stats, &offered))
    } else {
        Box::new(to_v1(&stats, clock_ticks_per_second()))
    };
    let mut any = Any::new();
    any.type_url = message.descriptor_dyn().full_name().to_string();
    any.value = message
        .write_to_bytes_dyn()
        .map_err(|e| read_error(format!("encode: {e}")))?;
    Ok(any)
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

fn entry(data: &MemoryData) -> MessageField<v1::MemoryEntry> {
    MessageField::some(v1::MemoryEntry {
        limit: data.limit,
        usage: data.usage,
        max: data.max_usage,
        failcnt: data.fail_count,
        ..Default::default()
    })
}

fn blkio(entries: &[BlkioDeviceStat]) -> Vec<v1::BlkIOEntry> {
    entries
        .iter()
        .map(|e| v1::BlkIOEntry {
            op: e.op_type.clone().unwrap_or_default(),
            major: e.major,
            minor: e.minor,
            value: e.value,
            ..Default::default()
        })
        .collect()
}

/// cgroup v1 metrics. cpuacct.stat counts user and system time in clock ticks; containerd
/// reports nanoseconds.
pub fn to_v1(stats: &Stats, ticks_per_second: u64) -> v1::Metrics {
    let ticks_to_ns = |ticks: u64| ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1);
    let usage = &stats.cpu.usage;
    let throttling = &stats.cpu.throttling;
    let m = &stats.memory.stats;
    let get = |key: &str| m.get(key).copied().unwrap_or(0);
    let memory = v1::MemoryStat {
        cache: get("cache"),
        rss: get("rss"),
        rss_huge: get("rss_huge"),
        mapped_file: get("mapped_file"),
        dirty: get("dirty"),
        writeback: get("writeback"),
        pg_pg_in: get("pgpgin"),
        pg_pg_out: get("pgpgout"),
        pg_fault: get("pgfault"),
        pg_maj_fault: get("pgmajfault"),
        inactive_anon: get("inactive_anon"),
        active_anon: get("active_anon"),
        inactive_file: get("inactive_file"),
        active_file: get("active_file"),
        unevictable: get("unevictable"),
        hierarchical_memory_limit: get("hierarchical_memory_limit"),
        hierarchical_swap_limit: get("hierarchical_memsw_limit"),
        total_cache: get("total_cache"),
        total_rss: get("total_rss"),
        total_rss_huge: get("total_rss_huge"),
        total_mapped_file: get("total_mapped_file"),
        total_dirty: get("total_dirty"),
        total_writeback: get("total_writeback"),
        total_pg_pg_in: get("total_pgpgin"),
        total_pg_pg_out: get("total_pgpgout"),
        total_pg_fault: get("total_pgfault"),
        total_pg_maj_fault: get("total_pgmajfault"),
        total_inactive_anon: get("total_inactive_anon"),
        total_active_anon: get("total_active_anon"),
        total_inactive_file: get("total_inactive_file"),
        total_active_file: get("total_active_file"),
        total_unevictable: get("total_unevictable"),
        usage: entry(&stats.memory.memory),
        swap: entry(&stats.memory.memswap),
        kernel: entry(&stats.memory.kernel),
        kernel_tcp: entry(&stats.memory.kernel_tcp),
        ..Default::default()
    };
    let b = &stats.blkio;
    let mut hugetlb: Vec<v1::HugetlbStat> = stats
        .hugetlb
        .iter()
        .map(|(pagesize, h)| v1::HugetlbStat {
            usage: h.usage,
            max: h.max_usage,
            failcnt: h.fail_count,
            pagesize: pagesize.clone(),
            ..Default::default()
        })
        .collect();
    hugetlb.sort_by(|a, b| a.pagesize.cmp(&b.pagesize));
    v1::Metrics {
        hugetlb,
        pids: MessageField::some(v1::PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: usage.usage_total,
                kernel: ticks_to_ns(usage.usage_kernel),
                user: ticks_to_ns(usage.usage_user),
                per_cpu: usage.per_core_usage_total.clone(),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: throttling.periods,
                throttled_periods: throttling.throttled_periods,
                throttled_time: throttling.throttled_time,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(memory),
        blkio: MessageField::some(v1::BlkIOStat {
            io_service_bytes_recursive: blkio(&b.service_bytes),
            io_serviced_recursive: blkio(&b.serviced),
            io_queued_recursive: blkio(&b.queued),
            io_service_time_recursive: blkio(&b.service_time),
            io_wait_time_recursive: blkio(&b.wait_time),
            io_merged_recursive: blkio(&b.merged),
            io_time_recursive: blkio(&b.time),
            sectors_recursive: blkio(&b.sectors),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// cgroup v2 metrics (libcgroups reads cpu.stat's microseconds into the usage fields); the
/// controllers the cgroup lacks are left out, as containerd's runc shim leaves them.
pub fn to_v2(stats: &Stats, offered: &Offered) -> v2::Metrics {
    let usage = &stats.cpu.usage;
    let throttling = &stats.cpu.throttling;
    let m: &HashMap<String, u64> = &stats.memory.stats;
    let get = |key: &str| m.get(key).copied().unwrap_or(0);
    let mut metrics = v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: usage.usage_total,
            user_usec: usage.usage_user,
            system_usec: usage.usage_kernel,
            nr_periods: throttling.periods,
            nr_throttled: throttling.throttled_periods,
            throttled_usec: throttling.throttled_time,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: get("anon"),
            file: get("file"),
            kernel_stack: get("kernel_stack"),
            slab: get("slab"),
            sock: get("sock"),
            shmem: get("shmem"),
            file_mapped: get("file_mapped"),
            file_dirty: get("file_dirty"),
            file_writeback: get("file_writeback"),
            anon_thp: get("anon_thp"),
            inactive_anon: get("inactive_anon"),
            active_anon: get("active_anon"),
            inactive_file: get("inactive_file"),
            active_file: get("active_file"),
            unevictable: get("unevictable"),
            slab_reclaimable: get("slab_reclaimable"),
            slab_unreclaimable: get("slab_unreclaimable"),
            pgfault: get("pgfault"),
            pgmajfault: get("pgmajfault"),
            usage: stats.memory.memory.usage,
            usage_limit: stats.memory.memory.limit,
            max_usage: stats.memory.memory.max_usage,
            swap_usage: stats.memory.memswap.usage,
            swap_limit: stats.memory.memswap.limit,
            ..Default::default()
        }),
        ..Default::default()
    };
    if !offered.pids() {
        metrics.pids = MessageField::none();
    }
    if !offered.memory() {
        metrics.memory = MessageField::none();
    }
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_controllers_path_is_the_containers() {
        let hybrid = "12:pids:/default/c1\n5:memory:/default/c1\n1:name=systemd:/\n0::/\n";
        assert_eq!(cgroup_in(hybrid, false), Some(PathBuf::from("/default/c1")));
        let unified = "0::/default/c2\n";
        assert_eq!(cgroup_in(unified, true), Some(PathBuf::from("/default/c2")));
        assert_eq!(
            cgroup_in(unified, false),
            Some(PathBuf::from("/default/c2"))
        );
        assert_eq!(cgroup_in("", true), None);
        // A unified /sys/fs/cgroup above v1 hierarchies that still list the process.
        let both = "5:memory:/pure-v2.1\n0::/default/c3\n";
        assert_eq!(cgroup_in(both, true), Some(PathBuf::from("/default/c3")));
    }

    #[test]
    fn v1_metrics_carry_cpu_memory_and_pids() {
        let mut stats = Stats::default();
        stats.cpu.usage.usage_total = 5_000_000;
        stats.cpu.usage.usage_user = 3;
        stats.cpu.usage.usage_kernel = 1;
        stats.cpu.usage.per_core_usage_total = vec![4_000_000, 1_000_000];
        stats.memory.memory = MemoryData {
            usage: 4096,
            max_usage: 8192,
            fail_count: 2,
            limit: 33_554_432,
        };
        stats.memory.stats.insert("total_inactive_file".into(), 512);
        stats.memory.stats.insert("cache".into(), 1024);
        stats.pids.current = 2;
        stats.pids.limit = 100;
        let m = to_v1(&stats, 100);
        let cpu = m.cpu.usage.as_ref().expect("cpu usage");
        assert_eq!(cpu.total, 5_000_000);
        assert_eq!(cpu.user, 30_000_000, "3 ticks at 100 Hz in ns");
        assert_eq!(cpu.kernel, 10_000_000);
        assert_eq!(cpu.per_cpu, vec![4_000_000, 1_000_000]);
        let memory = m.memory.as_ref().expect("memory");
        let usage = memory.usage.as_ref().expect("usage");
        assert_eq!(
            (usage.usage, usage.max, usage.failcnt, usage.limit),
            (4096, 8192, 2, 33_554_432)
        );
        assert_eq!(memory.cache, 1024);
        assert_eq!(memory.total_inactive_file, 512);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(
            m.descriptor_dyn().full_name(),
            "io.containerd.cgroups.v1.Metrics"
        );
    }

    #[test]
    fn v2_metrics_carry_cpu_and_memory() {
        let mut stats = Stats::default();
        stats.cpu.usage.usage_total = 7730;
        stats.memory.memory.usage = 4096;
        stats.memory.memory.limit = 8192;
        stats.memory.stats.insert("anon".into(), 100);
        let m = to_v2(
            &stats,
            &Offered::from_list("cpuset cpu io memory hugetlb pids"),
        );
        assert_eq!(m.cpu.usage_usec, 7730);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 8192);
        assert_eq!(m.memory.anon, 100);
        assert_eq!(
            m.descriptor_dyn().full_name(),
            "io.containerd.cgroups.v2.Metrics"
        );
    }

    #[test]
    fn v2_metrics_leave_out_the_controllers_a_cgroup_lacks() {
        let offered = Offered::from_list("cpu io\n");
        let mut stats = Stats::default();
        stats.cpu.usage.usage_total = 12;
        let m = to_v2(&stats, &offered);
        assert_eq!(m.cpu.usage_usec, 12);
        assert!(m.memory.is_none() && m.pids.is_none());
    }
}
