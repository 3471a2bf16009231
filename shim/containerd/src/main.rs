//! `containerd-shim-cryo-v1`: cryo's containerd shim (runtime type `io.containerd.cryo.v1`).
//! It serves containerd's task API v2 as containerd's runc shim does, running the `cryo`
//! binary for every operation, and adds cryo's checkpoint settings per runtime (see
//! docs/ARCHITECTURE.md, "containerd shim").

mod checkpoint;
mod container;
mod cryo;
mod errors;
mod events;
mod exits;
mod io;
mod oom;
mod options;
mod process;
mod rootfs;
mod service;
mod shim;
mod stats;

use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::Config;

/// The runtime type containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.cryo.v1";

/// A protobuf timestamp.
pub(crate) fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args
        .iter()
        .skip(1)
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!(
            "containerd-shim-cryo-v1 (cryo {})",
            env!("CARGO_PKG_VERSION")
        );
        println!("runtime type: {RUNTIME_ID}, task API: containerd.task.v2");
        return;
    }
    let config = Config {
        no_setup_logger: false,
        default_log_level: "info".to_string(),
        no_reaper: false,
        no_sub_reaper: false,
    };
    containerd_shim::run::<shim::CryoShim>(RUNTIME_ID, Some(config));
}
