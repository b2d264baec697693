//! Errors of the merge engine.

use std::io;
use std::path::PathBuf;

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
        "{}: refusing to commit: it is the backing file of {}; committing into it would change what {} read (use force to override)",
        .base.display(),
        list(.users),
        if .users.len() == 1 { "that image would" } else { "those images would" }
    )]
    BaseInUse {
        /// The base image.
        base: PathBuf,
        /// The images naming it as their backing file.
        users: Vec<PathBuf>,
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

impl MergeError {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: io::Error) -> MergeError {
        MergeError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
