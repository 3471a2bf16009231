//! What CRIU's CUDA plugin wrote into CRIU's log (`dump.log`, `restore.log`).
//!
//! The plugin logs one line as each of its steps starts, per process: `pausing devices on pid
//! N` (lock), `Checkpointing CUDA devices on pid N restore_tid T` (device memory to host) and
//! `resuming devices on pid N` (restore + unlock: at the end of a dump, and at restore). It
//! logs nothing when a step succeeds, so a step lasts until CRIU's next timestamped line
//! (cryo asks CRIU for log level 4, which has timestamps); the plugin's own `Restore thread
//! pid …` line, printed as the resume starts, is part of the step. Failures are `Error (…):
//! cuda_plugin: …` lines (except the one for a process without CUDA), and CRIU reports a dump
//! failure itself but only logs a failed resume at restore: [`PluginLog::errors`] is how cryo
//! notices that one.

use std::path::Path;

use serde::{Deserialize, Serialize};

const PREFIX: &str = "cuda_plugin: ";
const LOCK: &str = "pausing devices on pid ";
const CHECKPOINT: &str = "Checkpointing CUDA devices on pid ";
const RESUME: &str = "resuming devices on pid ";
/// The plugin's error line for a process without CUDA state.
const NO_CUDA: &str = "to retrieve restore tid";
/// Logged by the plugin as a resume starts: not the end of the step.
const RESUME_DETAIL: &str = "Restore thread pid ";

/// The plugin's steps, summed over the processes it acted on, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PluginTimings {
    /// `lock`: new CUDA calls blocked, submitted work drained (the container still runs).
    pub lock_ms: f64,
    /// `checkpoint`: device memory copied to host memory, the GPU released.
    pub checkpoint_ms: f64,
    /// `restore` + `unlock`: device memory copied back, CUDA calls unblocked (at the end of a
    /// dump that leaves the container running, or failed; and at restore).
    pub resume_ms: f64,
}

/// The plugin's part of one CRIU log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PluginLog {
    /// The plugin was loaded and enabled (`initialized: cuda_plugin stage …`).
    pub initialized: bool,
    /// Why the plugin disabled itself, if it said so.
    pub disabled: Option<String>,
    /// The processes it locked or resumed, in order of first appearance.
    pub cuda_pids: Vec<i32>,
    /// Its steps' durations (`None` when no step was seen or the log has no timestamps).
    pub timings: Option<PluginTimings>,
    /// Its error lines, as logged.
    pub errors: Vec<String>,
}

impl PluginLog {
    /// Parse `log` (an unreadable log has nothing of the plugin's).
    pub fn read(log: &Path) -> Self {
        std::fs::read_to_string(log)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// Parse a log's text.
    pub fn parse(text: &str) -> Self {
        let lines: Vec<(Option<f64>, &str)> = text.lines().map(split_timestamp).collect();
        let mut out = PluginLog::default();
        let mut timings = PluginTimings::default();
        let mut timed = false;
        for (i, &(ts, msg)) in lines.iter().enumerate() {
            let Some(at) = msg.find(PREFIX) else {
                continue;
            };
            let body = &msg[at + PREFIX.len()..];
            if msg.starts_with("Error") {
                // The plugin asks every process for its CUDA restore thread and logs an error
                // for each that has none: a process without CUDA, not a failure.
                if !body.contains(NO_CUDA) {
                    out.errors.push(msg.to_string());
                }
                continue;
            }
            if body.starts_with("initialized: ") {
                out.initialized = true;
            } else if body.contains("CUDA plugin is disabled")
                || body.contains("Disabling CUDA plugin")
                || body.starts_with("check that ")
            {
                out.disabled = Some(body.to_string());
            }
            let (slot, pid_text) = if let Some(rest) = body.strip_prefix(LOCK) {
                (&mut timings.lock_ms, rest)
            } else if let Some(rest) = body.strip_prefix(CHECKPOINT) {
                (&mut timings.checkpoint_ms, rest)
            } else if let Some(rest) = body.strip_prefix(RESUME) {
                (&mut timings.resume_ms, rest)
            } else {
                continue;
            };
            if let Some(pid) = pid_text
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                if !out.cuda_pids.contains(&pid) {
                    out.cuda_pids.push(pid);
                }
            }
            if let (Some(start), Some(end)) = (ts, step_end(&lines[i + 1..])) {
                *slot += ((end - start) * 1000.0).max(0.0);
                timed = true;
            }
        }
        out.timings = timed.then_some(timings);
        out
    }
}

/// The timestamp of the first line after a step's start that is not part of the step.
fn step_end(rest: &[(Option<f64>, &str)]) -> Option<f64> {
    rest.iter()
        .filter(|(ts, _)| ts.is_some())
        .find(|(_, msg)| !msg.contains(RESUME_DETAIL))
        .and_then(|(ts, _)| *ts)
}

/// `(00.123456) text` → (0.123456 s, "text"). CRIU prints `(%02u.%06u)`; past 99 s the last
/// digit is overwritten, and such a line counts as untimed.
fn split_timestamp(line: &str) -> (Option<f64>, &str) {
    let parse = || -> Option<(f64, &str)> {
        let rest = line.strip_prefix('(')?;
        let close = rest.find(')')?;
        let (secs, frac) = rest[..close].trim().split_once('.')?;
        if frac.len() != 6 {
            return None;
        }
        let t = secs.parse::<u64>().ok()? as f64 + frac.parse::<u64>().ok()? as f64 / 1e6;
        Some((t, rest[close + 1..].trim_start()))
    };
    match parse() {
        Some((t, msg)) => (Some(t), msg),
        None => (None, line),
    }
}
