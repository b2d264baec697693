//! Preallocation of every L2 table and data cluster (qemu-img's
//! `preallocation=metadata|falloc|full`).

use strata_format::{GuestOffset, HostOffset, L2Entry};

use crate::error::{Error, Result};
use crate::qcow2::WritableImage;

use super::Plan;

/// How [`Qcow2Image::preallocate`](crate::Qcow2Image::preallocate) provides the data clusters' space
/// (qemu-img's `preallocation=metadata|falloc|full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreallocFill {
    /// The file is extended sparse: the clusters are holes (`metadata`).
    Sparse,
    /// The clusters' space is reserved with `posix_fallocate` (`falloc`).
    Fallocate,
    /// The clusters are written with zeros (`full`).
    Zeros,
}

impl WritableImage {
    /// Allocates every L2 table and data cluster of the disk, as qemu-img
    /// does: the L2 entries are plain data entries (no zero flag: the
    /// clusters read as zeros because they are holes, reserved or zeroed
    /// space), and with extended L2 entries every subcluster is left
    /// unallocated, so that reads still fall through to a backing file
    /// (qemu-img allows a backing file only then; iotest 271 / issue 15
    /// defect 4). A cluster the allocator found inside the old end of the
    /// file (which may hold stale bytes) is written with zeros.
    pub fn preallocate(&mut self, fill: PreallocFill) -> Result<()> {
        self.begin_write()?;
        let geo = self.view.geometry();
        let size = self.virtual_size();
        let clusters = geo.clusters_for(size);
        let mut c = 0u64;
        while c < clusters {
            let g = geo.guest_cluster_start(c).get();
            let toff = self.l2_for_write(geo.l1_index(GuestOffset::new(g)))?;
            let table = self.l2_table(toff)?;
            let in_table = (geo.l2_entries() - geo.l2_index(GuestOffset::new(g))).min(clusters - c);
            let mut plans = Vec::new();
            for j in 0..in_table {
                let idx = geo.l2_index(geo.guest_cluster_start(c + j));
                let e = L2Entry::read(&table, geo, idx).map_err(|source| Error::Format {
                    path: self.view.path().to_path_buf(),
                    source,
                })?;
                if self.view.entry_host(&e).is_none() && !e.compressed() {
                    plans.push(Plan {
                        idx,
                        old: e,
                        new: e,
                        dest: None,
                        writes: None,
                        frees: vec![],
                    });
                }
            }
            if self.view.data_ref().is_some() {
                // An external data file: each cluster at its guest offset.
                self.data_file_prealloc(geo.clusters_bytes(c), in_table, fill)?;
                let base = self.view.data_file_table_base(toff)?;
                for p in &mut plans {
                    let host = HostOffset::new(base + geo.clusters_bytes(p.idx));
                    p.dest = Some(host);
                    p.new = L2Entry::data(Some(host), true);
                }
                self.barrier()?;
                self.update_l2(toff, &plans)?;
                c += in_table;
                continue;
            }
            let mut k = 0;
            while k < plans.len() {
                let (first, n) =
                    self.alloc_run((plans.len() - k) as u64, "preallocated clusters")?;
                for j in 0..n as usize {
                    let p = &mut plans[k + j];
                    let host = geo.cluster_start(first + j as u64);
                    p.dest = Some(host);
                    p.new = L2Entry::data(Some(host), true);
                }
                k += n as usize;
            }
            let len = self
                .view
                .storage()
                .len()
                .map_err(|e| Error::io(self.view.path(), "stat", 0, e))?;
            let cs = geo.cluster_size();
            let zeros = vec![0u8; cs as usize];
            let (mut start, mut end) = (u64::MAX, 0);
            for p in &plans {
                let dest = p.dest.map_or(0, HostOffset::get);
                start = start.min(dest);
                end = end.max(dest + cs);
                if fill == PreallocFill::Zeros || dest < len {
                    self.w.write_data(&zeros, dest, "write zeros")?;
                }
            }
            // The clusters must exist in the file (they read as zeros).
            if end > len {
                self.view
                    .storage()
                    .set_len(end)
                    .map_err(|e| Error::io(self.view.path(), "extend file", end, e))?;
            }
            if fill == PreallocFill::Fallocate && start < end {
                self.fallocate(start, end - start)?;
            }
            self.barrier()?;
            self.update_l2(toff, &plans)?;
            c += in_table;
        }
        Ok(())
    }
}

impl WritableImage {
    /// Reserves `[offset, offset+len)` of the file (`posix_fallocate`);
    /// storages without a file get zeros written instead.
    pub(in crate::qcow2) fn fallocate(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(f) = self.view.storage().file() {
            let (o, l) = (
                i64::try_from(offset).map_err(|_| Error::InvalidArgument("offset".into()))?,
                i64::try_from(len).map_err(|_| Error::InvalidArgument("length".into()))?,
            );
            return nix::fcntl::posix_fallocate(f, o, l)
                .map_err(|e| self.io_err("fallocate", offset, std::io::Error::from(e)));
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.w
                .write_data(&chunk[..n], offset + done, "write zeros")?;
            done += n as u64;
        }
        Ok(())
    }
}
