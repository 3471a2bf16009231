//! Errors of task calls and how containerd receives them: a gRPC status whose code containerd
//! maps onto its error kinds (not found, already exists, failed precondition, …) and whose
//! message carries cryo's own error.

use std::io;
use std::path::PathBuf;

use containerd_shim::protos::ttrpc::{self, Code};

use crate::cryo::CryoError;
use crate::io::IoError;
use crate::options::OptionsError;
use crate::rootfs::RootfsError;
use crate::stats::StatsError;

/// A task call failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process; or the process already finished.
    #[error("{0}: not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// Not in this state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The runtime's options.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The rootfs mounts.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The process's stdio.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Stats.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// A cryo call.
    #[error("{what}: {source}")]
    Cryo {
        /// What the call was for, in the runc shim's words ("OCI runtime create failed").
        what: &'static str,
        /// cryo's failure.
        source: CryoError,
    },
    /// A checkpoint failed; the task is as it was.
    #[error("checkpoint failed, the task keeps running: {source}{}", match dump_log {
        Some(p) => format!(" (CRIU's log: {})", p.display()),
        None => String::new(),
    })]
    Checkpoint {
        /// cryo's failure.
        source: CryoError,
        /// CRIU's dump.log, copied into the bundle.
        dump_log: Option<PathBuf>,
    },
    /// A system call of the shim.
    #[error("{what}: {source}")]
    Os {
        /// What, with the path.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl TaskError {
    /// The gRPC code containerd maps to its error kind.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::InvalidArgument(_) | Self::Options(_) => Code::INVALID_ARGUMENT,
            Self::Stats(StatsError::NoCgroup(_)) => Code::NOT_FOUND,
            Self::Cryo { source, .. } if source.container_gone() => Code::NOT_FOUND,
            _ => Code::UNKNOWN,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
