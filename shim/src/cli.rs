//! The command line, runc's: global flags before the verb, the same verbs and flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// cryo: an OCI runtime whose specialty is checkpoint/restore.
#[derive(Debug, Parser)]
#[command(name = "cryo", disable_version_flag = true, args_override_self = true)]
pub struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/cryo")]
    pub root: PathBuf,
    /// Log file (containerd reads errors from it).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for compatibility; this runtime drives cgroupfs.
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// The CRIU binary to run (default: `criu` on PATH).
    #[arg(long, global = true)]
    pub criu: Option<PathBuf>,
    /// GPU containers: NVIDIA's cuda-checkpoint (default: $CRYO_CUDA_CHECKPOINT, else PATH).
    #[arg(long = "cuda-checkpoint", global = true)]
    pub cuda_checkpoint: Option<PathBuf>,
    /// GPU containers: the directory holding CRIU's cuda_plugin.so (default:
    /// $CRYO_CRIU_PLUGIN_DIR, else /opt/cryo/criu/plugins, /usr/lib/criu, /usr/local/lib/criu).
    #[arg(long = "criu-plugin-dir", global = true)]
    pub criu_plugin_dir: Option<PathBuf>,
    /// Accepted for compatibility (runc's rootless detection).
    #[arg(long, global = true)]
    pub rootless: Option<String>,
    /// Print the version.
    #[arg(short = 'v', long)]
    pub version: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time="…" level=error msg="…"`
    Text,
    /// `{"level":"error","msg":"…","time":"…"}`
    Json,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container.
    Create(CreateArgs),
    /// Start a created container.
    Start(IdArg),
    /// Create and start a container.
    Run(RunArgs),
    /// Print a container's state as JSON.
    State(IdArg),
    /// List containers.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Send a signal to a container's init process.
    Kill(KillArgs),
    /// Delete a container.
    Delete(DeleteArgs),
    /// Run a process in a running container.
    Exec(ExecArgs),
    /// List a container's processes.
    Ps(PsArgs),
    /// Freeze a container.
    Pause(IdArg),
    /// Thaw a container.
    Resume(IdArg),
    /// Print container events / stats.
    Events(EventsArgs),
    /// Update resource limits.
    Update(UpdateArgs),
    /// Print the runtime's features as JSON.
    Features,
    /// Write a default config.json.
    Spec(SpecArgs),
    /// Checkpoint a running container with CRIU.
    Checkpoint(CheckpointArgs),
    /// Restore a container from a checkpoint.
    Restore(RestoreArgs),
    /// Verify a checkpoint image without restoring it (cryo only).
    Verify(VerifyArgs),
    /// Look into a checkpoint store (cryo only).
    #[command(subcommand)]
    Store(StoreCommand),
    /// cryo's guardian process (started by checkpoint and restore; not for users).
    #[command(name = "__guardian", hide = true)]
    Guardian,
}

/// Just a container id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Container id.
    pub container_id: String,
}

/// `create`
#[derive(Debug, Args, Clone)]
pub struct CreateArgs {
    /// Bundle directory.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the init pid here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master.
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Do not pivot_root (accepted).
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Do not create a session keyring (accepted).
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Pass N extra fds (from 3) to the container.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: i32,
    /// Container id.
    pub container_id: String,
}

/// `run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// create's flags.
    #[command(flatten)]
    pub create: CreateArgs,
    /// Do not wait for the container.
    #[arg(short, long)]
    pub detach: bool,
    /// Do not become a subreaper (accepted).
    #[arg(long = "no-subreaper")]
    pub no_subreaper: bool,
    /// Keep the container's state after it exits (delete it later with `delete`).
    #[arg(long)]
    pub keep: bool,
}

/// `list`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Ids only.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `kill`
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(short, long)]
    pub all: bool,
    /// Container id.
    pub container_id: String,
    /// Signal: number, name or SIG-name.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// Container id.
    pub container_id: String,
}

/// `exec`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// process.json describing the process.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Do not wait.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the pid here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Unix socket that receives the pty master.
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Environment (KEY=VALUE).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// User (uid[:gid]).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Extra capabilities.
    #[arg(short = 'c', long)]
    pub cap: Vec<String>,
    /// Additional groups of the process (repeatable).
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Pass N extra fds (from 3) to the process.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: i32,
    /// Run in a sub-cgroup of the container: PATH, or CONTROLLER[,CONTROLLER]:PATH (v1)
    /// (repeatable).
    #[arg(long)]
    pub cgroup: Vec<String>,
    /// SELinux label of the process.
    #[arg(long = "process-label")]
    pub process_label: Option<String>,
    /// AppArmor profile of the process.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Set no_new_privs.
    #[arg(long = "no-new-privs")]
    pub no_new_privs: bool,
    /// Run in a paused container anyway.
    #[arg(long = "ignore-paused")]
    pub ignore_paused: bool,
    /// Container id.
    pub container_id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `ps`
#[derive(Debug, Args)]
pub struct PsArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Container id.
    pub container_id: String,
    /// Options for ps(1) (default `-ef`), as with runc.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Print stats once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between stats: a duration such as `5s`, `1s`, `100ms` (a bare number is seconds).
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// Container id.
    pub container_id: String,
}

/// `update`: runc's flags; a limit not given is left as it is.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// JSON LinuxResources file (`-` for stdin); the flags below override its values.
    #[arg(short, long)]
    pub resources: Option<PathBuf>,
    /// Block IO weight (10-1000).
    #[arg(long = "blkio-weight")]
    pub blkio_weight: Option<u16>,
    /// CPU CFS period (µs).
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota (µs; -1 for none).
    #[arg(long = "cpu-quota", allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-share", alias = "cpu-shares")]
    pub cpu_shares: Option<u64>,
    /// CPU realtime period (µs).
    #[arg(long = "cpu-rt-period")]
    pub cpu_rt_period: Option<u64>,
    /// CPU realtime runtime (µs).
    #[arg(long = "cpu-rt-runtime", allow_hyphen_values = true)]
    pub cpu_rt_runtime: Option<i64>,
    /// CPUs to run on (`0-3`, `0,1`).
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes to use.
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    /// Memory limit (bytes, or with a unit: 50M, 1g; -1 for none).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit.
    #[arg(long = "memory-reservation", allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit (-1 for none).
    #[arg(long = "memory-swap", allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Kernel memory limit (accepted for compatibility; newer kernels ignore it).
    #[arg(long = "kernel-memory", allow_hyphen_values = true)]
    pub kernel_memory: Option<String>,
    /// Kernel TCP buffer limit (accepted for compatibility; newer kernels ignore it).
    #[arg(long = "kernel-memory-tcp", allow_hyphen_values = true)]
    pub kernel_memory_tcp: Option<String>,
    /// Maximum number of pids (-1 for none).
    #[arg(long = "pids-limit", allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// Container id.
    pub container_id: String,
}

/// `spec`
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
}

/// `checkpoint`
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Where the images go (default ./checkpoint).
    #[arg(long = "image-path")]
    pub image_path: Option<PathBuf>,
    /// Where logs and stats go (default: the image path).
    #[arg(long = "work-path")]
    pub work_path: Option<PathBuf>,
    /// A previous pre-dump, relative to the image path.
    #[arg(long = "parent-path")]
    pub parent_path: Option<PathBuf>,
    /// Keep the container running.
    #[arg(long = "leave-running")]
    pub leave_running: bool,
    /// Checkpoint established TCP connections.
    #[arg(long = "tcp-established")]
    pub tcp_established: bool,
    /// Skip in-flight TCP connections.
    #[arg(long = "tcp-skip-in-flight")]
    pub tcp_skip_in_flight: bool,
    /// Remap linked files (CRIU --link-remap).
    #[arg(long = "link-remap")]
    pub link_remap: bool,
    /// Allow external unix sockets.
    #[arg(long = "ext-unix-sk")]
    pub ext_unix_sk: bool,
    /// Allow shell jobs.
    #[arg(long = "shell-job")]
    pub shell_job: bool,
    /// Lazy pages (post-copy) via a page server.
    #[arg(long = "lazy-pages")]
    pub lazy_pages: bool,
    /// Fd to signal when lazy pages are ready.
    #[arg(long = "status-fd")]
    pub status_fd: Option<i32>,
    /// ADDRESS:PORT of a page server.
    #[arg(long = "page-server")]
    pub page_server: Option<String>,
    /// Checkpoint file locks.
    #[arg(long = "file-locks")]
    pub file_locks: bool,
    /// Memory-only pre-dump (needs soft-dirty tracking).
    #[arg(long = "pre-dump")]
    pub pre_dump: bool,
    /// soft, full, strict or ignore.
    #[arg(long = "manage-cgroups-mode")]
    pub manage_cgroups_mode: Option<String>,
    /// Namespaces whose contents are not dumped (only "network").
    #[arg(long = "empty-ns")]
    pub empty_ns: Vec<String>,
    /// Deduplicate against the parent image.
    #[arg(long = "auto-dedup")]
    pub auto_dedup: bool,
    /// auto, overlay or none: capture the overlay upper dir into the image.
    #[arg(long = "rootfs-snapshot", default_value = "auto")]
    pub rootfs_snapshot: String,
    /// Store the page images zstd-compressed (after the thaw). Smaller images; only cryo can
    /// restore them, and not with --lazy-pages.
    #[arg(long = "compress-pages")]
    pub compress_pages: bool,
    /// Let CRIU write the page images itself inside the freeze (as runc does) instead of
    /// cryo receiving them into images prepared before the freeze.
    #[arg(long = "no-page-staging")]
    pub no_page_staging: bool,
    /// iptables, nftables or skip.
    #[arg(long = "network-lock")]
    pub network_lock: Option<String>,
    /// Longest the container may stay frozen, in seconds (default: 30 + 10 per GiB of its
    /// memory); past it CRIU is stopped and the container thawed (cryo only).
    #[arg(long = "freeze-timeout", value_name = "SECONDS")]
    pub freeze_timeout: Option<u64>,
    /// Longest CRIU may work, in seconds; past it CRIU is stopped (cryo only).
    #[arg(long = "criu-timeout", value_name = "SECONDS", default_value_t = 600)]
    pub criu_timeout: u64,
    /// Write a new generation into this checkpoint store instead of --image-path: named by
    /// time, published whole, incremental over the newest good one (cryo only; see `cryo
    /// store ls`).
    #[arg(long = "store", value_name = "DIR", conflicts_with = "image_path")]
    pub store: Option<PathBuf>,
    /// With --store: keep the N newest good generations (and those they depend on), remove
    /// older ones. Default: remove none.
    #[arg(long = "keep", value_name = "N", requires = "store")]
    pub keep: Option<usize>,
    /// With --store: stay in the foreground and checkpoint (leaving it running) every
    /// DURATION (`30s`, `5m`, `1h`) until the container stops or SIGTERM/SIGINT.
    #[arg(long = "every", value_name = "DURATION", requires = "store")]
    pub every: Option<String>,
    /// With --store: every N-th generation is a full one, written whole (1: all of them); the
    /// others keep only what changed (a chain of CRIU parent images, or, on XFS and btrfs,
    /// full images sharing the unchanged extents).
    #[arg(
        long = "full-every",
        value_name = "N",
        default_value_t = 16,
        requires = "store"
    )]
    pub full_every: u32,
    /// Container id (with more ids: the first member of a group checkpoint).
    #[arg(required_unless_present = "group")]
    pub container_id: Option<String>,
    /// More containers: one coordinated checkpoint of them all, into one group image (cryo
    /// only).
    pub more_ids: Vec<String>,
    /// A coordinated checkpoint of every container whose `io.cryo.group` annotation has this
    /// value (cryo only).
    #[arg(long, conflicts_with_all = ["container_id", "more_ids"])]
    pub group: Option<String>,
}

/// `restore`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Unix socket that receives the pty master.
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Where the images are (default ./checkpoint).
    #[arg(long = "image-path")]
    pub image_path: Option<PathBuf>,
    /// Where logs and stats go (default: the image path).
    #[arg(long = "work-path")]
    pub work_path: Option<PathBuf>,
    /// Restore established TCP connections.
    #[arg(long = "tcp-established")]
    pub tcp_established: bool,
    /// Close restored TCP connections.
    #[arg(long = "tcp-close")]
    pub tcp_close: bool,
    /// Allow external unix sockets.
    #[arg(long = "ext-unix-sk")]
    pub ext_unix_sk: bool,
    /// Allow shell jobs.
    #[arg(long = "shell-job")]
    pub shell_job: bool,
    /// Restore file locks.
    #[arg(long = "file-locks")]
    pub file_locks: bool,
    /// soft, full, strict or ignore.
    #[arg(long = "manage-cgroups-mode")]
    pub manage_cgroups_mode: Option<String>,
    /// Bundle directory.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Do not wait for the container.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the init pid here.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Do not become a subreaper.
    #[arg(long = "no-subreaper")]
    pub no_subreaper: bool,
    /// Do not pivot_root (accepted).
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Namespaces whose contents are not restored (only "network").
    #[arg(long = "empty-ns")]
    pub empty_ns: Vec<String>,
    /// Accepted (dedup happens at dump).
    #[arg(long = "auto-dedup")]
    pub auto_dedup: bool,
    /// Lazy restore (userfaultfd).
    #[arg(long = "lazy-pages")]
    pub lazy_pages: bool,
    /// LSM profile TYPE:NAME.
    #[arg(long = "lsm-profile")]
    pub lsm_profile: Option<String>,
    /// LSM mount context.
    #[arg(long = "lsm-mount-context")]
    pub lsm_mount_context: Option<String>,
    /// Accepted (go-runc passes it when a parent checkpoint is set).
    #[arg(long = "parent-path")]
    pub parent_path: Option<PathBuf>,
    /// Do not apply the image's rootfs snapshot.
    #[arg(long = "no-rootfs-restore")]
    pub no_rootfs_restore: bool,
    /// iptables, nftables or skip.
    #[arg(long = "network-lock")]
    pub network_lock: Option<String>,
    /// Longest CRIU may work, in seconds; past it CRIU is stopped and the restore undone
    /// (cryo only).
    #[arg(long = "criu-timeout", value_name = "SECONDS", default_value_t = 600)]
    pub criu_timeout: u64,
    /// Restore the newest generation of this checkpoint store that verifies, falling back
    /// to older ones (cryo only).
    #[arg(long = "store", value_name = "DIR", conflicts_with = "image_path")]
    pub store: Option<PathBuf>,
    /// Group image: restore member OLD under the id NEW (default: its own id; cryo only).
    #[arg(long = "rename", value_name = "OLD=NEW")]
    pub rename: Vec<String>,
    /// Group image: restore member ID from bundle DIR (default: the bundle it had at
    /// checkpoint; cryo only).
    #[arg(long = "member-bundle", value_name = "ID=DIR")]
    pub member_bundle: Vec<String>,
    /// Container id (none for a group image: its members are restored).
    pub container_id: Option<String>,
}

/// `verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The checkpoint to verify (default ./checkpoint).
    #[arg(long = "image-path")]
    pub image_path: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long = "format", default_value = "text")]
    pub format: String,
}

/// `store`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List a store's generations: time, kind, parent, size, freeze, verified or why not.
    #[command(alias = "list")]
    Ls(StoreLsArgs),
}

/// `store ls`
#[derive(Debug, Args)]
pub struct StoreLsArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Check only that every file is there with its size, not its digest (fast).
    #[arg(long)]
    pub quick: bool,
    /// The store directory.
    pub dir: PathBuf,
}
