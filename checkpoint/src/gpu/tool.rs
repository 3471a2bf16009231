//! Running NVIDIA's `cuda-checkpoint` from cryo itself: the `--help` check, and bringing a
//! process's CUDA state back after a failed checkpoint. Every run has a deadline: the tool
//! waits on the process it acts on, which may be stuck or frozen.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Problem;

/// How long `--help` may take.
const HELP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one action may take (a restore copies the device memory back).
const ACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// A finished run of the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToolRun {
    /// Exited with status 0.
    pub(super) success: bool,
    /// stdout and stderr, trimmed.
    pub(super) output: String,
}

/// Run `tool args…` for at most `timeout`; killed (and said so) when it takes longer.
pub(super) fn run(tool: &Path, args: &[&str], timeout: Duration) -> Result<ToolRun, String> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {}: {e}", tool.display())),
        }
    };
    let mut output = String::new();
    // The pipes close as the tool exits, unless a process it started still holds them: give
    // the readers a moment, and leave one that does not finish behind.
    let until = Instant::now() + Duration::from_secs(1);
    for r in readers {
        while !r.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if r.is_finished() {
            if let Ok(buf) = r.join() {
                output.push_str(&String::from_utf8_lossy(&buf));
            }
        }
    }
    let output = output.trim().to_string();
    match status {
        Some(s) => Ok(ToolRun {
            success: s.success(),
            output,
        }),
        None => Err(format!(
            "{} {} did not finish within {} s and was killed",
            tool.display(),
            args.join(" "),
            timeout.as_secs()
        )),
    }
}

/// The check CRIU's plugin makes: `--help` runs and offers `--action`.
pub(super) fn check_help(tool: &Path) -> Result<(), Problem> {
    let unusable = |detail: String| Problem::ToolUnusable {
        path: tool.to_path_buf(),
        detail,
    };
    let run = run(tool, &["--help"], HELP_TIMEOUT).map_err(unusable)?;
    if !run.success {
        return Err(unusable(format!(
            "`{TOOL} --help` failed: {}",
            first_lines(&run.output)
        )));
    }
    if !run.output.contains("--action") {
        return Err(unusable(format!(
            "it offers no --action (lock/checkpoint/restore/unlock), which CRIU's CUDA plugin \
             drives: use the cuda-checkpoint of a driver >= 555 (`--help` said: {})",
            first_lines(&run.output)
        )));
    }
    Ok(())
}

const TOOL: &str = super::TOOL_NAME;

fn first_lines(s: &str) -> String {
    let lines: Vec<&str> = s.lines().take(3).collect();
    if lines.is_empty() {
        "nothing".into()
    } else {
        lines.join(" / ")
    }
}

/// For each pid with a CUDA restore thread: `checkpointed` → restore + unlock, `locked` →
/// unlock. Processes without CUDA, or running, are left alone.
pub(super) fn recover(tool: &Path, pids: &[i32]) -> Vec<String> {
    let mut notes = Vec::new();
    for &pid in pids {
        let p = pid.to_string();
        // As CRIU's plugin: only a process with a restore thread has CUDA state to act on.
        let Ok(tid) = run(tool, &["--get-restore-tid", "--pid", &p], ACTION_TIMEOUT) else {
            continue;
        };
        if !tid.success {
            continue;
        }
        let state = match run(tool, &["--get-state", "--pid", &p], ACTION_TIMEOUT) {
            Ok(r) if r.success => r.output,
            Ok(r) => {
                notes.push(format!(
                    "pid {pid}: {TOOL} --get-state failed: {}",
                    first_lines(&r.output)
                ));
                continue;
            }
            Err(e) => {
                notes.push(format!("pid {pid}: {e}"));
                continue;
            }
        };
        let state = state
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let actions: &[&str] = match state.as_str() {
            "checkpointed" => &["restore", "unlock"],
            "locked" => &["unlock"],
            _ => continue,
        };
        let failed = actions.iter().find_map(|action| {
            match run(tool, &["--action", action, "--pid", &p], ACTION_TIMEOUT) {
                Ok(r) if r.success => None,
                Ok(r) => Some(format!("{action} failed: {}", first_lines(&r.output))),
                Err(e) => Some(format!("{action} failed: {e}")),
            }
        });
        notes.push(match failed {
            None => format!(
                "pid {pid}: its CUDA state was {state}, now running again ({TOOL} {})",
                actions.join(" + ")
            ),
            Some(e) => format!("pid {pid}: its CUDA state was {state}; {e}"),
        });
    }
    notes
}
