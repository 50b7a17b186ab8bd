//! Shared helpers for the blockmesh benchmarks.
