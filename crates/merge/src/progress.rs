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
#[derive(Default)]
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
