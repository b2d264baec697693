//! Block status of a chain: what each guest range reads as and which layer
//! answers, with QEMU's rules — the one derivation that `map`, `compare`
//! and `convert` share.
//!
//! The rules, found by experiment against qemu-img 10 and its source
//! (`qemu-img.c: get_block_status`, `block/io.c`, `block/qcow2.c`):
//! - `depth` is the index of the layer that answered. A range no layer
//!   allocates is answered by the bottom image (a qcow2 image without a
//!   backing file reports unallocated ranges as zeros): depth = layers - 1,
//!   not `allocated`, `zero`.
//! - Past the end of a backing file shorter than the image above it, the
//!   image above answers "zeros" itself: depth of that image, not
//!   `allocated`, `zero`, and `past_end`.
//! - A raw image reports data and holes (`zero`), both allocated, both
//!   with an `offset` equal to the guest offset.
//! - A qcow2 zero cluster with a preallocated host cluster has an `offset`;
//!   a compressed cluster has none and is `compressed`.
//! - With extended L2 entries, an unallocated subcluster of an allocated
//!   cluster still carries the cluster's host offset when the layer that
//!   answers is the one holding it (the bottom, or the image above a short
//!   backing file).
//! - In an image QEMU takes for metadata-preallocated
//!   (`qcow2_detect_metadata_preallocation`), data ranges are split where
//!   the file has holes or ends: those parts are `zero` (still `data`,
//!   with an offset).
//!
//! Cost: one step per run of one answer. Ranges whose L1 entries are
//! empty in every layer are skipped in one step, without looking at each
//! L2 table span; memory is a few extents and one flag per layer.

use strata_format::{GuestOffset, L1Entry, L2Entry};

use crate::chain::{resolve_in, Chain, Image, Layer};
use crate::check;
use crate::error::{Error, Result};
use crate::mapping::Mapping;

/// What a guest range of a chain reads as (one answer for all its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// The layer that answers, as `qemu-img map` reports it (0 = top; the
    /// bottom for ranges no layer allocates; the image above a short
    /// backing file for ranges past its end).
    pub depth: usize,
    /// The layer whose mapping holds the bytes (`mapping` is in it), when a
    /// layer allocates the range; `None` when it reads as zeros because no
    /// layer allocates it or it lies past the end of a backing file.
    pub layer: Option<usize>,
    /// Whether a layer allocates the range (`present` in `qemu-img map`).
    pub allocated: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether data is stored for it.
    pub data: bool,
    /// Whether it lies in a compressed cluster.
    pub compressed: bool,
    /// Host offset in the answering layer's file, when there is one.
    pub offset: Option<u64>,
    /// Whether the range lies past the end of a backing file shorter than
    /// the image above it.
    pub past_end: bool,
    /// The answering layer's mapping of `start` (`Unallocated` when
    /// `layer` is `None`); read the bytes with [`Image::read_mapped`].
    pub mapping: Mapping,
}

impl BlockStatus {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }

    /// Whether `next` continues `self` into one entry of `qemu-img map`
    /// (qemu-img's `entry_mergeable`).
    pub fn mergeable(&self, next: &BlockStatus) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.allocated != next.allocated
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }

    /// Whether the range must be read to be copied: it holds data that is
    /// not known to read as zeros.
    pub fn reads_data(&self) -> bool {
        self.layer.is_some() && !self.zero
    }
}

/// What block status remembers about each layer between extents, so that
/// a walk that asks extent by extent (with writes in between, as a merge
/// does) pays for it once: the last run of empty L1 entries seen. (Whether
/// QEMU would ask a layer's file about holes is decided once by the image
/// itself.) One cache belongs to one list of layers (it starts over when
/// given a list of another length).
#[derive(Debug, Clone, Default)]
pub struct StatusCache {
    /// Per layer: the last L1 scan, `(from, next)`: no L1 entry in
    /// `[from, next)` points at a table (so a long empty run is scanned
    /// once, not once per extent).
    l1_scans: Vec<(usize, usize)>,
}

impl StatusCache {
    /// An empty cache.
    pub fn new() -> StatusCache {
        StatusCache::default()
    }

    /// Forgets the L1 scans: call it after writing to one of the layers,
    /// whose write may have given an L2 table to a range the cache
    /// remembers as empty.
    pub fn forget_tables(&mut self) {
        self.l1_scans.iter_mut().for_each(|s| *s = (0, 0));
    }

    fn fit(&mut self, layers: usize) {
        if self.l1_scans.len() != layers {
            self.l1_scans = vec![(0, 0); layers];
        }
    }
}

/// The iterator [`Chain::block_status`] and [`block_status_in`] return.
#[derive(Debug)]
pub struct BlockStatusIter<'a> {
    layers: &'a [Layer],
    pos: u64,
    end: u64,
    cache: StatusCache,
    failed: bool,
}

impl Chain {
    /// The block status of `[start, start+len)` (clipped to the virtual
    /// size), as extents in guest order that together cover the range.
    /// Neighbouring extents may have the same answer; merge them with
    /// [`BlockStatus::mergeable`] where that matters.
    pub fn block_status(&self, start: u64, len: u64) -> BlockStatusIter<'_> {
        block_status_in(self.layers(), start, len)
    }
}

/// [`Chain::block_status`] of the view `layers` show (top first; e.g. the
/// layers below an image: the view it has of its backing chain), clipped
/// to the first layer's virtual size. Depths and `layer` index `layers`.
pub fn block_status_in(layers: &[Layer], start: u64, len: u64) -> BlockStatusIter<'_> {
    let size = layers.first().map_or(0, |l| l.image.virtual_size());
    let end = start.saturating_add(len).min(size);
    BlockStatusIter {
        layers,
        pos: start.min(end),
        end,
        cache: StatusCache::default(),
        failed: false,
    }
}

/// The extent of [`block_status_in`]`(layers, start, max)` at `start` (at
/// most `max` bytes, at least one when `max` is not 0), with the per-layer
/// answers kept in `cache` between calls. At or past the end of the first
/// layer (a view shorter than the walk over it), the extent reads as
/// zeros: `depth` 0, no `layer`, `past_end`, `max` bytes long.
pub fn block_status_at(
    layers: &[Layer],
    cache: &mut StatusCache,
    start: u64,
    max: u64,
) -> Result<BlockStatus> {
    cache.fit(layers.len());
    let size = layers.first().map_or(0, |l| l.image.virtual_size());
    if start >= size || max == 0 {
        return Ok(BlockStatus {
            start,
            length: max,
            depth: 0,
            layer: None,
            allocated: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
            past_end: start >= size,
            mapping: Mapping::Unallocated,
        });
    }
    step(layers, cache, start, max.min(size - start))
}

impl Iterator for BlockStatusIter<'_> {
    type Item = Result<BlockStatus>;

    fn next(&mut self) -> Option<Result<BlockStatus>> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        self.cache.fit(self.layers.len());
        match step(self.layers, &mut self.cache, self.pos, self.end - self.pos) {
            Ok(s) => {
                self.pos = s.end();
                Some(Ok(s))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// The extent at `pos` (at most `max` bytes; `[pos, pos+max)` inside the
/// first layer, `cache` fitted to `layers`).
fn step(layers: &[Layer], cache: &mut StatusCache, pos: u64, max: u64) -> Result<BlockStatus> {
    let bottom = layers.len() - 1;
    if let Some(n) = empty_l1_run(layers, &mut cache.l1_scans, pos, max) {
        return unallocated_zero(&layers[bottom], bottom, pos, n, false);
    }
    let r = resolve_in(layers, pos, max)?;
    let len = r.extent.len.min(max);
    if len == 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: internal error: empty extent at guest offset {pos:#x}",
            layers[0].path.display()
        )));
    }
    let base = BlockStatus {
        start: pos,
        length: len,
        depth: r.depth,
        layer: Some(r.depth),
        allocated: true,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        past_end: false,
        mapping: r.extent.mapping,
    };
    if r.past_end {
        // The layer above the short one answers "zeros".
        let d = r.depth.saturating_sub(1);
        return unallocated_zero(&layers[d], d, pos, len, true);
    }
    Ok(match r.extent.mapping {
        Mapping::Unallocated => return unallocated_zero(&layers[bottom], bottom, pos, len, false),
        Mapping::Zero { host } => BlockStatus {
            zero: true,
            offset: host.map(|h| h.get()),
            ..base
        },
        Mapping::Data { host } => {
            let layer = &layers[r.depth];
            let prealloc = layer
                .image
                .as_qcow2()
                .is_some_and(check::detect_metadata_preallocation);
            let mut length = len;
            let mut zero = false;
            if prealloc {
                let (data, run) = layer
                    .image
                    .data_storage()?
                    .data_run(host.get(), len)
                    .map_err(|e| Error::io(&layer.path, "seek data/hole", host.get(), e))?;
                length = run.clamp(1, len);
                zero = !data;
            }
            BlockStatus {
                length,
                zero,
                data: true,
                offset: Some(host.get()),
                ..base
            }
        }
        Mapping::Compressed(_) => BlockStatus {
            data: true,
            compressed: true,
            ..base
        },
    })
}

/// When `pos` lies in an L1 range that is empty in every layer (all qcow2
/// images, none shorter than `pos`): the length of that run (at most
/// `max`), found without visiting each L2 table span.
fn empty_l1_run(layers: &[Layer], scans: &mut [(usize, usize)], pos: u64, max: u64) -> Option<u64> {
    let mut run = max;
    for (l, scan) in layers.iter().zip(scans.iter_mut()) {
        let Image::Qcow2(q) = &l.image else {
            return None;
        };
        let vs = q.virtual_size();
        if pos >= vs {
            // Past the end of a short backing file: resolve answers that.
            return None;
        }
        let geo = q.geometry();
        let span = geo.l2_span();
        let l1 = q.l1();
        let first = usize::try_from(geo.l1_index(GuestOffset::new(pos))).ok()?;
        let next = if scan.0 <= first && first < scan.1 {
            scan.1
        } else {
            // Look no further than the range asked about: a caller that
            // forgets the scans between questions pays for what it asks.
            let last = usize::try_from(geo.l1_index(GuestOffset::new(pos + max - 1)))
                .map_or(l1.len(), |i| i.saturating_add(1).min(l1.len()));
            let next = l1
                .get(first..last.max(first))?
                .iter()
                .position(|&e| L1Entry(e).l2_offset().is_some())
                .map_or(last.max(first), |i| first + i);
            *scan = (first, next);
            next
        };
        if next == first {
            return None;
        }
        let run_end = (next as u64).saturating_mul(span).min(vs);
        run = run.min(run_end - pos);
    }
    (run > 0).then_some(run)
}

/// Where the "unallocated" answer of `layer` at guest offset `g` keeps
/// one host offset (a qcow2 image): `(offset, end)`. When the cluster of
/// `g` has an uncompressed host cluster (an extended L2 entry with some
/// subclusters unallocated), `offset` is `g`'s place in it and `end` the
/// end of the cluster. Otherwise `offset` is `None` and `end` the end of
/// the run of clusters without one from `g` on (at most `limit`, within
/// one L2 table span), so that a long unallocated range of an extended-L2
/// image is one step, not one per cluster.
fn host_run(layer: &Layer, g: u64, limit: u64) -> Result<(Option<u64>, u64)> {
    let Some(q) = layer.image.as_qcow2() else {
        return Ok((None, limit));
    };
    let geo = q.geometry();
    let l1i = geo.l1_index(GuestOffset::new(g));
    let span_end = (l1i + 1).saturating_mul(geo.l2_span());
    let Some((_, table)) = q.l2_for(l1i)? else {
        return Ok((None, span_end.min(limit)));
    };
    let entry = |i: u64| {
        L2Entry::read(&table, geo, i).map_err(|source| Error::Format {
            path: layer.path.clone(),
            source,
        })
    };
    let first = geo.l2_index(GuestOffset::new(g));
    let cluster_end = geo.align_down(g).saturating_add(geo.cluster_size());
    if let Some(h) = entry(first)?.host_cluster() {
        return Ok((Some(h.get() + geo.in_cluster(g)), cluster_end));
    }
    let mut end = cluster_end;
    let mut i = first + 1;
    while i < geo.l2_entries() && end < limit && entry(i)?.host_cluster().is_none() {
        end = end.saturating_add(geo.cluster_size());
        i += 1;
    }
    Ok((None, end.min(limit)))
}

/// The extent at `start` (at most `len` bytes) that `layer` at `depth`
/// answers as "unallocated, reads as zeros" (QEMU's ZERO without
/// ALLOCATED).
fn unallocated_zero(
    layer: &Layer,
    depth: usize,
    start: u64,
    len: u64,
    past_end: bool,
) -> Result<BlockStatus> {
    let base = BlockStatus {
        start,
        length: len,
        depth,
        layer: None,
        allocated: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
        past_end,
        mapping: Mapping::Unallocated,
    };
    // Only extended L2 entries can leave part of an allocated cluster
    // unallocated; such a cluster answers with its host offset, one
    // cluster at a time, and the clusters between them in one step.
    let extended = layer
        .image
        .as_qcow2()
        .is_some_and(|q| q.geometry().extended_l2());
    if !extended {
        return Ok(base);
    }
    let (offset, end) = host_run(layer, start, start.saturating_add(len))?;
    Ok(BlockStatus {
        length: (end - start).clamp(1, len),
        offset,
        ..base
    })
}
