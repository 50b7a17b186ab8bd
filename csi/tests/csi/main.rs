//! The CSI driver's integration tests: one file per behaviour, all in one test binary. Each test binary links tonic,
//! the generated CSI services and the driver, so one binary instead of several saves most of their build and link time
//! in CI. Run one behaviour with `cargo test -p blockmesh-csi --test csi <file>::`.
#![allow(clippy::unwrap_used)]

mod common;

mod controller_volumes;
mod kernel_attach;
mod kube_api;
mod manifests;
mod multi_node;
mod node_restart;
mod node_stage_publish;
mod pool_moves;
mod qos;
mod snapshots_clones;
