//! Errors of the merge engine.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias for the merge engine.
pub type Result<T> = std::result::Result<T, MergeError>;

/// An error of commit, pull or rebase. Nothing is written before an error
/// of the refusing kinds (`BaseInUse`, `Refused`, `NotInChain`,
/// `NoBacking`, `InvalidArgument`) is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The image engine failed (I/O, corruption found while reading, lock
    /// held by another process, ...).
    #[error(transparent)]
    Image(#[from] strata_image::Error),
    /// Other images use the commit's base as their backing file: the
    /// commit would change what they read.
    #[error(
        "{}: refusing to commit: it is the backing file of {}; committing into it would change what {} read (`--force` overrides). Looked for users of the base in: {}",
        .base.display(),
        list(.users),
        if .users.len() == 1 { "that image would" } else { "those images would" },
        list(.searched)
    )]
    BaseInUse {
        /// The base image.
        base: PathBuf,
        /// The images naming it as their backing file.
        users: Vec<PathBuf>,
        /// Where Strata looked: directories (not their subdirectories),
        /// then files named by the caller.
        searched: Vec<PathBuf>,
    },
    /// An image is in a state the operation must not touch (corrupt bit,
    /// dirty, damaged metadata, features the write path does not keep).
    #[error("{}: refusing to {op}: {why}", .path.display())]
    Refused {
        /// The image.
        path: PathBuf,
        /// The operation ("commit", "pull", "rebase").
        op: &'static str,
        /// Why.
        why: String,
    },
    /// The requested base is not a backing file of the top.
    #[error("{}: is not in the backing chain of {}", .base.display(), .top.display())]
    NotInChain {
        /// The top image.
        top: PathBuf,
        /// The requested base.
        base: PathBuf,
    },
    /// The top image has no backing file to commit into.
    #[error("{}: has no backing file", .top.display())]
    NoBacking {
        /// The top image.
        top: PathBuf,
    },
    /// A file operation outside the image engine failed (directory scan).
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The caller asked for something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The merge stopped on an error after it had started writing. The
    /// message gives the first error (file, operation, offset, errno text),
    /// the state each file is left in, and what to run next.
    #[error("{op} failed: {}{}", first_cause(.cause), render_states(.files, .next))]
    Failed {
        /// The operation ("commit", "pull", "rebase").
        op: &'static str,
        /// The first error (for a poisoned image, the error that poisoned
        /// it is what the message shows).
        cause: Box<MergeError>,
        /// Each file and the state the failure left it in.
        files: Vec<(PathBuf, String)>,
        /// What to run next.
        next: String,
    },
    /// A source file changed under the merge (truncated, replaced) before
    /// the header switch: what was copied from it cannot be trusted.
    #[error("{}: {why}", .path.display())]
    SourceChanged {
        /// The source file.
        path: PathBuf,
        /// What changed.
        why: String,
    },
    /// The caller cancelled. Everything written so far is consistent and
    /// durable; running the same operation again finishes it.
    #[error("cancelled; the images are consistent and the same command finishes the job")]
    Cancelled,
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The message of the first error behind `e`: for a poisoned image, the
/// error that poisoned it.
fn first_cause(e: &MergeError) -> String {
    if let MergeError::Image(strata_image::Error::Poisoned {
        first: Some(first), ..
    }) = e
    {
        return first.to_string();
    }
    e.to_string()
}

fn render_states(files: &[(PathBuf, String)], next: &str) -> String {
    let mut s = String::new();
    for (path, state) in files {
        s.push_str(&format!("\n  {}: {state}", path.display()));
    }
    if !next.is_empty() {
        s.push_str(&format!("\n  next: {next}"));
    }
    s
}

impl MergeError {
    /// Whether the first error behind this one is "no space left on
    /// device" (or a quota).
    pub fn is_no_space(&self) -> bool {
        match self {
            MergeError::Image(e) => e.first_io_error().is_some_and(|f| f.is_no_space()),
            MergeError::Failed { cause, .. } => cause.is_no_space(),
            MergeError::Io { source, .. } => matches!(source.raw_os_error(), Some(28 | 122)),
            _ => false,
        }
    }

    /// The OS error number of the first error behind this one.
    fn raw_os_error(&self) -> Option<i32> {
        match self {
            MergeError::Image(e) => e.first_io_error().and_then(|f| f.raw_os_error),
            MergeError::Failed { cause, .. } => cause.raw_os_error(),
            MergeError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// What to do about the cause before running the command again (ends
    /// with "; then " when there is something), for a failure's `next`.
    pub(crate) fn remedy(&self, default_file: &Path) -> String {
        let file = self
            .failed_file()
            .unwrap_or_else(|| default_file.to_path_buf());
        if self.is_no_space() {
            format!(
                "free space on the filesystem that holds {}; then ",
                file.display()
            )
        } else if self.raw_os_error() == Some(14) {
            // EFAULT: a write from a mapping of a source whose pages
            // vanished (the source was truncated under the merge).
            "a source file of the merge was probably truncated while it was being read \
             (EFAULT on a write from its mapping): make sure no other process changes the \
             chain's files; then "
                .to_string()
        } else {
            String::new()
        }
    }

    /// The file whose operation failed first, when known.
    pub(crate) fn failed_file(&self) -> Option<PathBuf> {
        match self {
            MergeError::Image(strata_image::Error::Io { path, .. }) => Some(path.clone()),
            MergeError::Image(strata_image::Error::Poisoned { path, .. }) => Some(path.clone()),
            MergeError::Io { path, .. } | MergeError::SourceChanged { path, .. } => {
                Some(path.clone())
            }
            MergeError::Failed { cause, .. } => cause.failed_file(),
            _ => None,
        }
    }

    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: io::Error) -> MergeError {
        MergeError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
