//! The operator's integration tests: one file per behaviour, all in one test binary. Each test binary links the
//! whole Kubernetes client and its generated API types, so one binary instead of eight saves most of their build
//! and link time in CI. Run one behaviour with `cargo test -p blockmesh-operator --test operator <file>::`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fake_api;

mod bad_config_changes_nothing;
mod controller_mock_api;
mod e2e_real_cluster;
mod images;
mod leader_election;
mod manifests;
mod nodes_come_and_go;
mod pvcs_survive_nodes;
