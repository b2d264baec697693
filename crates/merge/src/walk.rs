//! The cluster walk shared by commit, pull and rebase.
//!
//! A `Job` classifies the guest disk extent by extent (runs of clusters,
//! never bytes): skip, make zero, copy, or copy where the source view
//! differs from a reference view. The walk runs a job twice: once to plan
//! (metadata only; this pass also validates every table it reads before
//! anything is written), once to execute. Source data stored uncompressed
//! in a file is passed to the destination mapped in place (no copy into a
//! buffer), up to [`BUF_BYTES`] per write; the rest (compressed clusters,
//! memory storage) is read into one reused buffer, coalescing consecutive
//! extents into writes of up to [`BUF_BYTES`]. Where the destination's
//! filesystem shares extents with the source's (XFS with reflink, btrfs),
//! whole clusters are cloned instead (`clone_run`): nothing is read.
//!
//! Memory is bounded by two buffers of [`BUF_BYTES`] (or one cluster, when
//! that is larger), one mapped window of at most as much, and the image
//! engine's L2 caches, whatever the image size.
//!
//! What the source layers hold at an extent (which layer stores it, where,
//! compressed or not, or zeros) comes from strata-image's block status
//! ([`block_status_at`], QEMU's rules in one place), with its per-layer
//! answers kept for the whole walk ([`StatusCache`]).

use std::path::PathBuf;

use strata_image::block_status::{block_status_at, StatusCache};
use strata_image::chain::read_below;
use strata_image::{BlockStatus, Image, Layer, MappedBytes, Mapping};

use crate::error::{MergeError, Result};
use crate::progress::{Hooks, Progress};

/// Bytes of guest data moved per read and write (the buffer size).
pub const BUF_BYTES: usize = 4 << 20;

/// Shortest stored run passed on mapped rather than read into the buffer.
const MIN_MAPPED: u64 = 64 << 10;

/// What to do with one guest extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Nothing to do.
    Skip,
    /// Make the extent read as zeros in the destination.
    Zero,
    /// Copy the source view into the destination.
    Copy,
    /// Copy the source view into the destination where it differs from the
    /// reference view (granule by granule). A `*_zero` flag says that view
    /// reads as zeros here without reading it.
    Diff {
        /// The source view reads zeros here.
        source_zero: bool,
        /// The reference view reads zeros here.
        reference_zero: bool,
    },
}

impl Kind {
    /// Whether the source view is known to read as zeros (nothing to read).
    fn source_zero(self) -> bool {
        matches!(
            self,
            Kind::Diff {
                source_zero: true,
                ..
            }
        )
    }
}

/// One classified extent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    pub len: u64,
    pub kind: Kind,
}

/// A merge, as the walk sees it.
pub(crate) trait Job {
    /// The guest range walked: `[0, size)`.
    fn size(&self) -> u64;
    /// Classifies the extent at `pos` (at most `max` bytes, at least one).
    fn next(&mut self, pos: u64, max: u64) -> Result<Seg>;
    /// Reads the source view (that of [`Job::source_layers`]).
    fn read_source(&self, buf: &mut [u8], at: u64) -> Result<()> {
        Ok(read_below(self.source_layers(), buf, at)?)
    }
    /// Reads the reference view (for `Diff`).
    fn read_reference(&self, buf: &mut [u8], at: u64) -> Result<()>;
    /// Writes data into the destination.
    fn write_data(&mut self, buf: &[u8], at: u64) -> Result<()>;
    /// Makes a range of the destination read as zeros.
    fn write_zeroes(&mut self, at: u64, len: u64) -> Result<()>;
    /// Unit of comparison for `Diff` (the destination's allocation unit).
    fn granule(&self) -> u64;
    /// Bytes the destination files would grow by (upper bound) when the
    /// range `[at, at+len)` is written with data; called in order.
    fn growth(&mut self, at: u64, len: u64) -> Result<u64>;
    /// Files that grow, in the order of [`Plan::growth`].
    fn growing_file(&self) -> PathBuf;
    /// The layers the source view of `[at, at+len)` is read from, top
    /// first (checked by the plan pass: see [`check_compressed`]).
    fn source_layers(&self) -> &[Layer];
    /// The image written (the top of the destination chain).
    fn destination(&self) -> &Layer;
    /// Writes `[at, at+len)` of the destination with the bytes source
    /// layer `depth` (an index into [`Job::source_layers`]) stores at host
    /// offset `host`, moved by a clone ([`clone_run`] found it can be).
    fn write_range(&mut self, at: u64, len: u64, depth: usize, host: u64) -> Result<()>;
}

/// Most bytes moved by one clone step (progress and cancellation come
/// between steps).
const CLONE_BYTES: u64 = 64 << 20;

/// The start of the source run at `at` (at most `want` bytes) that can be
/// cloned into the destination: stored uncompressed in one source layer,
/// starting and ending on destination cluster boundaries, its host offset
/// and the destination's clusters aligned to the filesystem block, on a
/// destination that shares extents with that layer's file (found out by
/// trying, once per source device). Returns the source layer's index,
/// the host offset and the length; `None`: copy as usual.
///
/// A destination with subclusters (extended L2) is never cloned into.
/// Compressed clusters, zeros, holes and runs shorter than a cluster go
/// the usual way.
pub(crate) fn clone_run(
    job: &dyn Job,
    cache: &mut StatusCache,
    at: u64,
    want: u64,
) -> Result<Option<(usize, u64, u64)>> {
    let dest = job.destination();
    // Data goes to, and comes from, a layer's external data file when it
    // has one.
    let dst = dest.image.data_storage()?;
    let g = dst.clone_granule();
    if g == 0 {
        return Ok(None);
    }
    let unit = match &dest.image {
        Image::Qcow2(q) => {
            let geo = q.geometry();
            if geo.extended_l2() {
                return Ok(None);
            }
            geo.cluster_size()
        }
        Image::Raw(_) => g,
    };
    if !unit.is_multiple_of(g) || !at.is_multiple_of(unit) || want < unit {
        return Ok(None);
    }
    let layers = job.source_layers();
    let s = block_status_at(layers, cache, at, want)?;
    let (Some((d, layer)), Mapping::Data { host }) = (stored_in(layers, &s), s.mapping) else {
        return Ok(None);
    };
    let n = s.length.min(want) / unit * unit;
    if n == 0 || !host.get().is_multiple_of(g) || !dst.clones_from(layer.image.data_storage()?) {
        return Ok(None);
    }
    Ok(Some((d, host.get(), n)))
}

/// The layer of `layers` (and its index) whose mapping holds the bytes of
/// extent `s` (none when it reads as zeros for want of one).
fn stored_in<'l>(layers: &'l [Layer], s: &BlockStatus) -> Option<(usize, &'l Layer)> {
    let d = s.layer?;
    layers.get(d).map(|l| (d, l))
}

/// The start of what [`read_below`] would read at `at` from `layers` (at
/// most `len` bytes), mapped in place instead of copied, when one layer
/// stores at least [`MIN_MAPPED`] bytes of it uncompressed on a storage
/// that can map ([`Image::mapped_data`]). The bytes may be fewer than
/// `len`; `None`: read instead.
fn mapped_source(
    layers: &[Layer],
    cache: &mut StatusCache,
    at: u64,
    len: u64,
) -> Result<Option<MappedBytes>> {
    if len < MIN_MAPPED {
        return Ok(None);
    }
    let s = block_status_at(layers, cache, at, len)?;
    match stored_in(layers, &s) {
        Some((_, layer)) if s.reads_data() && s.length >= MIN_MAPPED => {
            let n = usize::try_from(s.length).unwrap_or(usize::MAX);
            Ok(layer.image.mapped_data(s.mapping, n)?)
        }
        _ => Ok(None),
    }
}

/// How much a file is expected to grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileGrowth {
    /// The file.
    pub path: PathBuf,
    /// Upper bound of the growth, in bytes (data clusters; L2 and refcount
    /// tables come on top, about 1/4096 of it with 64 KiB clusters).
    pub bytes: u64,
}

/// What a merge will do, computed from metadata alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// Guest bytes whose data will be copied (for pull and rebase: at most
    /// this much; ranges that turn out equal to the new backing file are
    /// not written).
    pub copy_bytes: u64,
    /// Guest bytes that will be made to read as zeros.
    pub zero_bytes: u64,
    /// Destination clusters touched by copies.
    pub copy_clusters: u64,
    /// Extents (runs with one answer) with work to do.
    pub extents: u64,
    /// Whether `copy_bytes` is exact (false when a comparison decides).
    pub exact: bool,
    /// Expected growth of each file written.
    pub growth: Vec<FileGrowth>,
}

impl Plan {
    /// Guest bytes the merge handles (the progress total).
    pub fn total_bytes(&self) -> u64 {
        self.copy_bytes + self.zero_bytes
    }
}

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Guest bytes written with data.
    pub copied_bytes: u64,
    /// Guest bytes made to read as zeros.
    pub zeroed_bytes: u64,
    /// Guest bytes compared with the new backing file and found equal
    /// (nothing written).
    pub equal_bytes: u64,
    /// Of `copied_bytes`, those cloned: the destination shares the
    /// source's extents (XFS with reflink, btrfs), no data was read or
    /// written. A clone is not compared with the new backing file first
    /// (that would read the data), so a pull or rebase may clone ranges
    /// qemu-img would find equal and skip: the guest view is the same.
    pub cloned_bytes: u64,
}

/// Plans a job: walks its metadata, writes nothing.
pub(crate) fn plan(job: &mut dyn Job, cluster: u64) -> Result<Plan> {
    let size = job.size();
    let mut p = Plan {
        exact: true,
        ..Plan::default()
    };
    let mut growth = 0u64;
    let mut last_cluster: Option<u64> = None;
    let mut cache = StatusCache::new();
    let mut pos = 0u64;
    while pos < size {
        let seg = job.next(pos, size - pos)?;
        let len = seg.len.clamp(1, size - pos);
        match seg.kind {
            Kind::Skip => {}
            Kind::Zero => {
                p.zero_bytes += len;
                p.extents += 1;
            }
            Kind::Copy | Kind::Diff { .. } => {
                if matches!(seg.kind, Kind::Diff { .. }) {
                    p.exact = false;
                }
                p.copy_bytes += len;
                p.extents += 1;
                let first = pos / cluster;
                let last = (pos + len - 1) / cluster;
                let first = match last_cluster {
                    Some(l) if l >= first => l + 1,
                    _ => first,
                };
                if first <= last {
                    p.copy_clusters += last - first + 1;
                }
                last_cluster = Some(last);
                growth += job.growth(pos, len)?;
                if !seg.kind.source_zero() {
                    check_compressed(job.source_layers(), &mut cache, pos, len)?;
                }
            }
        }
        pos += len;
    }
    p.growth.push(FileGrowth {
        path: job.growing_file(),
        bytes: growth,
    });
    Ok(p)
}

/// A run of consecutive extents of one kind, read into the buffer.
struct Batch {
    start: u64,
    len: usize,
    kind: Kind,
}

struct Runner<'j, 'h, 'a> {
    job: &'j mut dyn Job,
    hooks: &'h mut Hooks<'a>,
    buf: Vec<u8>,
    reference: Vec<u8>,
    batch: Option<Batch>,
    zero_run: Option<(u64, u64)>,
    /// Block status of the source layers, kept between extents.
    status: StatusCache,
    stats: Stats,
    progress: Progress,
}

/// Executes a job planned by [`plan`]: the writes, in guest order, with
/// progress and cancellation. Returns what was done. Does not flush the
/// destination: the caller does, where its protocol says.
pub(crate) fn execute(job: &mut dyn Job, total: u64, hooks: &mut Hooks<'_>) -> Result<Stats> {
    let cap = BUF_BYTES.max(usize::try_from(job.granule()).unwrap_or(BUF_BYTES));
    let mut r = Runner {
        job,
        hooks,
        buf: vec![0u8; cap],
        reference: Vec::new(),
        batch: None,
        zero_run: None,
        status: StatusCache::new(),
        stats: Stats::default(),
        progress: Progress {
            done_bytes: 0,
            total_bytes: total,
        },
    };
    r.run()?;
    Ok(r.stats)
}

impl Runner<'_, '_, '_> {
    fn run(&mut self) -> Result<()> {
        let size = self.job.size();
        let cap = self.buf.len();
        let mut pos = 0u64;
        while pos < size {
            if self.hooks.cancelled() {
                self.flush_pending()?;
                return Err(MergeError::Cancelled);
            }
            let seg = self.job.next(pos, size - pos)?;
            let len = seg.len.clamp(1, size - pos);
            match seg.kind {
                Kind::Skip => {
                    self.flush_pending()?;
                }
                Kind::Zero => {
                    self.flush_batch()?;
                    self.zero_run = match self.zero_run {
                        Some((s, l)) if s + l == pos => Some((s, l + len)),
                        Some(z) => {
                            self.write_zero_run(z)?;
                            Some((pos, len))
                        }
                        None => Some((pos, len)),
                    };
                    if self.zero_run.is_some_and(|(_, l)| l >= 1 << 30) {
                        self.flush_pending()?;
                    }
                }
                Kind::Copy | Kind::Diff { .. } => {
                    self.flush_zero_run()?;
                    let source_zero = seg.kind.source_zero();
                    let mut done = 0u64;
                    while done < len {
                        let at = pos + done;
                        let joins = self
                            .batch
                            .as_ref()
                            .is_some_and(|b| b.kind == seg.kind && b.start + b.len as u64 == at);
                        if !joins && !source_zero {
                            // Whole clusters stored uncompressed, on a
                            // filesystem that shares extents: cloned.
                            let want = (len - done).min(CLONE_BYTES);
                            if let Some((d, host, n)) =
                                clone_run(&*self.job, &mut self.status, at, want)?
                            {
                                self.flush_batch()?;
                                self.job.write_range(at, n, d, host)?;
                                self.stats.copied_bytes += n;
                                self.stats.cloned_bytes += n;
                                self.advance(n);
                                done += n;
                                continue;
                            }
                            // Runs of bytes stored uncompressed in a file
                            // go from the page cache to the destination
                            // with no copy into the buffer (short runs
                            // are read and batched: fewer writes).
                            let want = (len - done).min(cap as u64);
                            let layers = self.job.source_layers();
                            if let Some(m) = mapped_source(layers, &mut self.status, at, want)? {
                                self.flush_batch()?;
                                self.write_source(seg.kind, &m, at)?;
                                done += m.len() as u64;
                                continue;
                            }
                        }
                        if !joins {
                            self.flush_batch()?;
                            self.batch = Some(Batch {
                                start: at,
                                len: 0,
                                kind: seg.kind,
                            });
                        }
                        let filled = self.batch.as_ref().map_or(0, |b| b.len);
                        let n = (len - done).min((cap - filled) as u64) as usize;
                        let dst = &mut self.buf[filled..filled + n];
                        if source_zero {
                            dst.fill(0);
                        } else {
                            self.job.read_source(dst, at)?;
                        }
                        if let Some(b) = self.batch.as_mut() {
                            b.len += n;
                        }
                        done += n as u64;
                        if filled + n == cap {
                            self.flush_batch()?;
                        }
                    }
                }
            }
            pos += len;
        }
        self.flush_pending()?;
        self.progress.done_bytes = self.progress.total_bytes;
        self.hooks.report(self.progress);
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        self.flush_batch()?;
        self.flush_zero_run()
    }

    fn advance(&mut self, n: u64) {
        self.progress.done_bytes =
            (self.progress.done_bytes + n).min(self.progress.total_bytes.max(n));
        self.hooks.report(self.progress);
    }

    fn flush_zero_run(&mut self) -> Result<()> {
        if let Some(z) = self.zero_run.take() {
            self.write_zero_run(z)?;
        }
        Ok(())
    }

    fn write_zero_run(&mut self, (at, len): (u64, u64)) -> Result<()> {
        self.job.write_zeroes(at, len)?;
        self.stats.zeroed_bytes += len;
        self.advance(len);
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        let Some(b) = self.batch.take() else {
            return Ok(());
        };
        if b.len == 0 {
            return Ok(());
        }
        // The buffer is lent out for the write (it is not read meanwhile).
        let buf = std::mem::take(&mut self.buf);
        let written = self.write_source(b.kind, &buf[..b.len], b.start);
        self.buf = buf;
        written
    }

    /// Writes source bytes `src`, read at `at`, as `kind` says.
    fn write_source(&mut self, kind: Kind, src: &[u8], at: u64) -> Result<()> {
        match kind {
            Kind::Diff { reference_zero, .. } => self.write_differences(src, at, reference_zero)?,
            _ => {
                self.job.write_data(src, at)?;
                self.stats.copied_bytes += src.len() as u64;
            }
        }
        self.advance(src.len() as u64);
        Ok(())
    }

    /// Writes the granules of `src` (read at `start`) where the source
    /// differs from the reference: zeros as zero writes, the rest as data,
    /// coalesced.
    fn write_differences(&mut self, src: &[u8], start: u64, reference_zero: bool) -> Result<()> {
        let n = src.len();
        if !reference_zero {
            if self.reference.len() < n {
                self.reference = vec![0u8; n.max(BUF_BYTES)];
            }
            self.job.read_reference(&mut self.reference[..n], start)?;
        }
        let g = self.job.granule().max(1);
        // (offset in src, len, is_zero) of the pending write.
        let mut run: Option<(usize, usize, bool)> = None;
        let mut i = 0usize;
        while i < n {
            let abs = start + i as u64;
            let step = ((g - abs % g) as usize).min(n - i);
            let part = &src[i..i + step];
            let same = if reference_zero {
                is_zero(part)
            } else {
                part == &self.reference[i..i + step]
            };
            if same {
                self.stats.equal_bytes += step as u64;
                if let Some(r) = run.take() {
                    self.write_run(src, start, r)?;
                }
            } else {
                let zero = is_zero(part);
                run = match run {
                    Some((s, l, z)) if z == zero => Some((s, l + step, z)),
                    Some(r) => {
                        self.write_run(src, start, r)?;
                        Some((i, step, zero))
                    }
                    None => Some((i, step, zero)),
                };
            }
            i += step;
        }
        if let Some(r) = run {
            self.write_run(src, start, r)?;
        }
        Ok(())
    }

    fn write_run(
        &mut self,
        src: &[u8],
        start: u64,
        (off, len, zero): (usize, usize, bool),
    ) -> Result<()> {
        let at = start + off as u64;
        if zero {
            self.job.write_zeroes(at, len as u64)?;
            self.stats.zeroed_bytes += len as u64;
        } else {
            self.job.write_data(&src[off..off + len], at)?;
            self.stats.copied_bytes += len as u64;
        }
        Ok(())
    }
}

/// Whether every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|x| *x == 0)
}

/// What a view reads at one extent, as the merge jobs classify it: one
/// [`block_status_at`] answer, with the layer that answers counted the way
/// the jobs compare views.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer {
    /// The extent (`length` at least 1).
    pub status: BlockStatus,
    /// Index in the layers of the one that answers: the layer holding
    /// the bytes; for a range past the end of a short layer, that layer
    /// (its end is part of the view); when no layer allocates the range,
    /// the number of layers (below them all).
    pub depth: usize,
    /// Whether the range reads as zeros: past the end of a layer, a zero
    /// mapping, or unallocated in every layer (a data mapping in a hole of
    /// a preallocated file is data: it is copied as stored).
    pub zero: bool,
}

impl Answer {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.status.length
    }
}

/// The [`Answer`] of the view of `layers` at `pos` (at most `max` bytes,
/// `max` not 0). `cache` must belong to `layers`; call
/// [`StatusCache::forget_tables`] first when one of them was written since
/// it was last asked.
pub(crate) fn answer(
    layers: &[Layer],
    cache: &mut StatusCache,
    pos: u64,
    max: u64,
) -> Result<Answer> {
    let status = block_status_at(layers, cache, pos, max)?;
    let depth = match (status.layer, layers.first()) {
        (Some(d), _) => d,
        (None, None) => 0,
        // Past the end of the first layer: it is the short one.
        (None, Some(top)) if status.past_end && pos >= top.image.virtual_size() => 0,
        // Block status names the image above the short backing file.
        (None, Some(_)) if status.past_end => status.depth + 1,
        (None, Some(_)) => layers.len(),
    };
    let zero = status.layer.is_none() || status.mapping.is_zero();
    Ok(Answer {
        status: BlockStatus {
            length: status.length.clamp(1, max),
            ..status
        },
        depth,
        zero,
    })
}

/// Checks that a data extent of `layer` lies inside its file (a pointer
/// past the end is corruption: refuse before writing anything).
pub(crate) fn check_inside(
    layer: &Layer,
    s: &BlockStatus,
    file_len: u64,
    op: &'static str,
) -> Result<()> {
    if let Mapping::Data { host } = s.mapping {
        if host.get().saturating_add(s.length) > file_len {
            return Err(MergeError::Refused {
                path: layer.path.clone(),
                op,
                why: format!(
                    "damaged image: guest range {:#x}+{:#x} points at host offset {:#x}, past the end of the file ({file_len} bytes); run `strata check`",
                    s.start, s.length, host.get()
                ),
            });
        }
    }
    Ok(())
}

/// Decompresses every compressed cluster the view of `layers` reads in
/// `[pos, pos+len)`. Their tables were validated when the plan read them,
/// but only decompression tells whether the bytes are a valid stream: a
/// cluster that does not decompress is refused here, in the plan pass,
/// so that a merge never stops part-way through (with its destination
/// half written) on damage it could have seen before writing.
pub(crate) fn check_compressed(
    layers: &[Layer],
    cache: &mut StatusCache,
    pos: u64,
    len: u64,
) -> Result<()> {
    let end = pos.saturating_add(len);
    let mut at = pos;
    let mut buf = Vec::new();
    while at < end {
        let s = block_status_at(layers, cache, at, end - at)?;
        let n = s.length.clamp(1, end - at);
        if let (true, Some((_, layer))) = (s.compressed, stored_in(layers, &s)) {
            // A compressed extent never spans more than one cluster (at
            // most 2 MiB, under BUF_BYTES); reading it decompresses it.
            buf.resize(n.min(BUF_BYTES as u64) as usize, 0);
            layer.image.read_mapped(s.mapping, at, &mut buf)?;
        }
        at += n;
    }
    Ok(())
}
