//! The runc checkpoint/restore flags, validated, and their translation into CRIU options.
//! Pure: unit-tested without CRIU.

use std::path::{Path, PathBuf};

use crate::criu::rpc;

/// Flags shared by checkpoint and restore, as the CLI received them.
#[derive(Debug, Clone, Default)]
pub struct CommonFlags {
    /// `--tcp-established`
    pub tcp_established: bool,
    /// `--ext-unix-sk`
    pub ext_unix_sk: bool,
    /// `--shell-job`
    pub shell_job: bool,
    /// `--file-locks`
    pub file_locks: bool,
    /// `--manage-cgroups-mode`
    pub manage_cgroups_mode: Option<String>,
    /// `--empty-ns`
    pub empty_ns: Vec<String>,
    /// `--auto-dedup`
    pub auto_dedup: bool,
    /// `--lazy-pages`
    pub lazy_pages: bool,
    /// `--network-lock iptables|nftables|skip` (crun's flag)
    pub network_lock: Option<String>,
}

/// Checkpoint-only flags.
#[derive(Debug, Clone, Default)]
pub struct DumpFlags {
    /// Shared flags.
    pub common: CommonFlags,
    /// `--leave-running`
    pub leave_running: bool,
    /// `--tcp-skip-in-flight`
    pub tcp_skip_in_flight: bool,
    /// `--link-remap`
    pub link_remap: bool,
    /// `--pre-dump`
    pub pre_dump: bool,
    /// `--parent-path` (relative to the image path)
    pub parent_path: Option<PathBuf>,
    /// `--page-server ADDR:PORT`
    pub page_server: Option<String>,
    /// `--status-fd`
    pub status_fd: Option<i32>,
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    /// Bad cgroup mode.
    #[error("invalid manage-cgroups-mode value {0:?}: use soft, full, strict or ignore")]
    CgroupMode(String),
    /// Bad network-lock method.
    #[error("invalid network-lock value {0:?}: use iptables, nftables or skip")]
    NetworkLock(String),
    /// Absolute parent path.
    #[error("--parent-path must be relative to --image-path (got {0})")]
    ParentAbsolute(PathBuf),
    /// Parent not a directory.
    #[error("invalid --parent-path: {0} is not a directory holding a previous checkpoint")]
    ParentMissing(PathBuf),
    /// Page server syntax.
    #[error("Use --page-server ADDRESS:PORT to specify page server (got {0:?})")]
    PageServer(String),
    /// Page server port.
    #[error("Invalid port number in --page-server {0:?}")]
    PagePort(String),
    /// Two flags that exclude each other.
    #[error("{0}")]
    Conflict(&'static str),
}

/// Parse `--manage-cgroups-mode`.
pub fn cgroup_mode(v: &str) -> Result<rpc::Criu_cg_mode, FlagError> {
    Ok(match v {
        "soft" => rpc::Criu_cg_mode::SOFT,
        "full" => rpc::Criu_cg_mode::FULL,
        "strict" => rpc::Criu_cg_mode::STRICT,
        "ignore" => rpc::Criu_cg_mode::IGNORE,
        other => return Err(FlagError::CgroupMode(other.to_string())),
    })
}

/// Parse `--network-lock`.
pub fn network_lock(v: &str) -> Result<rpc::Criu_network_lock_method, FlagError> {
    Ok(match v {
        "iptables" => rpc::Criu_network_lock_method::IPTABLES,
        "nftables" => rpc::Criu_network_lock_method::NFTABLES,
        "skip" => rpc::Criu_network_lock_method::SKIP,
        other => return Err(FlagError::NetworkLock(other.to_string())),
    })
}

/// Parse `ADDR:PORT` (IPv6 addresses in brackets).
pub fn page_server(v: &str) -> Result<(String, i32), FlagError> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| FlagError::PageServer(v.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(FlagError::PageServer(v.to_string()));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| FlagError::PagePort(v.to_string()))?;
    Ok((host.to_string(), i32::from(port)))
}

/// Options both directions share.
pub fn apply_common(opts: &mut rpc::Criu_opts, f: &CommonFlags) -> Result<(), FlagError> {
    opts.set_tcp_established(f.tcp_established);
    opts.set_ext_unix_sk(f.ext_unix_sk);
    opts.set_shell_job(f.shell_job);
    opts.set_file_locks(f.file_locks);
    opts.set_auto_dedup(f.auto_dedup);
    opts.set_manage_cgroups(true);
    if let Some(m) = &f.manage_cgroups_mode {
        opts.set_manage_cgroups_mode(cgroup_mode(m)?);
    }
    match &f.network_lock {
        Some(n) => opts.set_network_lock(network_lock(n)?),
        // Without --tcp-established CRIU refuses to dump a connected TCP socket anyway, so
        // there is nothing for a network lock to protect; skipping it saves the iptables
        // runs CRIU makes inside the freeze (≈90 ms measured here). With it, keep runc's
        // iptables lock.
        None if !f.tcp_established => opts.set_network_lock(rpc::Criu_network_lock_method::SKIP),
        None => {}
    }
    if f.lazy_pages {
        opts.set_lazy_pages(true);
    }
    Ok(())
}

/// Build the dump options (flags only; the plan adds mounts and namespaces).
pub fn dump_opts(f: &DumpFlags, image_dir: &Path, pid: i32) -> Result<rpc::Criu_opts, FlagError> {
    let mut opts = rpc::Criu_opts::new();
    opts.set_pid(pid);
    apply_common(&mut opts, &f.common)?;
    opts.set_leave_running(f.leave_running || f.pre_dump);
    opts.set_tcp_skip_in_flight(f.tcp_skip_in_flight);
    opts.set_link_remap(f.link_remap);
    opts.set_orphan_pts_master(true);
    if let Some(p) = &f.parent_path {
        if p.is_absolute() {
            return Err(FlagError::ParentAbsolute(p.clone()));
        }
        if !image_dir.join(p).is_dir() {
            return Err(FlagError::ParentMissing(p.clone()));
        }
        opts.set_parent_img(p.to_string_lossy().into_owned());
        opts.set_track_mem(true);
    }
    if let Some(ps) = &f.page_server {
        let (address, port) = page_server(ps)?;
        let mut info = rpc::Criu_page_server_info::new();
        info.set_address(address);
        info.set_port(port);
        opts.ps = protobuf::MessageField::some(info);
    }
    if let Some(fd) = f.status_fd {
        if !f.common.lazy_pages {
            return Err(FlagError::Conflict(
                "--status-fd only makes sense with --lazy-pages",
            ));
        }
        opts.set_status_fd(fd);
    }
    if f.pre_dump && f.common.lazy_pages {
        return Err(FlagError::Conflict(
            "--pre-dump and --lazy-pages cannot be combined",
        ));
    }
    Ok(opts)
}

/// The CRIU config file runc would use: the `org.criu.config` annotation (empty = none),
/// else `/etc/criu/runc.conf` when it exists.
pub fn config_file(
    annotations: Option<&std::collections::HashMap<String, String>>,
) -> Option<String> {
    match annotations.and_then(|a| a.get("org.criu.config")) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(v.clone()),
        None => Path::new("/etc/criu/runc.conf")
            .exists()
            .then(|| "/etc/criu/runc.conf".to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_map_to_options() {
        let f = DumpFlags {
            common: CommonFlags {
                tcp_established: true,
                file_locks: true,
                manage_cgroups_mode: Some("ignore".into()),
                network_lock: Some("skip".into()),
                ..Default::default()
            },
            leave_running: true,
            page_server: Some("127.0.0.1:2020".into()),
            ..Default::default()
        };
        let o = dump_opts(&f, Path::new("/nonexistent"), 42).unwrap();
        assert_eq!(o.pid(), 42);
        assert!(o.tcp_established() && o.file_locks() && o.leave_running());
        assert!(o.orphan_pts_master() && o.manage_cgroups());
        assert_eq!(o.manage_cgroups_mode(), rpc::Criu_cg_mode::IGNORE);
        assert_eq!(o.network_lock(), rpc::Criu_network_lock_method::SKIP);
        let plain = dump_opts(&DumpFlags::default(), Path::new("/x"), 1).unwrap();
        assert_eq!(plain.network_lock(), rpc::Criu_network_lock_method::SKIP);
        let tcp = DumpFlags {
            common: CommonFlags {
                tcp_established: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let with_tcp = dump_opts(&tcp, Path::new("/x"), 1).unwrap();
        assert!(
            with_tcp.network_lock.is_none(),
            "--tcp-established keeps CRIU's default (iptables) lock"
        );
        assert_eq!(o.ps.address(), "127.0.0.1");
        assert_eq!(o.ps.port(), 2020);
    }

    #[test]
    fn bad_values_name_the_fix() {
        assert!(cgroup_mode("weird")
            .unwrap_err()
            .to_string()
            .contains("soft, full"));
        assert!(network_lock("x")
            .unwrap_err()
            .to_string()
            .contains("nftables"));
        assert_eq!(
            page_server("nope"),
            Err(FlagError::PageServer("nope".into()))
        );
        assert_eq!(
            page_server("h:99999"),
            Err(FlagError::PagePort("h:99999".into()))
        );
        assert_eq!(page_server("[::1]:80").unwrap(), ("::1".to_string(), 80));
        let mut f = DumpFlags {
            parent_path: Some("/abs".into()),
            ..Default::default()
        };
        assert!(matches!(
            dump_opts(&f, Path::new("/"), 1),
            Err(FlagError::ParentAbsolute(_))
        ));
        f.parent_path = Some("../missing-parent".into());
        assert!(matches!(
            dump_opts(&f, Path::new("/tmp"), 1),
            Err(FlagError::ParentMissing(_))
        ));
    }

    #[test]
    fn criu_config_annotation_rules() {
        let mut a = std::collections::HashMap::new();
        a.insert("org.criu.config".to_string(), String::new());
        assert_eq!(config_file(Some(&a)), None);
        a.insert("org.criu.config".to_string(), "/etc/my.conf".into());
        assert_eq!(config_file(Some(&a)).as_deref(), Some("/etc/my.conf"));
    }
}
