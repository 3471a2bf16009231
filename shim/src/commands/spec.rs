//! `spec`: write runc's default config.json.
//!
//! Tools and tests make a bundle with the runtime's own `spec` and then edit it (runc's own
//! integration suite does, and expects a terminal), so cryo writes what runc writes: an
//! interactive `sh` with a terminal, runc's five namespaces (plus a cgroup namespace on a pure
//! cgroup v2 host, as runc adds one there), a device cgroup that denies everything not listed,
//! no inheritable capabilities.

use std::path::Path;

use anyhow::{bail, Context as _};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Spec,
};
use serde::Serialize;

use crate::cli::SpecArgs;

/// runc's default spec, built on oci-spec's (which matches it in process, root and mounts);
/// `unified`: for a pure cgroup v2 host, where runc adds a cgroup namespace.
pub fn runc_default_spec_for(unified: bool) -> anyhow::Result<Spec> {
    let mut spec = Spec::default();
    spec.set_hostname(Some("runc".into()));
    spec.set_annotations(None);
    let mut process = spec
        .process()
        .clone()
        .context("oci-spec's default has a process")?;
    process.set_terminal(Some(true));
    let caps: oci_spec::runtime::Capabilities = [
        oci_spec::runtime::Capability::AuditWrite,
        oci_spec::runtime::Capability::Kill,
        oci_spec::runtime::Capability::NetBindService,
    ]
    .into_iter()
    .collect();
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .ambient(caps)
        .build()?;
    capabilities.set_inheritable(None);
    process.set_capabilities(Some(capabilities));
    spec.set_process(Some(process));
    let default_linux = spec
        .linux()
        .clone()
        .context("oci-spec's default has linux")?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .chain(unified.then_some(LinuxNamespaceType::Cgroup))
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
    .collect::<Result<Vec<_>, _>>()?;
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(
            LinuxResourcesBuilder::default()
                .devices(vec![deny_all])
                .build()?,
        )
        .build()?;
    linux.set_masked_paths(default_linux.masked_paths().clone());
    linux.set_readonly_paths(default_linux.readonly_paths().clone());
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// What runc refuses in a spec before it creates anything and libcontainer lets through: a
/// host or domain name without a UTS namespace of the container's own (it would rename the
/// host, or the namespace it joins).
pub fn check_runnable(spec: &Spec) -> anyhow::Result<()> {
    let own_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_none())
        });
    if own_uts {
        return Ok(());
    }
    for (field, value) in [
        ("hostname", spec.hostname()),
        ("domainname", spec.domainname()),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            bail!(
                "the spec sets {field} {v:?} but the container has no UTS namespace of its own: \
                 add {{\"type\": \"uts\"}} to linux.namespaces, or remove {field}"
            );
        }
    }
    Ok(())
}

/// The spec as runc writes it: tab-indented, capabilities in a stable (alphabetical) order.
fn render(spec: &Spec) -> anyhow::Result<Vec<u8>> {
    let mut value = serde_json::to_value(spec)?;
    if let Some(sets) = value
        .pointer_mut("/process/capabilities")
        .and_then(|c| c.as_object_mut())
    {
        for set in sets.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"\t"),
    );
    value.serialize(&mut ser)?;
    Ok(out)
}

/// `spec [--bundle DIR]`
pub fn spec(a: &SpecArgs) -> anyhow::Result<i32> {
    write_default_spec(&a.bundle)?;
    Ok(0)
}

fn write_default_spec(bundle: &Path) -> anyhow::Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let unified = cryo_cgroup::cgroup_setup()? == cryo_cgroup::Setup::Unified;
    let bytes = render(&runc_default_spec_for(unified)?)?;
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_runcs_terminal_sh_with_five_namespaces_and_devices_denied() {
        let v = serde_json::from_slice::<serde_json::Value>(
            &render(&runc_default_spec_for(false).expect("spec")).expect("render"),
        )
        .expect("json");
        assert_eq!(v["process"]["terminal"], true);
        assert_eq!(v["process"]["args"], serde_json::json!(["sh"]));
        assert_eq!(v["hostname"], "runc");
        assert!(v.get("annotations").is_none());
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert_eq!(ns, ["pid", "network", "ipc", "uts", "mount"]);
        let v2 = runc_default_spec_for(true).expect("spec");
        let last = v2.linux().as_ref().and_then(|l| l.namespaces().clone());
        assert_eq!(
            last.and_then(|n| n.last().map(|n| n.typ())),
            Some(LinuxNamespaceType::Cgroup),
            "runc adds a cgroup namespace on a pure cgroup v2 host"
        );
        assert_eq!(
            v["linux"]["resources"]["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        let caps = &v["process"]["capabilities"];
        assert!(caps.get("inheritable").is_none());
        assert_eq!(
            caps["bounding"],
            serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"])
        );
    }

    #[test]
    fn a_hostname_needs_a_uts_namespace_of_the_containers_own() {
        let mut spec = runc_default_spec_for(false).expect("spec");
        check_runnable(&spec).expect("runc's default has both");
        let mut linux = spec.linux().clone().expect("linux");
        let without_uts: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Uts)
            .collect();
        linux.set_namespaces(Some(without_uts));
        spec.set_linux(Some(linux));
        let err = check_runnable(&spec).expect_err("hostname without uts");
        assert!(err.to_string().contains("no UTS namespace"), "{err}");
        spec.set_hostname(None);
        check_runnable(&spec).expect("no hostname, no uts: fine");
    }

    #[test]
    fn an_existing_config_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), "mine").expect("write");
        let err = write_default_spec(dir.path()).expect_err("must refuse");
        assert!(err.to_string().contains("Remove it first"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("config.json")).expect("read"),
            b"mine"
        );
    }
}
