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

use std::sync::Arc;

use strata_format::header::{Autoclear, Incompatible};
use strata_format::{GuestOffset, HostOffset, L1Entry, L2Entry, SubclusterState};

use crate::error::{Error, Result};
use crate::qcow2::alloc::{Meta, MetadataMap};
use crate::qcow2::writer::DirtyTable;
use crate::qcow2::WritableImage;
use crate::storage::{RangeCopy, Storage};
use crate::Mapping;

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
/// another storage moved by [`Storage::copy_range_from`] (offset there,
/// length).
pub(super) enum Chunk<'a> {
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
pub(super) struct Plan<'a> {
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

/// How a range becomes zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    /// write_zeroes: reads as zeros; host clusters kept unless `unmap`.
    Zero { unmap: bool },
    /// discard: as QEMU's qcow2 discard (whole clusters only).
    Discard { has_backing: bool },
    /// Whole clusters become unallocated: reads fall through to the backing
    /// file (QEMU's full discard; what emptying an image after commit does).
    Deallocate,
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

    /// The guest view of this image alone at `[guest, guest+buf.len())`
    /// inside one cluster, falling through to `backing` where unallocated.
    pub(super) fn old_view(
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
    pub(super) fn entry_for_write(&mut self, table: &[u8], toff: u64, idx: u64) -> Result<L2Entry> {
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

    pub(super) fn freed_by(&self, e: L2Entry) -> Vec<u64> {
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
    fn plan_write<'a>(
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

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
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
    fn chunk_len(&self, pos: u64, remaining: u64) -> u64 {
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
    fn execute(&mut self, tables: Vec<(u64, Vec<Plan<'_>>)>) -> Result<()> {
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
    pub(super) fn update_l2(&mut self, toff: u64, plans: &[Plan<'_>]) -> Result<()> {
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

    /// Loads the refcount blocks of `clusters` (to be freed): a block the
    /// refcount table places at an unaligned offset, or outside the file,
    /// is a fatal corruption, as in QEMU (the image is marked corrupt).
    fn check_freeable(&mut self, clusters: &[u64]) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let r = clusters
            .iter()
            .try_for_each(|ci| self.w.refcount(*ci).map(|_| ()));
        match r {
            Err(e @ Error::Corrupt { .. }) => Err(self.fatal_corruption(e)),
            r => r,
        }
    }

    /// Makes `[offset, offset+len)` read as zeros. With `unmap`, host
    /// clusters are released where possible. v2 images (no zero flag)
    /// get explicit zeros.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: BackingRead,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        self.zero_raw_data_file(offset, len)?;
        self.zero_range(offset, len, ZeroMode::Zero { unmap }, backing)
    }

    /// Discards `[offset, offset+len)` as QEMU's qcow2 driver does: whole
    /// clusters only; they then read as zeros on v3 images (when there is
    /// a backing file or they were allocated) and become unallocated on v2
    /// images without a backing file. On a v2 image with a backing file
    /// nothing changes (QEMU 290): there is no zero flag to hide it.
    pub fn discard(&mut self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        if has_backing && self.view.header().version() < 3 {
            // A v2 image has no zero flag: a discarded cluster would
            // expose the backing file's data. QEMU does nothing then
            // (qcow2_co_pdiscard returns ENOTSUP, which discard ignores).
            self.check_range(offset, len)?;
            return self.refuse_if_halted();
        }
        let zero_backing = |b: &mut [u8], _| {
            b.fill(0);
            Ok(())
        };
        self.zero_range(
            offset,
            len,
            ZeroMode::Discard { has_backing },
            &zero_backing,
        )
    }

    /// Makes the whole clusters in `[offset, offset+len)` unallocated, so
    /// that they read through to the backing file, and queues their host
    /// clusters for freeing. Partial clusters at the edges are left as
    /// they are (except at the end of the disk).
    pub fn deallocate(&mut self, offset: u64, len: u64) -> Result<()> {
        let zero_backing = |b: &mut [u8], _| {
            b.fill(0);
            Ok(())
        };
        self.zero_range(offset, len, ZeroMode::Deallocate, &zero_backing)
    }

    /// Empties the image after its data was committed into its backing
    /// file: every whole cluster becomes unallocated and reads through to
    /// the backing file, which now holds the same data. The guest view
    /// does not change, so the persistent dirty bitmaps are left as they
    /// are (as QEMU's `bdrv_make_empty` leaves them). Only for that case:
    /// [`Qcow2Image::deallocate`](crate::Qcow2Image::deallocate) marks them.
    ///
    /// The cost follows what is allocated, not the virtual size: without
    /// internal snapshots (nothing shares the tables) every L2 table is
    /// dropped from the L1 table as a whole and its clusters freed, in
    /// batches (L1 entries written and synced, then the frees, as any
    /// free: after the pointer moved), and the freed clusters are given
    /// back to the filesystem ([`Storage::punch_hole`]). With snapshots,
    /// only the allocated entries of each table are deallocated.
    ///
    /// [`Storage::punch_hole`]: crate::storage::Storage::punch_hole
    pub fn make_empty(&mut self) -> Result<()> {
        let size = self.virtual_size();
        self.check_range(0, size)?;
        self.begin_write()?;
        if self.view.header().nb_snapshots() == 0 {
            return self.drop_tables();
        }
        let zero_backing = |b: &mut [u8], _| {
            b.fill(0);
            Ok(())
        };
        self.zero_range_marking(0, size, ZeroMode::Deallocate, &zero_backing, false)
    }

    /// [`Self::make_empty`] without snapshots: drops every L2 table.
    fn drop_tables(&mut self) -> Result<()> {
        // What is pending first: the tables read below are then final.
        self.flush()?;
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let mut dropped: Vec<usize> = Vec::new();
        let mut frees: Vec<u64> = Vec::new();
        for i in 0..self.view.l1().len() {
            let Some(off) = L1Entry(self.view.l1()[i]).l2_offset().map(|o| o.get()) else {
                continue;
            };
            self.view.l2_past_the_end(off)?;
            // The table must be only an active L2 table (a corrupt image
            // may point it at other metadata): refuse before any change.
            self.guard_write(
                &format!("L2 table free (L1 index {i})"),
                off,
                cs,
                &[Meta::ActiveL2],
            )?;
            let table = self.l2_table(off)?;
            let mut mine = Vec::new();
            for idx in strata_format::table::nonzero_entries(&table, geo) {
                let e = L2Entry::read(&table, geo, idx).map_err(|source| Error::Format {
                    path: self.view.path().to_path_buf(),
                    source,
                })?;
                mine.extend(self.freed_by(e));
                // A data file's clusters are discarded there (after the
                // flush of this batch).
                self.view.data_file_release(e, L2Entry::default());
            }
            if geo.is_aligned(off) {
                mine.push(geo.cluster_index(HostOffset::new(off)));
            }
            self.check_freeable(&mine)?;
            drop(table);
            self.view.uncache_l2(off);
            self.w.meta_mut().remove(off, cs, Meta::ActiveL2);
            self.view.l1_mut()[i] = 0;
            dropped.push(i);
            frees.extend(mine);
            if dropped.len() >= DROP_BATCH_TABLES || frees.len() >= DROP_BATCH_FREES {
                self.drop_batch(&mut dropped, &mut frees)?;
            }
        }
        self.drop_batch(&mut dropped, &mut frees)?;
        self.truncate_free_tail()
    }

    /// Truncates the file after its last referenced cluster, as QEMU does
    /// when it empties an image. Everything is durable (after a flush) and
    /// the clusters cut off are unreferenced: a crash leaves either length.
    /// The scan is proportional to the file's length in clusters.
    fn truncate_free_tail(&mut self) -> Result<()> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let len = self.view.storage_len()?;
        let n = geo.clusters_for(len);
        let mut last = n;
        {
            let ws = &mut self.w;
            while last > 1
                && ws.refcount(last - 1)? == 0
                && ws
                    .meta()
                    .overlap(geo.cluster_start(last - 1).get(), cs, &[])
                    .is_none()
            {
                last -= 1;
            }
        }
        if last == n {
            return Ok(());
        }
        // Advisory, like the punched holes: a longer file is still valid.
        if self
            .view
            .storage()
            .set_len(geo.cluster_start(last).get())
            .is_ok()
        {
            self.w.truncated(last);
        }
        Ok(())
    }

    /// Writes the zeroed L1 entries `dropped` (made durable first), then
    /// frees `frees` and punches the clusters left unreferenced.
    fn drop_batch(&mut self, dropped: &mut Vec<usize>, frees: &mut Vec<u64>) -> Result<()> {
        if dropped.is_empty() && frees.is_empty() {
            return Ok(());
        }
        let ws = &mut self.w;
        ws.l1_changed(dropped.drain(..));
        ws.free_later(frees.iter().copied());
        // commit_metadata writes the L1 entries; the barrier after it makes
        // them durable before the refcounts drop; a barrier ends it.
        self.flush()?;
        frees.sort_unstable();
        frees.dedup();
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let mut run: Option<(u64, u64)> = None;
        let mut runs = Vec::new();
        for &ci in frees.iter() {
            let at = geo.cluster_start(ci).get();
            let free = self.w.refcount(ci)? == 0 && self.w.meta().overlap(at, cs, &[]).is_none();
            if !free {
                continue;
            }
            run = match run {
                Some((a, n)) if a + n == ci => Some((a, n + 1)),
                Some(r) => {
                    runs.push(r);
                    Some((ci, 1))
                }
                None => Some((ci, 1)),
            };
        }
        runs.extend(run);
        frees.clear();
        for (a, n) in runs {
            // Space given back is a courtesy: the clusters are free either way.
            let _ = self
                .view
                .storage()
                .punch_hole(geo.cluster_start(a).get(), geo.clusters_bytes(n));
        }
        Ok(())
    }

    fn zero_range(
        &mut self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        backing: BackingRead,
    ) -> Result<()> {
        self.zero_range_marking(offset, len, mode, backing, true)
    }

    /// [`Self::zero_range`]; `mark`: the guest view may change, so the
    /// bitmaps are marked (and flagged in use) first.
    fn zero_range_marking(
        &mut self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        backing: BackingRead,
        mark: bool,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        self.begin_write()?;
        if mark {
            self.bitmaps_before_change(offset, len)?;
        }
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let end = offset + len;
        let v3 = self.view.header().version() >= 3;
        if let ZeroMode::Zero { .. } = mode {
            if !v3 {
                // No zero flag: write zeros, in bounded pieces.
                let mut pos = offset;
                while pos < end {
                    let n = (end - pos).min(WRITE_CHUNK);
                    self.write(pos, &vec![0u8; n as usize], backing)?;
                    pos += n;
                }
                return Ok(());
            }
        }
        if let ZeroMode::Zero { .. } = mode {
            return self.zero_fragments(offset, end, mode, backing);
        }
        let gran = cs;
        // Whole units inside the range (the unit at the end of the disk counts
        // when the range reaches the end).
        let first = offset.div_ceil(gran) * gran;
        let last = if end == size {
            end.div_ceil(gran) * gran
        } else {
            end / gran * gran
        };
        if first >= last {
            return Ok(());
        }
        let mut pos = first;
        while pos < last {
            let n = self.chunk_len(pos, last - pos);
            self.zero_chunk(pos, pos + n, mode, backing)?;
            pos += n;
        }
        Ok(())
    }

    /// A zero write of `[offset, end)` on a v3 image, decided as QEMU
    /// decides it (issue 15 defect 8). The block layer splits the request
    /// at subcluster boundaries (a head fragment, the aligned middle, a
    /// tail fragment; the end of the disk counts as aligned);
    /// qcow2_co_pwrite_zeroes zeroes a fragment inside one subcluster as
    /// the whole subcluster when the rest of it reads as zeros and it is
    /// unallocated or zero, and the middle with zero bits or flags; what
    /// it cannot zero that way (a fragment in a subcluster with data, or
    /// a range that zeroes part of a compressed cluster: ENOTSUP) gets
    /// written zeros.
    fn zero_fragments(
        &mut self,
        offset: u64,
        end: u64,
        mode: ZeroMode,
        backing: BackingRead,
    ) -> Result<()> {
        let geo = self.view.geometry();
        let scs = geo.subcluster_size();
        let size = self.virtual_size();
        let mut frags = Vec::new();
        let mut pos = offset;
        if !pos.is_multiple_of(scs) {
            let e = end.min(pos.next_multiple_of(scs));
            frags.push((pos, e));
            pos = e;
        }
        if pos < end {
            let tail = end % scs;
            if tail != 0 && end - pos > scs {
                frags.push((pos, end - tail));
                frags.push((end - tail, end));
            } else {
                frags.push((pos, end));
            }
        }
        for (a, b) in frags {
            let aligned = a.is_multiple_of(scs) && (b.is_multiple_of(scs) || b == size);
            let zeroable = if aligned {
                !self.zeroes_part_of_a_compressed_cluster(a, b)?
            } else {
                self.subcluster_zeroable(a, b, backing)?
            };
            if !zeroable {
                self.write(a, &vec![0u8; (b - a) as usize], backing)?;
                continue;
            }
            let (a, b) = if aligned {
                (a, b)
            } else {
                let s = a / scs * scs;
                (s, (s + scs).min(size))
            };
            let last = if b == size {
                b.next_multiple_of(scs)
            } else {
                b
            };
            let mut pos = a;
            while pos < last {
                let n = self.chunk_len(pos, last - pos);
                self.zero_chunk(pos, pos + n, mode, backing)?;
                pos += n;
            }
        }
        Ok(())
    }

    /// Whether zeroing the subcluster-aligned `[a, b)` would zero part of
    /// a compressed cluster, which QEMU's zero_l2_subclusters refuses
    /// (ENOTSUP: the range is then written as zeros).
    fn zeroes_part_of_a_compressed_cluster(&self, a: u64, b: u64) -> Result<bool> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let mut partial = Vec::new();
        if !a.is_multiple_of(cs) {
            partial.push(a);
        }
        if !b.is_multiple_of(cs) && b < size && (a.is_multiple_of(cs) || b / cs != a / cs) {
            partial.push(b - 1);
        }
        for g in partial {
            if matches!(self.map(g, 1)?.mapping, Mapping::Compressed(_)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// For a zero write of `[a, b)` inside one subcluster: whether QEMU
    /// zeroes the whole subcluster instead (qcow2_co_pwrite_zeroes: it is
    /// unallocated or zero, and the rest of it reads as zeros). QEMU asks
    /// the block status of the chain; Strata reads what lies below an
    /// unallocated subcluster and looks for zeros.
    fn subcluster_zeroable(&self, a: u64, b: u64, backing: BackingRead) -> Result<bool> {
        let scs = self.view.geometry().subcluster_size();
        let start = a / scs * scs;
        let end = (start + scs).min(self.virtual_size());
        match self.map(start, end - start)?.mapping {
            Mapping::Zero { .. } => Ok(true),
            Mapping::Unallocated => {
                for (x, y) in [(start, a), (b, end)] {
                    if x < y {
                        let mut buf = vec![0u8; (y - x) as usize];
                        backing(&mut buf, x)?;
                        if buf.iter().any(|&v| v != 0) {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
            Mapping::Data { .. } | Mapping::Compressed(_) => Ok(false),
        }
    }

    /// Zeroes whole units in `[start, end)` inside one L2 table.
    fn zero_chunk(
        &mut self,
        start: u64,
        end: u64,
        mode: ZeroMode,
        backing: BackingRead,
    ) -> Result<()> {
        let geo = self.view.geometry();
        let cs = geo.cluster_size();
        let scs = geo.subcluster_size();
        let l1i = geo.l1_index(GuestOffset::new(start));
        // A discard of a range with no L2 table and no backing changes nothing.
        let has_table = L1Entry(self.view.l1().get(l1i as usize).copied().unwrap_or(0))
            .l2_offset()
            .is_some();
        if matches!(
            mode,
            ZeroMode::Discard { has_backing: false } | ZeroMode::Deallocate
        ) && !has_table
        {
            return Ok(());
        }
        let toff = self.l2_for_write(l1i)?;
        let table = self.l2_table(toff)?;
        // Only a zeroing of part of a compressed cluster (extended L2
        // entries) writes data: the others need no cluster of zeros.
        let zeros = if matches!(mode, ZeroMode::Zero { .. }) && geo.extended_l2() {
            vec![0u8; cs as usize]
        } else {
            Vec::new()
        };
        let mut plans = Vec::new();
        // `end > start`: the callers' steps are never empty.
        for c in geo.guest_clusters(GuestOffset::new(start), end - start) {
            let cstart = geo.guest_cluster_start(c);
            let idx = geo.l2_index(cstart);
            let cstart = cstart.get();
            // A discard only drops the entry (an unaligned one leaks its
            // cluster, as in QEMU); zeroing may write through it.
            let e = if let ZeroMode::Zero { .. } = mode {
                self.entry_for_write(&table, toff, idx)?
            } else {
                L2Entry::read(&table, geo, idx).map_err(|source| Error::Format {
                    path: self.view.path().to_path_buf(),
                    source,
                })?
            };
            let a = start.max(cstart) - cstart;
            let b = end.min(cstart + cs) - cstart;
            let whole = a == 0 && b >= cs.min(self.virtual_size() - cstart);
            let new = match mode {
                ZeroMode::Deallocate => L2Entry::default(),
                ZeroMode::Discard { has_backing } => {
                    let allocated = self.view.entry_host(&e).is_some() || e.compressed();
                    if self.view.header().version() < 3 {
                        L2Entry::default()
                    } else if has_backing || allocated {
                        if geo.extended_l2() {
                            L2Entry::default().with_subclusters(0, u32::MAX)
                        } else {
                            L2Entry::zero()
                        }
                    } else {
                        // discard_in_l2_slice leaves an unallocated entry
                        // alone without a backing file (its zero bits too).
                        e
                    }
                }
                ZeroMode::Zero { unmap } => {
                    // QEMU's zero_in_l2_slice: a compressed cluster, or with
                    // `unmap` an allocated one, loses its host cluster; any
                    // other keeps its entry, the zero flag (bits) added.
                    let drop = e.compressed() || (unmap && self.view.entry_host(&e).is_some());
                    // (A standard entry's bitmap is 0; an extended one's is
                    // replaced below.)
                    let kept = if drop { L2Entry::default() } else { e };
                    if !geo.extended_l2() {
                        kept.with_zero_flag()
                    } else if whole {
                        kept.with_subclusters(0, u32::MAX)
                    } else {
                        if e.compressed() && !whole {
                            // Decompress into a plain cluster first, then zero.
                            let p = self.plan_write(
                                idx,
                                e,
                                cstart,
                                a,
                                &zeros[..(b - a) as usize],
                                backing,
                            )?;
                            plans.push(p);
                            continue;
                        }
                        let mut zbits = 0u32;
                        for sc in (a / scs)..(b.div_ceil(scs)).min(32) {
                            zbits |= 1 << sc;
                        }
                        // zero_l2_subclusters: only the bitmap changes.
                        e.with_subclusters(e.alloc_bits() & !zbits, e.zero_bits() | zbits)
                    }
                }
            };
            if new == e {
                continue;
            }
            let kept = new.host_cluster().is_some() && new.host_cluster() == e.host_cluster();
            let frees = if kept { vec![] } else { self.freed_by(e) };
            plans.push(Plan {
                idx,
                old: e,
                new,
                dest: new.host_cluster(),
                writes: None,
                frees,
            });
        }
        if plans.iter().any(|p| p.writes.is_some()) {
            return self.execute(vec![(toff, plans)]);
        }
        self.update_l2(toff, &plans)
    }

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
    pub(super) fn fallocate(&self, offset: u64, len: u64) -> Result<()> {
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
