//! `blockmesh-engine`: a log-structured copy-on-write store of thin block volumes inside one pool.
#![warn(missing_docs)]

pub mod error;
pub mod io;

pub use error::{Error, Result};
