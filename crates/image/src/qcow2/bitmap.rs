//! Persistent dirty bitmaps: the bitmap directory and bitmap tables of a
//! qcow2 image, what a library user reads of them ([`Qcow2Image::bitmaps`](crate::Qcow2Image::bitmaps),
//! [`Qcow2Image::dirty_bitmap`](crate::Qcow2Image::dirty_bitmap)) and how the write path keeps them exact.
//!
//! The write path's protocol (docs/crash-consistency.md, "Persistent dirty
//! bitmaps"): before the first guest change of a session, every enabled
//! bitmap is flagged `in_use` in the directory (rewritten in place, only the
//! flags change, then synced); the dirty bits live in memory and every
//! write, write-zeroes and discard sets the granules it touches; at flush
//! (and close) the new bitmap tables and data go to newly allocated
//! clusters, a barrier, then a new directory (in_use cleared) to new
//! clusters, a barrier, then the header extension points at it (synced),
//! and only then are the old tables and directory freed. A crash leaves a
//! bitmap flagged in_use (untrusted, QEMU's rule) or consistent, never
//! clean where the guest changed.
//!
//! ```
//! use std::path::Path;
//! use strata_image::create::{create_qcow2, CreateOptions};
//! use strata_image::{BitmapEdit, MemStorage, Qcow2Image};
//!
//! # fn main() -> strata_image::Result<()> {
//! let path = Path::new("disk.qcow2");
//! let disk = MemStorage::new();
//! let opts = CreateOptions { size: 1 << 30, ..Default::default() };
//! let mut img = create_qcow2(Box::new(disk.clone()), path, &opts)?;
//! // A backup tool starts tracking changes (qemu-img bitmap --add).
//! img.edit_bitmap("since-full", BitmapEdit::Add { granularity: None, disabled: false })?;
//! // The guest writes 4 KiB at 5 MiB (the backing read is unused here).
//! img.write(5 << 20, &[0xab; 4096], &|b: &mut [u8], _| { b.fill(0); Ok(()) })?;
//! drop(img); // closing saves the bitmaps
//!
//! // Later: which ranges must the incremental backup copy?
//! let img = Qcow2Image::open(Box::new(disk), path)?;
//! for b in img.bitmaps()? {
//!     println!("{}: granularity {}, in use {}, enabled {}", b.name, b.granularity, b.in_use, b.auto);
//! }
//! let dirty = img.dirty_bitmap("since-full")?;
//! let extents: Vec<(u64, u64)> = dirty.extents(0, img.virtual_size()).collect();
//! assert_eq!(extents, [(5 << 20, 64 << 10)]); // one 64 KiB granule
//! # Ok(())
//! # }
//! ```

use strata_format::bitmap::{
    parse_directory, BitmapDirEntry, BitmapTableEntry, FLAG_IN_USE, MAX_BITMAPS,
    MAX_DIRECTORY_SIZE, MAX_PHYS_SIZE,
};
use strata_format::header::Autoclear;
use strata_format::HostOffset;

use crate::error::{Error, Result};
use crate::qcow2::alloc::Meta;
use crate::qcow2::{View, WritableImage};

/// One persistent dirty bitmap, as the directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Flagged in use: the bitmap was not saved cleanly, its bits are not
    /// to be trusted.
    pub in_use: bool,
    /// Enabled: the bitmap tracks writes (the `auto` flag).
    pub auto: bool,
}

/// A bitmap's dirty bits, loaded into memory.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    granularity_bits: u8,
    virtual_size: u64,
    bits: Vec<u8>,
}

impl DirtyBitmap {
    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    /// Whether the granule holding guest offset `off` is dirty.
    pub fn is_dirty(&self, off: u64) -> bool {
        get_bit(&self.bits, off >> self.granularity_bits)
    }

    /// The dirty extents `(start, length)` inside `[start, start+len)`
    /// (clamped to the disk), in order, each a maximal run of dirty
    /// granules cut to the range.
    pub fn extents(&self, start: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = start.saturating_add(len).min(self.virtual_size);
        let gb = self.granularity_bits;
        let mut g = start >> gb;
        let last = if end == 0 { 0 } else { (end - 1) >> gb };
        let empty = start >= end;
        std::iter::from_fn(move || {
            if empty {
                return None;
            }
            while g <= last && !get_bit(&self.bits, g) {
                g += 1;
            }
            if g > last {
                return None;
            }
            let first = g;
            while g <= last && get_bit(&self.bits, g) {
                g += 1;
            }
            let s = (first << gb).max(start);
            let e = (g << gb).min(end);
            Some((s, e - s))
        })
    }
}

fn get_bit(bits: &[u8], g: u64) -> bool {
    usize::try_from(g / 8)
        .ok()
        .and_then(|i| bits.get(i))
        .is_some_and(|b| b & (1 << (g % 8)) != 0)
}

/// Sets the bits of granules `first..=last` (clamped to the vector).
fn set_bits(bits: &mut [u8], first: u64, last: u64) {
    let n = bits.len() as u64 * 8;
    if n == 0 || first >= n {
        return;
    }
    let last = last.min(n - 1);
    let mut g = first;
    while g <= last {
        let i = (g / 8) as usize;
        if g.is_multiple_of(8) && g + 7 <= last {
            let whole = ((last + 1 - g) / 8) as usize;
            bits[i..i + whole].fill(0xff);
            g += whole as u64 * 8;
        } else {
            bits[i] |= 1 << (g % 8);
            g += 1;
        }
    }
}

/// Bytes of bits a bitmap of `granularity_bits` needs for `size` bytes.
fn bits_len(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// A bitmap the write path keeps up to date in this session.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// Index of its entry in the directory.
    index: usize,
    granularity_bits: u8,
    bits: Vec<u8>,
    /// Clusters of its current table and data (freed when replaced).
    clusters: Vec<u64>,
    /// Its table (offset, bytes), for the metadata map.
    table: (u64, u64),
}

/// The bitmaps of an image open for writing.
#[derive(Debug)]
pub(crate) struct BitmapState {
    /// The directory's bytes as on disk (fields are patched in place, so
    /// names and padding are kept byte for byte).
    raw_dir: Vec<u8>,
    entries: Vec<BitmapDirEntry>,
    dir_offset: u64,
    tracked: Vec<Tracked>,
    /// The directory on disk flags the tracked bitmaps in use.
    in_use_on_disk: bool,
}

impl View {
    /// Whether QEMU would consider the image's bitmaps at all: a v3 image
    /// with the bitmaps extension and the bitmaps autoclear bit set.
    pub(crate) fn has_bitmaps_ext(&self) -> Option<(u32, u64, u64)> {
        let h = self.header();
        if h.version() < 3 || !h.autoclear_features().contains(Autoclear::BITMAPS) {
            return None;
        }
        h.bitmaps().filter(|(nb, _, _)| *nb > 0)
    }

    /// Reads and validates the bitmap directory: its raw bytes and
    /// entries, or `None` when the image has no bitmaps.
    pub(crate) fn read_bitmap_directory(&self) -> Result<Option<(Vec<u8>, Vec<BitmapDirEntry>)>> {
        let Some((nb, size, off)) = self.has_bitmaps_ext() else {
            return Ok(None);
        };
        let corrupt = |what: String| Error::corrupt(self.path(), off, what);
        if nb > MAX_BITMAPS || size == 0 || size > MAX_DIRECTORY_SIZE {
            return Err(corrupt(format!(
                "bitmap directory too large ({nb} bitmaps, {size} bytes)"
            )));
        }
        let file_len = self.storage_len()?;
        if off.checked_add(size).is_none_or(|e| e > file_len) {
            return Err(corrupt(
                "bitmap directory extends past the end of the file".into(),
            ));
        }
        let mut raw = vec![0u8; size as usize];
        self.storage()
            .read_at(&mut raw, off)
            .map_err(|e| Error::io(self.path(), "read bitmap directory", off, e))?;
        let fmt = |source| Error::Format {
            path: self.path().to_path_buf(),
            source,
        };
        let entries = parse_directory(&raw, nb, off).map_err(fmt)?;
        let cs = self.geometry().cluster_size();
        for e in &entries {
            e.validate(cs, self.header().size(), off).map_err(fmt)?;
        }
        Ok(Some((raw, entries)))
    }

    /// The image's persistent dirty bitmaps, in directory order (empty
    /// when it has none, or when QEMU would ignore them: a v2 image, or
    /// the bitmaps autoclear bit cleared).
    pub(crate) fn bitmaps(&self, tracked: Option<&BitmapState>) -> Result<Vec<BitmapInfo>> {
        let entries = match tracked {
            Some(s) => s.entries.clone(),
            None => self
                .read_bitmap_directory()?
                .map(|(_, e)| e)
                .unwrap_or_default(),
        };
        Ok(entries
            .into_iter()
            .map(|e| BitmapInfo {
                granularity: e.granularity(),
                in_use: e.in_use(),
                auto: e.auto(),
                name: e.name,
            })
            .collect())
    }

    /// Loads bitmap `name`'s dirty bits (as of the last save, or as
    /// tracked in this session).
    pub(crate) fn dirty_bitmap(
        &self,
        name: &str,
        tracked: Option<&BitmapState>,
    ) -> Result<DirtyBitmap> {
        if let Some(s) = tracked {
            if let Some(t) = s
                .tracked
                .iter()
                .find(|t| s.entries.get(t.index).is_some_and(|e| e.name == name))
            {
                return Ok(DirtyBitmap {
                    granularity_bits: t.granularity_bits,
                    virtual_size: self.header().size(),
                    bits: t.bits.clone(),
                });
            }
        }
        let (_, entries) = self.read_bitmap_directory()?.unwrap_or_default();
        let e = entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no bitmap named {name:?}")))?;
        if e.in_use() {
            return Err(Error::InvalidArgument(format!(
                "bitmap {name:?} is in use (inconsistent): its bits cannot be trusted"
            )));
        }
        let (bits, _) = self.load_bitmap_bits(e)?;
        Ok(DirtyBitmap {
            granularity_bits: e.granularity_bits,
            virtual_size: self.header().size(),
            bits,
        })
    }

    /// Reads a (validated, consistent) bitmap's bits and the clusters
    /// its table and data occupy.
    pub(crate) fn load_bitmap_bits(&self, e: &BitmapDirEntry) -> Result<(Vec<u8>, Vec<u64>)> {
        let cs = self.geometry().cluster_size();
        let geo = self.geometry();
        let len = bits_len(self.header().size(), e.granularity_bits);
        // validate() checked the table describes at least this much, and
        // at most MAX_PHYS_SIZE bytes.
        if len > MAX_PHYS_SIZE {
            return Err(Error::corrupt(
                self.path(),
                e.table_offset,
                format!("bitmap {:?} too large", e.name),
            ));
        }
        let needed = len.div_ceil(cs);
        let file_len = self.storage_len()?;
        let table_bytes = needed * 8;
        if e.table_offset
            .checked_add(e.table_bytes())
            .is_none_or(|end| end > file_len)
            || needed > u64::from(e.table_size)
        {
            return Err(Error::corrupt(
                self.path(),
                e.table_offset,
                format!(
                    "bitmap table of {:?} extends past the end of the file",
                    e.name
                ),
            ));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        self.storage()
            .read_at(&mut raw, e.table_offset)
            .map_err(|err| Error::io(self.path(), "read bitmap table", e.table_offset, err))?;
        let first = geo.cluster_index(HostOffset::new(e.table_offset));
        let mut clusters: Vec<u64> =
            (first..first + self.geometry().clusters_for(e.table_bytes())).collect();
        let mut bits = vec![0u8; len as usize];
        for (i, raw_e) in strata_format::table::decode_u64_table(&raw)
            .into_iter()
            .enumerate()
        {
            let at = e.table_offset + i as u64 * 8;
            let entry = BitmapTableEntry::parse(raw_e, cs, at).map_err(|source| Error::Format {
                path: self.path().to_path_buf(),
                source,
            })?;
            let lo = i * cs as usize;
            let hi = (lo + cs as usize).min(bits.len());
            let Some(chunk) = bits.get_mut(lo..hi) else {
                break;
            };
            match entry {
                BitmapTableEntry::AllZeros => {}
                BitmapTableEntry::AllOnes => chunk.fill(0xff),
                BitmapTableEntry::Data(off) => {
                    if off.checked_add(cs).is_none_or(|end| end > file_len) {
                        return Err(Error::corrupt(
                            self.path(),
                            at,
                            format!("bitmap data cluster {off:#x} past the end of the file"),
                        ));
                    }
                    self.storage()
                        .read_at(chunk, off)
                        .map_err(|err| Error::io(self.path(), "read bitmap data", off, err))?;
                    clusters.push(geo.cluster_index(HostOffset::new(off)));
                }
            }
        }
        // Bits past the end of the disk are not guest granules.
        let granules = self.header().size().div_ceil(1u64 << e.granularity_bits);
        if let Some(last) = bits.last_mut() {
            if !granules.is_multiple_of(8) {
                *last &= (1u8 << (granules % 8)) - 1;
            }
        }
        Ok((bits, clusters))
    }
}

impl WritableImage {
    /// First-write preparation of the bitmaps: loads the directory and
    /// the bits of every enabled, consistent bitmap. Returns `Some(why)`
    /// when the directory or a table is unusable (damaged); I/O errors are
    /// errors.
    pub(crate) fn bitmaps_prepare(&mut self) -> Result<Option<String>> {
        let Some((_, _, off)) = self.view.has_bitmaps_ext() else {
            return Ok(None);
        };
        let (raw_dir, entries) = match self.view.read_bitmap_directory() {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(e @ Error::Io { .. }) => return Err(e),
            Err(e) => return Ok(Some(e.to_string())),
        };
        let mut tracked = Vec::new();
        for (index, e) in entries.iter().enumerate() {
            if e.in_use() || !e.auto() {
                continue;
            }
            let (bits, clusters) = match self.view.load_bitmap_bits(e) {
                Ok(b) => b,
                Err(err @ Error::Io { .. }) => return Err(err),
                Err(err) => return Ok(Some(format!("bitmap {:?}: {err}", e.name))),
            };
            tracked.push(Tracked {
                index,
                granularity_bits: e.granularity_bits,
                bits,
                clusters,
                table: (e.table_offset, e.table_bytes()),
            });
        }
        self.w.set_bitmaps(Some(BitmapState {
            raw_dir,
            entries,
            dir_offset: off,
            tracked,
            in_use_on_disk: false,
        }));
        Ok(None)
    }

    /// Before a guest change: flags every tracked bitmap in use on disk
    /// (the directory rewritten in place, only flags change; synced), so
    /// that a crash from here on leaves it untrusted, never stale.
    pub(crate) fn bitmaps_before_change(&mut self, off: u64, len: u64) -> Result<()> {
        let Some(s) = self.w.bitmaps_mut() else {
            return Ok(());
        };
        if s.tracked.is_empty() {
            return Ok(());
        }
        if len > 0 {
            for t in &mut s.tracked {
                let gb = t.granularity_bits;
                set_bits(&mut t.bits, off >> gb, (off + len - 1) >> gb);
            }
        }
        if s.in_use_on_disk {
            return Ok(());
        }
        for t in &s.tracked {
            if let Some(e) = s.entries.get_mut(t.index) {
                e.flags |= FLAG_IN_USE;
                patch_entry(&mut s.raw_dir, e);
            }
        }
        let (raw, at) = (s.raw_dir.clone(), s.dir_offset);
        s.in_use_on_disk = true;
        self.guard_write(
            "bitmap directory write",
            at,
            raw.len() as u64,
            &[Meta::BitmapDirectory],
        )?;
        self.w.write_metadata(&raw, at, "write bitmap directory")?;
        self.sync()
    }

    /// At flush, after the guest data and its metadata are durable:
    /// writes the tracked bitmaps to new clusters, then a new directory
    /// with in_use cleared, then the header pointing at it, and queues
    /// the old clusters for freeing (the caller frees them).
    pub(crate) fn bitmaps_save(&mut self) -> Result<()> {
        let Some(mut s) = self.w.take_bitmaps() else {
            return Ok(());
        };
        let r = self.bitmaps_save_inner(&mut s);
        self.w.set_bitmaps(Some(s));
        r
    }

    fn bitmaps_save_inner(&mut self, s: &mut BitmapState) -> Result<()> {
        if !s.in_use_on_disk {
            return Ok(());
        }
        let cs = self.view.geometry().cluster_size();
        let geo = self.view.geometry();
        let mut old = Vec::new();
        let mut new_tables = Vec::new();
        for t in &mut s.tracked {
            let (toff, n, clusters) = self.write_bitmap_bits(&t.bits)?;
            old.push((t.table, std::mem::replace(&mut t.clusters, clusters)));
            t.table = (toff, n * 8);
            new_tables.push((t.table, n as u32));
            if let Some(e) = s.entries.get_mut(t.index) {
                e.table_offset = toff;
                e.table_size = n as u32;
                e.flags &= !FLAG_IN_USE;
                patch_entry(&mut s.raw_dir, e);
            }
        }
        self.barrier()?;
        let dsize = s.raw_dir.len() as u64;
        let dclusters = self.view.geometry().clusters_for(dsize);
        let doff = self.alloc_contiguous(dclusters, "the bitmap directory")?;
        let mut raw = s.raw_dir.clone();
        raw.resize((dclusters * cs) as usize, 0);
        self.w
            .write_metadata(&raw, doff, "write bitmap directory")?;
        self.barrier()?;
        let old_dir = s.dir_offset;
        for e in self.view.header_mut().extensions_mut().iter_mut() {
            if let strata_format::Extension::Bitmaps {
                directory_offset, ..
            } = e
            {
                *directory_offset = doff;
            }
        }
        self.write_header()?;
        self.sync()?;
        s.dir_offset = doff;
        s.in_use_on_disk = false;
        // The header points at the new directory: the old one and the
        // replaced tables may go (at the caller's frees, after a barrier).
        let meta = self.w.meta_mut();
        meta.remove(old_dir, dsize, Meta::BitmapDirectory);
        meta.add(doff, dsize, Meta::BitmapDirectory);
        let first = geo.cluster_index(HostOffset::new(old_dir));
        self.w
            .free_later(first..first + self.view.geometry().clusters_for(dsize));
        for ((toff, tbytes), clusters) in old {
            self.w.meta_mut().remove(toff, tbytes, Meta::BitmapTable);
            self.w.free_later(clusters);
        }
        for ((toff, tbytes), _) in new_tables {
            self.w.meta_mut().add(toff, tbytes, Meta::BitmapTable);
        }
        Ok(())
    }

    /// Writes a bitmap's bits to new data clusters (all-zero clusters
    /// become table entry 0) and a new table; returns the table's offset,
    /// its entry count and every cluster used. Nothing points at them yet.
    fn write_bitmap_bits(&mut self, bits: &[u8]) -> Result<(u64, u64, Vec<u64>)> {
        let cs = self.view.geometry().cluster_size();
        let geo = self.view.geometry();
        let n = (bits.len() as u64).div_ceil(cs).max(1);
        let mut table = Vec::with_capacity(n as usize);
        let mut clusters = Vec::new();
        for chunk in bits.chunks(cs as usize) {
            if chunk.iter().all(|b| *b == 0) {
                table.push(0u64);
                continue;
            }
            let at = self.alloc_contiguous(1, "bitmap data")?;
            let mut buf = chunk.to_vec();
            buf.resize(cs as usize, 0);
            self.w.write_metadata(&buf, at, "write bitmap data")?;
            clusters.push(geo.cluster_index(HostOffset::new(at)));
            table.push(at);
        }
        table.resize(n as usize, 0);
        let tclusters = self.view.geometry().clusters_for(n * 8);
        let toff = self.alloc_contiguous(tclusters, "a bitmap table")?;
        let mut raw = strata_format::table::encode_u64_table(&table);
        raw.resize((tclusters * cs) as usize, 0);
        self.w.write_metadata(&raw, toff, "write bitmap table")?;
        clusters.extend(geo.host_clusters(HostOffset::new(toff), geo.clusters_bytes(tclusters)));
        Ok((toff, n, clusters))
    }

    /// Whether the image carries bitmaps (tracked or kept as they are):
    /// a resize must grow their tables first.
    pub(crate) fn has_live_bitmaps(&self) -> bool {
        self.w.bitmaps().is_some_and(|s| !s.entries.is_empty())
    }
}

/// One change to an image's bitmaps, as `qemu-img bitmap` spells them.
#[derive(Debug, Clone, Copy)]
pub enum BitmapEdit<'a> {
    /// Creates the bitmap, empty: with `granularity` bytes per bit (QEMU's
    /// default when `None`: the cluster size, within 4 KiB..=64 KiB),
    /// enabled unless `disabled`.
    Add {
        /// Bytes per bit, a power of two in 512..=2 GiB.
        granularity: Option<u64>,
        /// Create it disabled (not tracking writes).
        disabled: bool,
    },
    /// Deletes the bitmap (an inconsistent one too).
    Remove,
    /// Clears every bit.
    Clear,
    /// Makes the bitmap track writes.
    Enable,
    /// Stops the bitmap from tracking writes.
    Disable,
    /// Sets every bit that is set in the given bitmap (at this bitmap's
    /// granularity: a granule is set when any dirty byte falls in it).
    Merge(&'a DirtyBitmap),
}

impl BitmapEdit<'_> {
    /// The operation's name as qemu-img reports it.
    pub fn name(&self) -> &'static str {
        match self {
            BitmapEdit::Add { .. } => "add",
            BitmapEdit::Remove => "remove",
            BitmapEdit::Clear => "clear",
            BitmapEdit::Enable => "enable",
            BitmapEdit::Disable => "disable",
            BitmapEdit::Merge(_) => "merge",
        }
    }
}

/// A host byte range: offset and length.
type HostRange = (u64, u64);

/// A bitmap while the directory is rewritten.
struct Work {
    name: String,
    granularity_bits: u8,
    flags: u32,
    /// The bits (a consistent bitmap), rewritten to new clusters.
    bits: Option<Vec<u8>>,
    /// An inconsistent bitmap keeps its table.
    kept: Option<(u64, u32)>,
    /// Clusters it used, freed when rewritten or removed.
    old_clusters: Vec<u64>,
    old_table: Option<(u64, u64)>,
}

impl WritableImage {
    /// Applies one `qemu-img bitmap` operation to bitmap `name`, durably:
    /// pending writes are flushed (and the bitmaps saved) first, then the
    /// bitmaps go to new clusters, a new directory is written, the header
    /// points at it, and the old clusters are freed, in the order of
    /// docs/crash-consistency.md. The errors are QEMU's.
    pub fn edit_bitmap(&mut self, name: &str, edit: BitmapEdit<'_>) -> Result<()> {
        let fail = |why: String| {
            Err(Error::InvalidArgument(format!(
                "Operation {} on bitmap {name} failed: {why}",
                edit.name()
            )))
        };
        self.begin_write()?;
        if self.view.header().version() < 3 {
            return fail(format!(
                "Can't make bitmap '{name}' persistent in '{}': Cannot store dirty bitmaps in qcow2 v2 files",
                self.view.path().display()
            ));
        }
        self.flush()?;
        let (mut works, old_dir) = self.bitmap_works()?;
        let mut removed = None;
        let pos = works.iter().position(|w| w.name == name);
        let size = self.view.header().size();
        match (edit, pos) {
            (
                BitmapEdit::Add {
                    granularity,
                    disabled,
                },
                None,
            ) => {
                let cs = self.view.geometry().cluster_size();
                let g = granularity.unwrap_or(cs.clamp(4096, 65536));
                if !g.is_power_of_two() || g < 512 {
                    return fail("Granularity must be power of 2 and at least 512".into());
                }
                let gb = g.trailing_zeros() as u8;
                if gb > strata_format::bitmap::MAX_GRANULARITY_BITS {
                    return fail(format!(
                        "Granularity exceeds maximum ({} bytes)",
                        1u64 << strata_format::bitmap::MAX_GRANULARITY_BITS
                    ));
                }
                if name.len() > usize::from(strata_format::bitmap::MAX_NAME_SIZE) {
                    return fail(format!(
                        "Can't make bitmap '{name}' persistent in '{}': Name length exceeds maximum (1023 characters)",
                        self.view.path().display()
                    ));
                }
                if works.len() >= MAX_BITMAPS as usize {
                    return fail("Too many bitmaps".into());
                }
                let len = bits_len(size, gb);
                if len > MAX_PHYS_SIZE {
                    return fail("Too much space will be occupied by the bitmap".into());
                }
                works.push(Work {
                    name: name.to_string(),
                    granularity_bits: gb,
                    flags: if disabled {
                        0
                    } else {
                        strata_format::bitmap::FLAG_AUTO
                    },
                    bits: Some(vec![0u8; len as usize]),
                    kept: None,
                    old_clusters: Vec::new(),
                    old_table: None,
                });
            }
            (BitmapEdit::Add { .. }, Some(_)) => {
                return fail(format!("Bitmap already exists: {name}"));
            }
            (_, None) => return fail(format!("Dirty bitmap '{name}' not found")),
            (BitmapEdit::Remove, Some(i)) => removed = Some(works.remove(i)),
            (edit, Some(i)) => {
                let w = &mut works[i];
                let Some(bits) = w.bits.as_mut() else {
                    return fail(format!(
                        "Bitmap '{name}' is inconsistent and cannot be used\nTry --remove to delete this bitmap from disk"
                    ));
                };
                match edit {
                    BitmapEdit::Clear => bits.fill(0),
                    BitmapEdit::Enable => w.flags |= strata_format::bitmap::FLAG_AUTO,
                    BitmapEdit::Disable => w.flags &= !strata_format::bitmap::FLAG_AUTO,
                    BitmapEdit::Merge(src) => {
                        let gb = w.granularity_bits;
                        for (s, l) in src.extents(0, size) {
                            set_bits(bits, s >> gb, (s + l - 1) >> gb);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.write_bitmap_directory(works, removed, old_dir)?;
        // Free the replaced clusters (and reload the session's bitmaps).
        self.flush()
    }

    /// Before growing the disk to `new_size`: rewrites every consistent
    /// bitmap with a table that covers `new_size` (the new part clean).
    /// A bigger table is valid for the old size too, so a crash before
    /// the header's size switch leaves consistent bitmaps.
    pub(crate) fn bitmaps_grow(&mut self, new_size: u64) -> Result<()> {
        self.flush()?;
        let (mut works, old_dir) = self.bitmap_works()?;
        for w in &mut works {
            if let Some(bits) = w.bits.as_mut() {
                let len = bits_len(new_size, w.granularity_bits);
                if len > MAX_PHYS_SIZE {
                    return Err(Error::InvalidArgument(format!(
                        "bitmap {:?} would exceed its size limit at {new_size} bytes",
                        w.name
                    )));
                }
                bits.resize(len as usize, 0);
            }
        }
        self.write_bitmap_directory(works, None, old_dir)
    }

    /// Loads the session's bitmap state again (after a size change).
    pub(crate) fn bitmaps_reload(&mut self) -> Result<()> {
        self.w.set_bitmaps(None);
        match self.bitmaps_prepare()? {
            None => Ok(()),
            Some(why) => Err(Error::corrupt(
                self.view.path(),
                0,
                format!("the bitmap directory does not read back after the resize: {why}"),
            )),
        }
    }

    /// Every bitmap of the image with its bits (consistent ones) and the
    /// clusters it occupies. Called after a flush: nothing is in use on
    /// disk because of this session.
    fn bitmap_works(&self) -> Result<(Vec<Work>, Option<HostRange>)> {
        let Some(s) = self.w.bitmaps() else {
            return Ok((Vec::new(), None));
        };
        let geo = self.view.geometry();
        let mut works = Vec::new();
        for (i, e) in s.entries.iter().enumerate() {
            let table = (e.table_offset, e.table_bytes());
            let tracked = s.tracked.iter().find(|t| t.index == i);
            let (bits, kept, old_clusters) = if let Some(t) = tracked {
                (Some(t.bits.clone()), None, t.clusters.clone())
            } else if e.in_use() {
                // Its table stays; when it is removed, only the table
                // clusters are freed (its data may be garbage: leaked).
                let first = geo.cluster_index(HostOffset::new(e.table_offset));
                let n = self.view.geometry().clusters_for(e.table_bytes());
                (
                    None,
                    Some((e.table_offset, e.table_size)),
                    (first..first + n).collect(),
                )
            } else {
                let (b, c) = self.view.load_bitmap_bits(e)?;
                (Some(b), None, c)
            };
            works.push(Work {
                name: e.name.clone(),
                granularity_bits: e.granularity_bits,
                flags: e.flags,
                bits,
                kept,
                old_clusters,
                old_table: Some(table),
            });
        }
        Ok((works, Some((s.dir_offset, s.raw_dir.len() as u64))))
    }

    /// Writes the bitmaps (new clusters), a barrier, the new directory, a
    /// barrier, the header pointing at it (synced); queues the replaced
    /// clusters for freeing; reloads the session's bitmap state.
    fn write_bitmap_directory(
        &mut self,
        works: Vec<Work>,
        removed: Option<Work>,
        old_dir: Option<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.view.geometry().cluster_size();
        let geo = self.view.geometry();
        let mut dir = Vec::new();
        let mut frees = Vec::new();
        let mut tables = Vec::new();
        if let Some(w) = removed {
            frees.extend_from_slice(&w.old_clusters);
            if let Some((o, b)) = w.old_table {
                tables.push((o, b, false));
            }
        }
        // The old directory goes once the new one is in place.
        if let Some((o, b)) = old_dir {
            let first = geo.cluster_index(HostOffset::new(o));
            frees.extend(first..first + self.view.geometry().clusters_for(b));
        }
        for w in &works {
            let (toff, n) = match (&w.bits, w.kept) {
                (Some(bits), _) => {
                    let (toff, n, _) = self.write_bitmap_bits(bits)?;
                    frees.extend_from_slice(&w.old_clusters);
                    if let Some((o, b)) = w.old_table {
                        tables.push((o, b, false));
                    }
                    tables.push((toff, n * 8, true));
                    (toff, n as u32)
                }
                (None, Some(kept)) => kept,
                (None, None) => continue,
            };
            strata_format::bitmap::encode_entry(
                &mut dir,
                toff,
                n,
                w.flags,
                w.granularity_bits,
                w.name.as_bytes(),
            );
        }
        if dir.len() as u64 > MAX_DIRECTORY_SIZE {
            return Err(Error::InvalidArgument(
                "the bitmap directory would exceed its size limit (too many or too long names)"
                    .into(),
            ));
        }
        self.barrier()?;
        self.view
            .header_mut()
            .extensions_mut()
            .retain(|e| !matches!(e, strata_format::Extension::Bitmaps { .. }));
        let mut new_dir = None;
        if works.is_empty() {
            let v = self.view.header().autoclear_features() & !Autoclear::BITMAPS;
            self.view.header_mut().set_autoclear(v);
        } else {
            let n = self.view.geometry().clusters_for(dir.len() as u64);
            let doff = self.alloc_contiguous(n, "the bitmap directory")?;
            let mut raw = dir.clone();
            raw.resize((n * cs) as usize, 0);
            self.w
                .write_metadata(&raw, doff, "write bitmap directory")?;
            self.barrier()?;
            let at = self
                .view
                .header()
                .extensions()
                .iter()
                .position(|e| matches!(e, strata_format::Extension::Unknown { .. }))
                .unwrap_or(self.view.header().extensions().len());
            self.view.header_mut().extensions_mut().insert(
                at,
                strata_format::Extension::Bitmaps {
                    nb_bitmaps: works.len() as u32,
                    directory_size: dir.len() as u64,
                    directory_offset: doff,
                },
            );
            let v = self.view.header().autoclear_features() | Autoclear::BITMAPS;
            self.view.header_mut().set_autoclear(v);
            new_dir = Some((doff, dir.len() as u64));
        }
        self.view
            .header()
            .layout()
            .map_err(|source| Error::Format {
                path: self.view.path().to_path_buf(),
                source,
            })?;
        self.write_header()?;
        self.sync()?;
        let meta = self.w.meta_mut();
        for (o, b, add) in tables {
            if add {
                meta.add(o, b, Meta::BitmapTable);
            } else {
                meta.remove(o, b, Meta::BitmapTable);
            }
        }
        if let Some((o, b)) = old_dir {
            meta.remove(o, b, Meta::BitmapDirectory);
        }
        if let Some((o, b)) = new_dir {
            meta.add(o, b, Meta::BitmapDirectory);
        }
        self.w.free_later(frees);
        self.w.set_bitmaps(None);
        if let Some(why) = self.bitmaps_prepare()? {
            return Err(Error::corrupt(
                self.view.path(),
                0,
                format!("the bitmap directory just written does not read back: {why}"),
            ));
        }
        Ok(())
    }
}

/// Writes an entry's table offset, table size and flags into its place in
/// the raw directory.
fn patch_entry(raw: &mut [u8], e: &BitmapDirEntry) {
    let at = e.dir_offset as usize;
    if let Some(f) = raw.get_mut(at..at + 16) {
        f[0..8].copy_from_slice(&e.table_offset.to_be_bytes());
        f[8..12].copy_from_slice(&e.table_size.to_be_bytes());
        f[12..16].copy_from_slice(&e.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_fills_partial_and_whole_bytes() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 3, 20);
        assert_eq!(b, [0xf8, 0xff, 0x1f, 0]);
        set_bits(&mut b, 30, 1000);
        assert_eq!(b[3], 0xc0);
    }

    #[test]
    fn extents_are_maximal_runs_cut_to_the_range() {
        let mut bits = vec![0u8; 2];
        set_bits(&mut bits, 1, 2);
        set_bits(&mut bits, 5, 5);
        let d = DirtyBitmap {
            granularity_bits: 16,
            virtual_size: 10 << 16,
            bits,
        };
        let v: Vec<_> = d.extents(0, u64::MAX).collect();
        assert_eq!(v, [(1 << 16, 2 << 16), (5 << 16, 1 << 16)]);
        let v: Vec<_> = d.extents(0x18000, 0x10000).collect();
        assert_eq!(v, [(0x18000, 0x10000)]);
        assert_eq!(d.extents(6 << 16, 100).count(), 0);
    }
}
