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
pub mod testing;
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
