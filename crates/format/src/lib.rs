//! strata-format: the qcow2 on-disk structures, and nothing else.
//!
//! Bytes in, typed values or errors out. This crate does no I/O, starts no
//! threads and never allocates from a count it read before checking that
//! count against [`limits`]. Every parser returns a [`FormatError`] naming
//! what is wrong and where, never panics, and is cheap to fuzz.
//!
//! The field descriptions follow QEMU's `docs/interop/qcow2.rst`.
//!
//! # Example
//!
//! Parse the header of a qcow2 image from its first cluster's bytes
//! (here a minimal version 3 header built by hand; any file's first
//! cluster works the same, and bad bytes are an error, never a panic):
//!
//! ```
//! use strata_format::Header;
//!
//! let mut c0 = vec![0u8; 65536];
//! c0[0..4].copy_from_slice(b"QFI\xfb");
//! c0[4..8].copy_from_slice(&3u32.to_be_bytes()); // version
//! c0[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits: 64 KiB
//! c0[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // 1 GiB
//! c0[36..40].copy_from_slice(&2u32.to_be_bytes()); // L1: 2 entries
//! c0[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes()); // at cluster 3
//! c0[48..56].copy_from_slice(&65536u64.to_be_bytes()); // refcount table
//! c0[56..60].copy_from_slice(&1u32.to_be_bytes());
//! c0[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
//! c0[100..104].copy_from_slice(&104u32.to_be_bytes()); // header_length
//! let h = Header::parse(&c0)?;
//! assert_eq!((h.version(), h.size(), h.cluster_size()), (3, 1 << 30, 65536));
//! assert_eq!(h.backing_file(), None);
//!
//! c0[4..8].copy_from_slice(&9u32.to_be_bytes());
//! assert!(Header::parse(&c0).is_err()); // version 9: refused, not a panic
//! # Ok::<(), strata_format::FormatError>(())
//! ```
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
