//! `resize`: change an image's virtual size as `qemu-img resize` does.
//!
//! Growing a qcow2 image is [`Qcow2Image::resize`](crate::Qcow2Image::resize) (a larger L1 table
//! when needed, bitmaps grown, the new area unallocated); when the
//! backing file is longer than the old size, the new area is then made to
//! read as zeros, as QEMU's `bdrv_co_truncate` does (`BDRV_REQ_ZERO_WRITE`:
//! explicit zeros for the partial cluster at the old end, zero clusters
//! after it), so that the backing file's tail does not show through.
//! `--preallocation=metadata|falloc|full` allocates the new area as
//! QEMU's `qcow2_co_truncate` does (see `preallocate_growth`); for raw,
//! `falloc`/`full` write zeros and `metadata` is refused (raw has no
//! metadata, as in QEMU). Shrinking is
//! done here: the whole clusters past the new end are deallocated (their
//! host clusters freed, shared ones kept for the internal snapshots that
//! still use them), then the header's size is changed. Like QEMU, the L1
//! table keeps its size (a larger table than the size needs is valid),
//! and the file is cut after its last cluster in use.
//! Images with persistent bitmaps are not shrunk by Strata yet.

use strata_format::{GuestOffset, L2Entry};

use crate::chain::{read_below, Chain, Image};
use crate::error::{Error, Result};
use crate::qcow2::write::{BackingRead, Plan};
use crate::qcow2::WritableImage;

/// `--preallocation` of the area a resize adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ResizePrealloc {
    /// Nothing allocated.
    #[default]
    Off,
    /// qcow2: the new clusters allocated, reading as zeros (refused for
    /// raw).
    Metadata,
    /// Blocks allocated (`posix_fallocate`; raw: zeros written).
    Falloc,
    /// Zeros written over the new area.
    Full,
}

/// Why a resize was refused before anything was written (the CLI turns
/// these into qemu-img's messages).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResizeRefusal {
    /// A persistent bitmap is flagged in use (not saved cleanly): QEMU
    /// cannot resize it, so it refuses any resize.
    InconsistentBitmap(String),
    /// The new size is smaller and shrinking was not allowed.
    ShrinkNotAllowed,
    /// A qcow2 size must be a multiple of 512 bytes.
    NotSectorMultiple,
    /// A version 2 image with internal snapshots (their L1 tables record
    /// no size) cannot be resized.
    V2Snapshots,
    /// Preallocation asked for a shrink.
    PreallocShrink,
    /// The mode does not exist for this format (raw has no metadata).
    PreallocUnsupported,
}

impl ResizeRefusal {
    /// qemu-img's message.
    pub fn message(&self) -> String {
        let m = match self {
            ResizeRefusal::InconsistentBitmap(name) => {
                return format!(
                    "Bitmap '{name}' is inconsistent and cannot be used \
                     (remove it with `strata bitmap --remove FILE {name}`)"
                )
            }
            ResizeRefusal::ShrinkNotAllowed => {
                "Use the --shrink option to perform a shrink operation."
            }
            ResizeRefusal::NotSectorMultiple => "The new size must be a multiple of 512",
            ResizeRefusal::V2Snapshots => "Can't resize a v2 image which has snapshots",
            ResizeRefusal::PreallocShrink => "Preallocation can only be used for growing images",
            ResizeRefusal::PreallocUnsupported => "Unsupported preallocation mode: metadata",
        };
        m.to_string()
    }
}

/// Checks a resize of the chain's top image to `new_size` before any
/// write: `None` when it may go ahead.
pub fn resize_refusal(
    chain: &Chain,
    new_size: u64,
    shrink: bool,
    prealloc: ResizePrealloc,
) -> Option<ResizeRefusal> {
    // qemu-img's order: its own checks, then the driver's truncate.
    let top = &chain.top().image;
    let qcow2 = matches!(top, Image::Qcow2(_));
    let smaller = new_size < top.virtual_size();
    if smaller && !shrink {
        return Some(ResizeRefusal::ShrinkNotAllowed);
    }
    if smaller && prealloc != ResizePrealloc::Off {
        return Some(ResizeRefusal::PreallocShrink);
    }
    if qcow2 && !new_size.is_multiple_of(512) {
        return Some(ResizeRefusal::NotSectorMultiple);
    }
    if let Image::Qcow2(q) = top {
        if q.header().version() < 3 && !q.snapshots().is_empty() {
            return Some(ResizeRefusal::V2Snapshots);
        }
        // An unreadable directory is left to the write path to judge.
        if let Some(b) = q
            .bitmaps()
            .ok()
            .and_then(|l| l.into_iter().find(|b| b.in_use))
        {
            return Some(ResizeRefusal::InconsistentBitmap(b.name));
        }
    }
    if prealloc == ResizePrealloc::Metadata && !qcow2 {
        return Some(ResizeRefusal::PreallocUnsupported);
    }
    None
}

/// Largest buffer of zeros written at once.
const ZERO_CHUNK: u64 = 4 << 20;

fn write_zeros(chain: &mut Chain, from: u64, to: u64) -> Result<()> {
    let buf = vec![0u8; ZERO_CHUNK.min(to - from) as usize];
    let mut off = from;
    while off < to {
        let n = (to - off).min(ZERO_CHUNK);
        chain.write_at(&buf[..n as usize], off)?;
        off += n;
    }
    Ok(())
}

/// Resizes the top image of a writable chain (opened with its backing
/// files) to `new_size`: grow or, with `shrink`, shrink, as `qemu-img
/// resize [--shrink] [--preallocation=MODE]`.
pub fn resize_chain(
    chain: &mut Chain,
    new_size: u64,
    shrink: bool,
    prealloc: ResizePrealloc,
) -> Result<()> {
    if let Some(r) = resize_refusal(chain, new_size, shrink, prealloc) {
        return Err(Error::InvalidArgument(r.message()));
    }
    let old = chain.top().image.virtual_size();
    let backing_len = chain.layers().get(1).map(|l| l.image.virtual_size());
    // QEMU's BDRV_REQ_ZERO_WRITE: the new area must hide the backing
    // file's tail.
    let zero_write = backing_len.is_some_and(|b| b > old);
    let (top, rest) = match chain.layers_mut().split_first_mut() {
        Some((l, rest)) => (&mut l.image, rest),
        None => return Err(Error::InvalidArgument("empty chain".into())),
    };
    let qcow2 = matches!(top, Image::Qcow2(_));
    match top {
        Image::Raw(r) => r.truncate(new_size)?,
        Image::Qcow2(q) if new_size < old => return shrink_qcow2(q.writable()?, new_size),
        Image::Qcow2(q) => {
            q.resize(new_size)?;
            q.flush()?;
            if new_size > old && prealloc != ResizePrealloc::Off {
                let below = |b: &mut [u8], off: u64| read_below(rest, b, off);
                let w = q.writable()?;
                preallocate_growth(w, old, new_size, prealloc, zero_write, &below)?;
                w.flush()?;
            }
        }
    }
    if new_size <= old {
        return chain.flush();
    }
    match prealloc {
        ResizePrealloc::Off if qcow2 && zero_write => {
            chain.write_zeroes(old, new_size - old, true)?;
        }
        ResizePrealloc::Metadata if zero_write => {
            // qcow2_co_truncate after preallocate_co: the subclusters
            // (clusters) from the first boundary after the old end were
            // zeroed by preallocate_growth; then explicit zeros for the
            // unaligned head (a write, copying the rest of its
            // subcluster from the backing file).
            let scs = subcluster_size(chain)?;
            let zero_start = old.div_ceil(scs) * scs;
            let head_end = zero_start.min(new_size);
            if head_end > old {
                write_zeros(chain, old, head_end)?;
            }
        }
        ResizePrealloc::Falloc | ResizePrealloc::Full if !qcow2 => {
            write_zeros(chain, old, new_size)?
        }
        // qcow2 preallocation was done above.
        _ => {}
    }
    chain.flush()
}

/// The subcluster size of the chain's top image (qcow2).
fn subcluster_size(chain: &Chain) -> Result<u64> {
    match &chain.top().image {
        Image::Qcow2(q) => Ok(q.geometry().subcluster_size()),
        Image::Raw(_) => Err(Error::InvalidArgument("not a qcow2 image".into())),
    }
}

/// The preallocation of a qcow2 image grown from `old` to `new` bytes
/// (its header already says `new`), as QEMU's `qcow2_co_truncate` does
/// it, for the clusters from the one holding the old end to the new end:
///
/// - `metadata` (`preallocate_co`): each cluster without a host cluster
///   gets one; an allocated cluster the image owns alone keeps its own.
///   The subcluster bitmaps are left as they are (new clusters: every
///   subcluster unallocated), so reads still fall through to a backing
///   file; standard entries become plain data entries reading zeros.
///   With `zero_write` the caller then zeroes the new area as QEMU does.
/// - `falloc`/`full`: every such cluster gets a new host cluster
///   (reserved, or written with zeros), the old ones are freed. Without
///   `zero_write` the bitmaps are kept; with it every subcluster is
///   marked allocated (QEMU's truncate of the file with zeros, then
///   `qcow2_alloc_cluster_link_l2` without `prealloc`).
///
/// In both, the guest data of the cluster at the old end below the old
/// end is copied into its new host cluster (QEMU's `cow_start`).
/// Crash protocol as every write: the data and zeros, a barrier, then
/// the L2 entries (at the next metadata commit), the old clusters freed
/// after them at flush. The host cluster of a compressed entry (no
/// bitmap QEMU would keep) is marked allocated over the copied range.
pub(crate) fn preallocate_growth(
    q: &mut WritableImage,
    old: u64,
    new: u64,
    prealloc: ResizePrealloc,
    zero_write: bool,
    backing: BackingRead,
) -> Result<()> {
    q.begin_write()?;
    let geo = q.view.geometry();
    let cs = geo.cluster_size();
    let scs = geo.subcluster_size();
    let metadata = prealloc == ResizePrealloc::Metadata;
    let first = old / cs;
    let end = new.div_ceil(cs);
    let zeros = vec![0u8; cs as usize];
    let mut c = first;
    while c < end {
        let g = GuestOffset::new(c * cs);
        let toff = q.l2_for_write(geo.l1_index(g))?;
        let table = q.l2_table(toff)?;
        let in_table = (geo.l2_entries() - geo.l2_index(g)).min(end - c);
        let mut plans: Vec<Plan<'_>> = Vec::new();
        // Which plans need a new host cluster.
        let mut fresh: Vec<usize> = Vec::new();
        for j in 0..in_table {
            let cg = (c + j) * cs;
            let idx = geo.l2_index(GuestOffset::new(cg));
            let e = q.entry_for_write(&table, toff, idx)?;
            let keep = metadata && e.host_cluster().is_some() && e.copied();
            let mut new_e = if keep {
                e
            } else {
                let mut n = L2Entry::data(None, true);
                if geo.extended_l2() {
                    let (alloc, zero) = if zero_write && !metadata {
                        (u32::MAX, 0)
                    } else if e.compressed() {
                        let k = old.saturating_sub(cg).min(cs).div_ceil(scs) as u32;
                        (low_bits(k), 0)
                    } else {
                        (e.alloc_bits(), e.zero_bits())
                    };
                    n = n.with_subclusters(alloc, zero);
                }
                n
            };
            if metadata && zero_write {
                new_e = zeroed_from(new_e, geo, cg, old);
            }
            if !keep {
                fresh.push(plans.len());
            }
            plans.push(Plan {
                idx,
                old: e,
                new: new_e,
                dest: None,
                writes: None,
                // The old cluster's reference goes (a shared one keeps
                // the others').
                frees: if keep { vec![] } else { q.freed_by(e) },
            });
        }
        let mut k = 0;
        while k < fresh.len() {
            let (h, n) = q.alloc_run((fresh.len() - k) as u64, "preallocated clusters")?;
            for (j, &pi) in fresh[k..k + n as usize].iter().enumerate() {
                let host = geo.cluster_start(h + j as u64);
                let p = &mut plans[pi];
                p.dest = Some(host);
                p.new = p.new.with_host(host);
            }
            k += n as usize;
        }
        let len = q
            .view
            .storage()
            .len()
            .map_err(|e| Error::io(q.view.path(), "stat", 0, e))?;
        let (mut lo, mut hi) = (u64::MAX, 0);
        for &pi in &fresh {
            let dest = plans[pi].dest.map_or(0, |h| h.get());
            lo = lo.min(dest);
            hi = hi.max(dest + cs);
        }
        if hi > len {
            q.view
                .storage()
                .set_len(hi)
                .map_err(|e| Error::io(q.view.path(), "extend file", hi, e))?;
        }
        // Reserved first: storages without a file get zeros written.
        if prealloc == ResizePrealloc::Falloc && lo < hi {
            q.fallocate(lo, hi - lo)?;
        }
        for &pi in &fresh {
            let p = &plans[pi];
            let dest = p.dest.map_or(0, |h| h.get());
            let cg = c * cs + (p.idx - geo.l2_index(g)) * cs;
            // QEMU's cow_start: the guest data below the old end, written
            // alone (the rest of a cluster past the end of the file stays
            // a hole, as in QEMU's file: `map` sees it).
            let copied = old.saturating_sub(cg).min(cs) as usize;
            if copied > 0 {
                let mut buf = vec![0u8; copied];
                q.old_view(p.old, cg, &mut buf, backing)?;
                q.w.write_data(&buf, dest, "copy the old end's cluster")?;
            }
            if prealloc == ResizePrealloc::Full || dest < len {
                // Full writes zeros; a cluster inside the old file may
                // hold stale bytes.
                q.w.write_data(&zeros[copied..], dest + copied as u64, "write zeros")?;
            } else if metadata && new - cg < cs {
                // QEMU extends the file to the end of the disk's data,
                // then writes zeros over the rest of the last cluster
                // (which `map` sees as data where the file system does).
                let at = (new - cg).max(copied as u64) as usize;
                q.w.write_data(&zeros[at..], dest + at as u64, "write zeros")?;
            }
        }
        q.barrier()?;
        q.update_l2(toff, &plans)?;
        c += in_table;
    }
    Ok(())
}

/// `e` (the entry of the cluster at guest `cg`) zeroed from the first
/// subcluster (cluster, without extended L2 entries) boundary after the
/// old end `old` to the end of the cluster, host cluster kept: QEMU's
/// `qcow2_subcluster_zeroize` from `qcow2_co_truncate`, which zeroes up to
/// the end of the last cluster (its request ends at the end of the image).
fn zeroed_from(e: L2Entry, geo: strata_format::Geometry, cg: u64, old: u64) -> L2Entry {
    let cs = geo.cluster_size();
    let scs = geo.subcluster_size();
    let zero_start = old.div_ceil(scs) * scs;
    if zero_start >= cg + cs {
        return e;
    }
    if !geo.extended_l2() {
        return e.with_zero_flag();
    }
    let first = (zero_start.saturating_sub(cg) / scs) as u32;
    let range = !low_bits(first);
    e.with_subclusters(e.alloc_bits() & !range, e.zero_bits() | range)
}

/// The `n` lowest bits set (n <= 32).
fn low_bits(n: u32) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// Shrinks a qcow2 image to `new_size` (a multiple of 512).
fn shrink_qcow2(q: &mut WritableImage, new_size: u64) -> Result<()> {
    q.view.refuse_bad_refblocks()?;
    q.begin_write()?;
    if q.has_live_bitmaps() {
        return Err(Error::Unsupported {
            path: q.view.path().to_path_buf(),
            what: "shrinking an image with persistent bitmaps is not supported by Strata yet \
                   (remove them with `strata bitmap --remove` first)"
                .into(),
        });
    }
    let old = q.virtual_size();
    let cs = q.view.geometry().cluster_size();
    // Whole clusters past the new end go; a partial cluster at the new
    // end keeps its data (the guest no longer sees its tail).
    let first = new_size.div_ceil(cs) * cs;
    if first < old {
        q.deallocate(first, old - first)?;
    }
    q.flush()?;
    q.view.header_mut().set_size(new_size);
    q.write_header()?;
    q.sync()?;
    q.flush()?;
    truncate_tail(q)?;
    // An external data file shrinks with the disk (qcow2/data_file.rs).
    q.data_file_resized(old, new_size)
}

/// Cuts the file after its last cluster in use, as QEMU does after a
/// shrink (the freed clusters at the end of the file go back to the file
/// system). Called after the header and the frees are durable: every
/// cluster past the cut has refcount 0 and nothing points at it.
fn truncate_tail(q: &mut WritableImage) -> Result<()> {
    let cs = q.view.geometry().cluster_size();
    let path = q.view.path().to_path_buf();
    let len = q
        .view
        .storage()
        .len()
        .map_err(|e| Error::io(&path, "stat", 0, e))?;
    let mut end = len.div_ceil(cs);
    {
        while end > 0 && q.w.refcount(end - 1)? == 0 {
            end -= 1;
        }
    }
    let cut = end * cs;
    if cut < len {
        q.view
            .storage()
            .set_len(cut)
            .map_err(|e| Error::io(&path, "truncate the tail", cut, e))?;
        q.sync()?;
    }
    Ok(())
}
