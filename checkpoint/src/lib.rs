//! The checkpoint engine: CRIU client, dump/restore plans, image manifest, rootfs snapshot.

pub mod cgroup_image;
pub mod criu;
pub mod descriptors;
pub mod dump;
pub mod facts;
pub mod flags;
pub mod gpu;
pub mod group;
pub mod guardian;
pub mod image;
pub mod manifest;
pub mod page_receiver;
pub mod pages;
pub mod plan;
pub mod prefault;
pub mod restore;
pub mod rootfs;
pub mod signals;
pub mod store;
