//! The shim binary's protocol with containerd (`containerd-shim-cryo-v1 … start|delete`, then
//! the long-lived server), on containerd-shim 0.11's synchronous runtime.
//!
//! - `start` (cwd: the bundle; stdin: the runtime's options): start the server process, or
//!   reuse the one of the container's group (a CRI pod shares one shim), write `address` into
//!   the bundle and print it.
//! - the server: the task service on the socket, exits and events wired up.
//! - `delete` (after the server died): remove what is left of the container with `cryo delete
//!   --force`, unmount its rootfs, and report it killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_address;
use containerd_shim::{spawn, Config, Error as ShimError, ExitSignal, Flags, Shim, StartOpts};

use crate::cryo::{CommandIo, Cryo, COMMAND_TIMEOUT};
use crate::events::EventSender;
use crate::exits::ExitTracker;
use crate::options::ShimOptions;
use crate::rootfs;
use crate::service::TaskService;
use crate::timestamp;

/// Annotations that put containers into one shim (a CRI pod's sandbox id).
const GROUP_LABELS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];
/// How long the server waits for its last events to be published before it exits.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The shim process.
pub struct CryoShim {
    namespace: String,
    id: String,
    bundle: String,
    exit: Arc<ExitSignal>,
    events: Mutex<Option<EventSender>>,
}

fn other(message: String) -> ShimError {
    ShimError::Other(message)
}

impl Shim for CryoShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            exit: Arc::new(ExitSignal::default()),
            events: Mutex::new(None),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        let mut stdin = Vec::new();
        std::io::stdin()
            .read_to_end(&mut stdin)
            .map_err(|e| other(format!("read the runtime options from stdin: {e}")))?;
        let options = if stdin.is_empty() {
            None
        } else {
            Some(Any::parse_from_bytes(&stdin).map_err(|e| {
                other(format!(
                    "the runtime options on stdin are not a protobuf Any: {e}"
                ))
            })?)
        };
        // A bad config is reported now, when containerd starts the shim, not at create, and
        // in plain words: containerd-shim prints a returned error in its Debug form.
        let settings = ShimOptions::from_any(options.as_ref()).unwrap_or_else(|e| {
            eprintln!("containerd-shim-cryo-v1: {e}");
            std::process::exit(1)
        });
        let grouping = group_of(Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
        let (pid, address) = spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        if let Some(cgroup) = settings.shim_cgroup.as_deref() {
            containerd_shim::cgroup::add_task_to_cgroup(cgroup, pid)?;
        }
        containerd_shim::cgroup::adjust_oom_score(pid)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| other(format!("current dir: {e}")))?
        } else {
            PathBuf::from(&self.bundle)
        };
        let options = ShimOptions::load(&bundle).unwrap_or_else(|e| {
            eprintln!("{e}; using the default settings");
            ShimOptions::default()
        });
        let (tracker, _subscription) = ExitTracker::new();
        let cryo = Cryo::new(
            options.cryo.clone(),
            options.state_root(&self.namespace),
            &bundle,
            options.criu.clone(),
            options.systemd_cgroup,
            tracker,
        );
        if let Err(e) = cryo.run(
            "delete",
            &["--force".into(), self.id.clone().into()],
            CommandIo::Captured,
            COMMAND_TIMEOUT,
        ) {
            eprintln!("container {}: {e}", self.id);
        }
        if let Err(e) = rootfs::unmount(&bundle.join("rootfs")) {
            eprintln!("container {}: {e}", self.id);
        }
        let pid = std::fs::read_to_string(bundle.join("init.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(DeleteResponse {
            pid,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        let events = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(events) = events {
            events.flush(FLUSH_TIMEOUT);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (tracker, subscription) = ExitTracker::new();
        {
            let tracker = tracker.clone();
            std::thread::spawn(move || tracker.run(subscription));
        }
        let events = EventSender::start(publisher, self.namespace.clone());
        *self.events.lock().unwrap_or_else(PoisonError::into_inner) = Some(events.clone());
        TaskService::new(self.namespace.clone(), tracker, events, self.exit.clone())
    }
}

/// The group a bundle's container belongs to, from its spec's annotations.
fn group_of(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    GROUP_LABELS
        .iter()
        .find_map(|label| spec["annotations"][label].as_str())
        .filter(|g| !g.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_a_shim_by_sandbox_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .expect("write");
        assert_eq!(group_of(&config).as_deref(), Some("pod1"));
        std::fs::write(&config, r#"{"annotations":{}}"#).expect("write");
        assert_eq!(group_of(&config), None);
        assert_eq!(group_of(&dir.path().join("absent.json")), None);
    }
}
