//! Progress reports and cancellation.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// How far a merge has got, in bytes of guest ranges handled (copied,
/// zeroed or compared) out of those the plan found work for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes handled so far.
    pub done_bytes: u64,
    /// Bytes to handle in all (from the plan; constant during a run).
    pub total_bytes: u64,
}

/// The caller's hooks into a running merge: a progress callback and a
/// cancellation flag. Both optional; `Hooks::default()` has neither.
/// Built with [`Hooks::new`] and the `with_*` methods (the struct is
/// `#[non_exhaustive]`: more hooks may come).
///
/// ```
/// use std::sync::atomic::AtomicBool;
/// use strata_merge::{Hooks, Progress};
///
/// let cancel = AtomicBool::new(false);
/// let mut last = Progress::default();
/// let mut on_progress = |p: Progress| last = p;
/// let hooks = Hooks::new().with_progress(&mut on_progress).with_cancel(&cancel);
/// assert!(hooks.progress.is_some() && hooks.cancel.is_some());
/// ```
#[derive(Default)]
#[non_exhaustive]
pub struct Hooks<'a> {
    /// Called after every step (at most a few MiB of work apart) and once
    /// at the end with `done_bytes == total_bytes`.
    pub progress: Option<&'a mut dyn FnMut(Progress)>,
    /// When it becomes true, the merge stops at the next step, makes what
    /// it wrote durable and returns [`crate::MergeError::Cancelled`].
    pub cancel: Option<&'a AtomicBool>,
}

impl fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel.map(|c| c.load(Ordering::Relaxed)))
            .finish()
    }
}

impl<'a> Hooks<'a> {
    /// No progress callback, no cancellation flag.
    pub fn new() -> Hooks<'a> {
        Hooks::default()
    }
    /// Calls `f` with the progress ([`Hooks::progress`]).
    pub fn with_progress(mut self, f: &'a mut dyn FnMut(Progress)) -> Hooks<'a> {
        self.progress = Some(f);
        self
    }
    /// Stops the merge when `flag` becomes true ([`Hooks::cancel`]).
    pub fn with_cancel(mut self, flag: &'a AtomicBool) -> Hooks<'a> {
        self.cancel = Some(flag);
        self
    }
}

impl Hooks<'_> {
    pub(crate) fn report(&mut self, p: Progress) {
        if let Some(cb) = self.progress.as_mut() {
            cb(p);
        }
    }
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}
