//! The CRIU client for a GPU container.

use std::cell::RefCell;

#[cfg(doc)]
use super::GpuPlan;
use super::PluginLog;
use crate::criu::{
    lazy, CallKind, CallObserver, CriuCall, CriuClient, CriuError, CriuOutcome, Features,
};

/// Wraps the client of a GPU container (one that runs CRIU with the plan's plugin directory and
/// `cuda-checkpoint` on its PATH: [`GpuPlan::swrk_client`]): a restore after which the plugin
/// logged an error is a failed restore (CRIU logs a failed CUDA restore and carries on: the
/// process would come back with its CUDA calls blocked for good). The plugin's part of the
/// last call's log is kept.
pub struct GpuCriu<'a> {
    inner: &'a dyn CriuClient,
    last: RefCell<Option<PluginLog>>,
}

impl<'a> GpuCriu<'a> {
    /// `inner`, which runs CRIU as [`GpuPlan::swrk_client`] does.
    pub fn new(inner: &'a dyn CriuClient) -> Self {
        Self {
            inner,
            last: RefCell::new(None),
        }
    }

    /// The plugin's part of the log of the last dump or restore.
    pub fn last_plugin_log(&self) -> Option<PluginLog> {
        self.last.borrow().clone()
    }
}

impl CriuClient for GpuCriu<'_> {
    fn version(&self) -> Result<u32, CriuError> {
        self.inner.version()
    }

    fn features(&self, ask: Features) -> Result<Features, CriuError> {
        self.inner.features(ask)
    }

    fn lazy_pages_daemon(
        &self,
        images_dir: &std::path::Path,
        work_dir: &std::path::Path,
    ) -> Result<Option<lazy::LazyPagesDaemon>, CriuError> {
        self.inner.lazy_pages_daemon(images_dir, work_dir)
    }

    fn call(
        &self,
        call: CriuCall,
        observer: &mut dyn CallObserver,
    ) -> Result<CriuOutcome, CriuError> {
        let kind = call.kind;
        let log = call.work_dir.join(kind.log_name());
        let result = self.inner.call(call, observer);
        let plugin = PluginLog::read(&log);
        *self.last.borrow_mut() = Some(plugin.clone());
        let outcome = result?;
        if kind == CallKind::Restore && !plugin.errors.is_empty() {
            return Err(CriuError::Failed {
                kind: "RESTORE (CUDA plugin)".into(),
                errno: 0,
                msg: ": CRIU restored the processes, but its CUDA plugin could not bring their \
                      GPU state back (cuda-checkpoint restore/unlock failed)"
                    .into(),
                log: log.clone(),
                excerpt: format!("\nfrom the log:\n  {}", plugin.errors.join("\n  ")),
            });
        }
        Ok(outcome)
    }
}
