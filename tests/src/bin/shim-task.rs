//! `shim-checkpoint`: sends one CheckpointTask request straight to a task's shim, with runc's
//! checkpoint options, as a containerd client does for a runtime named
//! `io.containerd.runc.v1`/`v2`. The client flows use it for `--exit`: ctr 1.6 passes `--exit`,
//! `--image-path` and `--work-path` only to runtimes of those names, so a `ctr t checkpoint
//! --exit` of an `io.containerd.cryo.v1` task reaches the shim without them.
//!
//! ```text
//! shim-checkpoint --bundle DIR --id ID --image-path DIR [--work-path DIR] [--exit]
//! ```
//! The shim's address is read from `<bundle>/address`. Exit status 0 when the shim answered
//! OK; otherwise its error on stderr and 1.

use std::path::PathBuf;
use std::process::ExitCode;

use containerd_shim::api::CheckpointTaskRequest;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;
use containerd_shim::protos::shim_sync::{Client, TaskClient};
use containerd_shim::protos::ttrpc::context;

struct Args {
    bundle: PathBuf,
    id: String,
    options: CheckpointOptions,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut bundle, mut id) = (None, None);
    let mut options = CheckpointOptions::default();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--bundle" => bundle = Some(PathBuf::from(value("--bundle")?)),
            "--id" => id = Some(value("--id")?),
            "--image-path" => options.image_path = value("--image-path")?,
            "--work-path" => options.work_path = value("--work-path")?,
            "--exit" => options.exit = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let bundle = bundle.ok_or("--bundle is required")?;
    let id = id.ok_or("--id is required")?;
    if options.image_path.is_empty() {
        return Err("--image-path is required".into());
    }
    Ok(Args {
        bundle,
        id,
        options,
    })
}

fn run(args: Args) -> Result<(), String> {
    let address_file = args.bundle.join("address");
    let address = std::fs::read_to_string(&address_file)
        .map_err(|e| format!("read {}: {e}", address_file.display()))?;
    let client = Client::connect(address.trim())
        .map_err(|e| format!("connect to the shim at {}: {e}", address.trim()))?;
    let mut options = Any::new();
    options.type_url = "containerd.runc.v1.CheckpointOptions".into();
    options.value = args
        .options
        .write_to_bytes()
        .map_err(|e| format!("encode the options: {e}"))?;
    let request = CheckpointTaskRequest {
        id: args.id,
        path: args.options.image_path.clone(),
        options: Some(options).into(),
        ..Default::default()
    };
    TaskClient::new(client)
        .checkpoint(context::with_timeout(120_000_000_000), &request)
        .map_err(|e| format!("checkpoint: {e}"))?;
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shim-checkpoint: {e}");
            ExitCode::FAILURE
        }
    }
}
