//! Log lines in the formats runc's callers parse: containerd reads
//! `{"level":"error","msg":"…","time":"…"}` lines from `--log`, humans read the text form.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::cli::LogFormat;

struct Sink {
    file: Option<std::fs::File>,
    format: LogFormat,
    debug: bool,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Open the `--log` file (append) and remember the format.
pub fn init(log: Option<&Path>, format: LogFormat, debug: bool) {
    let file = log.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    if let Ok(mut s) = SINK.lock() {
        *s = Some(Sink {
            file,
            format,
            debug,
        });
    }
    if debug {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .try_init();
    }
}

fn line(format: LogFormat, level: &str, msg: &str) -> String {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    match format {
        LogFormat::Json => {
            serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
        }
        LogFormat::Text => format!("time={time:?} level={level} msg={msg:?}"),
    }
}

/// Log at `level`; errors and warnings also go to stderr.
pub fn log(level: &str, msg: &str) {
    let Ok(mut guard) = SINK.lock() else { return };
    let (format, debug) = guard
        .as_ref()
        .map(|s| (s.format, s.debug))
        .unwrap_or((LogFormat::Text, false));
    if level == "debug" && !debug {
        return;
    }
    if let Some(Sink { file: Some(f), .. }) = guard.as_mut() {
        let _ = writeln!(f, "{}", line(format, level, msg));
    }
    // A closed stderr must not end cryo (eprintln! would panic).
    let mut err = std::io::stderr();
    if level == "error" || level == "warning" {
        let _ = writeln!(err, "cryo: {msg}");
    } else if level == "info" || debug {
        let _ = writeln!(err, "{}", line(LogFormat::Text, level, msg));
    }
}
