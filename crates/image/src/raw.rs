//! Raw images: the guest view is the file.

use std::path::{Path, PathBuf};

use strata_format::HostOffset;

use crate::error::{Error, Result};
use crate::mapping::{Extent, Mapping};
use crate::storage::Storage;

/// A raw image.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    storage: Box<dyn Storage>,
    size: u64,
}

impl RawImage {
    /// Opens a raw image on `storage`.
    pub fn open(storage: Box<dyn Storage>, path: &Path) -> Result<RawImage> {
        let size = storage.len().map_err(|e| Error::io(path, "stat", 0, e))?;
        Ok(RawImage {
            path: path.to_path_buf(),
            storage,
            size,
        })
    }
    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Virtual size: the file length.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }
    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    /// The extent at `start`, at most `max_len` long: data, or a hole
    /// (reads as zeros, with its host offset, as QEMU reports it).
    pub fn map(&self, start: u64, max_len: u64) -> Result<Extent> {
        let len = max_len.min(self.size.saturating_sub(start));
        if len == 0 {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset: start,
                len: max_len,
                size: self.size,
            });
        }
        let (data, run) = self
            .storage
            .data_run(start, len)
            .map_err(|e| Error::io(&self.path, "seek data", start, e))?;
        let host = Some(HostOffset(start));
        let mapping = if data {
            Mapping::Data {
                host: HostOffset(start),
            }
        } else {
            Mapping::Zero { host }
        };
        Ok(Extent {
            start,
            len: run.clamp(1, len),
            mapping,
        })
    }
    /// Reads guest bytes (the file's bytes; zeros past its end).
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "read data", offset, e))?;
        Ok(())
    }
}
