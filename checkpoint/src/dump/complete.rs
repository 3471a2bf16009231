//! Steps 3 and 4 of a checkpoint: after the thaw (or, when the container is to be stopped,
//! still frozen, so nothing is lost if this fails), the images are named, synced and digested
//! and the manifest written last, all in staging; then the image is published whole and, for a
//! checkpoint without `--leave-running`, the container stopped.

use std::path::Path;
use std::time::Instant;

use super::prepare::Prepared;
use super::steps::{flush_criu_images, sync_dir};
use super::window::{Dumped, Frozen};
use super::{compress_threads, ms, CheckpointError, DumpError, DumpReport, LeftAs};
use crate::criu::CallKind;
use crate::guardian::Order;
use crate::image::alongside::checked_alongside;
use crate::image::blocks::{blocks_name, BlockDigests, HashedPages};
use crate::image::digest::{digest_bytes, digest_files, FileRecord};
use crate::image::publish::{is_side_file, write_private_file};
use crate::manifest::{self, Manifest, PagesRecord, Timings, FORMAT};
use crate::store::delta::Lineage;
use crate::{facts, rootfs};

/// A complete image in staging, not yet published. `frozen` is set when the container is to
/// be stopped (it stays frozen until then); it thaws first if anything fails.
pub(crate) struct Complete<'r, 'a> {
    frozen: Option<Frozen<'a>>,
    p: Prepared<'r, 'a>,
    manifest: Option<Manifest>,
    warnings: Vec<String>,
}

impl<'r, 'a> Dumped<'r, 'a> {
    /// Thaw (or keep frozen to stop), finish the images and write the manifest.
    pub(crate) fn complete(self) -> Result<Complete<'r, 'a>, CheckpointError> {
        let Dumped {
            frozen,
            mut p,
            open_files,
            staging_wait_ms,
            dump_ms,
            rootfs: mut record,
            devshm,
            rootfs_capture_ms,
            rootfs_wait_ms,
        } = self;
        let stop = p.kind == CallKind::Dump && !p.req.flags.leave_running;
        let was_paused = frozen.was_paused();
        let t_freeze = frozen.since;
        let mut timings = Timings {
            freeze_ms: frozen.freeze_ms,
            rootfs_capture_ms,
            rootfs_wait_ms,
            dump_ms,
            staging_wait_ms,
            before_freeze_ms: ms(t_freeze.duration_since(p.started)),
            ..Default::default()
        };
        let (mut frozen, left) = if stop {
            let left = frozen.left();
            (Some(frozen), left)
        } else {
            let left = frozen.left();
            if let Err(e) = frozen.release(&mut p.guardian) {
                return Err(p.fail("thawing the container", e.into(), LeftAs::Unknown));
            }
            timings.frozen_ms = ms(t_freeze.elapsed());
            (None, left)
        };
        let t_thaw = (!stop).then(Instant::now);
        let fail = |p: &mut Prepared<'_, '_>,
                    frozen: &mut Option<Frozen<'_>>,
                    step: &'static str,
                    cause: DumpError| {
            p.undo_freeze(frozen.take());
            p.fail(step, cause, left)
        };

        // CRIU answered only after the receiver had copied every page: the container may run.
        let mut hashed_pages = Vec::new();
        let pages = match p.receiver.take().map(|r| r.finish()) {
            Some(Ok(s)) => {
                hashed_pages = s.digests;
                Some(PagesRecord {
                    received_bytes: s.bytes,
                    staged_bytes: s.staged_bytes,
                    prefaulted_bytes: s.prefaulted_bytes,
                    staging: p.req.stage_pages.map_or("", |m| m.name()).into(),
                })
            }
            Some(Err(e)) => {
                return Err(fail(
                    &mut p,
                    &mut frozen,
                    "receiving the page images",
                    e.into(),
                ))
            }
            None => None,
        };
        let dir = p.staging.dir().to_path_buf();
        // A store generation keeps only what changed since its parent, before anything is
        // synced: the full page images are dropped from the page cache unwritten.
        let t_increment = Instant::now();
        let increment = match (&p.req.parent, p.kind) {
            (Some(parent), CallKind::Dump) => {
                match crate::store::delta::make_incremental(&dir, &parent.dir, &hashed_pages) {
                    Ok((i, digests)) => {
                        hashed_pages.extend(digests);
                        Some(i)
                    }
                    Err(e) => {
                        let step = "keeping the pages that changed since the parent generation";
                        return Err(fail(&mut p, &mut frozen, step, e.into()));
                    }
                }
            }
            _ => None,
        };
        timings.increment_ms = ms(t_increment.elapsed());
        if increment.is_some_and(|i| !i.shares_extents) {
            // The pages files were rewritten to what changed (sharing extents, they hold the
            // very bytes received).
            hashed_pages.clear();
        }
        // CRIU's images go to disk while the changeset is compressed: the final syncfs then
        // has little left to write.
        if let Err((step, cause)) = flush_and_compress(&mut p, &dir, &mut record, &mut timings) {
            return Err(fail(&mut p, &mut frozen, step, cause));
        }
        let mut compressed_pages = Vec::new();
        if p.req.compress_pages && p.kind == CallKind::Dump {
            let t = Instant::now();
            match crate::pages::compress_pages(&dir, 1, compress_threads()) {
                Ok((names, _)) => compressed_pages = names,
                Err(e) => {
                    return Err(fail(
                        &mut p,
                        &mut frozen,
                        "compressing the page images",
                        DumpError::Inspect(e),
                    ))
                }
            }
            timings.compress_ms += ms(t.elapsed());
        }
        let lazy = p.req.flags.common.lazy_pages;
        if p.kind == CallKind::PreDump || lazy {
            // A pre-dump is only a parent for a later dump; a lazy image was published when
            // CRIU's page server became ready (both runc-style, without a manifest).
            if let Err(e) = sync_dir(&dir) {
                return Err(fail(
                    &mut p,
                    &mut frozen,
                    "syncing the image",
                    DumpError::Inspect(e),
                ));
            }
            return Ok(Complete {
                frozen,
                p,
                manifest: None,
                warnings: Vec::new(),
            });
        }

        let t_digest = Instant::now();
        let files = match image_files(&dir).and_then(|names| digest_rest(&dir, names, hashed_pages))
        {
            Ok(f) => f,
            Err(source) => {
                return Err(fail(
                    &mut p,
                    &mut frozen,
                    "digesting the image",
                    DumpError::Io {
                        step: "digest",
                        path: dir.clone(),
                        source,
                    },
                ))
            }
        };
        let lineage = match (&p.req.parent, &increment) {
            (Some(parent), Some(inc)) => {
                match crate::store::delta::share_and_link(&dir, &files, parent, inc) {
                    Ok(record) => Some(record),
                    Err(e) => {
                        return Err(fail(
                            &mut p,
                            &mut frozen,
                            "linking the parent generation",
                            e.into(),
                        ))
                    }
                }
            }
            _ => None,
        };
        let (parent, shares) = match lineage {
            Some(Lineage::Parent(p)) => (Some(p), None),
            Some(Lineage::Shares(s)) => (None, Some(s)),
            None => (None, None),
        };
        timings.digest_ms = ms(t_digest.elapsed());
        if let Err(e) = sync_dir(&dir) {
            return Err(fail(
                &mut p,
                &mut frozen,
                "syncing the image",
                DumpError::Inspect(e),
            ));
        }
        let config = p.req.bundle.join("config.json");
        let spec_sha256 = match manifest::sha256_file(&config) {
            Ok(s) => s,
            Err(source) => {
                return Err(fail(
                    &mut p,
                    &mut frozen,
                    "hashing config.json",
                    DumpError::Io {
                        step: "read",
                        path: config,
                        source,
                    },
                ))
            }
        };
        let mut requires = Vec::new();
        if !compressed_pages.is_empty() {
            requires.push(manifest::REQ_COMPRESSED_PAGES.to_string());
        }
        let gpu = p
            .req
            .gpu
            .as_ref()
            .map(|g| g.record(&p.work_dir.join(p.kind.log_name())));
        if gpu.is_some() {
            requires.push(manifest::REQ_CUDA.to_string());
        }
        if record.snapshot.is_some() || devshm.is_some() {
            // Sparse files are PAX 1.0 entries, which a reader of format 1 would take for
            // plain files with a map in front.
            requires.push(manifest::REQ_PAX_SPARSE.to_string());
        }
        if parent.is_some() {
            requires.push(manifest::REQ_PARENT_CHAIN.to_string());
        }
        timings.total_ms = ms(p.started.elapsed());
        timings.after_thaw_ms = t_thaw.map_or(0.0, |t| ms(t.elapsed()));
        let manifest = Manifest {
            format: FORMAT.into(),
            cryo_version: env!("CARGO_PKG_VERSION").into(),
            criu_version: p.criu_version,
            container_id: p.req.id.clone(),
            spec_sha256,
            created: chrono::Utc::now(),
            leave_running: p.req.flags.leave_running,
            was_paused,
            external_mounts: p.plan.ext_mounts.clone(),
            external_namespaces: p.plan.externals.clone(),
            rootfs: record,
            devshm,
            open_files,
            compressed_pages,
            pages,
            timings,
            gpu,
            files,
            parent,
            shares,
            requires,
            manifest_blake3: String::new(),
        };
        if let Err(source) = manifest.write(&dir) {
            return Err(fail(
                &mut p,
                &mut frozen,
                "writing the manifest",
                DumpError::Io {
                    step: "write",
                    path: dir.join(manifest::FILE),
                    source,
                },
            ));
        }
        Ok(Complete {
            frozen,
            p,
            manifest: Some(manifest),
            warnings: Vec::new(),
        })
    }
}

impl<'r, 'a> Complete<'r, 'a> {
    /// Publish the image at `--image-path`; then stop the container if asked.
    pub(super) fn publish(self) -> Result<DumpReport, CheckpointError> {
        Ok(self.publish_image()?.finish())
    }

    /// Publish the image at `--image-path`, leaving a container that is to be stopped frozen
    /// until [`Published::finish`].
    pub(crate) fn publish_image(self) -> Result<Published<'r, 'a>, CheckpointError> {
        let Complete {
            mut frozen,
            mut p,
            manifest,
            mut warnings,
        } = self;
        let left = frozen.as_ref().map_or(LeftAs::Thawed, |f| f.left());
        for path in p.staging.publish_debris() {
            if let Err(e) = p.guardian.order(&Order::Remove { path }) {
                p.undo_freeze(frozen.take());
                return Err(p.fail("publishing the image", e.into(), left));
            }
        }
        match p.staging.publish() {
            Ok(w) => warnings.extend(w),
            Err(e) => {
                p.undo_freeze(frozen.take());
                return Err(p.fail("publishing the image", e.into(), left));
            }
        }
        for path in p.staging.publish_debris() {
            let _ = p.guardian.order(&Order::Keep { path });
        }
        Ok(Published {
            frozen,
            p,
            manifest,
            warnings,
        })
    }
}

/// An image published at `--image-path` whose container, if it is to be stopped, is still
/// frozen. Dropped without [`Published::finish`], that container thaws and keeps running
/// (another member of a group failed after this image was published in the group's staging).
pub(crate) struct Published<'r, 'a> {
    frozen: Option<Frozen<'a>>,
    p: Prepared<'r, 'a>,
    manifest: Option<Manifest>,
    warnings: Vec<String>,
}

impl Published<'_, '_> {
    /// Where the image is.
    pub(crate) fn image_dir(&self) -> &Path {
        self.p.staging.target().path()
    }

    /// The container's cgroup (its processes are about to be stopped, or keep running).
    pub(crate) fn cgroup(&self) -> &Path {
        self.p.env.freezer.path()
    }

    /// Whether [`Published::finish`] stops the container.
    pub(crate) fn stops(&self) -> bool {
        self.frozen.is_some()
    }

    /// What the container is left as if this is dropped.
    pub(crate) fn left_if_dropped(&self) -> LeftAs {
        self.frozen.as_ref().map_or(LeftAs::Thawed, |f| f.left())
    }

    /// Stop the container if asked (the image is complete), let the guardian go.
    pub(crate) fn finish(self) -> DumpReport {
        let Published {
            mut frozen,
            mut p,
            manifest,
            mut warnings,
        } = self;
        let stopped = frozen.is_some();
        if let Some(f) = frozen.take() {
            // The image is complete: now stop the container for good (runc semantics). Tasks
            // are killed while frozen and die as soon as the cgroup thaws.
            facts::kill_cgroup(p.env.freezer.path());
            f.thaw_to_die(&mut p.guardian);
        }
        let image_dir = p.staging.target().path().to_path_buf();
        let Prepared { guardian, .. } = p;
        if let Err(e) = guardian.dismiss() {
            warnings.push(format!("the guardian process ended badly: {e}"));
        }
        DumpReport {
            manifest,
            stopped,
            image_dir,
            warnings,
        }
    }
}

/// fdatasync CRIU's images while the changeset is compressed (its raw form then removed).
fn flush_and_compress(
    p: &mut Prepared<'_, '_>,
    dir: &Path,
    record: &mut manifest::RootfsRecord,
    timings: &mut Timings,
) -> Result<(), (&'static str, DumpError)> {
    let compress_pages = p.req.compress_pages;
    let capture = p.capture.as_mut();
    std::thread::scope(|scope| {
        let flush = scope.spawn(|| flush_criu_images(dir, compress_pages));
        if let (Some(c), Some(_)) = (capture, &record.snapshot) {
            let (size, took) = c.compressed();
            size.map_err(|e| ("compressing the rootfs snapshot", e.into()))?;
            record.snapshot = Some(rootfs::COMPRESSED_CHANGESET.to_string());
            timings.compress_ms = took;
        }
        flush
            .join()
            .unwrap_or_else(|_| Err("the flushing thread panicked".into()))
            .map_err(|e| ("syncing the image", DumpError::Inspect(e)))
    })
}

/// Digest the image files `names`, but for the pages files the receiver hashed as it wrote them
/// (the caller drops those digests where the files were rewritten since). Every pages file
/// also gets its block digests (`image::blocks`), written beside it and digested too.
fn digest_rest(
    dir: &Path,
    names: Vec<String>,
    hashed: Vec<HashedPages>,
) -> std::io::Result<Vec<FileRecord>> {
    let mut hashed: std::collections::HashMap<String, HashedPages> = hashed
        .into_iter()
        .map(|h| (h.record.name.clone(), h))
        .collect();
    let mut files = Vec::with_capacity(names.len());
    let mut rest = Vec::new();
    for name in names {
        let pages = if let Some(h) = hashed.remove(&name) {
            Some(h)
        } else if checked_alongside(&name) {
            let path = dir.join(&name);
            let (blocks, root) = BlockDigests::of_file(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Some(HashedPages {
                record: FileRecord {
                    name: name.clone(),
                    size: blocks.len,
                    blake3: root.to_hex().to_string(),
                },
                blocks,
            })
        } else {
            None
        };
        match pages {
            Some(p) => {
                files.push(p.record);
                if !p.blocks.cvs.is_empty() {
                    let side = blocks_name(&name);
                    let bytes = p.blocks.encode();
                    write_private_file(&dir.join(&side), &bytes)?;
                    files.push(FileRecord {
                        name: side,
                        size: bytes.len() as u64,
                        blake3: digest_bytes(&bytes),
                    });
                }
            }
            None => rest.push(name),
        }
    }
    files.extend(digest_files(dir, &rest)?);
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The files of the image: everything in the staging dir but CRIU's logs and stats, cryo's
/// scratch files and the manifest.
fn image_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == manifest::FILE || is_side_file(&name) || !e.file_type()?.is_file() {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}
