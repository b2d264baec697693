//! strata-image: storage backends, qcow2 and raw images, backing chains.
//!
//! Layering: this crate uses `strata-format` for every on-disk structure
//! and knows nothing of merges, libvirt or the command line.
//!
//! # Examples
//!
//! Create a base image and an overlay on it, and write through the
//! overlay (copy-on-write: the base is never written):
//!
//! ```
//! use strata_image::create::{create_qcow2, CreateOptions};
//! use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.qcow2");
//! let top = dir.path().join("top.qcow2");
//! let mut opts = CreateOptions { size: 4 << 20, ..CreateOptions::default() };
//! create_qcow2(Box::new(FileStorage::create(&base)?), &base, &opts)?.close()?;
//! opts.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! create_qcow2(Box::new(FileStorage::create(&top)?), &top, &opts)?.close()?;
//!
//! let open = OpenOptions::new().writable(true);
//! let mut chain = Chain::open(&top, &open)?;
//! chain.write_at(&[0xab; 4096], 1 << 20)?;
//! chain.close()?; // flushes, and returns the error a drop could only log
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Open a chain read-only and read a guest range (the view QEMU's guest
//! sees: the first layer that allocates each byte answers):
//!
//! ```
//! # use strata_image::create::{create_qcow2, CreateOptions};
//! # use strata_image::{FileStorage, ImageFormat};
//! use strata_image::{Chain, OpenOptions};
//! # let dir = tempfile::tempdir()?;
//! # let base = dir.path().join("base.qcow2");
//! # let top = dir.path().join("top.qcow2");
//! # let mut opts = CreateOptions { size: 4 << 20, ..CreateOptions::default() };
//! # create_qcow2(Box::new(FileStorage::create(&base)?), &base, &opts)?.close()?;
//! # opts.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! # create_qcow2(Box::new(FileStorage::create(&top)?), &top, &opts)?.close()?;
//! # let mut w = Chain::open(&top, &OpenOptions::new().writable(true))?;
//! # w.write_at(&[0xab; 4096], 1 << 20)?;
//! # w.close()?;
//! let chain = Chain::open(&top, &OpenOptions::default())?;
//! assert_eq!(chain.layers().len(), 2);
//! let mut buf = vec![0u8; 8192];
//! chain.read_at(&mut buf, (1 << 20) - 4096)?;
//! assert!(buf[..4096].iter().all(|&b| b == 0)); // nobody wrote it
//! assert!(buf[4096..].iter().all(|&b| b == 0xab));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Walk the block status of the chain: which layer answers for each
//! extent, as `qemu-img map` reports it ([`Chain::block_status`]):
//!
//! ```
//! # use strata_image::create::{create_qcow2, CreateOptions};
//! # use strata_image::{FileStorage, ImageFormat};
//! use strata_image::{Chain, OpenOptions};
//! # let dir = tempfile::tempdir()?;
//! # let base = dir.path().join("base.qcow2");
//! # let top = dir.path().join("top.qcow2");
//! # let mut opts = CreateOptions { size: 4 << 20, ..CreateOptions::default() };
//! # create_qcow2(Box::new(FileStorage::create(&base)?), &base, &opts)?.close()?;
//! # opts.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! # create_qcow2(Box::new(FileStorage::create(&top)?), &top, &opts)?.close()?;
//! # let mut w = Chain::open(&top, &OpenOptions::new().writable(true))?;
//! # w.write_at(&[0xab; 4096], 1 << 20)?;
//! # w.close()?;
//! let chain = Chain::open(&top, &OpenOptions::default())?;
//! let mut data = Vec::new();
//! for extent in chain.block_status(0, chain.virtual_size()) {
//!     let e = extent?;
//!     if e.data {
//!         data.push((e.start, e.length, e.depth));
//!     }
//! }
//! // One cluster of data, in the top (depth 0).
//! assert_eq!(data, vec![(1 << 20, 65536, 0)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The example of README.md's "Using Strata as a library" (tests/readme.rs
//! keeps the two the same):
//!
//! ```rust
//! use strata_image::{Chain, OpenOptions};
//!
//! fn allocated_in_top(top: &std::path::Path) -> strata_image::Result<u64> {
//!     let opts = OpenOptions::new().force_share(true);
//!     let chain = Chain::open(top, &opts)?;
//!     let mut bytes = 0;
//!     for extent in chain.block_status(0, chain.virtual_size()) {
//!         let e = extent?;
//!         if e.layer == Some(0) && e.data {
//!             bytes += e.length; // read it with chain.read_at(...)
//!         }
//!     }
//!     Ok(bytes)
//! }
//! # use strata_image::create::{create_qcow2, CreateOptions};
//! # use strata_image::FileStorage;
//! # let dir = tempfile::tempdir()?;
//! # let p = dir.path().join("a.qcow2");
//! # let o = CreateOptions { size: 1 << 20, ..CreateOptions::default() };
//! # create_qcow2(Box::new(FileStorage::create(&p)?), &p, &o)?.close()?;
//! # let mut c = Chain::open(&p, &OpenOptions::new().writable(true))?;
//! # c.write_at(&[1; 512], 0)?;
//! # c.close()?;
//! # assert_eq!(allocated_in_top(&p)?, 65536);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Threads
//!
//! An open [`Chain`], [`Qcow2Image`] and [`RawImage`] are [`Send`] and
//! [`Sync`] (checked at compile time): reads take `&self` and may run
//! from several threads at once (the caches lock inside); writes take
//! `&mut self`, so one writer excludes readers, as the borrow checker
//! says. Errors are `Send + Sync` too, so they cross threads and fit
//! `Box<dyn Error + Send + Sync>`.
//!
//! # Test hooks
//!
//! The `testing` feature adds `FaultStorage` (a storage that crashes and
//! fails on request, for crash-consistency tests) and the `lock` module
//! (QEMU's image locks taken by hand, for the interoperability tests);
//! they are not part of the default API. Without it, locks are taken by
//! [`Chain::open`] and [`create`] and reported as [`LockError`].
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backing;
pub mod block_status;
pub mod chain;
mod compress;
pub mod convert;
pub mod create;
mod error;
#[cfg(any(test, feature = "testing"))]
pub mod lock;
// Without `testing`, the lock functions the QEMU interoperability tests
// call directly (lock_file, ImageLock::set_mode, ...) have no user.
#[cfg(not(any(test, feature = "testing")))]
#[allow(dead_code)]
mod lock;
mod mapping;
mod qcow2;
pub use qcow2::{amend, bitmap, check, repair, resize, snapshot_internal};
// The write path's own items, for the crate (`crate::write::...`).
use qcow2::write;
mod raw;
pub mod storage;

pub use backing::{set_backing_file, FileId};
pub use bitmap::{BitmapEdit, BitmapInfo, DirtyBitmap};
pub use block_status::{
    block_status_at, block_status_in, BlockStatus, BlockStatusIter, StatusCache,
};
pub use chain::{
    Chain, Image, ImageFormat, Layer, OnBadBitmaps, OnDirty, OnUnknownAutoclear, OpenOptions,
    WritePolicy, READ_CHAIN_DEPTH,
};
pub use error::{Error, FirstError, Result};
pub use lock::{LockError, LockMode};
pub use mapping::{Extent, Mapping};
pub use qcow2::data_file::DataFile;
pub use qcow2::Qcow2Image;
pub use raw::RawImage;
pub use snapshot_internal::SnapshotRef;
#[cfg(any(test, feature = "testing"))]
pub use storage::FaultStorage;
pub use storage::{FileStorage, MappedBytes, MemStorage, Storage};

// What the crate documentation promises about threads, checked.
const _: () = {
    const fn send<T: Send>() {}
    send::<Chain>();
    send::<Qcow2Image>();
    send::<RawImage>();
    const fn sync<T: Sync>() {}
    sync::<Chain>();
    sync::<Qcow2Image>();
    sync::<RawImage>();
    sync::<Error>();
};
