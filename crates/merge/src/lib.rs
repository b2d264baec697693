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
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod commit;
pub mod error;
mod open;
pub mod progress;
pub mod pull;
pub mod walk;

pub use commit::{commit, commit_open, CommitOptions, CommitParts, CommitReport};
pub use error::{MergeError, Result};
pub use progress::{Hooks, Progress};
pub use pull::{
    pull, pull_confined, pull_open, rebase, PullOptions, PullReport, RebaseOptions, RebaseReport,
};
pub use walk::{FileGrowth, Plan, Stats};
