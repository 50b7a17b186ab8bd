//! The in-memory index: per-volume radix trees mapping volume blocks to virtual block numbers (vbns), and the block
//! table mapping every vbn (data block or tree node) to its physical location, checksum and reference count.

pub(crate) mod block_table;
pub(crate) mod diff;
pub(crate) mod tree;

pub(crate) use block_table::{BlockTable, BtEntry};
pub use diff::{Extent, ExtentKind};
pub(crate) use tree::{Index, Mapping, MappingKind, Root, MAX_HEIGHT};
