//! Compressed writes of whole clusters (`convert -c`), packed as QEMU
//! packs them.

use strata_format::{GuestOffset, HostOffset, L2Entry};

use crate::error::{Error, Result};
use crate::qcow2::WritableImage;

use super::{BackingRead, Chunk, Plan};

/// Where the next compressed cluster's bytes may go: the unused tail of
/// the host cluster the previous one ended in (as QEMU packs them).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CompressedTail {
    /// Next free byte, or 0 when there is none.
    pub(crate) next: u64,
}

impl WritableImage {
    /// Writes whole clusters compressed (with the image's compression
    /// type) at the cluster-aligned guest offset `offset`; `data` is a
    /// multiple of the cluster size (the last cluster may reach past the
    /// end of the disk). Clusters that do not shrink are written plainly.
    /// Meant for filling new images (`convert -c`): clusters already
    /// allocated are replaced and their old space released at flush.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        data: &[u8],
        backing: BackingRead,
    ) -> Result<()> {
        self.view.refuse_with_data_file("compressed writes")?;
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        if !geo.is_aligned(offset) || !(data.len() as u64).is_multiple_of(cs) {
            return Err(Error::InvalidArgument(
                "compressed writes must cover whole clusters".into(),
            ));
        }
        self.check_range(
            offset,
            (data.len() as u64).min(self.virtual_size().saturating_sub(offset)),
        )?;
        self.begin_write()?;
        self.bitmaps_before_change(
            offset,
            (data.len() as u64).min(self.virtual_size().saturating_sub(offset)),
        )?;
        let mut done = 0u64;
        while done < data.len() as u64 {
            let pos = offset + done;
            let n = self.chunk_len(pos, data.len() as u64 - done);
            self.write_compressed_chunk(pos, &data[done as usize..(done + n) as usize], backing)?;
            done += n;
        }
        Ok(())
    }

    fn write_compressed_chunk(
        &mut self,
        off: u64,
        data: &[u8],
        backing: BackingRead,
    ) -> Result<()> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let toff = self.l2_for_write(geo.l1_index(GuestOffset::new(off)))?;
        let table = self.l2_table(toff)?;
        let mut plans = Vec::new();
        let mut plain: Vec<(u64, &[u8])> = Vec::new();
        for (i, cluster) in data.chunks(cs as usize).enumerate() {
            let g = off + i as u64 * cs;
            let idx = geo.l2_index(GuestOffset::new(g));
            let e = self.entry_for_write(&table, toff, idx)?;
            let Some(c) = crate::compress::compress(self.view.header().compression_type(), cluster)
            else {
                plain.push((g, cluster));
                continue;
            };
            let len = c.len() as u64;
            // Pack into the tail of the last host cluster when it fits.
            let tail = self.compressed_tail.next;
            let fits = tail != 0 && geo.in_cluster(tail) != 0 && geo.in_cluster(tail) + len <= cs;
            let room = fits && {
                let order = self.view.header().refcount_order();
                let ci = geo.cluster_index(HostOffset::new(tail));
                self.w.refcount(ci)? < strata_format::refcount::max_refcount(order)
            };
            let start = if room {
                let ci = geo.cluster_index(HostOffset::new(tail));
                self.w.adjust_refcount(ci, 1)?;
                tail
            } else {
                self.alloc_contiguous(geo.clusters_for(len), "compressed data")?
            };
            self.compressed_tail.next = start + len;
            let new =
                L2Entry::compressed_at(HostOffset::new(start), len, geo).ok_or_else(|| {
                    Error::InvalidArgument("compressed cluster cannot be described".into())
                })?;
            plans.push(Plan {
                idx,
                old: e,
                new,
                dest: Some(HostOffset::new(start)),
                writes: Some((0, Chunk::Owned(c))),
                frees: self.freed_by(e),
            });
        }
        for p in &mut plans {
            let dest = p.dest.map_or(0, HostOffset::get);
            if let Some((at, bytes)) = p.writes.take() {
                self.w
                    .write_data(bytes.bytes(), dest + at, "write compressed cluster")?;
            }
        }
        if !plans.is_empty() {
            self.barrier()?;
            self.update_l2(toff, &plans)?;
        }
        for (g, cluster) in plain {
            let end = (g + cs).min(self.virtual_size());
            self.write(g, &cluster[..(end - g) as usize], backing)?;
        }
        Ok(())
    }
}
