//! containerd's task API (`containerd.task.v2.Task`) over the shim's containers. Every call
//! finds its container and hands it the work; errors go back as gRPC statuses with cryo's
//! message and into the shim's log, which containerd copies into its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use containerd_shim::api::{
    self, CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse,
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, Empty,
    ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskIO, TaskPaused, TaskResumed,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::oci::ProcessDetails;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{error, info, ExitSignal, Task, TtrpcContext, TtrpcResult};

use crate::container::Container;
use crate::errors::TaskError;
use crate::events::EventSender;
use crate::exits::ExitTracker;
use crate::process::Phase;
use crate::timestamp;

/// The task service of one shim (one container, or a pod's containers when grouped).
pub struct TaskService {
    namespace: String,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Held across a create so that two creates of one id cannot race.
    creating: Mutex<()>,
    tracker: Arc<ExitTracker>,
    events: EventSender,
    exit: Arc<ExitSignal>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Log a failed call and turn it into the status containerd receives.
fn reply<T>(call: &str, id: &str, result: Result<T, TaskError>) -> TtrpcResult<T> {
    result.map_err(|e| {
        error!("{call} {id}: {e}");
        e.into()
    })
}

fn any_of(message: &dyn MessageDyn) -> Result<Any, TaskError> {
    let mut any = Any::new();
    any.type_url = message.descriptor_dyn().full_name().to_string();
    any.value = message
        .write_to_bytes_dyn()
        .map_err(|e| TaskError::Internal(format!("encode {}: {e}", any.type_url)))?;
    Ok(any)
}

fn status_of(phase: Phase) -> Status {
    match phase {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Paused => Status::PAUSED,
        Phase::Stopped => Status::STOPPED,
    }
}

impl TaskService {
    /// The service; `tracker` already routes exits, `events` publishes.
    pub fn new(
        namespace: String,
        tracker: Arc<ExitTracker>,
        events: EventSender,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            namespace,
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
            tracker,
            events,
            exit,
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        locked(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    fn create_task(&self, req: &CreateTaskRequest) -> Result<u32, TaskError> {
        let _creating = locked(&self.creating);
        if locked(&self.containers).contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        let container = Container::create(
            req,
            &self.namespace,
            self.tracker.clone(),
            self.events.clone(),
        )?;
        let pid = u32::try_from(container.pid()).unwrap_or(0);
        locked(&self.containers).insert(req.id.clone(), container);
        self.events.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            },
        );
        Ok(pid)
    }

    fn state(&self, req: &StateRequest) -> Result<StateResponse, TaskError> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let (pid, _, exit) = process.snapshot();
        let phase = container.phase_of(&process);
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid: u32::try_from(pid).unwrap_or(0),
            status: status_of(phase).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn delete_task(&self, req: &DeleteRequest) -> Result<DeleteResponse, TaskError> {
        let container = self.container(&req.id)?;
        let (pid, exit) = container.delete(&req.exec_id)?;
        let pid = u32::try_from(pid).unwrap_or(0);
        if req.exec_id.is_empty() {
            locked(&self.containers).remove(&req.id);
            self.events.send(
                topics::TASK_DELETE_EVENT_TOPIC,
                TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    id: req.id.clone(),
                    ..Default::default()
                },
            );
        }
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, req: &PidsRequest) -> Result<PidsResponse, TaskError> {
        let container = self.container(&req.id)?;
        let mut processes = Vec::new();
        for (pid, exec_id) in container.pids()? {
            let info = match exec_id {
                Some(exec_id) => Some(any_of(&ProcessDetails {
                    exec_id,
                    ..Default::default()
                })?),
                None => None,
            };
            processes.push(ProcessInfo {
                pid,
                info: info.into(),
                ..Default::default()
            });
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }
}

impl Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        info!(
            "create {} (bundle {}{})",
            req.id,
            req.bundle,
            if req.checkpoint.is_empty() {
                String::new()
            } else {
                format!(", restore from {}", req.checkpoint)
            }
        );
        let pid = reply("create", &req.id, self.create_task(&req))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let result = self.container(&req.id).and_then(|c| c.start(&req.exec_id));
        let pid = reply("start", &req.id, result)?;
        Ok(StartResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        reply("state", &req.id, TaskService::state(self, &req))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        reply("delete", &req.id, self.delete_task(&req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        reply("pids", &req.id, TaskService::pids(self, &req))
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let result = self.container(&req.id).and_then(|c| c.pause());
        reply("pause", &req.id, result)?;
        self.events.send(
            topics::TASK_PAUSED_EVENT_TOPIC,
            TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let result = self.container(&req.id).and_then(|c| c.resume());
        reply("resume", &req.id, result)?;
        self.events.send(
            topics::TASK_RESUMED_EVENT_TOPIC,
            TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            },
        );
        Ok(Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: CheckpointTaskRequest) -> TtrpcResult<Empty> {
        info!("checkpoint {} into {}", req.id, req.path);
        let result = self.container(&req.id).and_then(|c| c.checkpoint(&req));
        reply("checkpoint", &req.id, result)?;
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.kill(&req.exec_id, req.signal, req.all));
        reply("kill", &req.id, result)?;
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let result = self.container(&req.id).and_then(|c| c.add_exec(&req));
        reply("exec", &req.id, result)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.process(&req.exec_id))
            .and_then(|p| Ok(p.io().resize(req.width, req.height)?));
        reply("resize", &req.id, result)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.process(&req.exec_id));
        let process = reply("close io", &req.id, result)?;
        if req.stdin {
            process.io().close_stdin();
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.update(req.resources.as_ref()));
        reply("update", &req.id, result)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let result = self
            .container(&req.id)
            .and_then(|c| c.process(&req.exec_id));
        let process = reply("wait", &req.id, result)?;
        let exit = process.wait();
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let result = self.container(&req.id).and_then(|c| c.stats());
        let stats = reply("stats", &req.id, result)?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.pid()).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: u32::try_from(task_pid).unwrap_or(0),
            version: format!("cryo {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // A grouped shim serves other containers still.
        if locked(&self.containers).is_empty() {
            info!("shutdown: no container left");
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
