//! Refcounts and cluster allocation for the write path.
//!
//! The refcount table and the refcount blocks touched so far are held in
//! memory; changes are written back by [`Refcounts::write_blocks`] and
//! [`Refcounts::write_table`] at the points the crash protocol
//! (docs/crash-consistency.md) puts them: refcount blocks with the data
//! they describe, before the barrier that precedes any pointer update;
//! refcount table entries for new blocks after the blocks are durable.
//!
//! New refcount blocks are placed at the first cluster of the range they
//! describe, so they describe themselves and no recursion is needed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use strata_format::refcount::{self, REFTABLE_OFFSET_MASK};
use strata_format::table::decode_u64_table;
use strata_format::{Geometry, HostOffset};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// A kind of metadata the overlap check protects, in QEMU's order and
/// with QEMU's names (`qcow2_check_metadata_overlap`): when a cluster
/// holds several, the first one is reported, as QEMU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Meta {
    /// Cluster 0 and the header extensions in it.
    Header = 0,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table the active L1 table points at.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
    /// An L2 table a snapshot's L1 table points at.
    InactiveL2,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table (not checked by QEMU; Strata protects it too).
    BitmapTable,
}

const ALL_META: [Meta; 10] = [
    Meta::Header,
    Meta::ActiveL1,
    Meta::ActiveL2,
    Meta::RefcountTable,
    Meta::RefcountBlock,
    Meta::SnapshotTable,
    Meta::InactiveL1,
    Meta::InactiveL2,
    Meta::BitmapDirectory,
    Meta::BitmapTable,
];

impl Meta {
    /// QEMU's name for it (`metadata_ol_names`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Meta::Header => "qcow2_header",
            Meta::ActiveL1 => "active L1 table",
            Meta::ActiveL2 => "active L2 table",
            Meta::RefcountTable => "refcount table",
            Meta::RefcountBlock => "refcount block",
            Meta::SnapshotTable => "snapshot table",
            Meta::InactiveL1 => "inactive L1 table",
            Meta::InactiveL2 => "inactive L2 table",
            Meta::BitmapDirectory => "bitmap directory",
            Meta::BitmapTable => "bitmap table",
        }
    }
    fn bit(self) -> u16 {
        1 << self as u8
    }
}

/// The host clusters holding metadata, and which kinds each holds: a
/// sorted map built when the image is opened for writing and kept up to
/// date by the writer as it allocates, moves and drops tables. Every data
/// write and every allocation is checked against it before anything is
/// written (docs/crash-consistency.md, "Metadata overlap protection").
#[derive(Debug, Clone)]
pub(crate) struct MetadataMap {
    geo: Geometry,
    clusters: BTreeMap<u64, u16>,
    /// Metadata that could not be located (a snapshot L1 table at an
    /// unaligned offset): nothing can be checked, so every write is
    /// refused, as QEMU's full overlap check refuses it (iotest 080).
    unknown: Option<(u64, String)>,
}

impl MetadataMap {
    pub(crate) fn new(geo: Geometry) -> MetadataMap {
        MetadataMap {
            geo,
            clusters: BTreeMap::new(),
            unknown: None,
        }
    }

    /// Records that the metadata at `off` cannot be located (`what`).
    pub(crate) fn set_unknown(&mut self, off: u64, what: String) {
        self.unknown.get_or_insert((off, what));
    }

    /// Cluster indices covering `[off, off+len)` (empty for `len` 0 or an
    /// overflowing range: nothing is recorded for a structure that cannot
    /// be in the file).
    fn span(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        match off.checked_add(len) {
            Some(_) => self.geo.host_clusters(HostOffset::new(off), len),
            None => 0..0,
        }
    }

    /// Records `[off, off+len)` as holding `kind`.
    pub(crate) fn add(&mut self, off: u64, len: u64, kind: Meta) {
        for ci in self.span(off, len) {
            *self.clusters.entry(ci).or_insert(0) |= kind.bit();
        }
    }

    /// Forgets that `[off, off+len)` holds `kind` (other kinds stay).
    pub(crate) fn remove(&mut self, off: u64, len: u64, kind: Meta) {
        for ci in self.span(off, len) {
            if let Some(bits) = self.clusters.get_mut(&ci) {
                *bits &= !kind.bit();
                if *bits == 0 {
                    self.clusters.remove(&ci);
                }
            }
        }
    }

    /// The first metadata cluster in `[off, off+len)` holding a kind not
    /// in `allowed`: its host offset and the kind reported.
    pub(crate) fn overlap(&self, off: u64, len: u64, allowed: &[Meta]) -> Option<(u64, Meta)> {
        let mask = allowed.iter().fold(0u16, |m, k| m | k.bit());
        if len == 0 {
            return None;
        }
        // A range running past 2^64 is checked up to the end (never skipped).
        let span = self.geo.host_clusters(HostOffset::new(off), len);
        self.clusters
            .range(span)
            .find(|(_, bits)| *bits & !mask != 0)
            .and_then(|(ci, bits)| {
                let kind = ALL_META.into_iter().find(|k| bits & !mask & k.bit() != 0)?;
                Some((self.geo.cluster_start(*ci).get(), kind))
            })
    }

    /// The error for a write of `[off, off+len)` (described by `op`)
    /// that would overwrite `kind` at `at`.
    pub(crate) fn error(path: &Path, op: String, off: u64, len: u64, at: u64, kind: Meta) -> Error {
        Error::MetadataOverlap {
            path: path.to_path_buf(),
            op,
            offset: off,
            len,
            structure: kind.name(),
            structure_offset: at,
        }
    }

    /// Refuses a write of `[off, off+len)` that lands on metadata other
    /// than `allowed`.
    pub(crate) fn guard(
        &self,
        path: &Path,
        op: impl FnOnce() -> String,
        off: u64,
        len: u64,
        allowed: &[Meta],
    ) -> Result<()> {
        if let Some((at, what)) = &self.unknown {
            // Not a corruption found by the write: refuse, mark nothing.
            return Err(Error::ReadOnly {
                path: path.to_path_buf(),
                why: format!(
                    "{what} (host offset {at:#x}); {} refused, since the overlap check \
                     cannot protect it",
                    op()
                ),
            });
        }
        match self.overlap(off, len, allowed) {
            None => Ok(()),
            Some((at, kind)) => Err(Self::error(path, op(), off, len, at, kind)),
        }
    }
}

/// Most clusters the allocator hands out in one run.
pub const MAX_RUN_CLUSTERS: u64 = 1 << 16;

/// In-memory state of an image's refcount structures.
#[derive(Debug)]
pub(crate) struct Refcounts {
    geo: Geometry,
    order: u32,
    /// Refcount table entries (raw).
    pub(crate) table: Vec<u64>,
    /// Host offset of the refcount table.
    pub(crate) table_offset: u64,
    /// Clusters the refcount table occupies.
    pub(crate) table_clusters: u32,
    /// Refcount blocks read or created, by block index.
    blocks: HashMap<u64, Vec<u8>>,
    /// Blocks changed in memory and not yet written.
    dirty_blocks: BTreeSet<u64>,
    /// Table entries changed in memory and not yet written.
    dirty_entries: BTreeSet<u64>,
    /// A new, larger refcount table waiting to be written and pointed at.
    pub(crate) table_moved: Option<(u64, u32)>,
    /// The old table's location, to free once the header points elsewhere.
    pub(crate) old_table: Option<(u64, u32)>,
    /// Lowest cluster index that may be free.
    free_hint: u64,
    /// First cluster past the file and everything allocated this session.
    end_hint: u64,
    /// Where the image's metadata lies; allocations never land there.
    pub(crate) meta: MetadataMap,
}

impl Refcounts {
    /// Loads the refcount table described by the header.
    pub(crate) fn load(
        storage: &dyn Storage,
        path: &Path,
        file_len: u64,
        geo: Geometry,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Refcounts> {
        let bytes = geo.clusters_bytes(u64::from(table_clusters)) as usize;
        let mut raw = vec![0u8; bytes];
        let n = storage
            .read_at(&mut raw, table_offset)
            .map_err(|e| Error::io(path, "read refcount table", table_offset, e))?;
        if n < bytes {
            return Err(Error::corrupt(
                path,
                table_offset,
                "refcount table extends past the end of the file",
            ));
        }
        let table = decode_u64_table(&raw);
        Ok(Refcounts {
            geo,
            order,
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            dirty_entries: BTreeSet::new(),
            table_moved: None,
            old_table: None,
            free_hint: 0,
            end_hint: geo.clusters_for(file_len),
            // Filled by WritableImage::load_metadata_map, which knows the rest.
            meta: MetadataMap::new(geo),
        })
    }

    fn per_block(&self) -> u64 {
        refcount::entries_per_block(self.geo.cluster_bits(), self.order)
    }

    fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Host offset of the first byte of cluster `ci`.
    fn start(&self, ci: u64) -> u64 {
        self.geo.cluster_start(ci).get()
    }

    /// The refcount block covering block index `bi`, loaded if needed;
    /// `None` when the table has no block there.
    fn block(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        bi: u64,
    ) -> Result<Option<&mut Vec<u8>>> {
        if !self.blocks.contains_key(&bi) {
            let entry = usize::try_from(bi)
                .ok()
                .and_then(|i| self.table.get(i))
                .copied()
                .unwrap_or(0);
            let off = entry & REFTABLE_OFFSET_MASK;
            if off == 0 {
                return Ok(None);
            }
            if off & (self.cluster_size() - 1) != 0 {
                return Err(Error::corrupt(
                    path,
                    off,
                    "refcount block offset not cluster-aligned",
                ));
            }
            let mut b = vec![0u8; self.cluster_size() as usize];
            let n = storage
                .read_at(&mut b, off)
                .map_err(|e| Error::io(path, "read refcount block", off, e))?;
            if n < b.len() {
                return Err(Error::corrupt(
                    path,
                    off,
                    "refcount block extends past the end of the file",
                ));
            }
            self.blocks.insert(bi, b);
        }
        Ok(self.blocks.get_mut(&bi))
    }

    /// The refcount of host cluster `ci`.
    pub(crate) fn get(&mut self, storage: &dyn Storage, path: &Path, ci: u64) -> Result<u64> {
        let per = self.per_block();
        let order = self.order;
        match self.block(storage, path, ci / per)? {
            None => Ok(0),
            Some(b) => Ok(refcount::get(b, order, ci % per).unwrap_or(0)),
        }
    }

    /// Sets the refcount of cluster `ci` (repairs); the block must exist.
    pub(crate) fn set(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        ci: u64,
        value: u64,
    ) -> Result<()> {
        self.set_existing(storage, path, ci, value)
    }

    /// Sets the refcount of cluster `ci`; the block must exist.
    fn set_existing(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        ci: u64,
        value: u64,
    ) -> Result<()> {
        let per = self.per_block();
        let order = self.order;
        let bi = ci / per;
        let at = self.start(ci);
        self.block(storage, path, bi)?
            .ok_or_else(|| Error::corrupt(path, at, "no refcount block for cluster"))?;
        if !self.dirty_blocks.contains(&bi) {
            // The block will be written back: it must not lie on other metadata.
            let off = self.block_offset(bi);
            let cs = self.cluster_size();
            self.meta.guard(
                path,
                || format!("refcount block write (reftable index {bi:#x})"),
                off,
                cs,
                &[Meta::RefcountBlock],
            )?;
        }
        let b = self
            .blocks
            .get_mut(&bi)
            .ok_or_else(|| Error::corrupt(path, at, "no refcount block for cluster"))?;
        if !refcount::set(b, order, ci % per, value) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!("refcount {value} does not fit in {} bits", 1u32 << order),
            });
        }
        self.dirty_blocks.insert(bi);
        Ok(())
    }

    /// Sets the refcounts of clusters `[first, first+n)` to `value`, as
    /// [`Refcounts::set_existing`] on each in turn would (the blocks must
    /// exist), with one block lookup (and one overlap check of a block
    /// not yet dirty) per refcount block instead of per cluster.
    fn set_run(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        first: u64,
        n: u64,
        value: u64,
    ) -> Result<()> {
        let per = self.per_block();
        let order = self.order;
        let end = first.saturating_add(n);
        let mut ci = first;
        while ci < end {
            let bi = ci / per;
            let stop = bi.saturating_add(1).saturating_mul(per).min(end);
            // The first cluster of the segment stands for all of it: same
            // block, same errors.
            self.set_existing(storage, path, ci, value)?;
            let b = self.blocks.get_mut(&bi).ok_or_else(|| {
                Error::corrupt(
                    path,
                    self.geo.cluster_start(ci).get(),
                    "no refcount block for cluster",
                )
            })?;
            for c in ci + 1..stop {
                if !refcount::set(b, order, c % per, value) {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        what: format!("refcount {value} does not fit in {} bits", 1u32 << order),
                    });
                }
            }
            ci = stop;
        }
        Ok(())
    }

    /// The first cluster in `[from, to)` (all in one refcount block's
    /// range, its block loaded or absent) whose refcount is `zero` (0) or
    /// not (`!zero`); `to` when there is none. An absent block reads as
    /// all zeros.
    fn scan_block(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        from: u64,
        to: u64,
        zero: bool,
    ) -> Result<u64> {
        let per = self.per_block();
        let order = self.order;
        let Some(b) = self.block(storage, path, from / per)? else {
            return Ok(if zero { from } else { to });
        };
        let mut c = from;
        while c < to && (refcount::get(b, order, c % per).unwrap_or(0) == 0) != zero {
            c += 1;
        }
        Ok(c)
    }

    /// Host offset of refcount block `bi` as the table records it (0: none).
    fn block_offset(&self, bi: u64) -> u64 {
        usize::try_from(bi)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0)
            & REFTABLE_OFFSET_MASK
    }

    /// Refuses to allocate clusters `[first, first+n)` when any holds
    /// metadata (their refcount said free: the refcounts are corrupt).
    fn guard_alloc(&self, path: &Path, first: u64, n: u64) -> Result<()> {
        self.guard_alloc_as(path, first, n, "allocation")
    }

    fn guard_alloc_as(&self, path: &Path, first: u64, n: u64, what: &str) -> Result<()> {
        self.meta.guard(
            path,
            || format!("{what} of {n} cluster(s)"),
            self.start(first),
            self.geo.clusters_bytes(n),
            &[],
        )
    }

    /// Adds `delta` (±1) to the refcount of cluster `ci`.
    pub(crate) fn adjust(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        ci: u64,
        delta: i64,
    ) -> Result<u64> {
        let cur = self.get(storage, path, ci)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .ok_or_else(|| {
            Error::corrupt(
                path,
                self.start(ci),
                format!("refcount of cluster {ci} would go below zero"),
            )
        })?;
        if delta >= 0 && new > refcount::max_refcount(self.order) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "refcount of cluster {ci} would overflow {} bits",
                    1u32 << self.order
                ),
            });
        }
        self.set_existing(storage, path, ci, new)?;
        Ok(new)
    }

    /// Makes sure a refcount block exists for cluster `ci`, creating one
    /// at the first cluster of its range (describing itself) if needed.
    /// Returns the cluster index of a block created, if any.
    fn ensure_block(&mut self, storage: &dyn Storage, path: &Path, ci: u64) -> Result<Option<u64>> {
        let per = self.per_block();
        let bi = ci / per;
        if self.block(storage, path, bi)?.is_some() {
            return Ok(None);
        }
        self.ensure_table_slot(storage, path, bi)?;
        if self.has_block(bi) {
            // Growing the table placed a block for this range already.
            return Ok(None);
        }
        let block_ci = bi * per;
        self.guard_alloc_as(path, block_ci, 1, "placement of a new refcount block")?;
        self.meta.add(
            self.start(block_ci),
            self.cluster_size(),
            Meta::RefcountBlock,
        );
        let mut b = vec![0u8; self.cluster_size() as usize];
        // The block describes itself: refcount 1 at index 0.
        refcount::set(&mut b, self.order, 0, 1);
        self.blocks.insert(bi, b);
        self.dirty_blocks.insert(bi);
        if let Some(e) = usize::try_from(bi).ok().and_then(|i| self.table.get_mut(i)) {
            *e = self.geo.cluster_start(block_ci).get();
        }
        self.dirty_entries.insert(bi);
        Ok(Some(block_ci))
    }

    /// Makes sure the refcount table has an entry for block `bi`, moving
    /// it (in memory) to a larger table at the end of the file if needed.
    fn ensure_table_slot(&mut self, storage: &dyn Storage, path: &Path, bi: u64) -> Result<()> {
        if (bi as usize) < self.table.len() {
            return Ok(());
        }
        self.place_at_end(storage, path, 0, bi + 1)?;
        Ok(())
    }

    /// Whether a refcount block exists (or is being created) for `bi`.
    fn has_block(&self, bi: u64) -> bool {
        self.blocks.contains_key(&bi)
            || usize::try_from(bi)
                .ok()
                .and_then(|i| self.table.get(i))
                .is_some_and(|e| e & REFTABLE_OFFSET_MASK != 0)
    }

    /// Allocates `n` contiguous clusters past everything in use, together
    /// with the refcount blocks they need (placed just before them) and,
    /// when the table is too small for `min_entries` or for those blocks,
    /// a larger refcount table. Returns the first cluster of the run.
    fn place_at_end(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        n: u64,
        min_entries: u64,
    ) -> Result<u64> {
        let per = self.per_block();
        let cs = self.cluster_size();
        // Start past the end of the file and of this session's allocations,
        // and past any cluster still counted there.
        let mut start = self.end_hint;
        while self.get(storage, path, start)? != 0 {
            start += 1;
        }
        let (mut k, mut t) = (0u64, 0u64);
        let (blocks, entries) = loop {
            let total = k + t + n;
            let first_bi = start / per;
            let last_bi = (start + total.max(1) - 1) / per;
            let blocks: Vec<u64> = (first_bi..=last_bi)
                .filter(|bi| !self.has_block(*bi))
                .collect();
            let need_entries = (last_bi + 1).max(min_entries);
            let new_t = if need_entries > self.table.len() as u64 {
                let mut e = (self.table.len() as u64).max(1);
                while e < need_entries {
                    e *= 2;
                }
                (e * 8).div_ceil(cs)
            } else {
                0
            };
            if blocks.len() as u64 == k && new_t == t {
                break (blocks, t * cs / 8);
            }
            k = blocks.len() as u64;
            t = new_t;
        };
        if t * cs > strata_format::limits::MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "refcount table would exceed its size limit".into(),
            });
        }
        self.guard_alloc(path, start, k + t + n)?;
        if t > 0 {
            let old_len = self.table.len() as u64;
            self.table.resize(entries as usize, 0);
            self.dirty_entries.extend(old_len..entries);
            if let Some((off, clusters)) = self.table_moved.take() {
                // A table placed earlier and never pointed at: release it.
                let first = self.geo.cluster_index(HostOffset::new(off));
                self.set_run(storage, path, first, u64::from(clusters), 0)?;
                let len = self.geo.clusters_bytes(u64::from(clusters));
                self.meta.remove(off, len, Meta::RefcountTable);
            } else {
                self.old_table = Some((self.table_offset, self.table_clusters));
            }
            let at = self.start(start + k);
            self.table_moved = Some((at, t as u32));
            self.meta.add(at, t * cs, Meta::RefcountTable);
        }
        for (j, bi) in blocks.iter().enumerate() {
            let at = self.start(start + j as u64);
            self.meta.add(at, cs, Meta::RefcountBlock);
            self.blocks.insert(*bi, vec![0u8; cs as usize]);
            self.dirty_blocks.insert(*bi);
            if let Some(e) = usize::try_from(*bi)
                .ok()
                .and_then(|i| self.table.get_mut(i))
            {
                *e = at;
            }
            self.dirty_entries.insert(*bi);
        }
        let total = k + t + n;
        self.set_run(storage, path, start, total, 1)?;
        self.end_hint = start + total;
        Ok(start + k + t)
    }

    /// Allocates up to `max` contiguous clusters (at least one) with
    /// refcount 1; returns the first cluster index and the count. Creates
    /// refcount blocks as needed.
    pub(crate) fn alloc_run(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        max: u64,
    ) -> Result<(u64, u64)> {
        let max = max.clamp(1, MAX_RUN_CLUSTERS);
        let per = self.per_block();
        let mut ci = self.free_hint;
        // Find the first free cluster, a refcount block at a time (each
        // block created first if missing, as the allocation needs it).
        loop {
            self.ensure_block(storage, path, ci)?;
            let block_end = (ci / per + 1) * per;
            ci = self.scan_block(storage, path, ci, block_end, true)?;
            if ci < block_end {
                break;
            }
        }
        self.guard_alloc(path, ci, 1)?;
        let first = ci;
        // The run stops before the first cluster holding metadata (its
        // refcount said free: the next allocation reports it).
        let limit = self
            .meta
            .overlap(self.start(first), self.geo.clusters_bytes(max), &[])
            .map_or(first + max, |(at, _)| {
                self.geo.cluster_index(HostOffset::new(at))
            });
        // Then the free clusters after it, a block at a time; crossing into
        // another block's range stops the run when that block is missing
        // (it may need to be created at this very cluster).
        let mut end = first;
        while end < limit {
            if end.is_multiple_of(per)
                && end != first
                && self.block(storage, path, end / per)?.is_none()
            {
                break;
            }
            let block_end = ((end / per + 1) * per).min(limit);
            let stop = self.scan_block(storage, path, end, block_end, false)?;
            end = stop;
            if stop < block_end {
                break;
            }
        }
        let n = end - first;
        self.set_run(storage, path, first, n, 1)?;
        self.free_hint = first + n;
        self.end_hint = self.end_hint.max(first + n);
        Ok((first, n))
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the first
    /// cluster index. Shorter free runs met on the way are released again
    /// (they were never referenced).
    pub(crate) fn alloc_contiguous(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
        n: u64,
    ) -> Result<u64> {
        if n == 0 || n > MAX_RUN_CLUSTERS {
            return Err(Error::InvalidArgument(format!(
                "cannot allocate {n} contiguous clusters"
            )));
        }
        if n == 1 {
            return Ok(self.alloc_run(storage, path, 1)?.0);
        }
        self.place_at_end(storage, path, n, 0)
    }

    /// The file was truncated to `clusters` clusters (all past it free):
    /// allocations at the end start there.
    pub(crate) fn truncated(&mut self, clusters: u64) {
        self.end_hint = clusters;
        self.free_hint = self.free_hint.min(clusters);
    }

    /// Lets the allocator look for free clusters from the start again
    /// (after frees have been made durable).
    pub(crate) fn rewind(&mut self) {
        self.free_hint = 0;
    }

    /// Whether table entries (new blocks) or a moved table wait to be written.
    pub(crate) fn table_dirty(&self) -> bool {
        !self.dirty_entries.is_empty() || self.table_moved.is_some()
    }

    /// Writes every changed refcount block.
    pub(crate) fn write_blocks(&mut self, storage: &dyn Storage, path: &Path) -> Result<()> {
        for bi in std::mem::take(&mut self.dirty_blocks) {
            let off = usize::try_from(bi)
                .ok()
                .and_then(|i| self.table.get(i))
                .copied()
                .unwrap_or(0)
                & REFTABLE_OFFSET_MASK;
            if let Some(b) = self.blocks.get(&bi) {
                storage
                    .write_at(b, off)
                    .map_err(|e| Error::io(path, "write refcount block", off, e))?;
            }
        }
        Ok(())
    }

    /// Writes changed refcount table entries (or the whole new table when
    /// it moved). Returns the new table location when the header must be
    /// updated to point at it.
    pub(crate) fn write_table(
        &mut self,
        storage: &dyn Storage,
        path: &Path,
    ) -> Result<Option<(u64, u32)>> {
        let entries = std::mem::take(&mut self.dirty_entries);
        if let Some((off, clusters)) = self.table_moved {
            let raw = strata_format::table::encode_u64_table(&self.table);
            storage
                .write_at(&raw, off)
                .map_err(|e| Error::io(path, "write refcount table", off, e))?;
            return Ok(Some((off, clusters)));
        }
        for i in entries {
            let v = usize::try_from(i)
                .ok()
                .and_then(|x| self.table.get(x))
                .copied()
                .unwrap_or(0);
            let off = self.table_offset + i * 8;
            storage
                .write_at(&v.to_be_bytes(), off)
                .map_err(|e| Error::io(path, "write refcount table entry", off, e))?;
        }
        Ok(None)
    }

    /// Records that the header now points at the moved table; returns the
    /// old table's clusters, to be freed.
    pub(crate) fn table_switched(&mut self) -> Option<(u64, u32)> {
        if let Some((off, clusters)) = self.table_moved.take() {
            self.table_offset = off;
            self.table_clusters = clusters;
        }
        let old = self.old_table.take();
        if let Some((off, clusters)) = old {
            let len = self.geo.clusters_bytes(u64::from(clusters));
            self.meta.remove(off, len, Meta::RefcountTable);
            // The new table may share clusters with nothing else; keep its role.
            let len = self.geo.clusters_bytes(u64::from(self.table_clusters));
            self.meta.add(self.table_offset, len, Meta::RefcountTable);
        }
        old
    }
}

#[cfg(test)]
mod metadata_map_tests {
    use super::*;

    // 64 KiB clusters.
    const CB: Geometry = Geometry::DEFAULT;

    #[test]
    fn overlap_reports_the_first_kind_in_qemus_order() {
        let mut m = MetadataMap::new(CB);
        m.add(0x20000, 0x10000, Meta::InactiveL2);
        m.add(0x20000, 0x10000, Meta::RefcountBlock);
        assert_eq!(
            m.overlap(0x20000, 512, &[]),
            Some((0x20000, Meta::RefcountBlock))
        );
        // An allowed kind is skipped; the other one is still reported.
        assert_eq!(
            m.overlap(0x2_0100, 1, &[Meta::RefcountBlock]),
            Some((0x20000, Meta::InactiveL2))
        );
    }

    #[test]
    fn ranges_are_cluster_granular_and_end_exclusive() {
        let mut m = MetadataMap::new(CB);
        // A snapshot table of 100 bytes at an unaligned offset.
        m.add(0x3_fff0, 100, Meta::SnapshotTable);
        assert!(m.overlap(0x30000, 0x10000, &[]).is_some());
        assert!(m.overlap(0x40000, 1, &[]).is_some());
        assert_eq!(m.overlap(0x50000, 0x10000, &[]), None);
        // A write ending exactly where the metadata begins does not touch it.
        assert_eq!(m.overlap(0x20000, 0x10000, &[]), None);
    }

    #[test]
    fn removing_one_role_keeps_the_others() {
        let mut m = MetadataMap::new(CB);
        m.add(0x40000, 0x10000, Meta::ActiveL2);
        m.add(0x40000, 0x10000, Meta::InactiveL2);
        m.remove(0x40000, 0x10000, Meta::ActiveL2);
        assert_eq!(
            m.overlap(0x40000, 1, &[]),
            Some((0x40000, Meta::InactiveL2))
        );
        m.remove(0x40000, 0x10000, Meta::InactiveL2);
        assert_eq!(m.overlap(0x40000, 1, &[]), None);
    }

    #[test]
    fn hostile_ranges_neither_panic_nor_match() {
        let mut m = MetadataMap::new(CB);
        m.add(u64::MAX - 10, 100, Meta::BitmapTable); // overflows: ignored
        m.add(0x10000, 0, Meta::BitmapTable); // empty: ignored
        assert_eq!(m.overlap(0, u64::MAX, &[]), None);
        assert_eq!(m.overlap(u64::MAX, 2, &[]), None);
        // A write range that overflows is still checked up to the end.
        m.add(0xffff_0000_0000, 0x10000, Meta::ActiveL2);
        assert!(m.overlap(0xfff0_0000_0000, u64::MAX, &[]).is_some());
    }

    #[test]
    fn unknown_metadata_refuses_every_write() {
        let mut m = MetadataMap::new(CB);
        m.set_unknown(
            0x400200,
            "the L1 table of snapshot \"a\" is not cluster-aligned".into(),
        );
        let e = m
            .guard(
                Path::new("t.qcow2"),
                || "data write".into(),
                0x900000,
                512,
                &[],
            )
            .unwrap_err();
        assert!(e.to_string().contains("not cluster-aligned"), "{e}");
    }
}
