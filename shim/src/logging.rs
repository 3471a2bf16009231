//! Log lines in the formats runc's callers parse: containerd reads
//! `{"level":"error","msg":"…","time":"…"}` lines from `--log`, humans read the text form.
//!
//! One sink for everything, as runc's logger: cryo's own messages ([`log`]) and the events the
//! libraries emit through `tracing` (libcontainer's, libcgroups', cryo's own crates'). Lines go
//! to the `--log` file when one is given, else to stderr. Warnings and errors always; debug lines
//! with `--debug`. The libraries' informational chatter only with `--debug` too: callers read
//! the runtime's stderr, and runc's is quiet unless something is wrong.
//!
//! The log file is kept on a high-numbered, close-on-exec descriptor: libcontainer's forked
//! container processes inherit it until they exec, and it must stay out of the range a caller
//! passes on with `--preserve-fds`. Lines without `--log` go to fd 2 itself, not to a copy: a
//! container process waiting for `start` would hold a copy open, and a caller reading cryo's
//! stderr to its end (as `$(cryo create …)` does) would wait for the container's start.

use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::cli::LogFormat;

struct Sink {
    file: Option<std::fs::File>,
    format: LogFormat,
    debug: bool,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Open the `--log` file (append), remember the format, and route the libraries' `tracing`
/// events into the same sink.
pub fn init(log: Option<&Path>, format: LogFormat, debug: bool) {
    let file = log.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| {
                let _ = writeln!(
                    std::io::stderr(),
                    "cryo: cannot open log file {}: {e}",
                    p.display()
                );
            })
            .ok()
            .and_then(|f| set_aside(f.as_raw_fd()))
    });
    if let Ok(mut s) = SINK.lock() {
        *s = Some(Sink {
            file,
            format,
            debug,
        });
    }
    let max = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    let subscriber = tracing_subscriber::registry()
        .with(ToSink.with_filter(tracing_subscriber::filter::LevelFilter::from_level(max)));
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// A close-on-exec copy of `fd` numbered 64 or above (the original is closed), out of the way
/// of the descriptors a caller passes on to the container (`--preserve-fds` counts from 3).
fn set_aside(fd: RawFd) -> Option<std::fs::File> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor and touches no memory.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64) };
    // SAFETY: a descriptor fcntl just created, owned by nothing else.
    (copy >= 0).then(|| unsafe { std::fs::File::from_raw_fd(copy) })
}

/// runc's level names.
fn level_name(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warning",
        tracing::Level::INFO => "info",
        _ => "debug",
    }
}

/// A `tracing` layer that writes each event as one line through [`log`].
struct ToSink;

impl<S: tracing::Subscriber> Layer<S> for ToSink {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut text = EventText::default();
        event.record(&mut text);
        let target = event.metadata().target();
        let level = if routine(target, &text.0) {
            "debug"
        } else {
            level_name(event.metadata().level())
        };
        log(level, &format!("{target}: {}", text.0));
    }
}

/// Library warnings about how the host is, not about anything going wrong, logged at debug
/// level: libcgroups warns about every v1 controller the host does not mount, each time it
/// opens a container's cgroups.
/// And libcontainer's note that it cannot raise ambient capabilities the process has no
/// inheritable ones for (runc's default spec asks for both sets and the kernel refuses; runc
/// says nothing either). It is logged in the container's process, per capability.
/// And libcontainer's error when a container's cgroups are still busy at delete: cryo retries
/// (see `delete_settling`) and reports the last failure itself.
fn routine(target: &str, text: &str) -> bool {
    (target.starts_with("libcgroups::v1") && text.ends_with("not supported on this system"))
        || (target.starts_with("libcontainer")
            && text.starts_with("can't raise ambient capability"))
        || (target.starts_with("libcontainer::container::container_delete")
            && text.starts_with("failed to remove cgroup"))
}

/// An event's message followed by its other fields as `name=value`.
#[derive(Default)]
struct EventText(String);

impl Visit for EventText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            if !rest.is_empty() {
                self.0.push(' ');
                self.0.push_str(&rest);
            }
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
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

/// Log at `level` (`debug`, `info`, `warning`, `error`): to the `--log` file if there is one,
/// else to stderr; debug lines only with `--debug`.
pub fn log(level: &str, msg: &str) {
    let Ok(mut guard) = SINK.lock() else { return };
    let Some(sink) = guard.as_mut() else {
        let _ = writeln!(std::io::stderr(), "{}", line(LogFormat::Text, level, msg));
        return;
    };
    if level == "debug" && !sink.debug {
        return;
    }
    let text = line(sink.format, level, msg);
    match sink.file.as_mut() {
        Some(f) => {
            let _ = writeln!(f, "{text}");
        }
        // A closed stderr must not end cryo (eprintln! would panic).
        None => {
            let _ = writeln!(std::io::stderr(), "{text}");
        }
    }
}

/// The error a verb ends with: logged like any line, and (as runc does) also printed plainly
/// to stderr, which is where podman and humans look for it.
pub fn fatal(msg: &str) {
    log("error", msg);
    let _ = writeln!(std::io::stderr(), "cryo: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_quote_the_message_as_runc_does() {
        let l = line(LogFormat::Text, "warning", "could not \"thaw\"");
        assert!(l.starts_with("time=\""), "{l}");
        assert!(
            l.ends_with(r#" level=warning msg="could not \"thaw\"""#),
            "{l}"
        );
    }

    #[test]
    fn json_lines_carry_level_msg_and_time() {
        let v: serde_json::Value =
            serde_json::from_str(&line(LogFormat::Json, "error", "boom")).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "boom");
        assert!(v["time"].is_string());
    }

    #[test]
    fn an_unmounted_v1_controller_is_no_warning() {
        assert!(routine(
            "libcgroups::v1::manager",
            "cgroup hugetlb not supported on this system"
        ));
        assert!(routine(
            "libcontainer::syscall::linux",
            "can't raise ambient capability e=.. c=CAP_KILL"
        ));
        assert!(!routine("libcgroups::v1::freezer", "could not thaw"));
    }

    #[test]
    fn an_event_reads_as_its_message_then_its_fields() {
        struct Capture(Mutex<Vec<String>>);
        impl<S: tracing::Subscriber> Layer<S> for &'static Capture {
            fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
                let mut text = EventText::default();
                event.record(&mut text);
                self.0.lock().expect("lock").push(text.0);
            }
        }
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        let subscriber = tracing_subscriber::registry().with(capture);
        tracing::subscriber::with_default(subscriber, || {
            let path = "/sys/fs/cgroup/freezer/x";
            tracing::warn!(?path, "could not thaw");
        });
        let got = capture.0.lock().expect("lock").clone();
        assert_eq!(got, [r#"could not thaw path="/sys/fs/cgroup/freezer/x""#]);
    }
}
