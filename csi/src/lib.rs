//! blockmesh's CSI driver: PVCs are blockmesh volumes (subdots of dots), VolumeSnapshots are commits, clones are
//! new dots cloned from a commit in O(1), group snapshots are one commit of a dot over its subdots.
//!
//! - [`controller`]: the Controller and GroupController services, over the node daemons' HTTP APIs ([`daemon`]), routed by node
//!   ([`daemons`]: static and discovered servers);
//! - [`node`]: the Node service over an [`node::Attacher`] (kernel NBD over generic netlink: [`kernel`]) and a
//!   [`node::Mounter`] ([`system`]);
//! - [`identity`], [`server`] (gRPC on a Unix socket), [`ids`] (volume and snapshot ids), [`pvc`] (where a PVC's
//!   volume lives), [`testing`] (stand-ins for the kernel).
#![forbid(unsafe_code)]

pub mod controller;
pub mod daemon;
pub mod daemons;
pub mod error;
pub mod identity;
pub mod ids;
pub mod kernel;
pub mod kube;
pub mod node;
pub mod pvc;
pub mod server;
pub mod system;
pub mod targets;
pub mod testing;

/// The CSI v1.12 messages and services, generated from the vendored `proto/csi.proto`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

pub use error::{Error, Result};
