//! strata-image: storage backends, qcow2 and raw images, backing chains.
//!
//! Layering: this crate uses `strata-format` for every on-disk structure
//! and knows nothing of merges, libvirt or the command line.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod chain;
pub mod compress;
pub mod convert;
pub mod create;
pub mod error;
pub mod lock;
pub mod mapping;
pub mod qcow2;
pub use qcow2::{amend, bitmap, check, repair, resize, snapshot_internal, write};
pub mod raw;
pub mod storage;

pub use bitmap::{BitmapEdit, BitmapInfo, DirtyBitmap};
pub use chain::{set_backing_file, Chain, Image, ImageFormat, Layer, OpenOptions, Resolved};
pub use error::{Error, Result};
pub use mapping::{Extent, Mapping};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;
pub use snapshot_internal::SnapshotRef;
pub use storage::{FaultStorage, FileStorage, MappedBytes, MemStorage, Storage};
