//! SIGINT/SIGTERM/SIGHUP while a checkpoint holds the container frozen must not kill cryo
//! before it thaws the container: for the duration of a verb those signals only raise a flag,
//! which the engine checks between steps (it aborts and thaws at the next one).

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
        INTERRUPTED.store(false, Ordering::SeqCst);
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
        Ok(Self { previous })
    }

    /// Whether one of the signals arrived.
    pub fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (s, old) in self.previous.drain(..) {
            // SAFETY: restores the disposition that was in place before install().
            let _ = unsafe { sigaction(s, &old) };
        }
    }
}

/// Whether an interrupt arrived since the last [`InterruptGuard::install`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
