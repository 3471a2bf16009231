//! The overlay upper dir's part of a checkpoint: the raw changeset is measured and faulted
//! in before the freeze, and captured while the container is frozen, beside CRIU's dump on
//! the other core where that is safe.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::rootfs::{self, CaptureOptions, CaptureReport, FrozenTop, RootfsError};

type CaptureResult = (Result<CaptureReport, RootfsError>, f64);

/// One checkpoint's capture of an upper dir. Dropped, it waits for its threads and removes
/// the raw changeset (which a finished checkpoint has replaced by its compressed copy).
pub(crate) struct UpperCapture {
    upper: PathBuf,
    raw: PathBuf,
    beside_dump: bool,
    prep: Option<JoinHandle<Option<File>>>,
    file: Option<File>,
    running: Option<JoinHandle<CaptureResult>>,
}

impl UpperCapture {
    /// Before CRIU starts: prepare `raw` for a capture of `upper` in a thread of its own.
    /// `beside_dump`: the capture may run while CRIU dumps (not with `--link-remap`, whose
    /// link files CRIU creates in the container's tree while dumping).
    pub(crate) fn prepare(upper: &Path, raw: &Path, beside_dump: bool) -> Self {
        let (u, r) = (upper.to_path_buf(), raw.to_path_buf());
        Self {
            upper: upper.to_path_buf(),
            raw: raw.to_path_buf(),
            beside_dump,
            prep: Some(std::thread::spawn(move || rootfs::prepare_capture(&u, &r))),
            file: None,
            running: None,
        }
    }

    /// Just before the freeze: wait for the preparation.
    pub(crate) fn wait_prepared(&mut self) {
        if let Some(prep) = self.prep.take() {
            self.file = prep.join().ok().flatten();
        }
    }

    /// Frozen, before CRIU dumps: start capturing beside CRIU, if allowed.
    pub(crate) fn start_beside_dump(&mut self) {
        if !self.beside_dump || self.running.is_some() {
            return;
        }
        self.wait_prepared();
        let opts = CaptureOptions {
            during_dump: Some(FrozenTop::record(&self.upper)),
            ..CaptureOptions::default()
        };
        let (upper, raw, file) = (self.upper.clone(), self.raw.clone(), self.file.take());
        self.running = Some(std::thread::spawn(move || run(&upper, &raw, file, &opts)));
    }

    /// After CRIU's dump, still frozen: the capture's report and how long it took (ms). A
    /// capture not started beside the dump runs now.
    pub(crate) fn finish(&mut self) -> CaptureResult {
        match self.running.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                let err = std::io::Error::other("the capture thread panicked");
                (Err(rootfs::io_err("capture", &self.raw)(err)), 0.0)
            }),
            None => {
                self.wait_prepared();
                run(
                    &self.upper,
                    &self.raw,
                    self.file.take(),
                    &CaptureOptions::default(),
                )
            }
        }
    }
}

fn run(upper: &Path, raw: &Path, file: Option<File>, opts: &CaptureOptions) -> CaptureResult {
    let t = Instant::now();
    let report = match file {
        Some(f) => rootfs::capture_upper_into(upper, f, raw, opts),
        None => rootfs::capture_upper(upper, raw, opts),
    };
    (report, t.elapsed().as_secs_f64() * 1000.0)
}

impl Drop for UpperCapture {
    fn drop(&mut self) {
        if let Some(p) = self.prep.take() {
            let _ = p.join();
        }
        if let Some(r) = self.running.take() {
            let _ = r.join();
        }
        let _ = std::fs::remove_file(&self.raw);
    }
}
