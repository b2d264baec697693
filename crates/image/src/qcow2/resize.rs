//! `resize`: change an image's virtual size as `qemu-img resize` does.
//!
//! Growing a qcow2 image is [`Qcow2Image::resize`](crate::Qcow2Image::resize) (a larger L1 table
//! when needed, bitmaps grown, the new area unallocated); when the
//! backing file is longer than the old size, the new area is then made to
//! read as zeros, as QEMU's `bdrv_co_truncate` does (`BDRV_REQ_ZERO_WRITE`:
//! explicit zeros for the partial cluster at the old end, zero clusters
//! after it), so that the backing file's tail does not show through.
//! `--preallocation=full`/`falloc` write zeros over the new area (data
//! clusters, or file blocks for raw); `metadata` is refused (raw has no
//! metadata, as in QEMU; for qcow2 Strata does not do it yet). Shrinking is
//! done here: the whole clusters past the new end are deallocated (their
//! host clusters freed, shared ones kept for the internal snapshots that
//! still use them), then the header's size is changed. Like QEMU, the L1
//! table keeps its size (a larger table than the size needs is valid),
//! and the file is cut after its last cluster in use.
//! Images with persistent bitmaps are not shrunk by Strata yet.

use crate::chain::{Chain, Image};
use crate::error::{Error, Result};
use crate::qcow2::WritableImage;

/// `--preallocation` of the area a resize adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ResizePrealloc {
    /// Nothing allocated.
    #[default]
    Off,
    /// qcow2: the new clusters allocated, reading as zeros (refused:
    /// not done yet).
    Metadata,
    /// Blocks allocated (done as `Full`: zeros written).
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
    /// qcow2 `metadata` preallocation of the new area: not done by
    /// Strata yet.
    PreallocNotYet,
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
            ResizeRefusal::PreallocNotYet => {
                "--preallocation=metadata is not supported by Strata's resize yet \
                 (use off, falloc or full)"
            }
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
    if prealloc == ResizePrealloc::Metadata {
        return Some(if qcow2 {
            ResizeRefusal::PreallocNotYet
        } else {
            ResizeRefusal::PreallocUnsupported
        });
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
    let top = match chain.layers_mut().first_mut() {
        Some(l) => &mut l.image,
        None => return Err(Error::InvalidArgument("empty chain".into())),
    };
    let qcow2 = matches!(top, Image::Qcow2(_));
    match top {
        Image::Raw(r) => r.truncate(new_size)?,
        Image::Qcow2(q) if new_size < old => return shrink_qcow2(q.writable()?, new_size),
        Image::Qcow2(q) => {
            q.resize(new_size)?;
            q.flush()?;
        }
    }
    if new_size <= old {
        return chain.flush();
    }
    match prealloc {
        ResizePrealloc::Off => {
            if qcow2 && backing_len.is_some_and(|b| b > old) {
                chain.write_zeroes(old, new_size - old, true)?;
            }
        }
        ResizePrealloc::Falloc | ResizePrealloc::Full => write_zeros(chain, old, new_size)?,
        // Refused above.
        ResizePrealloc::Metadata => {}
    }
    chain.flush()
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
