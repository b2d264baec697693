//! The [`Writer`]: the write state of an image opened for writing.
//!
//! It owns what only a writer has: the refcount structures (and the map of
//! the image's metadata the overlap check uses), the dirty L2 tables and L1
//! entries waiting for the next metadata commit, the clusters to free at
//! the next flush, and the persistent bitmaps kept up to date. Its fields
//! are private to this module: the rest of the image code reads and
//! changes that state through the methods below, so each invariant is kept
//! in one place:
//!
//! - a dirty L2 table is pinned here, never in the L2 cache, until its
//!   entries are written ([`Writer::pin`], [`Writer::unpin`],
//!   [`Writer::take_dirty`]); reads see it through [`Writer::dirty_table`];
//! - clusters that lost their last pointer are only queued
//!   ([`Writer::free_later`]) and freed by the flush after the barrier
//!   that made the pointer change durable;
//! - replacing the refcount structures (a rebuild) drops the queued frees
//!   with them ([`Writer::replace_refcounts`]).
//!
//! The writer holds its own handle on the image's storage and its path,
//! so refcount reads and allocations need no other borrow of the image.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_format::{Geometry, HostOffset};

use crate::chain::WritePolicy;
use crate::error::{Error, Poison, Result};
use crate::qcow2::alloc::{MetadataMap, Refcounts};
use crate::qcow2::bitmap::BitmapState;
use crate::qcow2::data_file::DataFile;
use crate::storage::{RangeCopy, Storage};

/// An L2 table with entries not yet on disk, and the changed entry range.
#[derive(Debug)]
pub(crate) struct DirtyTable {
    pub(crate) table: Arc<Vec<u8>>,
    pub(crate) lo: u64,
    pub(crate) hi: u64,
}

/// The write state of an image opened for writing.
#[derive(Debug)]
pub(crate) struct Writer {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    /// The image's poison, shared with it: set by the first I/O error of
    /// a write.
    poisoned: Arc<Poison>,
    refcounts: Refcounts,
    /// Cluster indices whose refcount drops by one at the next flush.
    pending_frees: Vec<u64>,
    /// Whether the first-write preparation (repair, autoclear) ran.
    prepared: bool,
    /// L2 tables changed in memory whose entries are written at the next
    /// metadata commit (after a barrier), with the changed entry range.
    dirty_l2: BTreeMap<u64, DirtyTable>,
    /// L1 entries changed in memory, written at the next metadata commit.
    dirty_l1: BTreeSet<usize>,
    /// Data bytes written since the last metadata commit.
    unsynced_bytes: u64,
    /// Set when a write was refused for corrupt metadata (an overlap, an
    /// invalid entry): the image was marked corrupt, and nothing more is
    /// written, not even the metadata still pending in memory (as a crash
    /// would lose it; the protocol makes that safe).
    halted: bool,
    /// The persistent dirty bitmaps kept up to date in this session
    /// (loaded at the first write; docs/crash-consistency.md).
    bitmaps: Option<BitmapState>,
    /// What the first write does with a dirty image, unreadable bitmaps
    /// or unknown autoclear bits.
    policy: WritePolicy,
    /// The external data file and its storage: guest data goes there
    /// (qcow2/data_file.rs).
    data: Option<(Arc<DataFile>, Arc<dyn Storage>)>,
}

impl Writer {
    /// The write state of the image at `path` on `storage`, with its
    /// loaded refcount structures.
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        path: &Path,
        poisoned: Arc<Poison>,
        refcounts: Refcounts,
    ) -> Writer {
        Writer {
            storage,
            path: path.to_path_buf(),
            poisoned,
            refcounts,
            pending_frees: Vec::new(),
            prepared: false,
            dirty_l2: BTreeMap::new(),
            dirty_l1: BTreeSet::new(),
            unsynced_bytes: 0,
            halted: false,
            bitmaps: None,
            policy: WritePolicy::default(),
            data: None,
        }
    }

    /// Sends guest data to the external data file `storage` from now on.
    pub(crate) fn set_data_file(&mut self, file: Arc<DataFile>, storage: Arc<dyn Storage>) {
        self.data = Some((file, storage));
    }

    /// Where guest data goes: the data file, or the image's storage. A
    /// write there cancels the data file's queued discards it overlaps.
    fn data_sink(&self, offset: u64, len: u64) -> &dyn Storage {
        match &self.data {
            Some((file, storage)) => {
                file.cancel_discards(offset, len);
                storage.as_ref()
            }
            None => self.storage.as_ref(),
        }
    }

    // --- writes ----------------------------------------------------------

    fn io_err(&self, op: &'static str, offset: u64, e: std::io::Error) -> Error {
        let e = Error::io(&self.path, op, offset, e);
        self.poisoned.set(&e);
        e
    }

    /// Writes metadata (a header, L1 or L2 table or entries, a refcount
    /// block, the snapshot table, a bitmap directory, table or its data)
    /// at `offset`: the one place metadata reaches the storage. The
    /// callers keep the order docs/crash-consistency.md sets (data before
    /// the pointers at it, a barrier between); an I/O error poisons the
    /// image.
    pub(crate) fn write_metadata(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| self.io_err(op, offset, e))
    }

    /// Writes guest data (or zeros) into host clusters at `offset`.
    pub(crate) fn write_data(&self, buf: &[u8], offset: u64, op: &'static str) -> Result<()> {
        self.data_sink(offset, buf.len() as u64)
            .write_at(buf, offset)
            .map_err(|e| self.io_err(op, offset, e))
    }

    /// Writes guest data from several buffers, contiguous on the host.
    pub(crate) fn write_data_vectored(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.data_sink(offset, len)
            .write_vectored_at(bufs, offset)
            .map_err(|e| self.io_err("write data", offset, e))
    }

    /// Moves `len` bytes of guest data from `src` at `from` into host
    /// clusters at `offset` (a clone of the source's extents where the
    /// filesystem can, a copy otherwise); says which.
    pub(crate) fn copy_data_from(
        &self,
        src: &dyn Storage,
        from: u64,
        len: u64,
        offset: u64,
    ) -> Result<RangeCopy> {
        self.data_sink(offset, len)
            .copy_range_from(src, from, len, offset)
            .map_err(|e| self.io_err("move data", offset, e))
    }

    /// The barrier: makes everything written to the image's file durable
    /// (`fdatasync`), unless its storage knows that nothing changed it
    /// since its last successful sync ([`Storage::unsynced`]): then every
    /// write before is durable already and the sync would order nothing
    /// (docs/crash-consistency.md, "Barriers with nothing to write").
    /// Returns whether it synced. An I/O error poisons the image.
    pub(crate) fn sync(&self) -> Result<bool> {
        if !self.storage.unsynced() {
            return Ok(false);
        }
        self.storage.sync().map_err(|e| self.io_err("sync", 0, e))?;
        Ok(true)
    }

    // --- refcounts -------------------------------------------------------

    /// The refcount of cluster `ci`.
    pub(crate) fn refcount(&mut self, ci: u64) -> Result<u64> {
        self.refcounts.get(self.storage.as_ref(), &self.path, ci)
    }

    /// Sets the refcount of cluster `ci` (repairs); its block must exist.
    pub(crate) fn set_refcount(&mut self, ci: u64, value: u64) -> Result<()> {
        self.refcounts
            .set(self.storage.as_ref(), &self.path, ci, value)
    }

    /// Adds `delta` (±1) to the refcount of cluster `ci`; returns the new one.
    pub(crate) fn adjust_refcount(&mut self, ci: u64, delta: i64) -> Result<u64> {
        self.refcounts
            .adjust(self.storage.as_ref(), &self.path, ci, delta)
    }

    /// Allocates `n` contiguous clusters; returns the first cluster index.
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        self.refcounts
            .alloc_contiguous(self.storage.as_ref(), &self.path, n)
    }

    /// Allocates up to `max` contiguous clusters (at least one): the first
    /// cluster index and the count.
    pub(crate) fn alloc_run(&mut self, max: u64) -> Result<(u64, u64)> {
        self.refcounts
            .alloc_run(self.storage.as_ref(), &self.path, max)
    }

    /// The refcount structures, read-only (the overlap map is built from
    /// their layout).
    pub(crate) fn refcounts(&self) -> &Refcounts {
        &self.refcounts
    }

    /// The refcount table's raw entries, as held in memory.
    pub(crate) fn refcount_table(&self) -> &[u64] {
        &self.refcounts.table
    }

    /// Writes every changed refcount block (barrier step 1).
    pub(crate) fn write_refcount_blocks(&mut self) -> Result<()> {
        self.refcounts
            .write_blocks(self.storage.as_ref(), &self.path)
    }

    /// Whether refcount table entries or a moved table wait to be written.
    pub(crate) fn refcount_table_dirty(&self) -> bool {
        self.refcounts.table_dirty()
    }

    /// Writes the changed refcount table entries, or the moved table
    /// (barrier step 2); returns the moved table's place for the header.
    pub(crate) fn write_refcount_table(&mut self) -> Result<Option<(u64, u32)>> {
        self.refcounts
            .write_table(self.storage.as_ref(), &self.path)
    }

    /// Records that the header now points at the moved refcount table
    /// (barrier step 3): the old table's clusters are freed at the next
    /// flush.
    pub(crate) fn refcount_table_switched(&mut self, geo: Geometry) {
        if let Some((old, n)) = self.refcounts.table_switched() {
            let first = geo.cluster_index(HostOffset::new(old));
            self.pending_frees.extend(first..first + u64::from(n));
        }
    }

    /// Lets the allocator look for free clusters from the start again
    /// (after frees have been made durable).
    pub(crate) fn rewind_allocator(&mut self) {
        self.refcounts.rewind();
    }

    /// Records that the file was cut to `clusters` clusters.
    pub(crate) fn truncated(&mut self, clusters: u64) {
        self.refcounts.truncated(clusters);
    }

    /// Replaces the refcount structures with rebuilt ones; the frees queued
    /// against the old ones are dropped (the rebuild counted what is
    /// referenced now).
    pub(crate) fn replace_refcounts(&mut self, fresh: Refcounts) {
        self.refcounts = fresh;
        self.pending_frees.clear();
    }

    /// The map of the image's metadata (the overlap check).
    pub(crate) fn meta(&self) -> &MetadataMap {
        &self.refcounts.meta
    }

    /// The map of the image's metadata, to record a change of layout.
    pub(crate) fn meta_mut(&mut self) -> &mut MetadataMap {
        &mut self.refcounts.meta
    }

    // --- frees -----------------------------------------------------------

    /// Queues one reference drop per cluster index for the next flush.
    pub(crate) fn free_later(&mut self, clusters: impl IntoIterator<Item = u64>) {
        self.pending_frees.extend(clusters);
    }

    /// Whether reference drops wait for the next flush.
    pub(crate) fn has_pending_frees(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    /// The queued reference drops (the flush releases them).
    pub(crate) fn take_pending_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_frees)
    }

    // --- dirty tables ----------------------------------------------------

    /// The dirty (pinned) L2 table at `offset`, if any.
    pub(crate) fn dirty_table(&self, offset: u64) -> Option<&Arc<Vec<u8>>> {
        self.dirty_l2.get(&offset).map(|d| &d.table)
    }

    /// Whether the L2 table at `offset` is pinned.
    pub(crate) fn is_pinned(&self, offset: u64) -> bool {
        self.dirty_l2.contains_key(&offset)
    }

    /// Takes the pinned table at `offset` out to change it (it must be
    /// pinned again with [`Writer::pin`]).
    pub(crate) fn unpin(&mut self, offset: u64) -> Option<DirtyTable> {
        self.dirty_l2.remove(&offset)
    }

    /// Pins a changed L2 table until the next metadata commit.
    pub(crate) fn pin(&mut self, offset: u64, table: DirtyTable) {
        self.dirty_l2.insert(offset, table);
    }

    /// Marks L1 entries changed in memory.
    pub(crate) fn l1_changed(&mut self, entries: impl IntoIterator<Item = usize>) {
        self.dirty_l1.extend(entries);
    }

    /// The L1 entries waiting for the next commit.
    pub(crate) fn dirty_l1_entries(&self) -> impl Iterator<Item = usize> + '_ {
        self.dirty_l1.iter().copied()
    }

    /// Counts data bytes written since the last metadata commit.
    pub(crate) fn add_unsynced(&mut self, bytes: u64) {
        self.unsynced_bytes += bytes;
    }

    /// Whether nothing waits for a metadata commit.
    pub(crate) fn nothing_pending(&self) -> bool {
        self.dirty_l2.is_empty() && self.dirty_l1.is_empty() && self.unsynced_bytes == 0
    }

    /// Whether enough waits that a metadata commit is due.
    pub(crate) fn commit_due(&self, cluster_size: u64, max_tables: u64, max_unsynced: u64) -> bool {
        self.dirty_l2.len() as u64 * cluster_size > max_tables || self.unsynced_bytes > max_unsynced
    }

    /// Takes the pinned tables and changed L1 entries to write them (the
    /// commit returns each table to the cache once written).
    pub(crate) fn take_dirty(&mut self) -> (BTreeMap<u64, DirtyTable>, BTreeSet<usize>) {
        self.unsynced_bytes = 0;
        (
            std::mem::take(&mut self.dirty_l2),
            std::mem::take(&mut self.dirty_l1),
        )
    }

    // --- session state ---------------------------------------------------

    /// Whether the first-write preparation ran.
    pub(crate) fn prepared(&self) -> bool {
        self.prepared
    }

    /// Records that the first-write preparation ran.
    pub(crate) fn set_prepared(&mut self) {
        self.prepared = true;
    }

    /// Whether a write was refused for corrupt metadata.
    pub(crate) fn halted(&self) -> bool {
        self.halted
    }

    /// Takes no more writes; returns whether it had already stopped.
    pub(crate) fn halt(&mut self) -> bool {
        std::mem::replace(&mut self.halted, true)
    }

    /// The write policy of the first write.
    pub(crate) fn policy(&self) -> WritePolicy {
        self.policy
    }

    /// Sets the write policy of the first write.
    pub(crate) fn set_policy(&mut self, policy: WritePolicy) {
        self.policy = policy;
    }

    /// The persistent bitmaps kept up to date, once loaded.
    pub(crate) fn bitmaps(&self) -> Option<&BitmapState> {
        self.bitmaps.as_ref()
    }

    /// The persistent bitmaps kept up to date, to mark writes.
    pub(crate) fn bitmaps_mut(&mut self) -> Option<&mut BitmapState> {
        self.bitmaps.as_mut()
    }

    /// Sets (or drops) the persistent bitmaps kept up to date.
    pub(crate) fn set_bitmaps(&mut self, bitmaps: Option<BitmapState>) {
        self.bitmaps = bitmaps;
    }

    /// Takes the persistent bitmaps out (to be set again).
    pub(crate) fn take_bitmaps(&mut self) -> Option<BitmapState> {
        self.bitmaps.take()
    }
}
