//! The format crate's error: a static message, the byte offset it concerns
//! and, for a few cases, a detail string.

use std::fmt;

/// Result alias for format parsing.
pub type Result<T> = std::result::Result<T, FormatError>;

/// What is wrong with a piece of on-disk data, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// What is wrong, in words.
    pub what: &'static str,
    /// The byte offset in the image file the problem concerns (the start of
    /// the structure when no finer offset is known).
    pub offset: u64,
    /// More detail when a static message is not enough (names of unknown
    /// feature bits, the offending value).
    pub detail: Option<String>,
}

impl FormatError {
    /// An error with a static message at `offset`.
    pub const fn new(what: &'static str, offset: u64) -> Self {
        FormatError {
            what,
            offset,
            detail: None,
        }
    }

    /// An error with a message, an offset and a detail string.
    pub fn with_detail(what: &'static str, offset: u64, detail: impl Into<String>) -> Self {
        FormatError {
            what,
            offset,
            detail: Some(detail.into()),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte offset {:#x})", self.what, self.offset)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FormatError {}
