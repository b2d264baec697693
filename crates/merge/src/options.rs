//! Builders of the merge options ([`CommitOptions`], [`PullOptions`],
//! [`RebaseOptions`]): the structs are `#[non_exhaustive]` (new options
//! may come), so code outside this crate starts from `default()` and sets
//! what it needs with the `with_*` methods (or assigns the public fields
//! of a value it holds).
//!
//! ```
//! use strata_merge::{CommitOptions, PullOptions, RebaseOptions};
//!
//! let c = CommitOptions::default().with_base("base.qcow2").with_dry_run(true);
//! assert!(c.dry_run && !c.keep_top);
//! let p = PullOptions::default().with_base("mid.qcow2");
//! assert_eq!(p.base.as_deref(), Some(std::path::Path::new("mid.qcow2")));
//! let r = RebaseOptions::default().with_confine_to("/var/lib/images");
//! assert!(r.confine_to.is_some());
//! ```

use std::path::PathBuf;

use crate::commit::CommitOptions;
use crate::pull::{PullOptions, RebaseOptions};

impl CommitOptions {
    /// Commits into `base` (`-b`; see [`CommitOptions::base`]).
    pub fn with_base(mut self, base: impl Into<PathBuf>) -> CommitOptions {
        self.base = Some(base.into());
        self
    }
    /// Sets [`CommitOptions::keep_top`] (`-d`).
    pub fn with_keep_top(mut self, yes: bool) -> CommitOptions {
        self.keep_top = yes;
        self
    }
    /// Sets [`CommitOptions::shorten_chain`].
    pub fn with_shorten_chain(mut self, yes: bool) -> CommitOptions {
        self.shorten_chain = yes;
        self
    }
    /// Sets [`CommitOptions::force`].
    pub fn with_force(mut self, yes: bool) -> CommitOptions {
        self.force = yes;
        self
    }
    /// Sets [`CommitOptions::dry_run`].
    pub fn with_dry_run(mut self, yes: bool) -> CommitOptions {
        self.dry_run = yes;
        self
    }
    /// Sets [`CommitOptions::also_check`].
    pub fn with_also_check(mut self, files: Vec<PathBuf>) -> CommitOptions {
        self.also_check = files;
        self
    }
    /// Sets [`CommitOptions::users_in`].
    pub fn with_users_in(mut self, dirs: Vec<PathBuf>) -> CommitOptions {
        self.users_in = dirs;
        self
    }
    /// Confines the chain to `dir` ([`CommitOptions::confine_to`]).
    pub fn with_confine_to(mut self, dir: impl Into<PathBuf>) -> CommitOptions {
        self.confine_to = Some(dir.into());
        self
    }
}

impl PullOptions {
    /// Keeps `base` as the top's backing file ([`PullOptions::base`]).
    pub fn with_base(mut self, base: impl Into<PathBuf>) -> PullOptions {
        self.base = Some(base.into());
        self
    }
    /// Sets [`PullOptions::dry_run`].
    pub fn with_dry_run(mut self, yes: bool) -> PullOptions {
        self.dry_run = yes;
        self
    }
}

impl RebaseOptions {
    /// Sets [`RebaseOptions::dry_run`].
    pub fn with_dry_run(mut self, yes: bool) -> RebaseOptions {
        self.dry_run = yes;
        self
    }
    /// Confines both chains to `dir` ([`RebaseOptions::confine_to`]).
    pub fn with_confine_to(mut self, dir: impl Into<PathBuf>) -> RebaseOptions {
        self.confine_to = Some(dir.into());
        self
    }
}
