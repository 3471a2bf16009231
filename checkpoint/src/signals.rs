//! SIGINT/SIGTERM/SIGHUP while a checkpoint holds the container frozen must not kill cryo
//! before it thaws the container: for the duration of a verb those signals only raise a flag,
//! which the engine checks between steps (it aborts and thaws at the next one).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Guards alive: only the outermost one starts with the flag down, so that a signal that
/// arrived while an outer guard lived (between two generations of `--every`) is not lost
/// when a step installs its own.
static GUARDS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn raise_flag(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// While alive, SIGINT/SIGTERM/SIGHUP set a flag instead of terminating the process.
pub struct InterruptGuard {
    previous: Vec<(Signal, SigAction)>,
}

impl InterruptGuard {
    /// Install the flag handlers.
    pub fn install() -> std::io::Result<Self> {
        if GUARDS.load(Ordering::SeqCst) == 0 {
            INTERRUPTED.store(false, Ordering::SeqCst);
        }
        // No SA_RESTART: a blocking read of CRIU's socket returns EINTR, the transport
        // retries, and the engine sees the flag as soon as CRIU's step is over.
        let action = SigAction::new(
            SigHandler::Handler(raise_flag),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for s in SIGNALS {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let old = unsafe { sigaction(s, &action) }.map_err(std::io::Error::from)?;
            previous.push((s, old));
        }
        GUARDS.fetch_add(1, Ordering::SeqCst);
        Ok(Self { previous })
    }

    /// Whether one of the signals arrived.
    pub fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        GUARDS.fetch_sub(1, Ordering::SeqCst);
        for (s, old) in self.previous.drain(..) {
            // SAFETY: restores the disposition that was in place before install().
            let _ = unsafe { sigaction(s, &old) };
        }
    }
}

/// Whether an interrupt arrived since the outermost [`InterruptGuard::install`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_nested_guard_keeps_a_signal_the_outer_one_caught() {
        let outer = InterruptGuard::install().unwrap();
        assert!(!outer.interrupted());
        nix::sys::signal::raise(Signal::SIGHUP).unwrap();
        assert!(outer.interrupted());
        let inner = InterruptGuard::install().unwrap();
        assert!(inner.interrupted(), "the step's own guard lost the signal");
        drop(inner);
        drop(outer);
        let fresh = InterruptGuard::install().unwrap();
        assert!(!fresh.interrupted(), "a new verb starts with the flag down");
    }
}
