//! strata-libvirt: external snapshots and block merges of libvirt domains:
//! of shut-off domains done offline by Strata, with libvirt only told about
//! them; of running or paused domains through libvirt's own live snapshot
//! and block jobs, planned and recorded by the same rules.
//!
//! - [`snapshot_create`]: a qcow2 overlay per disk, the domain switched to
//!   it, a disk-only external snapshot recorded (redefined) in libvirt.
//! - [`snapshot_list`] and [`render_tree`]: snapshots with their files.
//! - [`snapshot_revert`]: a new overlay on the files that hold the
//!   snapshot's state; what nothing needs any more is removed.
//! - [`snapshot_delete`]: the snapshot's state file merged (commit or
//!   pull) with the one image that still reads through it; every other
//!   state and the domain's view unchanged.
//! - [`blockcommit`] and [`blockpull`]: merges of the active chain.
//!
//! Rules (docs/libvirt.md): offline Strata's engine, live libvirt's jobs
//! (a revert of a running domain only with `force`); one operation per
//! domain at a time (a lock keyed by the domain's UUID, taken before the
//! XML is read); every operation is all-or-nothing for libvirt's view and
//! the files it creates; disks are chosen as `virsh snapshot-create-as
//! --disk-only` chooses them; a changed disk's stale `<backingStore>` is
//! dropped so that QEMU opens the chain the images describe; Strata only
//! ever removes files it created itself (recorded in the domain's
//! `<metadata>` under [`xml::STRATA_NS`]) and the overlays libvirt's
//! snapshot metadata names; every file kept is reported with the reason.
//!
//! Layering: uses `strata-merge` for commit and pull and `strata-image`
//! for creating overlays and reading chains; libvirt through the `virt`
//! crate; XML through `xmltree`.
//!
//! # Examples
//!
//! Where a snapshot's overlay goes when the caller names none (libvirt's
//! rule):
//!
//! ```
//! use std::path::Path;
//! use strata_libvirt::default_overlay_path;
//!
//! let p = default_overlay_path(Path::new("/kvm/test.qcow2"), "take-1");
//! assert_eq!(p, Path::new("/kvm/test.take-1"));
//! ```
//!
//! List a domain's disks and their chains on libvirt's test driver (an
//! in-process hypervisor; a real one is `qemu:///system`):
//!
//! ```
//! use strata_libvirt::{domain_disks, Connect};
//!
//! let conn = Connect::open(Some("test:///default"))?;
//! for d in domain_disks(&conn, "test")? {
//!     println!("{} {:?} {:?}", d.disk, d.source, d.chain);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Take a disk-only external snapshot, then merge it away again (a
//! domain with qcow2 disks is needed, so this is not run here):
//!
//! ```no_run
//! use strata_libvirt::{snapshot_create, snapshot_delete, Connect, SnapshotCreateOptions};
//! use strata_merge::Hooks;
//!
//! let conn = Connect::open(Some("qemu:///system"))?;
//! let report = snapshot_create(&conn, "vm1", "before-upgrade", &SnapshotCreateOptions::default())?;
//! println!("{report:?}");
//! let report = snapshot_delete(&conn, "vm1", "before-upgrade", &mut Hooks::default())?;
//! println!("{report:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Threads
//!
//! Operations run on the caller's thread with the caller's [`Connect`];
//! two operations on one domain exclude each other through a per-domain
//! lock (across processes too), the second failing with [`Error::Busy`].
//!
//! # Test hooks
//!
//! The `testing` feature adds the module `testing` (fail points, holding a
//! domain's lock), for this workspace's tests; it is not part of the
//! default API.
//!
//! # Options and threads
//!
//! The option structs ([`BlockCommitOptions`], [`BlockPullOptions`],
//! [`SnapshotCreateOptions`], [`DiskSpec`], [`RevertOptions`]) are
//! `#[non_exhaustive]`: start from `default()` (or [`DiskSpec::new`]) and
//! set what you need with their `with_*` methods. [`Report`] is
//! `#[must_use]`: it says what changed (files created and removed, disks
//! skipped).
//!
//! The operations run on the caller's thread, on the caller's
//! [`Connect`]. Options, reports and errors are `Send + Sync` (checked at
//! compile time), so they cross threads.
#![deny(missing_docs)]
// Only jobs.rs (libvirt's block-job calls, which `virt` 0.4 does not wrap)
// is allowed unsafe code.
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod block;
mod ctx;
pub mod error;
mod jobs;
mod live;
mod snapshot;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(not(feature = "testing"))]
mod testing;
mod tree;
pub mod xml;

pub use block::{blockcommit, blockpull, BlockCommitOptions, BlockPullOptions};
pub use ctx::default_overlay_path;
pub use error::{Error, Result};
pub use snapshot::{
    domain_disks, snapshot_create, snapshot_delete, snapshot_delete_metadata, snapshot_dumpxml,
    snapshot_list, snapshot_revert, snapshot_revert_with, DiskInfo, DiskSpec, Report,
    RevertOptions, SnapshotCreateOptions, SnapshotDisk, SnapshotInfo,
};
pub use tree::render_tree;
pub use virt::connect::Connect;

// What the crate documentation promises about threads, checked.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Error>();
    send_sync::<Report>();
    send_sync::<BlockCommitOptions>();
    send_sync::<BlockPullOptions>();
    send_sync::<SnapshotCreateOptions>();
    send_sync::<DiskSpec>();
    send_sync::<RevertOptions>();
    send_sync::<SnapshotInfo>();
    send_sync::<DiskInfo>();
};
