//! strata-merge: offline commit, pull and safe rebase of backing chains.
//!
//! The three operations share one cluster walk ([`walk`]): a job says, for
//! each guest extent, whether it is skipped, becomes zeros, is copied, or
//! is copied where two views differ; the walk coalesces extents into large
//! reads and writes through one reused buffer, reports progress and
//! honours cancellation. Planning (`dry_run`) runs the same walk without
//! writing.
//!
//! Every operation keeps the top image's guest view intact at every
//! moment, and a rerun after a crash or a cancellation finishes the job:
//! docs/merge-protocol.md gives the argument step by step.
//!
//! Layering: this crate uses `strata-image` (chains, the write path,
//! locks) and `strata-format`; it knows nothing of libvirt or the command
//! line.
//!
//! # Examples
//!
//! Commit an overlay into its backing file, with a progress callback and a
//! cancellation flag (a second thread, or a signal handler, would set it):
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use strata_image::create::{create_qcow2, CreateOptions};
//! use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};
//! use strata_merge::{commit, CommitOptions, Hooks, Progress};
//!
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.qcow2");
//! let top = dir.path().join("top.qcow2");
//! let mut o = CreateOptions { size: 8 << 20, ..CreateOptions::default() };
//! create_qcow2(Box::new(FileStorage::create(&base)?), &base, &o)?.close()?;
//! o.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! create_qcow2(Box::new(FileStorage::create(&top)?), &top, &o)?.close()?;
//! let mut c = Chain::open(&top, &OpenOptions::new().writable(true))?;
//! c.write_at(&[7; 1 << 20], 2 << 20)?;
//! c.close()?;
//!
//! let cancel = AtomicBool::new(false);
//! let mut seen = Vec::new();
//! let mut on_progress = |p: Progress| seen.push(p);
//! let mut hooks = Hooks::new().with_progress(&mut on_progress).with_cancel(&cancel);
//! let report = commit(&top, &CommitOptions::default(), &mut hooks)?;
//! assert_eq!(report.layers_merged, 1);
//! assert!(report.top_emptied);
//! let last = seen.last().copied().unwrap_or_default();
//! assert_eq!(last.done_bytes, last.total_bytes);
//!
//! // The base now holds the data.
//! let b = Chain::open(&base, &OpenOptions::default())?;
//! let mut buf = [0u8; 4];
//! b.read_at(&mut buf, 2 << 20)?;
//! assert_eq!(buf, [7; 4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A set cancellation flag stops the merge at its next step with
//! [`MergeError::Cancelled`]; what was written is durable and a rerun
//! finishes the job:
//!
//! ```
//! # use std::sync::atomic::AtomicBool;
//! # use strata_image::create::{create_qcow2, CreateOptions};
//! # use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};
//! use strata_merge::{pull, Hooks, MergeError, PullOptions};
//! # let dir = tempfile::tempdir()?;
//! # let base = dir.path().join("base.qcow2");
//! # let top = dir.path().join("top.qcow2");
//! # let mut o = CreateOptions { size: 8 << 20, ..CreateOptions::default() };
//! # create_qcow2(Box::new(FileStorage::create(&base)?), &base, &o)?.close()?;
//! # let mut c = Chain::open(&base, &OpenOptions::new().writable(true))?;
//! # c.write_at(&[7; 1 << 20], 2 << 20)?;
//! # c.close()?;
//! # o.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
//! # create_qcow2(Box::new(FileStorage::create(&top)?), &top, &o)?.close()?;
//! let cancel = AtomicBool::new(true);
//! let mut hooks = Hooks::new().with_cancel(&cancel);
//! let err = pull(&top, &PullOptions::default(), &mut hooks).unwrap_err();
//! assert!(matches!(err, MergeError::Cancelled), "{err}");
//! // The rerun, not cancelled, completes the pull.
//! let report = pull(&top, &PullOptions::default(), &mut Hooks::default())?;
//! assert_eq!(report.new_backing, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To merge a chain the caller already holds open, [`pull_open`] pulls
//! into the top of an open writable [`strata_image::Chain`];
//! [`commit_chain`] commits a held chain (closing it, then insisting that
//! the files it commits are the same files), and [`commit_open`] commits
//! images the caller opened itself ([`CommitParts`]).
//!
//! # Options
//!
//! [`CommitOptions`], [`PullOptions`], [`RebaseOptions`] and [`Hooks`] are
//! `#[non_exhaustive]`: start from `default()` (or [`Hooks::new`]) and set
//! what you need with their `with_*` methods. Reports are `#[must_use]`:
//! they say what was done (layers merged, whether the top was emptied,
//! images that use the base).
//!
//! # Threads
//!
//! The operations run on the caller's thread; [`Hooks`] borrow the
//! callback and the flag for the call (the flag is an `AtomicBool`, so
//! another thread may set it: `Hooks` is `Send` when its callback is, and
//! not `Sync`). Options, reports, plans and errors are `Send + Sync`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod commit;
pub mod error;
mod open;
mod options;
pub mod progress;
pub mod pull;
pub mod walk;

pub use commit::{commit, commit_open, CommitOptions, CommitParts, CommitReport};
pub use error::{MergeError, Result};
pub use open::commit_chain;
pub use progress::{Hooks, Progress};
pub use pull::{
    pull, pull_confined, pull_open, rebase, PullOptions, PullReport, RebaseOptions, RebaseReport,
};
pub use walk::{FileGrowth, Plan, Stats};

// What the crate documentation promises about threads, checked.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<MergeError>();
    send_sync::<CommitReport>();
    send_sync::<PullReport>();
    send_sync::<RebaseReport>();
    send_sync::<CommitOptions>();
    send_sync::<PullOptions>();
    send_sync::<RebaseOptions>();
    send_sync::<Plan>();
    send_sync::<Stats>();
    send_sync::<Progress>();
};
