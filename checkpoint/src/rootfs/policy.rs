//! What a changeset may do to the target, decided by the restore's own inputs (the target
//! spec, the manifest's record of the capture), never by the archive itself.

use std::collections::BTreeSet;

use oci_spec::runtime::{LinuxDeviceType, Spec};
use serde::{Deserialize, Serialize};

/// A device node kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeviceKind {
    /// Character device.
    Char,
    /// Block device.
    Block,
}

/// A device node: kind and numbers (its path does not matter: a node's numbers are what it
/// opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Character or block.
    pub kind: DeviceKind,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceNode {
    const fn char(major: u32, minor: u32) -> Self {
        DeviceNode {
            kind: DeviceKind::Char,
            major,
            minor,
        }
    }
}

/// The nodes runc creates in every container's /dev whatever the spec says (null, zero,
/// full, tty, urandom, random). runc makes /dev/ptmx a symlink to pts/ptmx and /dev/console
/// a bind mount of the pty, so neither is a node it creates.
pub const RUNTIME_DEFAULT_DEVICES: [DeviceNode; 6] = [
    DeviceNode::char(1, 3),
    DeviceNode::char(1, 5),
    DeviceNode::char(1, 7),
    DeviceNode::char(5, 0),
    DeviceNode::char(1, 9),
    DeviceNode::char(1, 8),
];

/// Sizes a changeset declares, as the capture counted them ([`super::CaptureReport::sizes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesetSizes {
    /// File data stored in the archive (holes of sparse files excluded).
    pub data_bytes: u64,
    /// Sum of the sizes of the regular files (holes included): what the files claim to be.
    pub logical_bytes: u64,
}

/// What a changeset may do beyond plain files and directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyPolicy {
    devices: BTreeSet<DeviceNode>,
    declared: Option<ChangesetSizes>,
    legacy_sparse: bool,
}

impl ApplyPolicy {
    /// The policy for restoring into a container with `spec`: device nodes only of the kinds
    /// and numbers the runtime itself creates for it (`linux.devices` and runc's defaults).
    /// No size limit (add the capture's with [`Self::with_declared_sizes`]); old-GNU sparse
    /// entries refused (see [`Self::with_legacy_sparse`]).
    pub fn for_spec(spec: &Spec) -> Self {
        let mut p = ApplyPolicy::default();
        p.devices.extend(RUNTIME_DEFAULT_DEVICES);
        let listed = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten();
        for d in listed {
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => DeviceKind::Char,
                LinuxDeviceType::B => DeviceKind::Block,
                // A fifo is allowed anyway; "all" names no node.
                LinuxDeviceType::P | LinuxDeviceType::A => continue,
            };
            if let (Ok(major), Ok(minor)) = (u32::try_from(d.major()), u32::try_from(d.minor())) {
                p.devices.insert(DeviceNode { kind, major, minor });
            }
        }
        p
    }

    /// No device nodes at all (a host directory such as a bind-mounted /dev/shm).
    pub fn no_devices() -> Self {
        ApplyPolicy::default()
    }

    /// Also allow `node`.
    pub fn allow_device(mut self, node: DeviceNode) -> Self {
        self.devices.insert(node);
        self
    }

    /// Refuse an archive that declares more file data or a larger total file size than the
    /// capture recorded (the manifest's record of [`super::CaptureReport::sizes`]).
    pub fn with_declared_sizes(mut self, sizes: ChangesetSizes) -> Self {
        self.declared = Some(sizes);
        self
    }

    /// Accept old-GNU sparse entries (type `S`), which changesets of image format 1 hold.
    /// The tar reader expands their holes into zeros, so their cost grows with the sizes
    /// they declare: at most [`LEGACY_SPARSE_MAX_BYTES`] in all are accepted.
    pub fn with_legacy_sparse(mut self, accept: bool) -> Self {
        self.legacy_sparse = accept;
        self
    }

    /// Whether a device node `node` may be created.
    pub fn allows(&self, node: &DeviceNode) -> bool {
        self.devices.contains(node)
    }

    /// The sizes the capture recorded, if given.
    pub fn declared(&self) -> Option<ChangesetSizes> {
        self.declared
    }

    /// Whether old-GNU sparse entries are accepted.
    pub fn legacy_sparse(&self) -> bool {
        self.legacy_sparse
    }
}

/// The most a format-1 changeset's old-GNU sparse entries may declare in all (logical
/// bytes): reading them costs time in proportion, twice (validation and apply).
pub const LEGACY_SPARSE_MAX_BYTES: u64 = 16 << 30;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spec_devices_and_runtime_defaults_only() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"devices": [
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0},
                {"path": "/dev/weird", "type": "u", "major": 4, "minor": 1},
                {"path": "/dev/pipe", "type": "p"}
            ]}
        }))
        .unwrap();
        let p = ApplyPolicy::for_spec(&spec);
        assert!(p.allows(&DeviceNode::char(1, 3)));
        assert!(p.allows(&DeviceNode::char(10, 229)));
        assert!(p.allows(&DeviceNode::char(4, 1)));
        let loop0 = DeviceNode {
            kind: DeviceKind::Block,
            major: 7,
            minor: 0,
        };
        assert!(p.allows(&loop0));
        // The same numbers as a char device, a block device not listed, the console.
        assert!(!p.allows(&DeviceNode::char(7, 0)));
        let sda = DeviceNode {
            kind: DeviceKind::Block,
            major: 8,
            minor: 0,
        };
        assert!(!p.allows(&sda));
        assert!(!p.allows(&DeviceNode::char(5, 1)));
        assert!(!ApplyPolicy::no_devices().allows(&DeviceNode::char(1, 3)));
    }
}
