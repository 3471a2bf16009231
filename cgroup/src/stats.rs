//! A container cgroup's stats, also where the cgroup lacks controllers.
//!
//! libcgroups' v2 manager reads every controller's files and fails on the first one missing,
//! but a cgroup2 cgroup need not have them all (a delegated slice may enable no memory or pids
//! controller); containerd's runc shim and runc then report what there is. cpu.stat is in
//! every cgroup2 cgroup.

use std::collections::HashMap;
use std::path::Path;

use libcgroups::common::{get_cgroup_setup, AnyCgroupManager, CgroupManager, CgroupSetup};
use libcgroups::stats::Stats;

const V2_ROOT: &str = "/sys/fs/cgroup";

/// The stats of the cgroup `manager` manages (at `cgroups_path` below the hierarchy roots),
/// and which controllers a cgroup2 cgroup offered (all of them on v1).
pub fn read(manager: &AnyCgroupManager, cgroups_path: &Path) -> Result<(Stats, Offered), String> {
    if !matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified)) {
        return Ok((
            manager.stats().map_err(|e| e.to_string())?,
            Offered::everything(),
        ));
    }
    let dir = Path::new(V2_ROOT).join(cgroups_path.strip_prefix("/").unwrap_or(cgroups_path));
    let offered = Offered::in_cgroup(&dir);
    let stats = if offered.all() {
        manager.stats().map_err(|e| e.to_string())?
    } else {
        offered_stats(&dir, &offered)?
    };
    Ok((stats, offered))
}

/// The controllers whose files a cgroup2 cgroup has (cpu.stat is there in every one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    memory: bool,
    pids: bool,
    io: bool,
    hugetlb: bool,
}

impl Offered {
    fn everything() -> Self {
        Self::from_list("memory pids io hugetlb")
    }

    fn in_cgroup(dir: &Path) -> Self {
        Self::from_list(
            &std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default(),
        )
    }

    /// From a `cgroup.controllers` line ("cpuset cpu io memory pids").
    pub fn from_list(list: &str) -> Self {
        let has = |name: &str| list.split_whitespace().any(|c| c == name);
        Self {
            memory: has("memory"),
            pids: has("pids"),
            io: has("io"),
            hugetlb: has("hugetlb"),
        }
    }

    fn all(&self) -> bool {
        self.memory && self.pids && self.io && self.hugetlb
    }

    /// The memory controller's files are there.
    pub fn memory(&self) -> bool {
        self.memory
    }

    /// The pids controller's files are there.
    pub fn pids(&self) -> bool {
        self.pids
    }
}

/// The stats of the controllers the cgroup has: cpu.stat always, memory and pids when offered.
fn offered_stats(dir: &Path, offered: &Offered) -> Result<Stats, String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let keyed = |name: &str| -> Result<HashMap<String, u64>, String> {
        Ok(read(name)?
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect())
    };
    let value = |name: &str| -> Result<u64, String> {
        let text = read(name)?;
        match text.trim() {
            "max" => Ok(u64::MAX),
            v => v
                .parse()
                .map_err(|e| format!("{}: {e}", dir.join(name).display())),
        }
    };
    let mut stats = Stats::default();
    let cpu = keyed("cpu.stat")?;
    let get = |k: &str| cpu.get(k).copied().unwrap_or(0);
    stats.cpu.usage.usage_total = get("usage_usec");
    stats.cpu.usage.usage_user = get("user_usec");
    stats.cpu.usage.usage_kernel = get("system_usec");
    stats.cpu.throttling.periods = get("nr_periods");
    stats.cpu.throttling.throttled_periods = get("nr_throttled");
    stats.cpu.throttling.throttled_time = get("throttled_usec");
    if offered.pids {
        stats.pids = libcgroups::stats::pid_stats(dir).map_err(|e| e.to_string())?;
    }
    if offered.memory {
        stats.memory.memory.usage = value("memory.current")?;
        stats.memory.memory.limit = value("memory.max")?;
        stats.memory.stats = keyed("memory.stat")?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_without_memory_or_pids_still_reports_its_cpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 900\nuser_usec 600\nsystem_usec 300\nnr_periods 0\n",
        )
        .expect("cpu.stat");
        let stats = offered_stats(dir.path(), &Offered::from_list("")).expect("stats");
        assert_eq!(
            (stats.cpu.usage.usage_total, stats.cpu.usage.usage_user),
            (900, 600)
        );
        // memory offered but its files missing: an error naming the file, not zeros.
        let err = offered_stats(dir.path(), &Offered::from_list("memory")).unwrap_err();
        assert!(err.contains("memory.current"), "{err}");
    }
}
