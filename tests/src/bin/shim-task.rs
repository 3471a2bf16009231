//! `shim-task`: one task API call straight to a task's shim, as containerd would forward it.
//! The client flows use it for what ctr 1.6 cannot send to a runtime named
//! `io.containerd.cryo.v1`: checkpoint options (`ctr t checkpoint` passes `--exit`,
//! `--image-path` and `--work-path` only to runtimes named `io.containerd.runc.v1`/`v2`) and
//! resource updates (ctr 1.6 has no `tasks update`).
//!
//! ```text
//! shim-task checkpoint --bundle DIR --id ID --image-path DIR [--work-path DIR] [--exit]
//! shim-task update --bundle DIR --id ID --memory-limit BYTES
//! ```
//! The shim's address is read from `<bundle>/address`. Exit status 0 when the shim answered
//! OK; otherwise its error on stderr and 1.

use std::path::PathBuf;
use std::process::ExitCode;

use containerd_shim::api::{CheckpointTaskRequest, UpdateTaskRequest};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::shim_sync::{Client, TaskClient};
use containerd_shim::protos::ttrpc::context;

/// What a call may take (a checkpoint moves memory).
const CALL_TIMEOUT_NS: i64 = 120_000_000_000;

enum Call {
    Checkpoint(CheckpointOptions),
    Update { memory_limit: i64 },
}

struct Args {
    bundle: PathBuf,
    id: String,
    call: Call,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let verb = args.next().ok_or("give a call: checkpoint or update")?;
    let (mut bundle, mut id, mut memory_limit) = (None, None, None);
    let mut options = CheckpointOptions::default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--bundle" => bundle = Some(PathBuf::from(value("--bundle")?)),
            "--id" => id = Some(value("--id")?),
            "--image-path" => options.image_path = value("--image-path")?,
            "--work-path" => options.work_path = value("--work-path")?,
            "--exit" => options.exit = true,
            "--memory-limit" => {
                let v = value("--memory-limit")?;
                memory_limit = Some(v.parse().map_err(|e| format!("--memory-limit {v}: {e}"))?);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let call = match verb.as_str() {
        "checkpoint" if options.image_path.is_empty() => {
            return Err("checkpoint: --image-path is required".into())
        }
        "checkpoint" => Call::Checkpoint(options),
        "update" => Call::Update {
            memory_limit: memory_limit.ok_or("update: --memory-limit is required")?,
        },
        other => return Err(format!("unknown call {other:?}: checkpoint or update")),
    };
    Ok(Args {
        bundle: bundle.ok_or("--bundle is required")?,
        id: id.ok_or("--id is required")?,
        call,
    })
}

fn any(type_url: &str, value: Vec<u8>) -> Any {
    let mut any = Any::new();
    any.type_url = type_url.into();
    any.value = value;
    any
}

fn run(args: Args) -> Result<(), String> {
    let address_file = args.bundle.join("address");
    let address = std::fs::read_to_string(&address_file)
        .map_err(|e| format!("read {}: {e}", address_file.display()))?;
    let client = Client::connect(address.trim())
        .map_err(|e| format!("connect to the shim at {}: {e}", address.trim()))?;
    let task = TaskClient::new(client);
    let ctx = || context::with_timeout(CALL_TIMEOUT_NS);
    match args.call {
        Call::Checkpoint(options) => {
            let value = options
                .write_to_bytes()
                .map_err(|e| format!("encode the options: {e}"))?;
            let request = CheckpointTaskRequest {
                id: args.id,
                path: options.image_path.clone(),
                options: Some(any("containerd.runc.v1.CheckpointOptions", value)).into(),
                ..Default::default()
            };
            task.checkpoint(ctx(), &request)
                .map_err(|e| format!("checkpoint: {e}"))?;
        }
        Call::Update { memory_limit } => {
            // containerd sends the OCI LinuxResources as JSON under this type URL.
            let resources = format!("{{\"memory\":{{\"limit\":{memory_limit}}}}}");
            let request = UpdateTaskRequest {
                id: args.id,
                resources: Some(any(
                    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                    resources.into_bytes(),
                ))
                .into(),
                ..Default::default()
            };
            task.update(ctx(), &request)
                .map_err(|e| format!("update: {e}"))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shim-task: {e}");
            ExitCode::FAILURE
        }
    }
}
