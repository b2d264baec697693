//! strata-format: the qcow2 on-disk structures, and nothing else.
//!
//! Bytes in, typed values or errors out. This crate does no I/O, starts no
//! threads and never allocates from a count it read before checking that
//! count against [`limits`]. Every parser returns a [`FormatError`] naming
//! what is wrong and where, never panics, and is cheap to fuzz.
//!
//! The field descriptions follow QEMU's `docs/interop/qcow2.rst`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bitmap;
pub mod error;
pub mod header;
pub mod limits;
pub mod refcount;
pub mod snapshot;
pub mod table;
pub mod types;

pub use error::{FormatError, Result};
pub use header::{CompressionType, Extension, FeatureName, Header};
pub use table::{CompressedDescriptor, L1Entry, L2Entry, SubclusterState};
pub use types::{Geometry, GuestOffset, HostOffset};
