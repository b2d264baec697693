//! `resize`: change an image's virtual size as `qemu-img resize` does.
//!
//! Growing a qcow2 image is [`Qcow2Image::resize`] (a larger L1 table
//! when needed, bitmaps grown, the new area unallocated). Shrinking is
//! done here: the whole clusters past the new end are deallocated (their
//! host clusters freed, shared ones kept for the internal snapshots that
//! still use them), then the header's size is changed. Like QEMU, the L1
//! table keeps its size (a larger table than the size needs is valid).
//! Images with persistent bitmaps are not shrunk by Strata yet.

use crate::chain::{Chain, Image};
use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;

/// Why a resize was refused before anything was written (the CLI turns
/// these into qemu-img's messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResizeRefusal {
    /// The new size is smaller and shrinking was not allowed.
    ShrinkNotAllowed,
    /// A qcow2 size must be a multiple of 512 bytes.
    NotSectorMultiple,
}

/// Checks a resize of the chain's top image to `new_size` before any
/// write: `None` when it may go ahead.
pub fn resize_refusal(chain: &Chain, new_size: u64, shrink: bool) -> Option<ResizeRefusal> {
    let top = &chain.top().image;
    if matches!(top, Image::Qcow2(_)) && !new_size.is_multiple_of(512) {
        return Some(ResizeRefusal::NotSectorMultiple);
    }
    if new_size < top.virtual_size() && !shrink {
        return Some(ResizeRefusal::ShrinkNotAllowed);
    }
    None
}

/// Resizes the top image of a writable chain to `new_size` (grow or,
/// with `shrink`, shrink), as `qemu-img resize [--shrink]`.
pub fn resize_chain(chain: &mut Chain, new_size: u64, shrink: bool) -> Result<()> {
    match resize_refusal(chain, new_size, shrink) {
        Some(ResizeRefusal::ShrinkNotAllowed) => {
            return Err(Error::InvalidArgument(
                "Use the --shrink option to perform a shrink operation.".into(),
            ))
        }
        Some(ResizeRefusal::NotSectorMultiple) => {
            return Err(Error::InvalidArgument(
                "The new size must be a multiple of 512".into(),
            ))
        }
        None => {}
    }
    let layers = chain.layers_mut();
    let top = match layers.first_mut() {
        Some(l) => &mut l.image,
        None => return Err(Error::InvalidArgument("empty chain".into())),
    };
    match top {
        Image::Raw(r) => r.truncate(new_size),
        Image::Qcow2(q) => {
            if new_size < q.virtual_size() {
                shrink_qcow2(q, new_size)
            } else {
                q.resize(new_size)?;
                q.flush()
            }
        }
    }
}

/// Shrinks a qcow2 image to `new_size` (a multiple of 512).
fn shrink_qcow2(q: &mut Qcow2Image, new_size: u64) -> Result<()> {
    q.begin_write()?;
    if q.has_live_bitmaps() {
        return Err(Error::Unsupported {
            path: q.path().to_path_buf(),
            what: "shrinking an image with persistent bitmaps is not supported by Strata yet \
                   (remove them with `strata bitmap --remove` first)"
                .into(),
        });
    }
    let old = q.virtual_size();
    let cs = q.geometry().cluster_size();
    // Whole clusters past the new end go; a partial cluster at the new
    // end keeps its data (the guest no longer sees its tail).
    let first = new_size.div_ceil(cs) * cs;
    if first < old {
        q.deallocate(first, old - first)?;
    }
    q.flush()?;
    q.header.size = new_size;
    q.write_header()?;
    q.sync()?;
    q.flush()
}
