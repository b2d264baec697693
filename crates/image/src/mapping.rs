//! The one mapping type: what a layer holds at a guest range. Reads,
//! `map`, check, commit and pull all walk these.

use strata_format::{CompressedDescriptor, HostOffset, SubclusterState};

/// What one layer holds at a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated in this layer: reads fall through to the backing file.
    Unallocated,
    /// Reads as zeros; `host` is where the bytes would be (a preallocated
    /// qcow2 cluster, or a hole in a raw file), when there is such a place.
    Zero {
        /// Host offset corresponding to the start of the range, if any.
        host: Option<HostOffset>,
    },
    /// Data stored uncompressed, starting at `host`.
    Data {
        /// Host offset of the range's first byte.
        host: HostOffset,
    },
    /// Data stored in a compressed cluster (the range lies inside it).
    Compressed(CompressedDescriptor),
}

impl Mapping {
    /// The mapping of the byte `delta` bytes after the start of a range
    /// mapped by `self`.
    pub fn advance(self, delta: u64) -> Mapping {
        match self {
            Mapping::Data { host } => Mapping::Data {
                host: HostOffset::new(host.get() + delta),
            },
            Mapping::Zero { host: Some(h) } => Mapping::Zero {
                host: Some(HostOffset::new(h.get() + delta)),
            },
            m => m,
        }
    }

    /// Whether a range mapped by `next` continues a range mapped by `self`
    /// that is `len` bytes long, so the two form one extent.
    pub fn continues(self, len: u64, next: Mapping) -> bool {
        match (self, next) {
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            (Mapping::Zero { host: None }, Mapping::Zero { host: None }) => true,
            (Mapping::Zero { host: Some(a) }, Mapping::Zero { host: Some(b) }) => {
                a.get().checked_add(len) == Some(b.get())
            }
            (Mapping::Data { host: a }, Mapping::Data { host: b }) => {
                a.get().checked_add(len) == Some(b.get())
            }
            _ => false,
        }
    }

    /// Whether reads of this range come from this layer.
    pub fn is_allocated(self) -> bool {
        !matches!(self, Mapping::Unallocated)
    }

    /// Whether this range reads as zeros in this layer.
    pub fn is_zero(self) -> bool {
        matches!(self, Mapping::Zero { .. })
    }
}

impl From<SubclusterState> for Mapping {
    fn from(s: SubclusterState) -> Mapping {
        match s {
            SubclusterState::Unallocated => Mapping::Unallocated,
            SubclusterState::Zero { host } => Mapping::Zero { host },
            SubclusterState::Data { host } => Mapping::Data { host },
            SubclusterState::Compressed(d) => Mapping::Compressed(d),
        }
    }
}

/// A run of guest bytes with one mapping in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What the layer holds there (for `start`).
    pub mapping: Mapping,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}
