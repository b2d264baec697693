//! Allocating data writes: the plan of each cluster (copy-on-write of
//! the parts not written, a new host cluster or the old one), then its
//! execution in protocol order.

use std::sync::Arc;

use strata_format::{GuestOffset, HostOffset, L2Entry, SubclusterState};

use crate::error::{Error, Result};
use crate::qcow2::writer::DirtyTable;
use crate::qcow2::WritableImage;
use crate::storage::{RangeCopy, Storage};

use super::{BackingRead, Chunk, Plan, MAX_VECTORED_BYTES, WRITE_BATCH, WRITE_CHUNK};

impl WritableImage {
    /// The guest view of this image alone at `[guest, guest+buf.len())`
    /// inside one cluster, falling through to `backing` where unallocated.
    pub(in crate::qcow2) fn old_view(
        &self,
        e: L2Entry,
        guest: u64,
        buf: &mut [u8],
        backing: BackingRead,
    ) -> Result<()> {
        let geo = self.view.geometry();
        let scs = geo.subcluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let g = guest + done as u64;
            let sc = geo.subcluster_index(GuestOffset::new(g));
            let n = ((scs - geo.in_subcluster(GuestOffset::new(g))) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            let state = self.view.entry_state(&e, sc).map_err(|what| {
                Error::corrupt(self.view.path(), 0, format!("L2 entry for {g:#x}: {what}"))
            })?;
            match state {
                SubclusterState::Unallocated => backing(chunk, g)?,
                SubclusterState::Zero { .. } => chunk.fill(0),
                SubclusterState::Data { host } => {
                    let h = host.get() + geo.in_subcluster(GuestOffset::new(g));
                    self.view
                        .data_storage()?
                        .read_at(chunk, h)
                        .map_err(|e| Error::io(self.view.path(), "read data", h, e))?;
                }
                SubclusterState::Compressed(d) => {
                    let c = self.view.decompress(d)?;
                    let at = geo.in_cluster(g) as usize;
                    chunk.copy_from_slice(&c[at..at + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads entry `idx` of the L2 table at `toff` for a write through
    /// it. An entry QEMU calls invalid (a subcluster both allocated and
    /// zero, an allocated subcluster without a host cluster, an unaligned
    /// host offset) is a fatal corruption: the write is refused before
    /// anything of it is written and the image is marked corrupt, as QEMU
    /// does (iotest 271).
    pub(in crate::qcow2) fn entry_for_write(
        &mut self,
        table: &[u8],
        toff: u64,
        idx: u64,
    ) -> Result<L2Entry> {
        let geo = self.view.geometry();
        let e = L2Entry::read(table, geo, idx).map_err(|source| Error::Format {
            path: self.view.path().to_path_buf(),
            source,
        })?;
        if self.view.data_file().is_some() {
            // A data file cluster must lie at its guest offset.
            let r = self.view.data_file_table_base(toff).and_then(|base| {
                let at = toff + idx * geo.l2_entry_size();
                self.view
                    .check_data_file_host(&e, base + idx * geo.cluster_size(), idx, at)
            });
            if let Err(err) = r {
                return Err(self.fatal_corruption(err));
            }
        }
        match e.validate(geo) {
            Ok(()) => Ok(e),
            Err(what) => {
                let at = toff + idx * geo.l2_entry_size();
                let err = Error::corrupt(
                    self.view.path(),
                    at,
                    format!(
                        "invalid cluster entry (L2 offset {toff:#x}, L2 index {idx:#x}): {what}"
                    ),
                );
                Err(self.fatal_corruption(err))
            }
        }
    }

    pub(in crate::qcow2) fn freed_by(&self, e: L2Entry) -> Vec<u64> {
        let geo = self.view.geometry();
        if self.view.data_file().is_some() {
            // Data clusters live in the data file, unrefcounted: nothing
            // of the qcow2 file is freed (update_l2 discards them there).
            return Vec::new();
        }
        if let Some(d) = e.compressed_descriptor(geo) {
            let (a, b) = d.host_clusters(geo);
            return (a..=b).collect();
        }
        // An unaligned host offset is not freed (it is leaked), as QEMU's
        // "Cannot free unaligned cluster": which cluster it meant is unknown.
        e.host_cluster()
            .filter(|h| geo.is_aligned(h.get()))
            .map(|h| vec![geo.cluster_index(h)])
            .unwrap_or_default()
    }

    /// Plans a data write of `data` at `[a, a+data.len())` inside the
    /// cluster starting at guest `cstart`, whose entry is `e`.
    pub(super) fn plan_write<'a>(
        &self,
        idx: u64,
        e: L2Entry,
        cstart: u64,
        a: u64,
        data: &'a [u8],
        backing: BackingRead,
    ) -> Result<Plan<'a>> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let b = a + data.len() as u64;
        if !geo.extended_l2() {
            let state = self.view.entry_state(&e, 0).map_err(|what| {
                Error::corrupt(
                    self.view.path(),
                    0,
                    format!("L2 entry for {cstart:#x}: {what}"),
                )
            })?;
            if let (SubclusterState::Data { host }, true) = (state, e.copied()) {
                return Ok(Plan {
                    idx,
                    old: e,
                    new: e,
                    dest: Some(host),
                    writes: Some((a, Chunk::Borrowed(data))),
                    frees: vec![],
                });
            }
            let content = if a == 0 && b == cs {
                Chunk::Borrowed(data)
            } else {
                let mut buf = vec![0u8; cs as usize];
                self.old_view(e, cstart, &mut buf, backing)?;
                buf[a as usize..b as usize].copy_from_slice(data);
                Chunk::Owned(buf)
            };
            let reuse = match state {
                SubclusterState::Zero { host: Some(h) } if e.copied() => Some(h),
                _ => None,
            };
            let frees = if reuse.is_some() {
                vec![]
            } else {
                self.freed_by(e)
            };
            // The host offset of a new cluster is filled in once allocated.
            let new = L2Entry::data(reuse, true);
            return Ok(Plan {
                idx,
                old: e,
                new,
                dest: reuse,
                writes: Some((0, content)),
                frees,
            });
        }
        // Extended L2: subcluster granularity.
        let scs = geo.subcluster_size();
        let (sa, sb) = (a / scs, (b - 1) / scs);
        let mut touched = 0u64;
        for sc in sa..=sb {
            touched |= 1 << sc;
        }
        let host = self.view.entry_host(&e);
        if let (Some(h), true, false) = (host, e.copied(), e.compressed()) {
            let start = sa * scs;
            let end = (sb + 1) * scs;
            let content = if a == start && b == end {
                Chunk::Borrowed(data)
            } else {
                let mut buf = vec![0u8; (end - start) as usize];
                self.old_view(e, cstart + start, &mut buf, backing)?;
                buf[(a - start) as usize..(b - start) as usize].copy_from_slice(data);
                Chunk::Owned(buf)
            };
            let touched = touched as u32;
            let new = e.with_subclusters(e.alloc_bits() | touched, e.zero_bits() & !touched);
            return Ok(Plan {
                idx,
                old: e,
                new,
                dest: Some(h),
                writes: Some((start, content)),
                frees: vec![],
            });
        }
        if a == 0 && b == cs {
            // Every subcluster written: no copy needed.
            return Ok(Plan {
                idx,
                old: e,
                new: L2Entry::data(None, true).with_subclusters(u32::MAX, 0),
                dest: None,
                writes: Some((0, Chunk::Borrowed(data))),
                frees: self.freed_by(e),
            });
        }
        // A new cluster. As QEMU's calculate_l2_meta: the copy covers the
        // written subclusters and, when the old cluster has a host (shared
        // with a snapshot), every subcluster from its first to its last
        // allocated one (zero and unallocated ones in between become
        // allocated, read through); a compressed cluster is copied whole.
        // The bits of the subclusters outside the copy are kept.
        let (lo, hi) = if e.compressed() {
            (0, 31)
        } else if host.is_some() && e.bitmap as u32 != 0 {
            let alloc = e.bitmap as u32;
            (
                sa.min(u64::from(alloc.trailing_zeros())),
                sb.max(31 - u64::from(alloc.leading_zeros())),
            )
        } else {
            (sa, sb)
        };
        let mut buf = vec![0u8; cs as usize];
        let from = lo * scs;
        let to = ((hi + 1) * scs).min(self.virtual_size() - cstart);
        self.old_view(
            e,
            cstart + from,
            &mut buf[from as usize..to as usize],
            backing,
        )?;
        buf[a as usize..b as usize].copy_from_slice(data);
        let old_bits = if e.compressed() { 0 } else { e.bitmap };
        let mut range = 0u64;
        for sc in lo..=hi {
            range |= 1 << sc;
        }
        let (old_alloc, old_zero) = (old_bits as u32, (old_bits >> 32) as u32);
        let range = range as u32;
        let new = L2Entry::data(None, true).with_subclusters(old_alloc | range, old_zero & !range);
        Ok(Plan {
            idx,
            old: e,
            new,
            dest: None,
            writes: Some((0, Chunk::Owned(buf))),
            frees: self.freed_by(e),
        })
    }

    /// Writes `data` at guest `offset`. `backing` reads the layers below
    /// (for copy-on-write of partly written clusters).
    pub fn write(&mut self, offset: u64, data: &[u8], backing: BackingRead) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.begin_write()?;
        self.bitmaps_before_change(offset, data.len() as u64)?;
        let mut done = 0u64;
        while done < data.len() as u64 {
            let n = (data.len() as u64 - done).min(WRITE_BATCH);
            self.write_batch(
                offset + done,
                &data[done as usize..(done + n) as usize],
                backing,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Writes guest `[offset, offset+len)` with the bytes `src` holds at
    /// `[src_offset, src_offset+len)`, moved by
    /// [`Storage::copy_range_from`] (a clone sharing the filesystem's
    /// extents where it can) instead of through memory. Whole clusters
    /// only (`offset` and `len` cluster-aligned), and not on images with extended L2 entries: callers
    /// use [`Qcow2Image::write`](crate::Qcow2Image::write) for the rest.
    ///
    /// The protocol is that of `write`: a cluster the image does not own
    /// alone gets a new one, the moved bytes land in clusters nothing
    /// points at yet, and their L2 entries are written after the barrier
    /// that makes them durable (docs/crash-consistency.md).
    pub fn write_range_from(
        &mut self,
        offset: u64,
        len: u64,
        src: &dyn Storage,
        src_offset: u64,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let end = offset + len;
        if geo.extended_l2() || !geo.is_aligned(offset) || !geo.is_aligned(end) {
            return Err(Error::InvalidArgument(format!(
                "{}: a range write needs whole clusters of an image without subclusters \
                 ({offset:#x}+{len:#x})",
                self.view.path().display()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        self.begin_write()?;
        self.bitmaps_before_change(offset, len)?;
        let mut pos = offset;
        while pos < end {
            let batch_end = end.min(pos + WRITE_BATCH);
            let mut tables = Vec::new();
            while pos < batch_end {
                let l1i = geo.l1_index(GuestOffset::new(pos));
                let table_end = ((l1i + 1) * geo.l2_span()).min(batch_end);
                let toff = self.l2_for_write(l1i)?;
                let table = self.l2_table(toff)?;
                let mut plans = Vec::new();
                for c in geo.guest_clusters(GuestOffset::new(pos), table_end - pos) {
                    let cstart = geo.guest_cluster_start(c);
                    let idx = geo.l2_index(cstart);
                    let cstart = cstart.get();
                    let e = self.entry_for_write(&table, toff, idx)?;
                    let n = cs.min(end - cstart);
                    let chunk = Chunk::Range(src_offset + (cstart - offset), n);
                    let state = self.view.entry_state(&e, 0).map_err(|what| {
                        Error::corrupt(
                            self.view.path(),
                            0,
                            format!("L2 entry for {cstart:#x}: {what}"),
                        )
                    })?;
                    let (dest, new, frees) = match state {
                        SubclusterState::Data { host } if e.copied() => (Some(host), e, vec![]),
                        SubclusterState::Zero { host: Some(h) } if e.copied() => {
                            (Some(h), L2Entry::data(Some(h), true), vec![])
                        }
                        _ => (None, L2Entry::data(None, true), self.freed_by(e)),
                    };
                    plans.push(Plan {
                        idx,
                        old: e,
                        new,
                        dest,
                        writes: Some((0, chunk)),
                        frees,
                    });
                }
                tables.push((toff, plans));
                pos = table_end;
            }
            self.execute_from(tables, Some(src))?;
        }
        Ok(())
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                path: self.view.path().to_path_buf(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// Length of the next step: within one L2 table and WRITE_CHUNK.
    pub(super) fn chunk_len(&self, pos: u64, remaining: u64) -> u64 {
        let span = self.view.geometry().l2_span();
        let table_end = (pos / span + 1) * span;
        let chunk_end = (pos / WRITE_CHUNK + 1) * WRITE_CHUNK;
        remaining
            .min(table_end - pos)
            .min((chunk_end - pos).max(self.view.geometry().cluster_size()))
    }

    /// Plans, allocates and writes the data of one batch, then after a
    /// single barrier writes the L2 entries and the L1 entries of new
    /// tables.
    fn write_batch(&mut self, off: u64, data: &[u8], backing: BackingRead) -> Result<()> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let end = off + data.len() as u64;
        let mut tables = Vec::new();
        let mut pos = off;
        while pos < end {
            let l1i = geo.l1_index(GuestOffset::new(pos));
            let table_end = ((l1i + 1) * geo.l2_span()).min(end);
            let toff = self.l2_for_write(l1i)?;
            let table = self.l2_table(toff)?;
            let mut plans = Vec::new();
            for c in geo.guest_clusters(GuestOffset::new(pos), table_end - pos) {
                let cstart = geo.guest_cluster_start(c).get();
                let a = pos.max(cstart);
                let b = table_end.min(cstart + cs);
                let idx = geo.l2_index(GuestOffset::new(cstart));
                let e = self.entry_for_write(&table, toff, idx)?;
                let slice = &data[(a - off) as usize..(b - off) as usize];
                plans.push(self.plan_write(idx, e, cstart, a - cstart, slice, backing)?);
            }
            tables.push((toff, plans));
            pos = table_end;
        }
        self.execute(tables)
    }

    /// Allocates, writes data, then (after a barrier) the L2 entries of
    /// every table and the L1 entries of new tables.
    pub(super) fn execute(&mut self, tables: Vec<(u64, Vec<Plan<'_>>)>) -> Result<()> {
        self.execute_from(tables, None)
    }

    /// [`Self::execute`], with `src` the storage that [`Chunk::Range`]
    /// writes move bytes from.
    fn execute_from(
        &mut self,
        mut tables: Vec<(u64, Vec<Plan<'_>>)>,
        src: Option<&dyn Storage>,
    ) -> Result<()> {
        let geo = self.view.geometry();
        // Allocate new clusters, in runs; their entries get the offsets.
        // Only plans that write need one: a plan without writes (a cluster
        // zeroed whole next to partly zeroed ones) only changes its entry.
        let mut need: Vec<(usize, usize)> = Vec::new();
        for (t, (_, plans)) in tables.iter().enumerate() {
            need.extend(
                (0..plans.len())
                    .filter(|i| plans[*i].dest.is_none() && plans[*i].writes.is_some())
                    .map(|i| (t, i)),
            );
        }
        if self.view.data_ref().is_some() {
            // An external data file: a new cluster's host offset is its
            // guest offset (QEMU's do_alloc_cluster_offset).
            for &(t, i) in &need {
                let base = self.view.data_file_table_base(tables[t].0)?;
                let p = &mut tables[t].1[i];
                let host = HostOffset::new(base + geo.clusters_bytes(p.idx));
                p.dest = Some(host);
                p.new = p.new.with_host(host);
            }
            need.clear();
        }
        let mut k = 0;
        while k < need.len() {
            let (first, n) = self.alloc_run((need.len() - k) as u64, "data clusters")?;
            for j in 0..n as usize {
                let (t, i) = need[k + j];
                let p = &mut tables[t].1[i];
                let host = geo.cluster_start(first + j as u64);
                p.dest = Some(host);
                p.new = p.new.with_host(host);
            }
            k += n as usize;
        }
        // Data writes, coalesced by host offset into vectored writes;
        // range moves, coalesced where both sides are contiguous.
        let mut runs: Vec<(u64, Vec<&[u8]>, u64)> = Vec::new();
        let mut moves: Vec<(u64, u64, u64)> = Vec::new();
        for (_, plans) in &tables {
            for p in plans {
                let dest = p.dest.map_or(0, HostOffset::get);
                if let Some((at, chunk)) = &p.writes {
                    let h = dest + at;
                    if let Chunk::Range(from, n) = chunk {
                        match moves.last_mut() {
                            Some((d, f, len)) if *d + *len == h && *f + *len == *from => {
                                *len += n;
                            }
                            _ => moves.push((h, *from, *n)),
                        }
                        continue;
                    }
                    let bytes = chunk.bytes();
                    match runs.last_mut() {
                        Some((start, v, len))
                            if *start + *len == h && *len < MAX_VECTORED_BYTES =>
                        {
                            v.push(bytes);
                            *len += bytes.len() as u64;
                        }
                        _ => runs.push((h, vec![bytes], bytes.len() as u64)),
                    }
                }
            }
        }
        let spans = runs
            .iter()
            .map(|(h, _, len)| (*h, *len))
            .chain(moves.iter().map(|(h, _, len)| (*h, *len)))
            .collect::<Vec<_>>();
        // Data in an external data file cannot overlap the qcow2 file's
        // metadata.
        for (h, len) in spans.iter().filter(|_| self.view.data_ref().is_none()) {
            let r = self
                .w
                .meta()
                .guard(self.view.path(), || "data write".into(), *h, *len, &[]);
            if r.is_err() {
                drop(runs);
                return self.on_overlap(r);
            }
        }
        let mut written = 0;
        for (h, bufs, len) in &runs {
            self.w.write_data_vectored(bufs, *h)?;
            written += len;
        }
        drop(runs);
        if !moves.is_empty() {
            let src = src.ok_or_else(|| {
                Error::InvalidArgument("a range write without its source storage".into())
            })?;
            for (h, from, len) in &moves {
                let how = self.w.copy_data_from(src, *from, *len, *h)?;
                // A clone leaves no data to write back, only the remapping
                // the next barrier commits, whatever its size: it does not
                // bring the next commit forward (docs/BENCHMARKS.md).
                if how != RangeCopy::Cloned {
                    written += len;
                }
            }
        }
        self.w.add_unsynced(written.max(1));
        for (toff, plans) in &tables {
            self.update_l2(*toff, plans)?;
        }
        self.maybe_commit_metadata()
    }

    /// Applies the changed entries of an L2 table in memory (they are
    /// written at the next metadata commit) and queues the frees.
    pub(in crate::qcow2) fn update_l2(&mut self, toff: u64, plans: &[Plan<'_>]) -> Result<()> {
        let geo = self.view.geometry();
        if plans.iter().all(|p| p.new == p.old) {
            return Ok(());
        }
        // The clusters this frees are released at the next flush, after
        // the new entries are on disk: their refcount blocks must be
        // readable now, or the entries would change and the free fail
        // (QEMU 060, "Discarding with an unaligned refblock").
        let frees: Vec<u64> = plans
            .iter()
            .filter(|p| p.new != p.old)
            .flat_map(|p| p.frees.iter().copied())
            .collect();
        self.check_freeable(&frees)?;
        let taken = self.w.unpin(toff);
        let mut d = match taken {
            Some(d) => d,
            None => {
                let table = self.l2_table(toff)?;
                // Pinned from here on: out of the cache.
                self.view.uncache_l2(toff);
                DirtyTable {
                    table,
                    lo: u64::MAX,
                    hi: 0,
                }
            }
        };
        let table = Arc::make_mut(&mut d.table);
        let mut frees = Vec::new();
        for p in plans.iter().filter(|p| p.new != p.old) {
            self.view.data_file_release(p.old, p.new);
            p.new
                .write(table, geo, p.idx)
                .map_err(|source| Error::Format {
                    path: self.view.path().to_path_buf(),
                    source,
                })?;
            d.lo = d.lo.min(p.idx);
            d.hi = d.hi.max(p.idx);
            frees.extend_from_slice(&p.frees);
        }
        let ws = &mut self.w;
        ws.pin(toff, d);
        ws.free_later(frees);
        Ok(())
    }
}
