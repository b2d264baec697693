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
    /// Opens a raw image on `storage`. Its virtual size is the file length
    /// rounded up to 512 bytes, as QEMU's block layer sees it (the tail
    /// past the end of the file reads as zeros).
    pub fn open(storage: Box<dyn Storage>, path: &Path) -> Result<RawImage> {
        let len = storage.len().map_err(|e| Error::io(path, "stat", 0, e))?;
        let size = len.div_ceil(512).saturating_mul(512);
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
        let host = Some(HostOffset::new(start));
        let mapping = if data {
            Mapping::Data {
                host: HostOffset::new(start),
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

    /// Checks that a range lies inside the disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
    /// Writes guest bytes.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write data", offset, e))
    }
    /// Writes zeros over a range (in bounded pieces).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// Grows the image to `size` bytes (the new part reads as zeros).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        if size < self.size {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "shrinking an image is not supported".into(),
            });
        }
        self.storage
            .set_len(size)
            .map_err(|e| Error::io(&self.path, "resize", size, e))?;
        self.size = size;
        Ok(())
    }
    /// Sets the virtual size to `size`, growing or shrinking the file
    /// (`qemu-img resize [--shrink]` on raw: the file length is exactly
    /// `size`).
    pub fn truncate(&mut self, size: u64) -> Result<()> {
        self.storage
            .set_len(size)
            .map_err(|e| Error::io(&self.path, "resize", size, e))?;
        self.size = size;
        self.flush()
    }
    /// Makes writes durable.
    pub fn flush(&mut self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io(&self.path, "sync", 0, e))
    }
}
