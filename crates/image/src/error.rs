//! Errors of the image engine: what went wrong, on which file, where.

use std::io;
use std::path::PathBuf;

use strata_format::FormatError;

/// Result alias for the image engine.
pub type Result<T> = std::result::Result<T, Error>;

/// An error of the image engine. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{}: {op}{} failed: {cause}", .path.display(), at(*.offset, .op))]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("read L2 table", "write data", ...).
        op: &'static str,
        /// Host offset of the operation.
        offset: u64,
        /// The underlying error (part of the message, so not repeated as
        /// a separate cause).
        cause: io::Error,
    },
    /// The image's header or a table is malformed.
    #[error("{}: invalid qcow2 image: {source}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the format layer found.
        source: FormatError,
    },
    /// The image's metadata is inconsistent.
    #[error("{}: corrupt image: {what} (host offset {offset:#x})", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Host offset of the structure found corrupt.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The image uses something Strata does not support.
    #[error("{}: {what}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// An image names a backing file without recording its format.
    #[error(
        "{}: the backing file {backing:?} has no recorded format, and Strata never guesses one; \
         record it with `strata rebase -u -b {backing} -F <qcow2|raw> {}`",
        .path.display(), .path.display()
    )]
    BackingFormatUnknown {
        /// The image naming the backing file.
        path: PathBuf,
        /// The backing file name as recorded.
        backing: String,
    },
    /// A backing file cannot be used (missing, refused by policy, bad name).
    #[error("{}: backing file {backing:?}: {why}", .path.display())]
    Backing {
        /// The image naming the backing file.
        path: PathBuf,
        /// The backing file name as recorded.
        backing: String,
        /// Why it cannot be used.
        why: String,
    },
    /// The backing chain loops back on itself.
    #[error("{}: backing chain loops: {} is already in the chain", .path.display(), .backing.display())]
    BackingLoop {
        /// The image naming the looping backing file.
        path: PathBuf,
        /// The backing file that is already in the chain.
        backing: PathBuf,
    },
    /// The backing chain is deeper than the limit.
    #[error("{}: backing chain deeper than {limit} images", .path.display())]
    ChainTooDeep {
        /// The top image.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A guest range lies outside the virtual disk.
    #[error("{}: range {offset:#x}+{len:#x} is outside the virtual disk ({size} bytes)", .path.display())]
    OutOfRange {
        /// The image.
        path: PathBuf,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// The image was opened read-only, or cannot be written.
    #[error("{}: {why}", .path.display())]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// Why it cannot be written.
        why: String,
    },
    /// An earlier I/O error left the image in an unknown state; it refuses
    /// further writes.
    #[error("{}: an earlier I/O error left the image unusable for writing; reopen it", .path.display())]
    Poisoned {
        /// The image.
        path: PathBuf,
    },
    /// A write or an allocation would have landed on the image's
    /// metadata (QEMU's overlap check): it was refused before anything
    /// was written, and the image was marked corrupt (v3 images).
    #[error(
        "{}: Preventing invalid write on metadata (overlaps with {structure} at host offset \
         {structure_offset:#x}): {op} at host offset {offset:#x}+{len:#x} refused; the image \
         is marked corrupt (repair it with `strata check -r all`)",
        .path.display()
    )]
    MetadataOverlap {
        /// The image.
        path: PathBuf,
        /// What was about to be written ("data write for guest offset 0x0", ...).
        op: String,
        /// Host offset of the refused write.
        offset: u64,
        /// Its length.
        len: u64,
        /// QEMU's name of the structure it overlaps ("refcount block", ...).
        structure: &'static str,
        /// Host offset of the overlapped cluster of that structure.
        structure_offset: u64,
    },
    /// The caller asked for something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
    /// The image is locked by another process.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// " at offset N" for operations where the offset means something.
fn at(offset: u64, op: &str) -> String {
    match op {
        "open" | "stat" | "create" | "truncate" | "sync" | "resolve path" | "resolve directory" => {
            String::new()
        }
        _ => format!(" at offset {offset:#x}"),
    }
}

impl Error {
    /// Wraps an I/O error with its file, operation and offset.
    pub fn io(path: &std::path::Path, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op,
            offset,
            cause: source,
        }
    }
    /// A corruption found at `offset` of `path`.
    pub fn corrupt(path: &std::path::Path, offset: u64, what: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        }
    }
}
