//! The read-only metadata view of a qcow2 image: the header and its
//! geometry, the active L1 table, the L2 cache, the snapshot table, the
//! file's length and the storage reads go through.
//!
//! [`View`] is what every open image has, read-only or writable: its
//! fields are private to this module; the rest of the crate reads through
//! its methods (`map`, `read_mapped`, `l2_table`, ...) and the write path
//! changes it through the few setters below (`header_mut`, `l1_mut`,
//! `set_snapshots`, ...), which it calls once the change is on disk or
//! about to be written by it. A writable image's L2 tables changed in
//! memory and not yet written are its writer's (pinned there, never in the
//! cache): reads of such an image pass the writer in (`Pinned`), so that
//! they see them first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use strata_format::header::peek_cluster_bits;
use strata_format::snapshot::{self, Snapshot};
use strata_format::table::{decode_u64_table, OFFSET_MASK};
use strata_format::{limits, Geometry, GuestOffset, Header, L1Entry, L2Entry};

use crate::compress;
use crate::error::{Error, Result};
use crate::mapping::{Extent, Mapping};
use crate::qcow2::check;
use crate::qcow2::data_file::{self, DataFile, Source};
use crate::qcow2::writer::Writer;
use crate::storage::Storage;

/// The writer whose pinned (dirty) L2 tables reads see before the cache
/// and the file; `None` for an image opened read-only.
pub(crate) type Pinned<'a> = Option<&'a Writer>;

/// Bytes of L2 tables kept in the cache of one image.
pub const L2_CACHE_BYTES: usize = 4 << 20;

/// A bounded cache of L2 tables, keyed by host offset.
#[derive(Debug, Default)]
pub(crate) struct L2Cache {
    tables: HashMap<u64, (Arc<Vec<u8>>, u64)>,
    tick: u64,
    bytes: usize,
}

impl L2Cache {
    pub(crate) fn get(&mut self, offset: u64) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = tick;
            t.clone()
        })
    }

    pub(crate) fn insert(&mut self, offset: u64, table: Arc<Vec<u8>>) {
        self.tick += 1;
        let len = table.len();
        if let Some((old, _)) = self.tables.insert(offset, (table, self.tick)) {
            self.bytes -= old.len();
        }
        self.bytes += len;
        // Always keep at least the newest table, even when it alone is over budget.
        while self.bytes > L2_CACHE_BYTES && self.tables.len() > 1 {
            let victim = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            match victim.and_then(|k| self.tables.remove(&k)) {
                Some((t, _)) => self.bytes -= t.len(),
                None => break,
            }
        }
    }

    pub(crate) fn remove(&mut self, offset: u64) {
        if let Some((t, _)) = self.tables.remove(&offset) {
            self.bytes -= t.len();
        }
    }
}

/// The most recently decompressed cluster, keyed by its descriptor offset.
type DecompressedCache = Option<(u64, Arc<Vec<u8>>)>;

/// The metadata of an open qcow2 image, and the reads through it.
#[derive(Debug)]
pub(crate) struct View {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    header: Header,
    geometry: Geometry,
    /// The active L1 table (raw entries), `header.l1_size` long.
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    decompressed: Mutex<DecompressedCache>,
    snapshots: Vec<Snapshot>,
    /// Host offset just past the last snapshot table entry (its padding
    /// included); the table's start when there are none.
    snapshot_table_end: u64,
    /// Length of the file when opened (or after the last growth).
    file_len: u64,
    /// The external data file, when the header names one (data_file.rs).
    data: Option<Arc<DataFile>>,
    /// Whether QEMU would take the image for metadata-preallocated,
    /// decided at the first question (as QEMU does, once per open).
    metadata_preallocated: OnceLock<bool>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl View {
    /// Opens and validates a qcow2 image on `storage`. `path` names it in
    /// errors. Nothing is written.
    /// `data`: where the external data file is, if the image has one.
    pub(crate) fn open(storage: Box<dyn Storage>, path: &Path, data: Source) -> Result<View> {
        let fmt_err = |source| Error::Format {
            path: path.to_path_buf(),
            source,
        };
        let file_len = storage.len().map_err(|e| Error::io(path, "stat", 0, e))?;
        let mut prefix = [0u8; 24];
        storage
            .read_at(&mut prefix, 0)
            .map_err(|e| Error::io(path, "read header", 0, e))?;
        let cluster_bits = peek_cluster_bits(&prefix).map_err(fmt_err)?;
        let c0_len = (1u64 << cluster_bits).min(file_len) as usize;
        let mut c0 = vec![0u8; c0_len];
        storage
            .read_at(&mut c0, 0)
            .map_err(|e| Error::io(path, "read header", 0, e))?;
        let header = Header::parse(&c0).map_err(fmt_err)?;
        let geometry = header.geometry();

        // The L1 table must lie inside the file before we allocate for it.
        let l1_bytes = u64::from(header.l1_size()) * 8;
        let l1_end = header.l1_table_offset().saturating_add(l1_bytes);
        if header.l1_size() > 0 && l1_end > file_len {
            return Err(Error::corrupt(
                path,
                header.l1_table_offset(),
                format!(
                    "L1 table ({} entries) extends past the end of the file ({file_len} bytes)",
                    header.l1_size()
                ),
            ));
        }
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        storage
            .read_at(&mut raw_l1, header.l1_table_offset())
            .map_err(|e| Error::io(path, "read L1 table", header.l1_table_offset(), e))?;
        let l1 = decode_u64_table(&raw_l1);
        let rt_end = header
            .refcount_table_offset()
            .saturating_add(geometry.clusters_bytes(u64::from(header.refcount_table_clusters())));
        if rt_end > file_len {
            return Err(Error::corrupt(
                path,
                header.refcount_table_offset(),
                "refcount table extends past the end of the file",
            ));
        }
        let (snapshots, snapshot_table_end) =
            read_snapshots(storage.as_ref(), path, &header, file_len)?;
        let data = DataFile::open(&header, path, data, storage.file().is_some())?;
        Ok(View {
            path: path.to_path_buf(),
            storage: Arc::from(storage),
            header,
            geometry,
            l1,
            l2_cache: Mutex::new(L2Cache::default()),
            decompressed: Mutex::new(None),
            snapshots,
            snapshot_table_end,
            file_len,
            data: data.map(Arc::new),
            metadata_preallocated: OnceLock::new(),
        })
    }

    /// QEMU's `qcow2_detect_metadata_preallocation` for this image, run
    /// once (see [`check::detect_metadata_preallocation`]).
    pub(crate) fn metadata_preallocated(&self) -> bool {
        *self
            .metadata_preallocated
            .get_or_init(|| check::detect_preallocation(self).unwrap_or(false))
    }

    /// The external data file, when the image has one.
    pub(crate) fn data_file(&self) -> Option<&DataFile> {
        self.data.as_deref()
    }

    /// The external data file's shared handle (the writer's too).
    pub(crate) fn data_ref(&self) -> &Option<Arc<DataFile>> {
        &self.data
    }

    /// The storage data clusters' host offsets point into: the external
    /// data file when the image has one (an error when it could not be
    /// opened), the image's own storage otherwise.
    pub(crate) fn data_storage(&self) -> Result<&dyn Storage> {
        match &self.data {
            Some(d) => Ok(d.storage()?.as_ref()),
            None => Ok(self.storage.as_ref()),
        }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    /// The validated header.
    pub(crate) fn header(&self) -> &Header {
        &self.header
    }
    /// The header, to change it in memory (the write path writes it with
    /// `write_header`; a read-only image showing a snapshot changes its
    /// L1 table's place and the size). The geometry stays: no change
    /// touches the cluster size or the L2 entry width.
    pub(crate) fn header_mut(&mut self) -> &mut Header {
        &mut self.header
    }
    /// The cluster geometry.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }
    /// Virtual size in bytes.
    pub(crate) fn virtual_size(&self) -> u64 {
        self.header.size()
    }
    /// The internal snapshots.
    pub(crate) fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    /// Host offset just past the last snapshot table entry (its padding
    /// included); the table's start when there are none.
    pub(crate) fn snapshot_table_end(&self) -> u64 {
        self.snapshot_table_end
    }
    /// Replaces the snapshot list and the end of its table (a committed
    /// or restored snapshot table).
    pub(crate) fn set_snapshots(&mut self, snapshots: Vec<Snapshot>, table_end: u64) {
        self.snapshots = snapshots;
        self.snapshot_table_end = table_end;
    }
    /// The storage.
    pub(crate) fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    /// A shared handle on the storage (the writer's own).
    pub(crate) fn storage_arc(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }
    /// The active L1 table's raw entries.
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }
    /// The active L1 table, to change entries in memory (the write path
    /// writes them at its next metadata commit) or its length (growth).
    pub(crate) fn l1_mut(&mut self) -> &mut Vec<u64> {
        &mut self.l1
    }
    /// Length of the file when opened (or after the last growth).
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Drops every cached table and decompressed cluster (after a commit
    /// that replaced the tables in use: internal snapshots).
    pub(crate) fn forget_caches(&mut self) {
        *lock(&self.l2_cache) = L2Cache::default();
        *lock(&self.decompressed) = None;
    }

    /// Caches the L2 table at `offset`, as on disk (written, or read).
    /// Dirty tables are pinned in the writer instead, never cached: the
    /// write path calls this once their entries are written.
    pub(crate) fn cache_l2(&self, offset: u64, table: Arc<Vec<u8>>) {
        lock(&self.l2_cache).insert(offset, table);
    }

    /// Drops the L2 table at `offset` from the cache (it is about to be
    /// pinned as dirty, or freed).
    pub(crate) fn uncache_l2(&self, offset: u64) {
        lock(&self.l2_cache).remove(offset);
    }

    /// Reads (through the cache) the L2 table at `offset`; a table
    /// `pinned` holds changed in memory first.
    ///
    /// Tables written by this process are always in the cache, so the
    /// file-length check below only applies to tables read from disk.
    pub(crate) fn l2_table(&self, offset: u64, pinned: Pinned) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = pinned.and_then(|w| w.dirty_table(offset)) {
            return Ok(d.clone());
        }
        if let Some(t) = lock(&self.l2_cache).get(offset) {
            return Ok(t);
        }
        let cs = self.geometry.cluster_size();
        if !self.geometry.is_aligned(offset) {
            return Err(Error::corrupt(
                &self.path,
                offset,
                "L2 table offset not cluster-aligned",
            ));
        }
        // A table that starts inside the file but runs past its end reads
        // as zeros there, as in QEMU (a file qemu-img truncated to the
        // bytes in use; iotest 060 links an L2 entry onto the L1 table).
        let past_end = offset >= self.storage_len()?;
        if past_end && offset != 0 {
            // A table wholly past the end of the file reads as zeros, as
            // qemu-img reads it (its check reports the cluster as
            // "exceeding the end of the file" and unreferenced). Writes
            // through it are refused (`l2_past_the_end`): its L2 offset
            // contradicts the refcounts.
            let t = Arc::new(vec![0u8; cs as usize]);
            lock(&self.l2_cache).insert(offset, t.clone());
            return Ok(t);
        }
        if offset == 0 || past_end {
            return Err(Error::corrupt(
                &self.path,
                offset,
                "L2 table outside the file",
            ));
        }
        let mut t = vec![0u8; cs as usize];
        self.storage
            .read_at(&mut t, offset)
            .map_err(|e| Error::io(&self.path, "read L2 table", offset, e))?;
        let t = Arc::new(t);
        lock(&self.l2_cache).insert(offset, t.clone());
        Ok(t)
    }

    /// Refuses a write through the L2 table at `offset` when the table
    /// lies past the end of the file (reads see zeros there; QEMU would
    /// write into a cluster its refcounts call free).
    pub(crate) fn l2_past_the_end(&self, offset: u64) -> Result<()> {
        if offset >= self.storage_len()? {
            return Err(Error::corrupt(
                &self.path,
                offset,
                "L2 table outside the file",
            ));
        }
        Ok(())
    }

    /// Refuses an image whose refcount table points at a refcount block
    /// that is not cluster-aligned or not inside the file, naming the
    /// entry. Shrinking walks the refcount blocks past the new end, where
    /// QEMU then signals the corruption half-way ("Failed to discard
    /// unused refblocks", iotest 060); Strata refuses before any change.
    pub(crate) fn refuse_bad_refblocks(&self) -> Result<()> {
        let h = &self.header;
        let cs = self.geometry.cluster_size();
        let len = u64::from(h.refcount_table_clusters()) * cs;
        let mut table = vec![0u8; len as usize];
        self.storage
            .read_at(&mut table, h.refcount_table_offset())
            .map_err(|e| {
                Error::io(
                    &self.path,
                    "read refcount table",
                    h.refcount_table_offset(),
                    e,
                )
            })?;
        let file = self.storage_len()?;
        for (i, entry) in decode_u64_table(&table).into_iter().enumerate() {
            if entry == 0 {
                continue;
            }
            let at = h.refcount_table_offset() + 8 * i as u64;
            let off = entry & !0x1ff;
            let what = if !self.geometry.is_aligned(entry) {
                "is not cluster-aligned"
            } else if off.checked_add(cs).is_none_or(|e| e > file) {
                "is outside the file"
            } else {
                continue;
            };
            return Err(Error::corrupt(
                &self.path,
                at,
                format!(
                    "refcount block {i} (at {entry:#x}) {what}; repair the image with \
                     `check -r all` first"
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn storage_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(&self.path, "stat", 0, e))
    }

    /// The L2 table mapping L1 index `l1i` of the active table, if any.
    pub(crate) fn l2_for(&self, l1i: u64, pinned: Pinned) -> Result<Option<(u64, Arc<Vec<u8>>)>> {
        let entry = usize::try_from(l1i)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
            .unwrap_or(0);
        match L1Entry(entry).l2_offset() {
            None => Ok(None),
            Some(off) => Ok(Some((off.get(), self.l2_table(off.get(), pinned)?))),
        }
    }

    /// The mapping at guest offset `g` from an L2 table (None: no table).
    /// The mapping of guest offset `g` from its L2 table (none: no table),
    /// and the end of the run of subclusters from `g`'s on, in its cluster,
    /// that have the same state (each continues the one before it).
    fn mapping_in(&self, table: Option<&(u64, Arc<Vec<u8>>)>, g: u64) -> Result<(Mapping, u64)> {
        let step = self.geometry.subcluster_size();
        let Some((toff, table)) = table else {
            return Ok((Mapping::Unallocated, (g / step + 1) * step));
        };
        let guest = GuestOffset::new(g);
        let idx = self.geometry.l2_index(guest);
        let entry = L2Entry::read(table, self.geometry, idx).map_err(|source| Error::Format {
            path: self.path.clone(),
            source,
        })?;
        let sc = self.geometry.subcluster_index(guest);
        let run = u64::from(entry.same_state_run(self.geometry, sc));
        let run_end = self.geometry.align_down(g) + (u64::from(sc) + run) * step;
        let state = self.entry_state(&entry, sc).map_err(|what| {
            Error::corrupt(
                &self.path,
                toff + idx * self.geometry.l2_entry_size(),
                format!("L2 entry for guest offset {g:#x}: {what}"),
            )
        })?;
        let m = Mapping::from(state);
        self.check_data_file_host(&entry, g, idx, toff + idx * self.geometry.l2_entry_size())?;
        if let (Mapping::Compressed(_), Some(_)) = (m, &self.data) {
            return Err(data_file::compressed_entry(
                &self.path,
                *toff,
                idx,
                toff + idx * self.geometry.l2_entry_size(),
            ));
        }
        // Offset of g inside its subcluster.
        let within = self.geometry.in_subcluster(guest);
        let m = match m {
            Mapping::Compressed(_) => m,
            // A zero entry's host is the start of the whole cluster (data
            // subclusters already point at their own start): add g's
            // offset in the cluster, as QEMU reports it.
            Mapping::Zero { host: Some(_) } => m.advance(self.geometry.in_cluster(g)),
            m => m.advance(within),
        };
        Ok((m, run_end))
    }

    /// Where a run of data clusters that continues the data cluster just
    /// before `pos` (cluster-aligned, not the first of its table) ends,
    /// at most `end`; `pos` itself when the next cluster does not simply
    /// continue it, or when this image needs more than its raw words to
    /// tell (extended L2 entries, an external data file). A cluster
    /// continues the run when its L2 entry is the previous one with the
    /// host offset one cluster further and the same flags: then
    /// [`View::mapping_in`] maps it as data right after the previous
    /// cluster's (no flag changed, the offset is aligned and not 0), which
    /// is what a merge's walk looks for, cluster by cluster, in every run
    /// of a layer's data.
    fn data_run_in(&self, table: &[u8], pos: u64, end: u64) -> u64 {
        let geo = self.geometry;
        if geo.extended_l2() || self.data.is_some() || !geo.is_aligned(pos) {
            return pos;
        }
        let cs = geo.cluster_size();
        let word = |i: u64| -> Option<u64> {
            let at = usize::try_from(i).ok()?.checked_mul(8)?;
            let b = table.get(at..at.checked_add(8)?)?;
            Some(u64::from_be_bytes(b.try_into().ok()?))
        };
        let mut idx = geo.l2_index(GuestOffset::new(pos));
        let Some(mut prev) = idx.checked_sub(1).and_then(word) else {
            return pos;
        };
        let mut at = pos;
        while at < end {
            let Some(w) = word(idx) else { break };
            let continues = w & !OFFSET_MASK == prev & !OFFSET_MASK
                && (prev & OFFSET_MASK).checked_add(cs) == Some(w & OFFSET_MASK);
            if !continues {
                break;
            }
            prev = w;
            idx += 1;
            at = (at + cs).min(end);
        }
        at
    }

    /// The end of the extent [`View::map`] looks at from `start` (at most
    /// `max_len` bytes, not past the disk); an empty one is out of range.
    pub(crate) fn map_end(&self, start: u64, max_len: u64) -> Result<u64> {
        let size = self.virtual_size();
        let end = start.saturating_add(max_len).min(size);
        if start >= end {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset: start,
                len: max_len,
                size,
            });
        }
        Ok(end)
    }

    /// The longest extent starting at `start` (at most `max_len` bytes)
    /// whose bytes have one mapping, contiguous on the host.
    pub(crate) fn map(&self, start: u64, max_len: u64, pinned: Pinned) -> Result<Extent> {
        let end = self.map_end(start, max_len)?;
        self.map_uncached(start, end, pinned)
    }

    /// [`View::map`] from the tables, for `[start, end)` (not empty).
    pub(crate) fn map_uncached(&self, start: u64, end: u64, pinned: Pinned) -> Result<Extent> {
        let geo = self.geometry;
        let mut pos = start;
        let mut first: Option<Mapping> = None;
        while pos < end {
            let l1i = geo.l1_index(GuestOffset::new(pos));
            let table = self.l2_for(l1i, pinned)?;
            let table_end = ((l1i + 1) * geo.l2_span()).min(end);
            if table.is_none() {
                match first {
                    None => first = Some(Mapping::Unallocated),
                    Some(Mapping::Unallocated) => {}
                    Some(_) => break,
                }
                pos = table_end;
                continue;
            }
            while pos < table_end {
                if let (Some(Mapping::Data { .. }), Some((_, t))) = (first, table.as_ref()) {
                    // Data contiguous on the host, read from the raw words.
                    let run = self.data_run_in(t, pos, table_end);
                    if run > pos {
                        pos = run;
                        continue;
                    }
                }
                let (m, next) = self.mapping_in(table.as_ref(), pos)?;
                match first {
                    None => {
                        first = Some(m);
                        if let Mapping::Compressed(_) = m {
                            let cend = geo.align_down(pos) + geo.cluster_size();
                            return Ok(Extent {
                                start,
                                len: cend.min(end) - start,
                                mapping: m,
                            });
                        }
                    }
                    Some(f) => {
                        if !f.continues(pos - start, m) {
                            return Ok(Extent {
                                start,
                                len: pos - start,
                                mapping: f,
                            });
                        }
                    }
                }
                pos = next.min(table_end);
            }
        }
        Ok(Extent {
            start,
            len: pos.min(end) - start,
            mapping: first.unwrap_or(Mapping::Unallocated),
        })
    }

    /// Reads `buf.len()` guest bytes at `guest` that this image maps with
    /// `m` (the mapping of `guest` itself, as [`View::map`] returns
    /// it advanced to `guest`). Unallocated ranges are the caller's.
    pub(crate) fn read_mapped(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Unallocated | Mapping::Zero { .. } => buf.fill(0),
            Mapping::Data { host } => {
                self.data_storage()?
                    .read_at(buf, host.get())
                    .map_err(|e| Error::io(&self.path, "read data", host.get(), e))?;
            }
            Mapping::Compressed(d) => {
                let cluster = self.decompress(d)?;
                let at = self.geometry.in_cluster(guest) as usize;
                let src = cluster.get(at..at + buf.len()).ok_or_else(|| {
                    Error::InvalidArgument("compressed read crosses a cluster".into())
                })?;
                buf.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Decompresses the cluster `d` describes (cached: the last one).
    pub(crate) fn decompress(
        &self,
        d: strata_format::CompressedDescriptor,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some((off, data)) = lock(&self.decompressed).as_ref() {
            if *off == d.offset.get() {
                return Ok(data.clone());
            }
        }
        let cs = self.geometry.cluster_size() as usize;
        // A descriptor names at most 2^(cluster_bits-8) sectors: bounded.
        let mut input = vec![0u8; d.len as usize];
        let n = self
            .storage
            .read_at(&mut input, d.offset.get())
            .map_err(|e| Error::io(&self.path, "read compressed cluster", d.offset.get(), e))?;
        input.truncate(n);
        let mut out = vec![0u8; cs];
        compress::decompress(self.header.compression_type(), &input, &mut out)
            .map_err(|what| Error::corrupt(&self.path, d.offset.get(), what))?;
        let out = Arc::new(out);
        *lock(&self.decompressed) = Some((d.offset.get(), out.clone()));
        Ok(out)
    }
}

fn read_snapshots(
    storage: &dyn Storage,
    path: &Path,
    header: &Header,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut at = header.snapshots_offset();
    let end_limit = header
        .snapshots_offset()
        .saturating_add(limits::MAX_SNAPSHOT_TABLE_BYTES);
    for _ in 0..header.nb_snapshots() {
        let mut fixed = [0u8; snapshot::FIXED_LEN];
        let n = storage
            .read_at(&mut fixed, at)
            .map_err(|e| Error::io(path, "read snapshot table", at, e))?;
        if n < fixed.len() {
            return Err(Error::corrupt(
                path,
                at,
                "snapshot table extends past the end of the file",
            ));
        }
        let len = snapshot::entry_len(&fixed, at).map_err(|source| Error::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let data_len = snapshot::entry_data_len(&fixed, at).map_err(|source| Error::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let end = at.saturating_add(len as u64);
        // The padding of the last entry may lie past the end of the file.
        if at.saturating_add(data_len as u64) > file_len || end > end_limit {
            return Err(Error::corrupt(
                path,
                at,
                "snapshot table extends past the end of the file or its size limit",
            ));
        }
        let mut entry = vec![0u8; len];
        storage
            .read_at(&mut entry, at)
            .map_err(|e| Error::io(path, "read snapshot table", at, e))?;
        out.push(Snapshot::parse(&entry, at).map_err(|source| Error::Format {
            path: path.to_path_buf(),
            source,
        })?);
        at = end;
    }
    Ok((out, at))
}
