//! The read-only consistency check of a qcow2 image, as `qemu-img check`
//! does it (QEMU's `qcow2_check_refcounts` in `block/qcow2-refcount.c`).
//!
//! The check counts, for every host cluster of the file, the references
//! the metadata makes to it: the header (cluster 0), every L1 table
//! (active and internal snapshots') and the L2 tables they point to, the
//! data clusters those map (normal, preallocated zero, and every host
//! cluster a compressed cluster's bytes touch), the refcount table and its
//! refcount blocks, the snapshot table, and the bitmap directory, bitmap
//! tables and bitmap data clusters. It then compares those counts with the
//! refcounts stored on disk (every width, 1 to 64 bits):
//!
//! - stored refcount < references: a corruption (`ERROR cluster N ...`);
//! - stored refcount > references: a leak (`Leaked cluster N ...`);
//! - a COPIED flag in the active L1 or L2 tables that disagrees with
//!   "refcount == 1": a corruption, as QEMU counts it.
//!
//! Malformed metadata (misaligned offsets, reserved bits, references past
//! the end of the file, broken subcluster bitmaps) is counted as
//! corruption with QEMU's wording. Messages are phrased like the lines
//! `qemu-img check` prints, so that the two can be compared.
//!
//! Memory is bounded: one `u16` per host cluster (plus a map for the rare
//! counts that do not fit), refused above [`MAX_CHECK_CLUSTERS`]; each
//! distinct L2 table is read once however many L1 entries point to it,
//! and the total number of table entries examined is capped by
//! [`MAX_CHECK_WORK`], so a hostile image gives errors, never a hang.

use std::collections::HashMap;

use strata_format::bitmap::{self, BitmapTableEntry};
use strata_format::header::Autoclear;
use strata_format::refcount::{self, REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK};
use strata_format::snapshot;
use strata_format::table::{
    decode_u64_table, L1_RESERVED_MASK, L2_STD_RESERVED_MASK, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO,
};
use strata_format::{limits, CompressedDescriptor, Geometry, HostOffset};

use crate::error::{Error, Result};
use crate::qcow2::{Qcow2Image, View};

/// Largest number of host clusters (file length / cluster size) the check
/// accepts: its reference counts take two bytes per cluster.
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;
/// Largest number of table entries (L1, L2, bitmap table) one check
/// examines before giving up with an error.
pub const MAX_CHECK_WORK: u64 = 1 << 32;
/// Largest number of problem messages kept in a report (the counts stay
/// exact beyond it).
pub const MAX_PROBLEMS: usize = 10_000;

/// Subcluster "allocated" bits of an extended L2 entry's bitmap.
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Metadata is inconsistent in a way that may lose or corrupt data.
    Corruption,
    /// A cluster is allocated (refcount > references) but unused.
    Leak,
    /// Something could not be checked.
    CheckError,
}

/// One problem found, with the message `qemu-img check` prints for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Corruption, leak or check error.
    pub kind: ProblemKind,
    /// QEMU's wording, e.g. `ERROR cluster 5 refcount=1 reference=2`.
    pub message: String,
}

/// The result of a check, with the numbers `qemu-img check` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct CheckReport {
    /// Corruptions found (QEMU's `corruptions`).
    pub corruptions: u64,
    /// Leaked clusters found (QEMU's `leaks`).
    pub leaks: u64,
    /// Things that could not be checked (QEMU's `check-errors`).
    pub check_errors: u64,
    /// Corruptions repaired (always 0: this check does not write).
    pub corruptions_fixed: u64,
    /// Leaks repaired (always 0: this check does not write).
    pub leaks_fixed: u64,
    /// One past the last byte of the highest cluster that is referenced or
    /// has a refcount (QEMU's `image-end-offset`).
    pub image_end_offset: u64,
    /// Clusters of the virtual disk (QEMU's `total-clusters`).
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1 table (data, preallocated
    /// zero and compressed).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous on the host with the
    /// previous one of their L2 table; compressed ones always count.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters in the active L1 table.
    pub compressed_clusters: u64,
    /// The problems, in the order found (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<Problem>,
    /// Problems counted but not kept in `problems` (over the cap).
    pub problems_omitted: u64,
}

impl CheckReport {
    /// The exit code `qemu-img check` uses for this result: 1 when
    /// something could not be checked, 2 for corruptions, 3 for leaks
    /// only, 0 when clean.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    fn push(&mut self, kind: ProblemKind, message: String, times: u64) {
        match kind {
            ProblemKind::Corruption => self.corruptions += times,
            ProblemKind::Leak => self.leaks += times,
            ProblemKind::CheckError => self.check_errors += times,
        }
        for _ in 0..times {
            if self.problems.len() >= MAX_PROBLEMS {
                self.problems_omitted += 1;
                continue;
            }
            self.problems.push(Problem {
                kind,
                message: message.clone(),
            });
        }
    }
}

/// Checks `img` like `qemu-img check` (without `-r`): nothing is written.
///
/// Fails (rather than reporting) when the file is too large to check
/// within the memory bound, when its metadata asks for more work than
/// [`MAX_CHECK_WORK`], or on an I/O error.
pub fn check(img: &Qcow2Image) -> Result<CheckReport> {
    check_view(img.view())
}

/// [`check`] on the metadata view (a writable image's, for repairs).
pub(crate) fn check_view(img: &View) -> Result<CheckReport> {
    let mut c = Checker::new(img)?;
    if !c.calculate()? {
        return Ok(c.report);
    }
    c.compare()?;
    c.check_oflag_copied()?;
    c.report.image_end_offset = c
        .geo
        .cluster_start(c.highest_cluster.saturating_add(1))
        .get();
    Ok(c.report)
}

/// The refcount every host cluster of `img` should have, from all the
/// references its metadata makes (index: host cluster index). The vector
/// covers the file (and one cluster more when metadata reaches into the
/// cluster just past its end). Problems found on the way are ignored; use
/// [`check`] to see them. For repairs (`check -r`).
pub fn compute_refcounts(img: &Qcow2Image) -> Result<Vec<u64>> {
    compute_refcounts_view(img.view())
}

/// [`compute_refcounts`] on the metadata view.
pub(crate) fn compute_refcounts_view(img: &View) -> Result<Vec<u64>> {
    let mut c = Checker::new(img)?;
    c.calculate()?;
    Ok((0..c.refs.len).map(|i| c.refs.get(i)).collect())
}

/// [`compute_refcounts`] for an operation that replaces every refcount
/// with the counts computed (internal snapshots): refused when the
/// metadata references a region a cluster or more past the end of the
/// file (the problem `check` reports as "counting reference for region
/// exceeding the end of the file"). Such a cluster is counted in no
/// refcount, so the new refcounts would call it free while an L2 entry
/// still uses it. QEMU refuses too, for want of a refcount block covering
/// it (iotest 080, "invalid L2 entry (huge physical offset)").
pub(crate) fn compute_refcounts_inside_file(img: &View) -> Result<Vec<u64>> {
    let mut c = Checker::new(img)?;
    c.calculate()?;
    if let Some((offset, size)) = c.outside {
        return Err(Error::corrupt(
            img.path(),
            offset,
            format!(
                "the metadata references {size:#x} bytes at {offset:#x}, past the end of the \
                 file ({} bytes): no refcount can count them",
                c.file_len
            ),
        ));
    }
    Ok((0..c.refs.len).map(|i| c.refs.get(i)).collect())
}

/// QEMU's `qcow2_detect_metadata_preallocation`: whether noticeably more
/// clusters have a refcount than the file has disk blocks for (an image
/// made with `preallocation=metadata`, or one whose data clusters were
/// punched or truncated away). QEMU's block status then asks the file
/// whether a data cluster is a hole (or past its end), and `qemu-img map`
/// reports such ranges as zeros. Any error (an unreadable or misaligned
/// refcount block) gives `false`, as in QEMU. Decided once per open image,
/// at the first call (as QEMU decides at its first block status).
pub fn detect_metadata_preallocation(img: &Qcow2Image) -> bool {
    img.view().metadata_preallocated()
}

pub(crate) fn detect_preallocation(img: &View) -> Option<bool> {
    let h = img.header();
    let geo = img.geometry();
    let bits = geo.cluster_bits();
    let cs = geo.cluster_size();
    let file_length = img.storage().len().ok()?;
    let real_clusters = img.storage().allocated_bytes().ok()? / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file_length.div_ceil(cs);
    let per_block = refcount::entries_per_block(bits, h.refcount_order());
    let table_len = geo.clusters_bytes(u64::from(h.refcount_table_clusters())) / 8;
    let mut count = 0u64;
    let mut block: Option<(u64, Vec<u8>)> = None;
    let mut i = 0u64;
    while i < end_cluster && count < threshold {
        let bi = i / per_block;
        if bi >= table_len {
            // No refcount block covers the rest: all zero.
            break;
        }
        if block.as_ref().is_none_or(|(b, _)| *b != bi) {
            let mut e = [0u8; 8];
            img.storage()
                .read_at(&mut e, h.refcount_table_offset().checked_add(bi * 8)?)
                .ok()?;
            let off = u64::from_be_bytes(e) & REFTABLE_OFFSET_MASK;
            if off == 0 {
                // An empty block: skip the clusters it would cover.
                i = (bi + 1) * per_block;
                continue;
            }
            if !img.geometry().is_aligned(off) {
                return None;
            }
            let mut b = vec![0u8; cs as usize];
            img.storage().read_at(&mut b, off).ok()?;
            if b.iter().all(|x| *x == 0) {
                // Nothing counted here: skip the block whole (a hostile
                // table of many empty blocks must not cost 2^35 steps).
                i = (bi + 1) * per_block;
                continue;
            }
            block = Some((bi, b));
        }
        // The rest of this block's range (up to the end of the file),
        // counted at once: the result only asks whether the count reaches
        // the threshold, which counting further cannot undo.
        let b = block.as_ref().map(|(_, b)| b.as_slice()).unwrap_or(&[]);
        let to = ((bi + 1) * per_block).min(end_cluster);
        count += count_nonzero(b, h.refcount_order(), i % per_block, to - bi * per_block);
        i = to;
    }
    Some(count >= threshold)
}

/// Refcount `index` of refcount block `b` (0 when outside it): the
/// common 16-bit width read directly, the others by
/// [`refcount::get`].
#[inline]
fn refcount_at(b: &[u8], order: u32, index: u64) -> u64 {
    if order == 4 {
        let at = (index as usize).wrapping_mul(2);
        return match b.get(at..at.wrapping_add(2)) {
            Some(w) => u64::from(u16::from_be_bytes([w[0], w[1]])),
            None => 0,
        };
    }
    refcount::get(b, order, index).unwrap_or(0)
}

/// How many of the refcounts `[from, to)` of refcount block `b` are not
/// zero (entries outside the block count as zero).
fn count_nonzero(b: &[u8], order: u32, from: u64, to: u64) -> u64 {
    if (3..=6).contains(&order) {
        // Whole bytes per entry: an entry is non-zero when a byte is.
        let w = 1usize << (order - 3);
        let lo = usize::try_from(from)
            .unwrap_or(usize::MAX)
            .saturating_mul(w)
            .min(b.len());
        let hi = usize::try_from(to)
            .unwrap_or(usize::MAX)
            .saturating_mul(w)
            .min(b.len());
        if lo >= hi {
            return 0;
        }
        return b[lo..hi]
            .chunks_exact(w)
            .filter(|e| e.iter().any(|x| *x != 0))
            .count() as u64;
    }
    (from..to)
        .filter(|i| refcount::get(b, order, *i).unwrap_or(0) != 0)
        .count() as u64
}

/// Bytes of tables [`Checker::prefetch`] asks to be read ahead.
const PREFETCH_BYTES: u64 = 64 << 20;

/// Refcount blocks [`Checker::stored_refcount`] keeps read at a time.
const CACHED_REFBLOCKS: usize = 64;

/// Where the refcounts of a range of clusters are (one refcount block's).
enum RefBlock {
    /// No block: all zero.
    Zeros,
    /// The block cannot be used (why, as QEMU says it).
    Unusable(String),
    /// Read, at this index of the checker's blocks.
    Cached(usize),
}

/// Expected refcounts: a `u16` per cluster, wider counts in a side map.
struct RefArray {
    small: Vec<u16>,
    big: HashMap<u64, u64>,
    /// Clusters covered so far (QEMU's `nb_clusters`, which grows when a
    /// reference reaches into the partial cluster past the end).
    len: u64,
    /// The image's largest refcount (QEMU counts reaching it as overflow).
    max: u64,
}

impl RefArray {
    fn get(&self, i: u64) -> u64 {
        match usize::try_from(i).ok().and_then(|i| self.small.get(i)) {
            Some(&u16::MAX) => self.big.get(&i).copied().unwrap_or(u64::from(u16::MAX)),
            Some(&v) => u64::from(v),
            None => 0,
        }
    }

    fn set(&mut self, i: u64, v: u64) {
        let Some(slot) = usize::try_from(i).ok().and_then(|i| self.small.get_mut(i)) else {
            return;
        };
        if v >= u64::from(u16::MAX) {
            *slot = u16::MAX;
            self.big.insert(i, v);
        } else {
            // Only a slot at u16::MAX has a wide count in the side map.
            if *slot == u16::MAX {
                self.big.remove(&i);
            }
            *slot = v as u16;
        }
    }
}

/// The effects of one L2 table, computed once and applied once per L1
/// entry pointing at it.
#[derive(Default)]
struct L2Effects {
    /// Regions referenced: (offset, size).
    refs: Vec<(u64, u64)>,
    /// Problems (all corruptions).
    problems: Vec<String>,
    allocated: u64,
    fragmented: u64,
    compressed: u64,
}

struct Checker<'a> {
    img: &'a View,
    geo: Geometry,
    cs: u64,
    file_len: u64,
    refs: RefArray,
    report: CheckReport,
    reftable: Vec<u64>,
    /// Refcount blocks read for [`Checker::stored_refcount`] (host
    /// offset, bytes), at most [`CACHED_REFBLOCKS`].
    blocks: Vec<(u64, Vec<u8>)>,
    /// The entry of `blocks` the last lookup found: consecutive clusters
    /// share a block, so most lookups end there.
    last_block: usize,
    highest_cluster: u64,
    work: u64,
    /// The first reference found a cluster or more past the end of the
    /// file (offset, size): counted in no refcount.
    outside: Option<(u64, u64)>,
}

impl<'a> Checker<'a> {
    fn new(img: &'a View) -> Result<Checker<'a>> {
        let h = img.header();
        let geo = img.geometry();
        let cs = geo.cluster_size();
        let file_len = img
            .storage()
            .len()
            .map_err(|e| Error::io(img.path(), "stat", 0, e))?;
        let nb = file_len.div_ceil(cs);
        if nb > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported {
                path: img.path().to_path_buf(),
                what: format!(
                    "the file has {nb} clusters of {cs} bytes; check handles at most \
                     {MAX_CHECK_CLUSTERS}"
                ),
            });
        }
        // One more slot: a reference may reach into the cluster past the end.
        let small = vec![0u16; (nb + 1) as usize];
        // The refcount table lies inside the file (checked at open) and is
        // at most MAX_REFTABLE_BYTES long (checked by the header parser).
        let rt_bytes = geo.clusters_bytes(u64::from(h.refcount_table_clusters()));
        if rt_bytes > limits::MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::corrupt(
                img.path(),
                h.refcount_table_offset(),
                "refcount table too large",
            ));
        }
        let mut raw = vec![0u8; rt_bytes as usize];
        img.storage()
            .read_at(&mut raw, h.refcount_table_offset())
            .map_err(|e| {
                Error::io(
                    img.path(),
                    "read refcount table",
                    h.refcount_table_offset(),
                    e,
                )
            })?;
        Ok(Checker {
            img,
            geo,
            cs,
            file_len,
            refs: RefArray {
                small,
                big: HashMap::new(),
                len: nb,
                max: refcount::max_refcount(h.refcount_order()),
            },
            report: CheckReport {
                total_clusters: h.size().div_ceil(cs),
                ..CheckReport::default()
            },
            reftable: decode_u64_table(&raw),
            blocks: Vec::new(),
            last_block: 0,
            highest_cluster: 0,
            work: 0,
            outside: None,
        })
    }

    fn corruption(&mut self, message: String) {
        self.report.push(ProblemKind::Corruption, message, 1);
    }

    fn spend(&mut self, n: u64) -> Result<()> {
        self.work = self.work.saturating_add(n);
        if self.work > MAX_CHECK_WORK {
            return Err(Error::Unsupported {
                path: self.img.path().to_path_buf(),
                what: format!(
                    "the image's metadata asks the check to examine more than {MAX_CHECK_WORK} \
                     table entries; refusing"
                ),
            });
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64, op: &'static str) -> Result<()> {
        self.img
            .storage()
            .read_at(buf, offset)
            .map(|_| ())
            .map_err(|e| Error::io(self.img.path(), op, offset, e))
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`, `times` times over.
    fn inc_refcounts(&mut self, offset: u64, size: u64, times: u64) {
        if size == 0 || times == 0 {
            return;
        }
        let end = offset.saturating_add(size);
        // The last cluster may be partly past the end of the file, not more.
        if end.saturating_sub(self.file_len) >= self.cs {
            self.outside.get_or_insert((offset, size));
            self.report.push(
                ProblemKind::Corruption,
                format!(
                    "ERROR: counting reference for region exceeding the end of the file by one \
                     cluster or more: offset {offset:#x} size {size:#x}"
                ),
                times,
            );
            return;
        }
        for k in self
            .geo
            .host_clusters(HostOffset::new(offset), end - offset)
        {
            if k >= self.refs.small.len() as u64 {
                // Unreachable given the test above; never index past the array.
                self.report.push(
                    ProblemKind::CheckError,
                    format!("ERROR: cluster {k} outside the reference array"),
                    1,
                );
                continue;
            }
            self.refs.len = self.refs.len.max(k + 1);
            let cur = self.refs.get(k);
            let room = self.refs.max.saturating_sub(cur);
            if times <= room {
                self.refs.set(k, cur + times);
            } else {
                self.refs.set(k, self.refs.max);
                self.report.push(
                    ProblemKind::Corruption,
                    format!(
                        "ERROR: overflow cluster offset={:#x}",
                        self.geo.cluster_start(k).get()
                    ),
                    times - room,
                );
            }
        }
    }

    /// QEMU's `calculate_refcounts`. Returns `false` when the check had to
    /// stop (QEMU's "Check failed"), with the reason in the report.
    fn calculate(&mut self) -> Result<bool> {
        let img = self.img;
        let h = img.header();
        // QEMU's qcow2_read_snapshots in check mode: a v3 snapshot must
        // record vm_state_size_large and disk_size (16 bytes of extra data).
        if h.version() >= 3 {
            for (i, sn) in img.snapshots().iter().enumerate() {
                if sn.extra.len() < 16 {
                    self.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
                }
            }
        }
        // The header.
        self.inc_refcounts(0, self.cs, 1);

        // Every L1 table: count how often each L2 table is referenced, and
        // how often from the active one (which also gives the statistics).
        let mut order: Vec<u64> = Vec::new();
        let mut visits: HashMap<u64, (u64, u64)> = HashMap::new();
        self.walk_l1(
            h.l1_table_offset(),
            h.l1_size(),
            true,
            &mut order,
            &mut visits,
        )?;
        for sn in img.snapshots() {
            if !img.geometry().is_aligned(sn.l1_table_offset) {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > limits::MAX_L1_BYTES / 8 {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table \
                     entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.walk_l1(
                sn.l1_table_offset,
                sn.l1_size,
                false,
                &mut order,
                &mut visits,
            )?;
        }
        self.prefetch(&order);
        for off in order {
            let Some(&(n, active)) = visits.get(&off) else {
                continue;
            };
            let fx = self.l2_effects(off)?;
            for (o, s) in &fx.refs {
                self.inc_refcounts(*o, *s, n);
            }
            for p in fx.problems {
                self.report.push(ProblemKind::Corruption, p, n);
            }
            self.report.allocated_clusters += fx.allocated * active;
            self.report.fragmented_clusters += fx.fragmented * active;
            self.report.compressed_clusters += fx.compressed * active;
        }

        // The snapshot table.
        let sn_size = self.snapshot_table_size()?;
        self.inc_refcounts(h.snapshots_offset(), sn_size, 1);

        // The refcount table.
        self.inc_refcounts(h.refcount_table_offset(), self.reftable.len() as u64 * 8, 1);

        // Bitmaps.
        if !self.bitmaps()? {
            return Ok(false);
        }

        // Refcount blocks.
        self.check_refblocks();
        Ok(true)
    }

    /// Starts reading, all at once, the L2 tables at `tables` and the
    /// refcount blocks that the check reads next one after the other
    /// ([`crate::storage::Storage::will_need`]: on a cold page cache each
    /// read would otherwise wait for the disk in turn). At most
    /// [`PREFETCH_BYTES`]: the first tables the check reads anyway.
    fn prefetch(&self, tables: &[u64]) {
        let storage = self.img.storage();
        let blocks = self
            .reftable
            .iter()
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .filter(|o| *o != 0 && self.geo.is_aligned(*o));
        for off in tables
            .iter()
            .copied()
            .chain(blocks)
            .filter(|o| *o < self.file_len)
            .take((PREFETCH_BYTES / self.cs).max(1) as usize)
        {
            storage.will_need(off, self.cs);
        }
    }

    /// QEMU's `check_refcounts_l1`, up to reading the L2 tables: those
    /// are recorded in `visits` and processed once each afterwards.
    fn walk_l1(
        &mut self,
        offset: u64,
        l1_size: u32,
        active: bool,
        order: &mut Vec<u64>,
        visits: &mut HashMap<u64, (u64, u64)>,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc_refcounts(offset, bytes, 1);
        self.spend(u64::from(l1_size))?;
        let table = if active {
            // The table as opened (what is on disk, for a read-only image).
            self.img.l1().to_vec()
        } else {
            let mut raw = vec![0u8; bytes as usize];
            self.read(&mut raw, offset, "read L1 table")?;
            decode_u64_table(&raw)
        };
        for entry in table {
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
            }
            let l2 = entry & OFFSET_MASK;
            self.inc_refcounts(l2, self.cs, 1);
            if !self.img.geometry().is_aligned(l2) {
                self.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            // A table wholly past the end of the file reads as zeros: it
            // references nothing, no need to remember it.
            if l2 >= self.file_len {
                continue;
            }
            let v = visits.entry(l2).or_insert_with(|| {
                order.push(l2);
                (0, 0)
            });
            v.0 += 1;
            if active {
                v.1 += 1;
            }
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2` on the table at `offset`, once.
    fn l2_effects(&mut self, offset: u64) -> Result<L2Effects> {
        let geo = self.img.geometry();
        self.spend(geo.l2_entries())?;
        let mut table = vec![0u8; self.cs as usize];
        self.read(&mut table, offset, "read L2 table")?;
        let mut fx = L2Effects::default();
        let mut next_contiguous = 0u64;
        // All-zero entries (unallocated) add nothing: skipped a block at a time.
        for i in strata_format::table::nonzero_entries(&table, geo) {
            let Ok(e) = strata_format::L2Entry::read(&table, geo, i) else {
                break;
            };
            let (word, l2_bitmap) = (e.word, e.bitmap);
            if word & OFLAG_COMPRESSED != 0 {
                let d = CompressedDescriptor::decode(
                    word & !(OFLAG_COPIED | OFLAG_COMPRESSED),
                    self.geo.cluster_bits(),
                );
                if word & OFLAG_COPIED != 0 {
                    fx.problems.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                         clusters",
                        d.offset.get()
                    ));
                }
                if l2_bitmap != 0 {
                    fx.problems.push(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation \
                         bitmap, entry={:#x}",
                        word & !OFLAG_COPIED
                    ));
                    continue;
                }
                // Invalid with an external data file (qcow2/data_file.rs).
                if self.img.data_ref().is_some() {
                    fx.problems.push(format!(
                        "ERROR compressed cluster {i} with data file, entry={word:#x}"
                    ));
                    continue;
                }
                fx.refs.push((d.offset.get(), d.len));
                fx.allocated += 1;
                fx.compressed += 1;
                fx.fragmented += 1;
                continue;
            }
            if word & L2_STD_RESERVED_MASK != 0 {
                fx.problems.push(format!(
                    "ERROR found l2 entry with reserved bits set: {word:x}"
                ));
            }
            let host = word & OFFSET_MASK;
            let zero_flag = !geo.extended_l2() && word & OFLAG_ZERO != 0;
            // A data file cluster may lie at offset 0 (qcow2/data_file.rs).
            let at_data_start = self.img.entry_host(&e).is_some();
            if host == 0 && (zero_flag || !at_data_start) {
                // Unallocated, or a plain zero cluster.
                if !zero_flag && l2_bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                    fx.problems.push(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                            .to_string(),
                    );
                }
                continue;
            }
            // A normal cluster or a preallocated zero cluster.
            if (l2_bitmap >> 32) & l2_bitmap != 0 {
                fx.problems.push(format!(
                    "ERROR offset={host:x}: Allocated cluster has corrupted subcluster \
                     allocation bitmap"
                ));
            }
            if !geo.is_aligned(host) {
                let contains_data = if geo.extended_l2() {
                    l2_bitmap & L2_BITMAP_ALL_ALLOC != 0
                } else {
                    word & OFLAG_ZERO == 0
                };
                fx.problems.push(if contains_data {
                    format!(
                        "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry \
                         corrupted."
                    )
                } else {
                    format!(
                        "ERROR offset={host:x}: Preallocated cluster is not properly aligned; \
                         L2 entry corrupted."
                    )
                });
            }
            fx.allocated += 1;
            if next_contiguous != 0 && host != next_contiguous {
                fx.fragmented += 1;
            }
            next_contiguous = host.saturating_add(self.cs);
            // Data clusters in an external data file are not refcounted.
            if self.img.data_ref().is_none() {
                fx.refs.push((host, self.cs));
            }
        }
        Ok(fx)
    }

    /// The snapshot table's length as QEMU computes it: every entry
    /// padded to 8 bytes except the last.
    fn snapshot_table_size(&self) -> Result<u64> {
        let h = self.img.header();
        let mut at = h.snapshots_offset();
        let mut end = at;
        for _ in 0..self.img.snapshots().len() {
            let mut fixed = [0u8; snapshot::FIXED_LEN];
            self.read(&mut fixed, at, "read snapshot table")?;
            let fmt = |source| Error::Format {
                path: self.img.path().to_path_buf(),
                source,
            };
            let data_len = snapshot::entry_data_len(&fixed, at).map_err(fmt)?;
            let len = snapshot::entry_len(&fixed, at).map_err(fmt)?;
            end = at.saturating_add(data_len as u64);
            at = at.saturating_add(len as u64);
        }
        Ok(end - h.snapshots_offset())
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`. Returns `false` when the
    /// bitmaps could not be loaded (QEMU then fails the whole check).
    fn bitmaps(&mut self) -> Result<bool> {
        let img = self.img;
        let h = img.header();
        let Some((nb, dir_size, dir_offset)) = h.bitmaps() else {
            return Ok(true);
        };
        // Without the autoclear bit QEMU ignores the extension (the
        // bitmaps' clusters then show up as leaks).
        if !h.autoclear_features().contains(Autoclear::BITMAPS) {
            return Ok(true);
        }
        // QEMU refuses to open such an image at all.
        let refuse = if nb == 0 {
            Some("found bitmaps extension with zero bitmaps".to_string())
        } else if nb > bitmap::MAX_BITMAPS {
            Some(format!(
                "bitmaps_ext: Image has {nb} bitmaps, exceeding the maximum"
            ))
        } else if !self.img.geometry().is_aligned(dir_offset) {
            Some("bitmaps_ext: invalid bitmap directory offset".to_string())
        } else if dir_size > bitmap::MAX_DIRECTORY_SIZE {
            Some(format!(
                "bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported \
                 size ({})",
                bitmap::MAX_DIRECTORY_SIZE
            ))
        } else {
            None
        };
        if let Some(msg) = refuse {
            self.report.push(ProblemKind::CheckError, msg, 1);
            return Ok(false);
        }
        self.inc_refcounts(dir_offset, dir_size, 1);
        let mut dir = vec![0u8; dir_size as usize];
        self.read(&mut dir, dir_offset, "read bitmap directory")?;
        let cs = self.cs;
        let entries = bitmap::parse_directory(&dir, nb, dir_offset).and_then(|es| {
            for e in &es {
                e.validate(cs, h.size(), dir_offset)?;
            }
            Ok(es)
        });
        let entries = match entries {
            Ok(es) => es,
            Err(e) => {
                self.corruption(format!("ERROR invalid bitmap directory: {e}"));
                self.report
                    .push(ProblemKind::CheckError, format!("Check failed: {e}"), 1);
                return Ok(false);
            }
        };
        for e in entries {
            self.inc_refcounts(e.table_offset, e.table_bytes(), 1);
            self.spend(u64::from(e.table_size))?;
            // validate() bounds table_size * cluster_size by 512 MiB.
            let mut raw = vec![0u8; e.table_bytes() as usize];
            self.read(&mut raw, e.table_offset, "read bitmap table")?;
            let table = decode_u64_table(&raw);
            let mut parsed = Vec::with_capacity(table.len());
            for (i, raw) in table.iter().enumerate() {
                let at = e.table_offset + i as u64 * 8;
                match BitmapTableEntry::parse(*raw, cs, at) {
                    Ok(t) => parsed.push(t),
                    Err(err) => {
                        // QEMU's bitmap_table_load refuses the whole table.
                        self.corruption(format!(
                            "ERROR bitmap '{}': invalid bitmap table: {err}",
                            e.name
                        ));
                        self.report.push(
                            ProblemKind::CheckError,
                            format!("Check failed: {err}"),
                            1,
                        );
                        return Ok(false);
                    }
                }
            }
            for t in parsed {
                if let Some(o) = t.data_offset() {
                    self.inc_refcounts(o, cs, 1);
                }
            }
        }
        Ok(true)
    }

    /// QEMU's `check_refblocks` (without repairs).
    fn check_refblocks(&mut self) {
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry & REFTABLE_OFFSET_MASK;
            if entry & REFTABLE_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if !self.img.geometry().is_aligned(offset) {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                continue;
            }
            let cluster = self.geo.cluster_index(HostOffset::new(offset));
            if cluster >= self.refs.len {
                self.corruption(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(offset, self.cs, 1);
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.corruption(format!("ERROR refcount block {i} refcount={r}"));
                }
            }
        }
    }

    /// The refcount block holding the refcount of cluster `i`.
    fn refblock_of(&mut self, i: u64) -> Result<RefBlock> {
        let h = self.img.header();
        let per_block = refcount::entries_per_block(self.geo.cluster_bits(), h.refcount_order());
        let rt_index = i / per_block;
        let Some(&entry) = usize::try_from(rt_index)
            .ok()
            .and_then(|x| self.reftable.get(x))
        else {
            return Ok(RefBlock::Zeros);
        };
        let block = entry & REFTABLE_OFFSET_MASK;
        if block == 0 {
            return Ok(RefBlock::Zeros);
        }
        if !self.img.geometry().is_aligned(block) {
            return Ok(RefBlock::Unusable("Input/output error".to_string()));
        }
        let hit = match self.blocks.get(self.last_block) {
            Some((off, _)) if *off == block => Some(self.last_block),
            _ => self.blocks.iter().position(|(off, _)| *off == block),
        };
        let at = match hit {
            Some(at) => at,
            None => {
                if self.blocks.len() >= CACHED_REFBLOCKS {
                    self.blocks.clear();
                }
                let mut b = vec![0u8; self.cs as usize];
                self.read(&mut b, block, "read refcount block")?;
                self.blocks.push((block, b));
                self.blocks.len() - 1
            }
        };
        self.last_block = at;
        Ok(RefBlock::Cached(at))
    }

    /// The refcount stored on disk for cluster `i` (QEMU's
    /// `qcow2_get_refcount`); `Err` with a message when its refcount block
    /// cannot be used.
    fn stored_refcount(&mut self, i: u64) -> Result<std::result::Result<u64, String>> {
        let order = self.img.header().refcount_order();
        let per_block = refcount::entries_per_block(self.geo.cluster_bits(), order);
        Ok(match self.refblock_of(i)? {
            RefBlock::Zeros => Ok(0),
            RefBlock::Unusable(why) => Err(why),
            RefBlock::Cached(at) => Ok(refcount_at(&self.blocks[at].1, order, i % per_block)),
        })
    }

    /// QEMU's `compare_refcounts` (without repairs), a refcount block at
    /// a time: each block looked up once, its clusters compared in order.
    fn compare(&mut self) -> Result<()> {
        self.highest_cluster = 0;
        let order = self.img.header().refcount_order();
        let per_block = refcount::entries_per_block(self.geo.cluster_bits(), order);
        let mut i = 0;
        while i < self.refs.len {
            let stop = (i / per_block + 1)
                .saturating_mul(per_block)
                .min(self.refs.len);
            let block = self.refblock_of(i)?;
            if let RefBlock::Unusable(why) = &block {
                for c in i..stop {
                    self.report.push(
                        ProblemKind::CheckError,
                        format!("Can't get refcount for cluster {c}: {why}"),
                        1,
                    );
                }
                i = stop;
                continue;
            }
            for c in i..stop {
                let r1 = match &block {
                    RefBlock::Cached(at) => refcount_at(&self.blocks[*at].1, order, c % per_block),
                    _ => 0,
                };
                let r2 = self.refs.get(c);
                if r1 > 0 || r2 > 0 {
                    self.highest_cluster = c;
                }
                if r1 < r2 {
                    self.corruption(format!("ERROR cluster {c} refcount={r1} reference={r2}"));
                } else if r1 > r2 {
                    self.report.push(
                        ProblemKind::Leak,
                        format!("Leaked cluster {c} refcount={r1} reference={r2}"),
                        1,
                    );
                }
            }
            i = stop;
        }
        Ok(())
    }

    /// QEMU's `check_oflag_copied` (without repairs), on the active L1
    /// table. Each distinct L2 table is examined once; its findings count
    /// once per L1 entry pointing at it.
    fn check_oflag_copied(&mut self) -> Result<()> {
        let geo = self.img.geometry();
        let mut seen: HashMap<u64, Vec<String>> = HashMap::new();
        let l1 = self.img.l1().to_vec();
        for (i, &entry) in l1.iter().enumerate() {
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Ok(r) = self.stored_refcount(self.geo.cluster_index(HostOffset::new(l2)))? {
                if (r == 1) != (entry & OFLAG_COPIED != 0) {
                    self.corruption(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} \
                         refcount={r}"
                    ));
                }
            }
            if let Some(found) = seen.get(&l2) {
                for m in found.clone() {
                    self.corruption(m);
                }
                continue;
            }
            let mut found = Vec::new();
            if l2 < self.file_len {
                self.spend(geo.l2_entries())?;
                let mut table = vec![0u8; self.cs as usize];
                self.read(&mut table, l2, "read L2 table")?;
                for j in strata_format::table::nonzero_entries(&table, geo) {
                    let Ok(e) = strata_format::L2Entry::read(&table, geo, j) else {
                        break;
                    };
                    let word = e.word;
                    let host = word & OFFSET_MASK;
                    if word & OFLAG_COMPRESSED != 0 || host == 0 {
                        continue;
                    }
                    // A data file's clusters count as referenced once.
                    let r = if self.img.data_file().is_some() {
                        1
                    } else {
                        let ci = self.geo.cluster_index(HostOffset::new(host));
                        let Ok(r) = self.stored_refcount(ci)? else {
                            continue;
                        };
                        r
                    };
                    if (r == 1) != (word & OFLAG_COPIED != 0) {
                        found.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={word:x} refcount={r}"
                        ));
                    }
                }
            }
            for m in &found {
                self.corruption(m.clone());
            }
            seen.insert(l2, found);
        }
        Ok(())
    }
}
