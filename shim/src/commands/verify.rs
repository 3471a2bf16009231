//! `verify`: check a checkpoint image the way a restore would, without restoring it.

use anyhow::bail;
use cryo_checkpoint::image::verify_image;

use super::checkpoint::image_dir;
use crate::cli::VerifyArgs;

/// `verify [--image-path DIR] [--format text|json]`: exit 0 when the image would be restored,
/// 1 with the reason when it would be refused.
pub fn verify(a: &VerifyArgs) -> anyhow::Result<i32> {
    if a.format != "text" && a.format != "json" {
        bail!("invalid --format {:?}: use text or json", a.format);
    }
    let dir = image_dir(a.image_path.as_deref())?;
    if cryo_checkpoint::group::is_group_image(&dir) {
        return verify_group(&dir, a.format == "json");
    }
    let v = verify_image(&dir)?;
    let m = v.manifest.as_ref();
    if a.format == "json" {
        let out = serde_json::json!({
            "image": v.dir,
            "verified": true,
            "format": m.map(|m| m.format.clone()),
            "container": m.map(|m| m.container_id.clone()),
            "created": m.map(|m| m.created),
            "files": v.files_checked,
            "bytes": v.bytes_checked,
            "verify_ms": v.verify_ms,
            "rootfs_snapshot": m.and_then(|m| m.rootfs.snapshot.clone()),
            "parents": v.ancestors,
            "warnings": v.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    for w in &v.warnings {
        eprintln!("cryo: warning: {w}");
    }
    match m {
        Some(m) => println!(
            "{}: intact cryo checkpoint of container {} ({}), taken {}: {} files, {:.1} MiB verified in {:.0} ms; rootfs snapshot: {}",
            v.dir.display(),
            m.container_id,
            m.format,
            m.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            v.files_checked,
            v.bytes_checked as f64 / (1u64 << 20) as f64,
            v.verify_ms,
            m.rootfs.snapshot.as_deref().unwrap_or("none"),
        ),
        None => println!(
            "{}: a plain CRIU image without cryo manifest: nothing to verify",
            v.dir.display()
        ),
    }
    if !v.ancestors.is_empty() {
        // A store generation: the files counted above include the generations it needs.
        let names: Vec<String> = v
            .ancestors
            .iter()
            .map(|a| {
                a.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        println!(
            "incremental: verified with the generations it depends on, {}",
            names.join(" <- ")
        );
    }
    Ok(0)
}

/// A group image: its manifest, then every member's image whole.
fn verify_group(dir: &std::path::Path, json: bool) -> anyhow::Result<i32> {
    let (group, files, bytes) = cryo_checkpoint::group::manifest::verify_group_fully(dir)?;
    let m = &group.manifest;
    let ids: Vec<&str> = m.members.iter().map(|r| r.id.as_str()).collect();
    if json {
        let out = serde_json::json!({
            "image": dir,
            "verified": true,
            "format": m.format,
            "group": m.group,
            "members": ids,
            "created": m.created,
            "files": files,
            "bytes": bytes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "{}: intact cryo group checkpoint of {} ({}), taken {}: {} files, {:.1} MiB verified",
        dir.display(),
        ids.join(", "),
        m.format,
        m.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        files,
        bytes as f64 / (1u64 << 20) as f64,
    );
    Ok(0)
}
