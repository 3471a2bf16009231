//! One container (task) of the shim: its init, its execs, and what each task call does with
//! them, through cryo. The runc shim's state machine, kept in [`Process`] phases.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use containerd_shim::api::{CheckpointTaskRequest, CreateTaskRequest, ExecProcessRequest};
use containerd_shim::protos::events::task::{
    TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::topics;
use containerd_shim::{error, warn};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::checkpoint::{
    checkpoint_args, checkpoint_options, checkpoint_paths, restore_args, RestoreRequest,
};
use crate::cryo::{CommandIo, Cryo, CryoError, CHECKPOINT_TIMEOUT, COMMAND_TIMEOUT};
use crate::errors::TaskError;
use crate::events::EventSender;
use crate::exits::{ExitSink, ExitTracker, Launch};
use crate::io::{make_pipes, ConsoleSocket, Pipes, ProcessIo, StdioPaths};
use crate::oom;
use crate::options::ShimOptions;
use crate::process::{Exit, Phase, Process, ProcessState};
use crate::rootfs::{self, MountedRootfs};
use crate::stats;
use crate::timestamp;

/// A restore requested at create, run at start (as the runc shim does).
struct PendingRestore {
    request: RestoreRequest,
    /// The process's pipes, made at create (None with a terminal).
    pipes: Option<(Pipes, CommandIo)>,
}

/// An exec: its process and the OCI process spec it runs, until it starts.
struct ExecEntry {
    process: Arc<Process>,
    spec: Mutex<Option<serde_json::Value>>,
}

/// A container and its processes.
pub struct Container {
    /// The container id.
    pub id: String,
    /// Its bundle.
    pub bundle: PathBuf,
    options: ShimOptions,
    cryo: Cryo,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<ExecEntry>>>,
    rootfs: Mutex<Option<PathBuf>>,
    pending_restore: Mutex<Option<PendingRestore>>,
    cgroup: Mutex<Option<PathBuf>>,
    shares_host_pid_namespace: bool,
    tracker: Arc<ExitTracker>,
    events: EventSender,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn cryo_failed(what: &'static str) -> impl FnOnce(CryoError) -> TaskError {
    move |source| TaskError::Cryo { what, source }
}

/// Reports a watched process's exit.
struct ProcessExit {
    container: Arc<Container>,
    process: Arc<Process>,
}

impl ExitSink for ProcessExit {
    fn exited(&self, status: i32) {
        self.container.report_exit(&self.process, status);
    }
}

impl Container {
    /// Create the container as containerd asked: settings, rootfs, stdio, then `cryo
    /// create`; or, for a restore, everything but the restore itself, which runs at start.
    pub fn create(
        req: &CreateTaskRequest,
        namespace: &str,
        tracker: Arc<ExitTracker>,
        events: EventSender,
    ) -> Result<Arc<Self>, TaskError> {
        let bundle = PathBuf::from(&req.bundle);
        let options = ShimOptions::from_any(req.options.as_ref())?;
        options.save(&bundle)?;
        let rootfs = MountedRootfs::mount(&bundle, &req.rootfs)?;
        let cryo = Cryo::new(
            options.cryo.clone(),
            options.state_root(namespace),
            &bundle,
            options.criu.clone(),
            options.systemd_cgroup,
            tracker.clone(),
        );
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let container = Arc::new(Self {
            id: req.id.clone(),
            shares_host_pid_namespace: shares_host_pid_namespace(&bundle),
            bundle,
            cryo,
            init: Arc::new(Process::new("", stdio.clone())),
            execs: Mutex::new(HashMap::new()),
            rootfs: Mutex::new(None),
            pending_restore: Mutex::new(None),
            cgroup: Mutex::new(None),
            tracker,
            events,
            options,
        });
        if req.checkpoint.is_empty() {
            container.create_init()?;
        } else {
            let pipes = if stdio.terminal {
                None
            } else {
                Some(make_pipes(
                    &stdio,
                    container.options.io_uid,
                    container.options.io_gid,
                )?)
            };
            *locked(&container.pending_restore) = Some(PendingRestore {
                request: RestoreRequest {
                    image: PathBuf::from(&req.checkpoint),
                    parent: Some(PathBuf::from(&req.parent_checkpoint))
                        .filter(|p| !p.as_os_str().is_empty()),
                },
                pipes,
            });
        }
        *locked(&container.rootfs) = rootfs.keep();
        Ok(container)
    }

    fn id_arg(&self) -> OsString {
        OsString::from(&self.id)
    }

    /// `cryo create`, then the stdio copies and the init's pid.
    fn create_init(self: &Arc<Self>) -> Result<(), TaskError> {
        let launch = self.tracker.begin_launch();
        let pid_file = self.bundle.join("init.pid");
        let mut args: Vec<OsString> = vec![
            "--bundle".into(),
            self.bundle.clone().into(),
            "--pid-file".into(),
            pid_file.clone().into(),
        ];
        if self.options.no_pivot_root {
            args.push("--no-pivot".into());
        }
        if self.options.no_new_keyring {
            args.push("--no-new-keyring".into());
        }
        let (launcher, io) = StdioLauncher::prepare(&self.init.stdio, &self.options, None)?;
        if let Some(socket) = launcher.console_socket() {
            args.push("--console-socket".into());
            args.push(socket.into());
        }
        args.push(self.id_arg());
        self.cryo
            .run("create", &args, io, COMMAND_TIMEOUT)
            .map_err(cryo_failed("OCI runtime create failed"))?;
        let started = launcher
            .finish(&self.init.stdio)
            .and_then(|io| Ok((io, read_pid(&pid_file)?)));
        let (io, pid) = match started {
            Ok(v) => v,
            Err(e) => {
                self.force_delete();
                return Err(e);
            }
        };
        let mut state = self.init.lock();
        state.pid = pid;
        state.io = Arc::new(io);
        *locked(&self.cgroup) = stats::cgroup_of(pid);
        self.watch(&launch, &mut state, &self.init, pid);
        Ok(())
    }

    /// Watch `pid`; report at once if it already exited during the launch.
    fn watch(
        self: &Arc<Self>,
        launch: &Launch<'_>,
        state: &mut ProcessState,
        process: &Arc<Process>,
        pid: i32,
    ) {
        let sink = Arc::new(ProcessExit {
            container: self.clone(),
            process: process.clone(),
        });
        if let Some(status) = self.tracker.watch(launch, pid, sink) {
            self.record_exit(state, process, status);
        }
    }

    /// A watched process exited (called by the exit tracker).
    fn report_exit(&self, process: &Arc<Process>, status: i32) {
        let mut state = process.lock();
        self.record_exit(&mut state, process, status);
    }

    fn record_exit(&self, state: &mut ProcessState, process: &Process, status: i32) {
        let is_init = process.id.is_empty();
        if is_init && self.shares_host_pid_namespace {
            // Without a pid namespace of its own, the init's children outlive it: kill them,
            // as the runc shim does.
            if let Err(e) = self.cryo.run(
                "kill",
                &["--all".into(), self.id_arg(), "9".into()],
                CommandIo::Captured,
                COMMAND_TIMEOUT,
            ) {
                warn!(
                    "container {}: killing the init's children failed: {e}",
                    self.id
                );
            }
        }
        if !process.set_exited(state, status) {
            return;
        }
        let exit = state.exit.unwrap_or(Exit {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        self.events.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: self.id.clone(),
                id: if is_init {
                    self.id.clone()
                } else {
                    process.id.clone()
                },
                pid: u32::try_from(state.pid).unwrap_or(0),
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            },
        );
    }

    /// Best-effort removal of what cryo created, after a later step of create failed.
    fn force_delete(&self) {
        if let Err(e) = self.cryo.run(
            "delete",
            &["--force".into(), self.id_arg()],
            CommandIo::Captured,
            COMMAND_TIMEOUT,
        ) {
            error!(
                "container {}: removing it after a failed create: {e}",
                self.id
            );
        }
    }

    /// The init, or the exec `exec_id`.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, TaskError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        locked(&self.execs)
            .get(exec_id)
            .map(|e| e.process.clone())
            .ok_or_else(|| {
                TaskError::NotFound(format!("process {exec_id} of container {}", self.id))
            })
    }

    /// The init's pid (0 before it runs).
    pub fn pid(&self) -> i32 {
        self.init.snapshot().0
    }

    /// The state containerd sees for a process: an exec of a paused task is paused.
    pub fn phase_of(&self, process: &Process) -> Phase {
        let phase = process.snapshot().1;
        if process.id.is_empty() || phase != Phase::Running {
            return phase;
        }
        match self.init.snapshot().1 {
            Phase::Paused => Phase::Paused,
            _ => phase,
        }
    }

    /// Start the init (or run the pending restore) or an exec.
    pub fn start(self: &Arc<Self>, exec_id: &str) -> Result<i32, TaskError> {
        if !exec_id.is_empty() {
            return self.start_exec(exec_id);
        }
        let mut state = self.init.lock();
        if state.phase != Phase::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "cannot start task {}: it is {:?}",
                self.id, state.phase
            )));
        }
        let pending = locked(&self.pending_restore).take();
        if let Some(restore) = pending {
            return self.restore(state, restore);
        }
        self.cryo
            .run(
                "start",
                &[self.id_arg()],
                CommandIo::Captured,
                COMMAND_TIMEOUT,
            )
            .map_err(cryo_failed("OCI runtime start failed"))?;
        if state.exit.is_none() {
            state.phase = Phase::Running;
        }
        let pid = state.pid;
        self.send_start(pid);
        Ok(pid)
    }

    fn send_start(&self, pid: i32) {
        self.events.send(
            topics::TASK_START_EVENT_TOPIC,
            TaskStart {
                container_id: self.id.clone(),
                pid: u32::try_from(pid).unwrap_or(0),
                ..Default::default()
            },
        );
        let (events, id) = (self.events.clone(), self.id.clone());
        oom::watch(pid, move || {
            events.send(
                topics::TASK_OOM_EVENT_TOPIC,
                TaskOOM {
                    container_id: id.clone(),
                    ..Default::default()
                },
            );
        });
    }

    /// `cryo restore` of the checkpoint containerd gave at create.
    fn restore(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, ProcessState>,
        pending: PendingRestore,
    ) -> Result<i32, TaskError> {
        let launch = self.tracker.begin_launch();
        let pid_file = self.bundle.join("init.pid");
        let work = self
            .options
            .criu_work_path
            .clone()
            .unwrap_or_else(|| self.bundle.join("work"));
        let (launcher, io) =
            StdioLauncher::prepare(&self.init.stdio, &self.options, pending.pipes)?;
        let args = restore_args(
            &self.id,
            &self.bundle,
            &pending.request,
            &work,
            &pid_file,
            launcher.console_socket(),
            self.options.no_pivot_root,
        );
        self.cryo
            .run("restore", &args, io, CHECKPOINT_TIMEOUT)
            .map_err(cryo_failed("OCI runtime restore failed"))?;
        let started = launcher
            .finish(&self.init.stdio)
            .and_then(|io| Ok((io, read_pid(&pid_file)?)));
        let (io, pid) = match started {
            Ok(v) => v,
            Err(e) => {
                self.force_delete();
                return Err(e);
            }
        };
        state.pid = pid;
        state.io = Arc::new(io);
        state.phase = Phase::Running;
        *locked(&self.cgroup) = stats::cgroup_of(pid);
        self.send_start(pid);
        self.watch(&launch, &mut state, &self.init, pid);
        Ok(pid)
    }

    /// Record an exec (it runs at start).
    pub fn add_exec(&self, req: &ExecProcessRequest) -> Result<(), TaskError> {
        // Not in a paused task either: the new process would join the frozen cgroup, and
        // cryo would wait for it to start until its timeout.
        match self.init.snapshot().1 {
            Phase::Running => {}
            phase => {
                return Err(TaskError::FailedPrecondition(format!(
                    "cannot exec in task {}: it is {phase:?}",
                    self.id
                )))
            }
        }
        let spec: serde_json::Value = serde_json::from_slice(&req.spec.value).map_err(|e| {
            TaskError::InvalidArgument(format!(
                "exec {}: the process spec is not JSON: {e}",
                req.exec_id
            ))
        })?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut execs = locked(&self.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(TaskError::AlreadyExists(format!(
                "process {} of container {}",
                req.exec_id, self.id
            )));
        }
        execs.insert(
            req.exec_id.clone(),
            Arc::new(ExecEntry {
                process: Arc::new(Process::new(&req.exec_id, stdio)),
                spec: Mutex::new(Some(spec)),
            }),
        );
        drop(execs);
        self.events.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: self.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// `cryo exec --detach`.
    fn start_exec(self: &Arc<Self>, exec_id: &str) -> Result<i32, TaskError> {
        let entry = locked(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            TaskError::NotFound(format!("process {exec_id} of container {}", self.id))
        })?;
        let process = entry.process.clone();
        let mut state = process.lock();
        let spec = locked(&entry.spec).take();
        let Some(mut spec) = spec.filter(|_| state.phase == Phase::Created) else {
            return Err(TaskError::FailedPrecondition(format!(
                "process {exec_id} of container {} was already started",
                self.id
            )));
        };
        spec["terminal"] = serde_json::Value::Bool(process.stdio.terminal);
        let spec_file = self
            .bundle
            .join(format!(".cryo-exec-{}.json", safe_name(exec_id)));
        std::fs::write(&spec_file, spec.to_string()).map_err(|source| TaskError::Os {
            what: format!("write {}", spec_file.display()),
            source,
        })?;
        let launch = self.tracker.begin_launch();
        let pid_file = self.bundle.join(format!("{}.pid", safe_name(exec_id)));
        let result = (|| {
            let (launcher, io) = StdioLauncher::prepare(&process.stdio, &self.options, None)?;
            let mut args: Vec<OsString> = vec![
                "--process".into(),
                spec_file.clone().into(),
                "--detach".into(),
                "--pid-file".into(),
                pid_file.clone().into(),
            ];
            if let Some(socket) = launcher.console_socket() {
                args.push("--console-socket".into());
                args.push(socket.into());
            }
            args.push(self.id_arg());
            self.cryo
                .run("exec", &args, io, COMMAND_TIMEOUT)
                .map_err(cryo_failed("OCI runtime exec failed"))?;
            let io = launcher.finish(&process.stdio)?;
            Ok((io, read_pid(&pid_file)?))
        })();
        let _ = std::fs::remove_file(&spec_file);
        let (io, pid) = match result {
            Ok(v) => v,
            Err(e) => {
                // Waiters learn it will not run; the record stays until containerd deletes it.
                process.set_exited(&mut state, 255);
                return Err(e);
            }
        };
        state.pid = pid;
        state.io = Arc::new(io);
        state.phase = Phase::Running;
        self.events.send(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
                pid: u32::try_from(pid).unwrap_or(0),
                ..Default::default()
            },
        );
        self.watch(&launch, &mut state, &process, pid);
        Ok(pid)
    }

    /// Signal the init (`cryo kill`, with `--all` for every process) or an exec.
    pub fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let finished = || {
            TaskError::NotFound(match exec_id {
                "" => format!("task {}: its process already finished", self.id),
                _ => format!("process {exec_id} of task {}: it already finished", self.id),
            })
        };
        if !exec_id.is_empty() {
            let process = self.process(exec_id)?;
            let (pid, _, exit) = process.snapshot();
            if exit.is_some() {
                return Err(finished());
            }
            if pid == 0 {
                return Err(TaskError::FailedPrecondition(format!(
                    "process {exec_id} of container {} is not started",
                    self.id
                )));
            }
            let signal = Signal::try_from(i32::try_from(signal).unwrap_or(-1))
                .map_err(|_| TaskError::InvalidArgument(format!("{signal} is not a signal")))?;
            return match kill(Pid::from_raw(pid), signal) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::ESRCH) => Err(finished()),
                Err(e) => Err(TaskError::Os {
                    what: format!("signal process {exec_id} (pid {pid})"),
                    source: e.into(),
                }),
            };
        }
        if locked(&self.pending_restore).is_some() {
            return Err(TaskError::FailedPrecondition(format!(
                "task {} is a restore not yet started: nothing to signal",
                self.id
            )));
        }
        let mut args: Vec<OsString> = Vec::new();
        if all {
            args.push("--all".into());
        }
        args.push(self.id_arg());
        args.push(signal.to_string().into());
        match self
            .cryo
            .run("kill", &args, CommandIo::Captured, COMMAND_TIMEOUT)
        {
            Ok(_) => Ok(()),
            Err(e) if self.init.snapshot().2.is_some() || e.container_gone() => Err(finished()),
            Err(e) => Err(cryo_failed("OCI runtime kill failed")(e)),
        }
    }

    /// `cryo pause`.
    pub fn pause(&self) -> Result<(), TaskError> {
        let mut state = self.init.lock();
        match state.phase {
            Phase::Running => {}
            Phase::Paused => return Ok(()),
            phase => {
                return Err(TaskError::FailedPrecondition(format!(
                    "cannot pause task {}: it is {phase:?}",
                    self.id
                )))
            }
        }
        self.cryo
            .run(
                "pause",
                &[self.id_arg()],
                CommandIo::Captured,
                COMMAND_TIMEOUT,
            )
            .map_err(cryo_failed("OCI runtime pause failed"))?;
        state.phase = Phase::Paused;
        Ok(())
    }

    /// `cryo resume`.
    pub fn resume(&self) -> Result<(), TaskError> {
        let mut state = self.init.lock();
        match state.phase {
            Phase::Paused => {}
            Phase::Running => return Ok(()),
            phase => {
                return Err(TaskError::FailedPrecondition(format!(
                    "cannot resume task {}: it is {phase:?}",
                    self.id
                )))
            }
        }
        self.cryo
            .run(
                "resume",
                &[self.id_arg()],
                CommandIo::Captured,
                COMMAND_TIMEOUT,
            )
            .map_err(cryo_failed("OCI runtime resume failed"))?;
        state.phase = Phase::Running;
        Ok(())
    }

    /// Checkpoint the init with cryo. The task keeps running unless the options say `exit`;
    /// a failed checkpoint leaves it as it was (cryo's guarantee), with CRIU's log copied to
    /// `<bundle>/criu-dump.log` as the runc shim does.
    pub fn checkpoint(&self, req: &CheckpointTaskRequest) -> Result<(), TaskError> {
        let options =
            checkpoint_options(req.options.as_ref()).map_err(TaskError::InvalidArgument)?;
        let paths = checkpoint_paths(&req.path, &options, &self.bundle)
            .map_err(TaskError::InvalidArgument)?;
        let state = self.init.lock();
        if !matches!(state.phase, Phase::Running | Phase::Paused) {
            return Err(TaskError::FailedPrecondition(format!(
                "cannot checkpoint task {}: it is {:?}",
                self.id, state.phase
            )));
        }
        let args = checkpoint_args(&self.id, &paths, &options, &self.options.checkpoint);
        let result = self
            .cryo
            .run("checkpoint", &args, CommandIo::Captured, CHECKPOINT_TIMEOUT);
        drop(state);
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(source) => {
                let dump_log = self.bundle.join("criu-dump.log");
                let copied = std::fs::copy(paths.work.join("dump.log"), &dump_log).is_ok();
                Err(TaskError::Checkpoint {
                    source,
                    dump_log: copied.then_some(dump_log),
                })
            }
        };
        if paths.work_is_temporary {
            let _ = std::fs::remove_dir_all(&paths.work);
        }
        outcome
    }

    /// `cryo update --resources` with the LinuxResources JSON containerd sent.
    pub fn update(&self, resources: Option<&Any>) -> Result<(), TaskError> {
        let Some(resources) = resources.filter(|r| !r.value.is_empty()) else {
            return Err(TaskError::InvalidArgument(
                "update names no resources".into(),
            ));
        };
        let file = self.bundle.join(".cryo-update.json");
        std::fs::write(&file, &resources.value).map_err(|source| TaskError::Os {
            what: format!("write {}", file.display()),
            source,
        })?;
        let result = self.cryo.run(
            "update",
            &["--resources".into(), file.clone().into(), self.id_arg()],
            CommandIo::Captured,
            COMMAND_TIMEOUT,
        );
        let _ = std::fs::remove_file(&file);
        result
            .map(|_| ())
            .map_err(cryo_failed("OCI runtime update failed"))
    }

    /// The pids of the container (`cryo ps`), each with its exec id if it is an exec.
    pub fn pids(&self) -> Result<Vec<(u32, Option<String>)>, TaskError> {
        let output = self
            .cryo
            .run(
                "ps",
                &["--format".into(), "json".into(), self.id_arg()],
                CommandIo::Captured,
                COMMAND_TIMEOUT,
            )
            .map_err(cryo_failed("OCI runtime ps failed"))?;
        let pids: Vec<u32> = serde_json::from_slice(&output.stdout).map_err(|e| {
            TaskError::Internal(format!("cryo ps printed no JSON list of pids: {e}"))
        })?;
        let execs: HashMap<u32, String> = locked(&self.execs)
            .iter()
            .filter_map(|(id, e)| {
                let pid = u32::try_from(e.process.snapshot().0).ok()?;
                Some((pid, id.clone()))
            })
            .collect();
        Ok(pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned()))
            .collect())
    }

    /// The container's cgroup metrics.
    pub fn stats(&self) -> Result<Any, TaskError> {
        let cgroup = locked(&self.cgroup).clone();
        let cgroup = cgroup.ok_or_else(|| stats::StatsError::NoCgroup(self.id.clone()))?;
        Ok(stats::metrics(&cgroup)?)
    }

    /// Delete the init (the whole task) or an exec record; returns pid and exit.
    pub fn delete(&self, exec_id: &str) -> Result<(i32, Exit), TaskError> {
        if !exec_id.is_empty() {
            return self.delete_exec(exec_id);
        }
        let state = self.init.lock();
        if matches!(state.phase, Phase::Running | Phase::Paused) {
            return Err(TaskError::FailedPrecondition(format!(
                "cannot delete task {}: it is running (kill it first)",
                self.id
            )));
        }
        let (pid, phase) = (state.pid, state.phase);
        let exit = state.exit.unwrap_or(Exit {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        let io = state.io.clone();
        drop(state);
        if pid > 0 {
            self.tracker.unwatch(pid);
        }
        let never_restored = locked(&self.pending_restore).take().is_some();
        if !never_restored {
            let mut args: Vec<OsString> = Vec::new();
            if phase == Phase::Created {
                args.push("--force".into());
            }
            args.push(self.id_arg());
            match self
                .cryo
                .run("delete", &args, CommandIo::Captured, COMMAND_TIMEOUT)
            {
                Ok(_) => {}
                Err(e) if e.container_gone() => {}
                Err(e) => return Err(cryo_failed("OCI runtime delete failed")(e)),
            }
        }
        io.drain();
        for entry in locked(&self.execs).drain().map(|(_, e)| e) {
            entry.process.io().drain();
        }
        if let Some(target) = locked(&self.rootfs).take() {
            rootfs::unmount(&target).map_err(TaskError::Internal)?;
        }
        Ok((pid, exit))
    }

    fn delete_exec(&self, exec_id: &str) -> Result<(i32, Exit), TaskError> {
        let process = self.process(exec_id)?;
        let (pid, phase, exit) = process.snapshot();
        if phase == Phase::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "cannot delete process {exec_id} of container {}: it is running",
                self.id
            )));
        }
        process.io().drain();
        locked(&self.execs).remove(exec_id);
        if pid > 0 {
            self.tracker.unwatch(pid);
        }
        let _ = std::fs::remove_file(self.bundle.join(format!("{}.pid", safe_name(exec_id))));
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: std::time::SystemTime::now(),
        });
        Ok((pid, exit))
    }
}

/// What a process's stdio needs around the cryo call that starts it: a console socket for a
/// terminal, else pipes.
enum StdioLauncher {
    Console(ConsoleSocket),
    Pipes(Pipes),
    Nothing,
}

impl StdioLauncher {
    /// Prepare; `pipes` made earlier (a restore's, at create) are used when given.
    fn prepare(
        stdio: &StdioPaths,
        options: &ShimOptions,
        pipes: Option<(Pipes, CommandIo)>,
    ) -> Result<(Self, CommandIo), TaskError> {
        let none = || CommandIo::Passed {
            stdin: None,
            stdout: None,
            stderr: None,
        };
        if stdio.terminal {
            return Ok((Self::Console(ConsoleSocket::new()?), none()));
        }
        let (pipes, io) = match pipes {
            Some(made) => made,
            None => make_pipes(stdio, options.io_uid, options.io_gid)?,
        };
        let empty = stdio.stdin.is_empty() && stdio.stdout.is_empty() && stdio.stderr.is_empty();
        if empty {
            return Ok((Self::Nothing, io));
        }
        Ok((Self::Pipes(pipes), io))
    }

    fn console_socket(&self) -> Option<&Path> {
        match self {
            Self::Console(socket) => Some(socket.path()),
            _ => None,
        }
    }

    /// After cryo started the process: connect its stdio to containerd's.
    fn finish(self, stdio: &StdioPaths) -> Result<ProcessIo, TaskError> {
        Ok(match self {
            Self::Console(socket) => ProcessIo::copy_console(stdio, socket)?,
            Self::Pipes(pipes) => ProcessIo::copy_pipes(stdio, pipes)?,
            Self::Nothing => ProcessIo::none(),
        })
    }
}

/// The pid cryo wrote.
fn read_pid(path: &Path) -> Result<i32, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Os {
        what: format!("read the pid file {}", path.display()),
        source,
    })?;
    text.trim()
        .parse()
        .ok()
        .filter(|pid: &i32| *pid > 0)
        .ok_or_else(|| TaskError::Internal(format!("pid file {} holds {text:?}", path.display())))
}

/// An exec id as a file name (containerd's ids are already safe; this keeps a stray `/` out).
fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The spec has no pid namespace of its own (it shares the host's or joins one by path).
fn shares_host_pid_namespace(bundle: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(bundle.join("config.json")) else {
        return false;
    };
    let Ok(spec) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let own_pid_namespace = spec["linux"]["namespaces"].as_array().is_some_and(|list| {
        list.iter()
            .any(|ns| ns["type"] == "pid" && ns["path"].as_str().unwrap_or("").is_empty())
    });
    !own_pid_namespace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_ids_stay_file_names() {
        assert_eq!(safe_name("e2e-12-345"), "e2e-12-345");
        assert_eq!(safe_name("../x/y"), ".._x_y");
    }

    #[test]
    fn the_pid_namespace_decides_kill_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write =
            |spec: &str| std::fs::write(dir.path().join("config.json"), spec).expect("write");
        write(r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#);
        assert!(!shares_host_pid_namespace(dir.path()));
        write(r#"{"linux":{"namespaces":[{"type":"mount"}]}}"#);
        assert!(shares_host_pid_namespace(dir.path()));
        write(r#"{"linux":{"namespaces":[{"type":"pid","path":"/proc/1/ns/pid"}]}}"#);
        assert!(shares_host_pid_namespace(dir.path()));
    }

    #[test]
    fn pid_files_must_hold_a_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.pid");
        std::fs::write(&path, "4242").expect("write");
        assert_eq!(read_pid(&path).expect("pid"), 4242);
        std::fs::write(&path, "").expect("write");
        assert!(read_pid(&path).is_err());
        assert!(read_pid(&dir.path().join("absent")).is_err());
    }
}
