//! Bringing up `lo` in a network namespace the runtime created, over rtnetlink (libcontainer's
//! synchronous link client), as runc does: no `ip` or `nsenter` is needed on the host.

use std::fs::File;

use anyhow::{anyhow, Context as _};
use libcontainer::network::link::LinkClient;
use libcontainer::network::wrapper::create_network_client;
use nix::sched::{setns, CloneFlags};

/// The spec asks for a fresh network namespace (no path): the runtime sets it up.
pub(crate) fn owns_new_netns(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
            })
        })
}

/// Bring up `lo` in the network namespace of process `pid`. runc does this for a namespace it
/// creates; libcontainer does not, and a container talking to itself over 127.0.0.1 (and its
/// checkpoints with `--tcp-established`) depends on it.
pub(crate) fn loopback_up(pid: i32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/ns/net");
    let netns = File::open(&path)
        .with_context(|| format!("cannot open the container's network namespace {path}"))?;
    // setns moves only the calling thread, and a netlink socket speaks to the namespace it was
    // made in: a thread of its own enters the container's namespace, makes its socket there and
    // ends, so no other thread of cryo ever runs in it.
    let worker = std::thread::Builder::new()
        .name("cryo-loopback".into())
        .spawn(move || -> anyhow::Result<()> {
            setns(&netns, CloneFlags::CLONE_NEWNET)
                .context("cannot enter the container's network namespace (setns)")?;
            let mut links = LinkClient::new(create_network_client())
                .context("cannot open a netlink socket in the container's network namespace")?;
            let lo = links
                .get_by_name("lo")
                .context("netlink: cannot find lo in the container's network namespace")?;
            links
                .set_up(lo.header.index)
                .context("netlink: cannot set lo up in the container's network namespace")
        })
        .context("cannot start a thread to bring up the container's loopback")?;
    worker
        .join()
        .map_err(|_| anyhow!("the thread bringing up the container's loopback panicked"))?
        .with_context(|| format!("cannot bring up lo for the container's init (pid {pid})"))
}
