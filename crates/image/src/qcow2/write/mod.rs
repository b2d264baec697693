//! The qcow2 write path: allocating writes with copy-on-write, zero
//! writes, discards, flush, resize and header updates.
//!
//! The order of every write and sync is the crash-consistency contract;
//! docs/crash-consistency.md explains why each step is safe. In short:
//!
//! 1. New data, new L2 tables and the refcount blocks that count them are
//!    written to clusters nothing points at yet.
//! 2. A barrier (fdatasync) makes them durable. When new refcount blocks
//!    were created, their refcount table entries are written after a first
//!    sync, and a moved refcount table is switched in the header after a
//!    second one.
//! 3. Only then are pointers written: L2 entries, L1 entries.
//! 4. Clusters that lost their last pointer are freed (refcount decrement)
//!    only at the next flush, after a sync has made the pointer change
//!    durable. A crash in between leaks them; nothing points at freed space.
//!
//! This module holds that protocol (begin, guard, barrier, metadata
//! commit, flush, header and size changes, close); the kinds of writes
//! built on it are its submodules: [`data`] (allocating writes with
//! copy-on-write), [`zero`] (zero writes, discards, emptying),
//! [`prealloc`] and [`compressed`].

use std::sync::Arc;

use strata_format::header::{Autoclear, Incompatible};
use strata_format::{HostOffset, L1Entry, L2Entry};

use crate::error::{Error, Result};
use crate::qcow2::alloc::{Meta, MetadataMap};
use crate::qcow2::WritableImage;

mod compressed;
mod data;
mod prealloc;
mod zero;

pub(crate) use compressed::CompressedTail;
pub use prealloc::PreallocFill;

/// Reads the guest view of the layers below an image: fills the buffer
/// from the guest offset, zeros past their end.
pub type BackingRead<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// Guest bytes handled per step of a zero write or discard.
pub const WRITE_CHUNK: u64 = 8 << 20;
/// Guest bytes of one write handled between two barriers (the data is the
/// caller's; only partly written clusters are copied).
pub const WRITE_BATCH: u64 = 64 << 20;
/// Largest single vectored write.
const MAX_VECTORED_BYTES: u64 = 32 << 20;

/// Most bytes of snapshot L1 tables read to build the overlap check's
/// map (an image past it refuses writes).
const SNAPSHOT_L1_BUDGET: u64 = 32 << 20;

/// Metadata changes are committed (barrier, then pointer writes) when
/// this many bytes of dirty L2 tables are held...
const MAX_DIRTY_TABLE_BYTES: u64 = 16 << 20;

/// [`Qcow2Image::make_empty`](crate::Qcow2Image::make_empty) writes the L1 entries of this many dropped
/// tables, or of the tables holding this many clusters, before freeing
/// them (bounds its memory and the work a crash may leak).
const DROP_BATCH_TABLES: usize = 256;
const DROP_BATCH_FREES: usize = 1 << 20;
/// ... or this many data bytes were written since the last commit (cloned
/// runs do not count: they leave nothing to write back).
const MAX_UNSYNCED_BYTES: u64 = 256 << 20;

/// Bytes to write: the caller's, a copy-on-write buffer, or a run of
/// another storage moved by [`Storage::copy_range_from`](crate::storage::Storage::copy_range_from) (offset there,
/// length).
pub(in crate::qcow2) enum Chunk<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Range(u64, u64),
}

impl Chunk<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Borrowed(b) => b,
            Chunk::Owned(v) => v,
            Chunk::Range(..) => &[],
        }
    }
}

/// What a write does to one cluster.
pub(in crate::qcow2) struct Plan<'a> {
    /// Index of the entry in its L2 table.
    pub(super) idx: u64,
    pub(super) old: L2Entry,
    pub(super) new: L2Entry,
    /// Host cluster to write into; `None`: a new cluster.
    pub(super) dest: Option<HostOffset>,
    /// Bytes to write, at an offset inside the cluster (one run at most:
    /// no allocation per cluster).
    pub(super) writes: Option<(u64, Chunk<'a>)>,
    /// Clusters whose refcount drops once the new entry is durable.
    pub(super) frees: Vec<u64>,
}

impl WritableImage {
    fn io_err(&self, op: &'static str, offset: u64, e: std::io::Error) -> Error {
        let e = Error::io(self.view.path(), op, offset, e);
        self.poisoned.set(&e);
        e
    }

    pub(crate) fn sync(&self) -> Result<()> {
        // The external data file first: its data is durable before any
        // metadata the sync below makes durable points at it.
        self.sync_data_file()?;
        self.w.sync().map(|_| ())
    }

    /// Sets what the first write does with a dirty image, unreadable
    /// bitmaps or unknown autoclear bits (default: refuse; see
    /// [`WritePolicy`](crate::chain::WritePolicy)).
    pub(crate) fn set_write_policy(&mut self, policy: crate::chain::WritePolicy) {
        self.w.set_policy(policy);
    }

    /// Checks the image may be written, and runs the first-write
    /// preparation: refuse a corrupt image; refuse, or repair, a dirty one;
    /// refuse, or clear, unknown autoclear bits (as the write policy says).
    pub(crate) fn begin_write(&mut self) -> Result<()> {
        if self.poisoned.is_set() {
            return Err(Error::Poisoned {
                path: self.view.path().to_path_buf(),
                first: self.poisoned.first(),
            });
        }
        self.refuse_if_halted()?;
        if self.w.prepared() {
            return Ok(());
        }
        if self.view.header().corrupt() {
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why:
                    "image is marked corrupt; writes are refused (run `strata check -r all` first)"
                        .into(),
            });
        }
        if self.view.header().refcount_table_offset() == 0
            || self.view.header().refcount_table_clusters() == 0
        {
            // Opened so that check can report it (as QEMU); nothing can be
            // allocated without a refcount table (iotests 060, 108).
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why: "the refcount table is missing (offset 0 or size 0); writes are refused \
                      (run `strata check -r all` to rebuild it)"
                    .into(),
            });
        }
        if let Some(sn) = self.view.snapshots().iter().find(|s| !s.l1_size_is_valid()) {
            // QEMU's overlap check refuses such writes too (iotest 080).
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why: format!(
                    "snapshot {:?} names an L1 table of {} entries, more than the limit; \
                     writes are refused",
                    sn.name, sn.l1_size
                ),
            });
        }
        use crate::chain::{OnBadBitmaps, OnDirty, OnUnknownAutoclear};
        let policy = self.w.policy();
        let mut kept = self.view.header().autoclear_features() & Autoclear::BITMAPS;
        // The raw external data bit is known, with a data file.
        let raw_data = self.view.data_file_autoclear();
        // Bitmaps are kept (and kept up to date) when their directory is
        // valid. A damaged one is refused, as QEMU refuses to open the image
        // read-write: dropping it would make the next incremental backup
        // miss every change from here on. Only an explicit policy drops
        // them (their autoclear bit cleared: all inconsistent).
        if let Some(why) = self.bitmaps_prepare()? {
            if !kept.is_empty() {
                if policy.bitmaps == OnBadBitmaps::Refuse {
                    return Err(Error::ReadOnly {
                        path: self.view.path().to_path_buf(),
                        why: format!(
                            "its persistent dirty bitmaps cannot be read ({why}); writing would \
                             have to drop them; writes are refused (`strata convert` copies the \
                             image without its bitmaps)"
                        ),
                    });
                }
                kept = Autoclear::empty();
            }
        }
        kept |= raw_data;
        // Refusals first: nothing is written before one.
        if self.view.header().dirty() && policy.dirty == OnDirty::Refuse {
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why: "the image is dirty (lazy refcounts not repaired after a crash); writes \
                      are refused (repair it with `strata check -r all` first)"
                    .into(),
            });
        }
        let unknown =
            (self.view.header().autoclear_features() & !(Autoclear::BITMAPS | raw_data)).bits();
        if unknown != 0 && policy.unknown_autoclear == OnUnknownAutoclear::Refuse {
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why: format!(
                    "unknown autoclear feature bits {unknown:#x} are set; writing would clear \
                     them; writes are refused"
                ),
            });
        }
        if self.view.header().dirty() {
            // A dirty image's refcounts may be stale: rebuild them (the
            // rebuild counts the bitmaps' clusters). The header, with these
            // changes, is written once the new refcounts are durable.
            let v = self.view.header().incompatible_features() - Incompatible::DIRTY;
            self.view.header_mut().set_incompatible(v);
            self.view.header_mut().set_autoclear(kept);
            self.rebuild_refcounts()?;
        }
        if self.view.header().autoclear_features() != kept {
            self.view.header_mut().set_autoclear(kept);
            self.write_header()?;
            self.sync()?;
        }
        self.w.set_prepared();
        Ok(())
    }

    /// Refuses to go on after a write was refused for corrupt metadata.
    fn refuse_if_halted(&self) -> Result<()> {
        if self.w.halted() {
            return Err(Error::ReadOnly {
                path: self.view.path().to_path_buf(),
                why: "a write was refused because the image's metadata is corrupt; the image \
                      is marked corrupt and takes no more writes (run `strata check -r all`)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Marks the image corrupt, as QEMU's `qcow2_signal_corruption` does
    /// for a fatal corruption: on v3 images the corrupt bit (incompatible
    /// feature bit 1) is set in the header, written alone and synced; v2
    /// images have no such bit. Either way the image takes no more writes
    /// in this session. Returns `err`, the corruption found.
    pub(crate) fn fatal_corruption(&mut self, err: Error) -> Error {
        if self.w.halt() {
            return err;
        }
        if self.view.header().version() >= 3 {
            let v = self.view.header().incompatible_features() | Incompatible::CORRUPT;
            self.view.header_mut().set_incompatible(v);
            let bits = self
                .view
                .header()
                .incompatible_features()
                .bits()
                .to_be_bytes();
            // Offset 72: incompatible_features, present in every v3 header.
            if self
                .w
                .write_metadata(&bits, 72, "mark image corrupt")
                .is_ok()
            {
                let _ = self.sync();
            }
        }
        err
    }

    /// Marks the image corrupt when `r` failed for an overlap with metadata.
    pub(crate) fn on_overlap<T>(&mut self, r: Result<T>) -> Result<T> {
        match r {
            Err(e @ Error::MetadataOverlap { .. }) => Err(self.fatal_corruption(e)),
            r => r,
        }
    }

    /// Marks the image corrupt when an allocation failed on corrupt
    /// refcount structures (an overlap, an unaligned refcount block), as
    /// QEMU's allocator does (iotest 060, "unaligned reftable entry").
    fn on_alloc_error<T>(&mut self, r: Result<T>, purpose: &str) -> Result<T> {
        match r {
            Err(Error::MetadataOverlap {
                path,
                op,
                offset,
                len,
                structure,
                structure_offset,
            }) => {
                let e = Error::MetadataOverlap {
                    path,
                    op: format!("{op} for {purpose}"),
                    offset,
                    len,
                    structure,
                    structure_offset,
                };
                Err(self.fatal_corruption(e))
            }
            Err(e @ Error::Corrupt { .. }) => Err(self.fatal_corruption(e)),
            r => r,
        }
    }

    /// Refuses (and marks the image corrupt) a write of `[off, off+len)`
    /// that would land on metadata other than `allowed`.
    pub(crate) fn guard_write(
        &mut self,
        op: &str,
        off: u64,
        len: u64,
        allowed: &[Meta],
    ) -> Result<()> {
        let r = self
            .w
            .meta()
            .guard(self.view.path(), || op.to_string(), off, len, allowed);
        self.on_overlap(r)
    }

    /// Builds the map of the image's metadata the overlap check uses: the
    /// header cluster, the active and every snapshot's L1 table and the
    /// L2 tables they point at, the refcount table and blocks, the
    /// snapshot table, the bitmap directory and bitmap tables. Only the
    /// L1 tables are read (the L2 tables' offsets are in them), so this
    /// costs a few small reads at open.
    pub(crate) fn load_metadata_map(&mut self) -> Result<()> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let ws = &self.w;
        let mut meta = MetadataMap::new(geo);
        // The refcount structures, as the allocator knows them.
        let rc = ws.refcounts();
        meta.add(
            rc.table_offset,
            geo.clusters_bytes(u64::from(rc.table_clusters)),
            Meta::RefcountTable,
        );
        for e in &rc.table {
            let off = e & strata_format::refcount::REFTABLE_OFFSET_MASK;
            if off != 0 {
                meta.add(off, cs, Meta::RefcountBlock);
            }
        }
        if let Some((off, n)) = rc.table_moved {
            meta.add(off, geo.clusters_bytes(u64::from(n)), Meta::RefcountTable);
        }
        meta.add(0, cs, Meta::Header);
        meta.add(
            self.view.header().l1_table_offset(),
            u64::from(self.view.header().l1_size()) * 8,
            Meta::ActiveL1,
        );
        for e in self.view.l1() {
            if let Some(off) = L1Entry(*e).l2_offset() {
                meta.add(off.get(), cs, Meta::ActiveL2);
            }
        }
        if self.view.header().nb_snapshots() > 0 {
            meta.add(
                self.view.header().snapshots_offset(),
                self.snapshot_table_len(),
                Meta::SnapshotTable,
            );
        }
        let file_len = self.view.storage_len()?;
        // Snapshots usually share L1 tables' contents, rarely their
        // offsets: read each distinct table once, and at most
        // SNAPSHOT_L1_BUDGET bytes in all (a hostile image could name one
        // 32 MiB table from 65536 snapshots).
        let mut seen = std::collections::HashSet::new();
        let mut budget = SNAPSHOT_L1_BUDGET;
        for sn in self.view.snapshots() {
            let bytes = u64::from(sn.l1_size) * 8;
            if !seen.insert((sn.l1_table_offset, bytes)) {
                continue;
            }
            if !self.view.geometry().is_aligned(sn.l1_table_offset) {
                meta.set_unknown(
                    sn.l1_table_offset,
                    format!(
                        "the L1 table of snapshot {:?} is not cluster-aligned",
                        sn.name
                    ),
                );
                continue;
            }
            let in_file = sn
                .l1_table_offset
                .checked_add(bytes)
                .is_some_and(|e| e <= file_len);
            if bytes == 0 || bytes > strata_format::limits::MAX_L1_BYTES || !in_file {
                // `check` reports it; a table outside the file protects
                // nothing (and must not keep the allocator from growing
                // the file).
                continue;
            }
            meta.add(sn.l1_table_offset, bytes, Meta::InactiveL1);
            let Some(left) = budget.checked_sub(bytes) else {
                meta.set_unknown(
                    sn.l1_table_offset,
                    format!(
                        "the snapshots' L1 tables exceed {} MiB",
                        SNAPSHOT_L1_BUDGET >> 20
                    ),
                );
                break;
            };
            budget = left;
            let mut raw = vec![0u8; bytes as usize];
            self.view
                .storage()
                .read_at(&mut raw, sn.l1_table_offset)
                .map_err(|e| {
                    Error::io(
                        self.view.path(),
                        "read snapshot L1 table",
                        sn.l1_table_offset,
                        e,
                    )
                })?;
            for e in strata_format::table::decode_u64_table(&raw) {
                if let Some(off) = L1Entry(e).l2_offset() {
                    meta.add(off.get(), cs, Meta::InactiveL2);
                }
            }
        }
        if let Some((nb, dir_size, dir_off)) = self.view.header().bitmaps() {
            let in_file = dir_off.checked_add(dir_size).is_some_and(|e| e <= file_len);
            if in_file && dir_size > 0 && dir_size <= strata_format::bitmap::MAX_DIRECTORY_SIZE {
                meta.add(dir_off, dir_size, Meta::BitmapDirectory);
                let mut dir = vec![0u8; dir_size as usize];
                self.view
                    .storage()
                    .read_at(&mut dir, dir_off)
                    .map_err(|e| {
                        Error::io(self.view.path(), "read bitmap directory", dir_off, e)
                    })?;
                if let Ok(entries) = strata_format::bitmap::parse_directory(&dir, nb, dir_off) {
                    for b in entries {
                        let end = b.table_offset.checked_add(b.table_bytes());
                        let valid = b.validate(cs, self.view.header().size(), dir_off).is_ok()
                            && b.table_bytes() <= strata_format::limits::MAX_L1_BYTES;
                        if valid && end.is_some_and(|e| e <= file_len) {
                            meta.add(b.table_offset, b.table_bytes(), Meta::BitmapTable);
                        }
                    }
                }
            }
        }
        *self.w.meta_mut() = meta;
        Ok(())
    }

    /// Bytes from the snapshot table's start to the end of its last entry.
    fn snapshot_table_len(&self) -> u64 {
        self.view
            .snapshot_table_end()
            .saturating_sub(self.view.header().snapshots_offset())
    }

    /// Writes the header (with extensions and backing name) to cluster 0.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let (off, len) = self
            .view
            .header()
            .layout()
            .map_err(|source| Error::Format {
                path: self.view.path().to_path_buf(),
                source,
            })?;
        self.view.header_mut().set_backing_file_location(off, len);
        let buf = self
            .view
            .header()
            .encode()
            .map_err(|source| Error::Format {
                path: self.view.path().to_path_buf(),
                source,
            })?;
        let end = self
            .view
            .header()
            .encoded_len()
            .map_err(|source| Error::Format {
                path: self.view.path().to_path_buf(),
                source,
            })?;
        // Up to the end of the extensions and the name, rounded to a
        // sector (the rest of cluster 0 is unused).
        let n = ((end.div_ceil(512) * 512) as usize).min(buf.len());
        self.w.write_metadata(&buf[..n], 0, "write header")
    }

    /// Makes everything written so far durable, in the order the crash
    /// protocol requires: refcount blocks, then (after a sync) refcount
    /// table entries, then (after a sync) a moved table's header switch.
    pub(crate) fn barrier(&mut self) -> Result<()> {
        let r = self.w.write_refcount_blocks();
        r.inspect_err(|e| self.poisoned.set(e))?;
        let table_dirty = self.w.refcount_table_dirty();
        if table_dirty {
            self.sync()?;
            let r = self.w.write_refcount_table();
            let moved = r.inspect_err(|e| self.poisoned.set(e))?;
            if let Some((off, clusters)) = moved {
                self.sync()?;
                self.view.header_mut().set_refcount_table(off, clusters);
                self.write_header()?;
                self.w.refcount_table_switched(self.view.geometry());
            }
        }
        self.sync()
    }

    /// Allocates `n` contiguous clusters for `purpose` ("an L2 table",
    /// named in errors); returns the host offset.
    pub(crate) fn alloc_contiguous(&mut self, n: u64, purpose: &str) -> Result<u64> {
        let geo = self.view.geometry();
        let r = self.w.alloc_contiguous(n);
        Ok(geo.cluster_start(self.on_alloc_error(r, purpose)?).get())
    }

    /// Allocates up to `max` contiguous clusters (at least one).
    pub(super) fn alloc_run(&mut self, max: u64, purpose: &str) -> Result<(u64, u64)> {
        let r = self.w.alloc_run(max);
        self.on_alloc_error(r, purpose)
    }

    /// The L2 table for L1 index `l1i`, made writable: allocated when
    /// missing, copied when shared with a snapshot. Returns its offset.
    /// A new table's content is written now; its L1 entry is changed in
    /// memory and written at the next metadata commit, after the barrier
    /// that makes the table durable.
    pub(super) fn l2_for_write(&mut self, l1i: u64) -> Result<u64> {
        let i = usize::try_from(l1i)
            .ok()
            .filter(|i| *i < self.view.l1().len())
            .ok_or_else(|| {
                Error::corrupt(
                    self.view.path(),
                    self.view.header().l1_table_offset(),
                    format!("L1 index {l1i} outside the L1 table"),
                )
            })?;
        let e = L1Entry(self.view.l1()[i]);
        let cs = self.view.geometry().cluster_size();
        if let Some(off) = e.l2_offset() {
            if !self.w.is_pinned(off.get()) {
                self.view.l2_past_the_end(off.get())?;
            }
        }
        if let (Some(off), true) = (e.l2_offset(), e.copied()) {
            // Its entries are written in place: it must be nothing else.
            self.guard_write(
                &format!("L2 table write (L1 index {l1i})"),
                off.get(),
                cs,
                &[Meta::ActiveL2],
            )?;
            return Ok(off.get());
        }
        let content = match e.l2_offset() {
            Some(old) => self.l2_table(old.get())?.as_ref().clone(),
            None => vec![0u8; cs as usize],
        };
        let new = self.alloc_contiguous(1, "an L2 table")?;
        self.write_l2_table(new, content)?;
        self.view.l1_mut()[i] = L1Entry::new(strata_format::HostOffset::new(new), true).0;
        let meta = self.w.meta_mut();
        if let Some(old) = e.l2_offset() {
            meta.remove(old.get(), cs, Meta::ActiveL2);
        }
        meta.add(new, cs, Meta::ActiveL2);
        let geo = self.view.geometry();
        let ws = &mut self.w;
        ws.l1_changed([i]);
        if let Some(old) = e.l2_offset() {
            ws.free_later([geo.cluster_index(old)]);
        }
        Ok(new)
    }

    /// Writes the whole L2 table `table` at `offset` (a new or copied
    /// table, or one rewritten by amend or repair), then caches it. A
    /// pinned (dirty) table is never written this way: its entries go out
    /// at the next metadata commit.
    pub(crate) fn write_l2_table(&mut self, offset: u64, table: Vec<u8>) -> Result<()> {
        if self.w.is_pinned(offset) {
            return Err(Error::InvalidArgument(format!(
                "L2 table at {offset:#x} written whole while it has pending entries"
            )));
        }
        self.w.write_metadata(&table, offset, "write L2 table")?;
        self.view.cache_l2(offset, Arc::new(table));
        Ok(())
    }

    /// Commits metadata: a barrier makes data, new tables and refcounts
    /// durable, then the changed L2 entries and L1 entries are written.
    pub(crate) fn commit_metadata(&mut self) -> Result<()> {
        let ws = &mut self.w;
        if ws.nothing_pending() {
            return Ok(());
        }
        let l1_entries: Vec<usize> = ws.dirty_l1_entries().collect();
        for i in l1_entries {
            let at = self.view.header().l1_table_offset() + 8 * i as u64;
            self.guard_write("L1 entry write", at, 8, &[Meta::ActiveL1])?;
        }
        self.barrier()?;
        let es = self.view.geometry().l2_entry_size();
        let (tables, l1) = self.w.take_dirty();
        for (toff, d) in tables {
            let (s, e) = ((d.lo * es) as usize, ((d.hi + 1) * es) as usize);
            let bytes = d
                .table
                .get(s..e)
                .ok_or_else(|| Error::InvalidArgument("dirty range outside its table".into()))?;
            self.w
                .write_metadata(bytes, toff + d.lo * es, "write L2 entries")?;
            // Written: no longer pinned, it may be cached (and evicted).
            self.view.cache_l2(toff, d.table);
        }
        for i in l1 {
            let at = self.view.header().l1_table_offset() + 8 * i as u64;
            let v = self.view.l1()[i];
            self.w
                .write_metadata(&v.to_be_bytes(), at, "write L1 entry")?;
        }
        Ok(())
    }

    /// Commits metadata when enough is pending.
    fn maybe_commit_metadata(&mut self) -> Result<()> {
        let cs = self.view.geometry().cluster_size();
        if self
            .w
            .commit_due(cs, MAX_DIRTY_TABLE_BYTES, MAX_UNSYNCED_BYTES)
        {
            self.commit_metadata()?;
        }
        Ok(())
    }
}

impl WritableImage {
    /// Makes every write durable and releases clusters that lost their
    /// last pointer.
    pub fn flush(&mut self) -> Result<()> {
        if self.poisoned.is_set() {
            return Err(Error::Poisoned {
                path: self.view.path().to_path_buf(),
                first: self.poisoned.first(),
            });
        }
        self.refuse_if_halted()?;
        self.commit_metadata()?;
        self.barrier()?;
        // The guest data is durable: the bitmaps that track it may be
        // saved (their old clusters join the frees below).
        self.bitmaps_save()?;
        // Space released below may be reused: stop packing into it.
        self.compressed_tail = CompressedTail::default();
        // Data file clusters that lost their pointer, now durably.
        self.view.run_data_file_discards();
        let frees = self.w.take_pending_frees();
        if frees.is_empty() {
            return Ok(());
        }
        let r = {
            let ws = &mut self.w;
            let mut r = Ok(());
            for ci in frees {
                r = ws.adjust_refcount(ci, -1).map(|_| ());
                if r.is_err() {
                    break;
                }
            }
            ws.rewind_allocator();
            r
        };
        self.on_overlap(r)?;
        self.barrier()
    }

    /// Grows the virtual disk to `new_size` (growing the L1 table when
    /// needed). Shrinking is refused.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.begin_write()?;
        let old = self.virtual_size();

        if new_size < old {
            return Err(Error::Unsupported {
                path: self.view.path().to_path_buf(),
                what: "shrinking an image is not supported".into(),
            });
        }
        if new_size > strata_format::limits::MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is too large"
            )));
        }
        let need = self.view.geometry().l1_entries_for(new_size);
        if need * 8 > strata_format::limits::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} needs an L1 table over the limit"
            )));
        }
        // Bitmaps first get tables that cover the new size (valid for the
        // old one too), the new part clean, as QEMU grows them.
        let bitmaps = new_size > old && self.has_live_bitmaps();
        if bitmaps {
            self.bitmaps_grow(new_size)?;
        }
        if need > self.view.l1().len() as u64 {
            let clusters = self.view.geometry().clusters_for(need * 8);
            let new_off = self.alloc_contiguous(clusters, "the L1 table")?;
            let mut l1 = self.view.l1().to_vec();
            l1.resize(need as usize, 0);
            let mut raw = strata_format::table::encode_u64_table(&l1);
            raw.resize((clusters * self.view.geometry().cluster_size()) as usize, 0);
            self.w.write_metadata(&raw, new_off, "write L1 table")?;
            self.barrier()?;
            let old_l1 = (
                self.view.header().l1_table_offset(),
                self.view.l1().len() as u64,
            );
            self.view.header_mut().set_l1_table(new_off, need as u32);
            self.view.header_mut().set_size(new_size);
            self.write_header()?;
            self.sync()?;
            *self.view.l1_mut() = l1;
            let meta = self.w.meta_mut();
            meta.remove(old_l1.0, old_l1.1 * 8, Meta::ActiveL1);
            meta.add(new_off, need * 8, Meta::ActiveL1);
            if old_l1.1 > 0 {
                let geo = self.view.geometry();
                let first = geo.cluster_index(HostOffset::new(old_l1.0));
                let n = geo.clusters_for(old_l1.1 * 8);
                self.w.free_later(first..first + n);
            }
        } else {
            self.view.header_mut().set_size(new_size);
            self.write_header()?;
            self.sync()?;
        }
        if bitmaps {
            // Track the whole new size from here on.
            self.bitmaps_reload()?;
        }
        // An external data file grows with the disk (qcow2/data_file.rs).
        self.data_file_resized(old, new_size)
    }

    /// Rewrites the backing file name and format in the header (nothing
    /// else: the unsafe `rebase -u`). `None` removes the backing file.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.view
            .refuse_backing_with_raw_data_file(backing.is_some())?;
        self.begin_write()?;
        // Flush first: it may move the bitmap directory (a header change).
        self.flush()?;
        let mut h = self.view.header().clone();
        h.extensions_mut()
            .retain(|e| !matches!(e, strata_format::Extension::BackingFormat(_)));
        match backing {
            Some((name, fmt)) => {
                h.set_backing_file(Some(name.to_string()));
                h.extensions_mut()
                    .insert(0, strata_format::Extension::BackingFormat(fmt.to_string()));
            }
            None => h.set_backing_file(None),
        }
        h.layout().map_err(|source| Error::Format {
            path: self.view.path().to_path_buf(),
            source,
        })?;
        *self.view.header_mut() = h;
        self.write_header()?;
        self.sync()
    }

    /// Recomputes every refcount from the references and rewrites the
    /// refcount structures (used for dirty images and `check -r all`).
    pub fn rebuild_refcounts(&mut self) -> Result<()> {
        crate::repair::rebuild_refcounts_of(self)
    }
}

impl WritableImage {
    /// Closes the image: flushes it (an image open for writing) and
    /// returns the flush's error, which a drop could only log.
    pub(crate) fn close(&mut self) -> Result<()> {
        if self.closed || self.poisoned.is_set() || self.refusal_already_reported() {
            return Ok(());
        }
        let r = self.flush();
        // Reported here: the drop that follows does not try again.
        self.closed = true;
        r
    }

    /// Whether a flush at close would only repeat an error the caller
    /// already got: a write was refused for corrupt metadata (the image
    /// takes no more writes) and nothing written before it waits for the
    /// flush (no L2 or L1 entries, unsynced data or frees), so closing
    /// loses nothing. With something pending the flush's failure is
    /// reported: that is lost.
    fn refusal_already_reported(&self) -> bool {
        self.w.halted() && self.w.nothing_pending() && !self.w.has_pending_frees()
    }
}

impl Drop for WritableImage {
    /// Closing an image flushes it, as QEMU does on close: metadata still
    /// pending in memory is committed in protocol order. A drop cannot
    /// return the error: it is written to standard error; callers who
    /// care call [`Qcow2Image::close`](crate::Qcow2Image::close) (or [`Qcow2Image::flush`](crate::Qcow2Image::flush)) instead.
    fn drop(&mut self) {
        if !self.closed && !self.poisoned.is_set() && !self.refusal_already_reported() {
            if let Err(e) = self.flush() {
                // After a refusal the flush cannot run: say what that costs.
                let lost = if self.w.halted() {
                    " (the writes not flushed before the refused one are lost)"
                } else {
                    ""
                };
                eprintln!(
                    "strata: closing {}: flush failed{lost}: {e}",
                    self.view.path().display()
                );
            }
        }
    }
}
