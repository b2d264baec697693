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
    /// An earlier I/O error stopped the write path of this open image; it
    /// refuses further writes. `first` is that error (file, operation,
    /// offset, errno text), the one that explains what went wrong.
    #[error(
        "{}: no further writes after an earlier I/O error: {}",
        .path.display(),
        .first.as_ref().map_or_else(|| "unknown I/O error".to_string(), ToString::to_string)
    )]
    Poisoned {
        /// The image.
        path: PathBuf,
        /// The error that poisoned it (`None` if it was not recorded).
        first: Option<FirstError>,
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

/// The first error of an image's write path, kept when it poisons the
/// image: the file, the operation, the host offset and the errno text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstError {
    /// The message of the error as it was returned (file, operation,
    /// offset and cause).
    pub message: String,
    /// The OS error number, when it was an OS error (e.g. 28, ENOSPC).
    pub raw_os_error: Option<i32>,
    /// The kind of the underlying I/O error.
    pub kind: Option<io::ErrorKind>,
}

impl std::fmt::Display for FirstError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl FirstError {
    /// Whether the first error was "no space left on device" (ENOSPC) or
    /// "disk quota exceeded" (EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self.raw_os_error, Some(28 | 122))
            || matches!(
                self.kind,
                Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
            )
    }
}

impl Error {
    /// The underlying I/O error, when this is one (directly, or the first
    /// error of a poisoned image).
    pub fn first_io_error(&self) -> Option<FirstError> {
        match self {
            Error::Io { cause, .. } => Some(FirstError {
                message: self.to_string(),
                raw_os_error: cause.raw_os_error(),
                kind: Some(cause.kind()),
            }),
            Error::Poisoned { first, .. } => first.clone(),
            _ => None,
        }
    }
}

/// The poisoned state of an open image: set by the first I/O error of its
/// write path, which it keeps, so that the later refusals can name it.
#[derive(Debug, Default)]
pub(crate) struct Poison {
    set: std::sync::atomic::AtomicBool,
    first: std::sync::Mutex<Option<FirstError>>,
}

impl Poison {
    /// Poisons the image with `e`, unless it is already poisoned (the first
    /// error is kept).
    pub(crate) fn set(&self, e: &Error) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e.first_io_error().unwrap_or_else(|| FirstError {
                message: e.to_string(),
                raw_os_error: None,
                kind: None,
            }));
        }
        self.set.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    /// Whether an error poisoned the image.
    pub(crate) fn is_set(&self) -> bool {
        self.set.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// `AtomicBool`-style access, for call sites with no error at hand
    /// (prefer [`Poison::set`], which keeps the error for the message).
    #[allow(dead_code)]
    pub(crate) fn store(&self, poisoned: bool, order: std::sync::atomic::Ordering) {
        self.set.store(poisoned, order);
    }
    /// `AtomicBool`-style access: whether the image is poisoned.
    #[allow(dead_code)]
    pub(crate) fn load(&self, order: std::sync::atomic::Ordering) -> bool {
        self.set.load(order)
    }
    /// The error that poisoned the image.
    pub(crate) fn first(&self) -> Option<FirstError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
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
