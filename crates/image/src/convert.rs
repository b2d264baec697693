//! Copying a chain's guest view into a new image (`convert`).

use std::path::Path;

use crate::chain::{Chain, Image, ImageFormat};
use crate::create::{create_qcow2, create_raw, CreateOptions, NewImageFile};
use crate::error::{Error, Result};
use crate::storage::FileStorage;

/// Bytes read from the source per step (bounds memory).
pub const CONVERT_WINDOW: u64 = 4 << 20;
/// Granularity at which zero blocks are detected and left sparse (as
/// qemu-img convert's default `-S 4k`).
pub const SPARSE_BLOCK: usize = 4096;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Format of the new image.
    pub format: ImageFormat,
    /// qcow2 options (the size is taken from the source).
    pub create: CreateOptions,
    /// Compress data clusters (qcow2 only).
    pub compress: bool,
    /// Copy the top image's persistent dirty bitmaps (qcow2 to qcow2,
    /// as `qemu-img convert --bitmaps`).
    pub bitmaps: bool,
}

/// Writes the guest view of `src` into a new image at `dst`, which replaces
/// the file at `dst` (if any) only once complete, under its write lock
/// ([`NewImageFile`]): a convert that fails leaves `dst` as it was.
/// Ranges that read as zeros are not written (the new image reads zeros
/// there anyway). `progress(done, total)` is called per step.
pub fn convert(
    src: &Chain,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if opts.compress && opts.format != ImageFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "compression (-c) needs a qcow2 target".into(),
        ));
    }
    if opts.bitmaps {
        source_bitmaps(src, opts.format)?;
    }
    if opts.format == ImageFormat::Qcow2 {
        let mut c = opts.create.clone();
        c.size = src.virtual_size();
        c.backing = None;
        crate::create::check_qcow2_options(dst, &c)?;
    }
    let new = NewImageFile::begin(dst)?;
    convert_into(src, new.storage()?, dst, opts, progress)?;
    new.commit()
}

/// [`convert`] into `storage` (an empty file; `dst` names it in errors).
pub fn convert_into(
    src: &Chain,
    storage: FileStorage,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = src.virtual_size();
    if opts.compress && opts.format != ImageFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "compression (-c) needs a qcow2 target".into(),
        ));
    }
    let bitmaps = if opts.bitmaps {
        source_bitmaps(src, opts.format)?
    } else {
        Vec::new()
    };
    let mut target = match opts.format {
        ImageFormat::Raw => {
            create_raw(&storage, dst, size)?;
            Image::Raw(crate::raw::RawImage::open(Box::new(storage), dst)?)
        }
        ImageFormat::Qcow2 => {
            let mut c = opts.create.clone();
            c.size = size;
            c.backing = None;
            Image::Qcow2(create_qcow2(Box::new(storage), dst, &c)?)
        }
    };
    let cs = match &target {
        Image::Qcow2(q) => q.geometry().cluster_size() as usize,
        Image::Raw(_) => SPARSE_BLOCK,
    };
    let block = if opts.compress {
        cs
    } else {
        cs.min(SPARSE_BLOCK)
    };
    let no_backing = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    let mut buf = vec![0u8; CONVERT_WINDOW as usize];
    let mut pos = 0u64;
    while pos < size {
        let len = (size - pos).min(CONVERT_WINDOW);
        progress(pos, size);
        // Skip what reads as zeros without reading it.
        let r = src.resolve(pos, len)?;
        let reads_zero =
            r.past_end || !r.extent.mapping.is_allocated() || r.extent.mapping.is_zero();
        // Compressed writes need cluster-aligned windows: skip whole clusters.
        let skip = if opts.compress {
            (pos + r.extent.len) / cs as u64 * cs as u64 - pos
        } else {
            r.extent.len
        };
        if reads_zero && skip > 0 {
            pos += skip;
            continue;
        }
        let win = &mut buf[..len as usize];
        src.read_at(win, pos)?;
        // Write runs of nonzero blocks.
        let mut i = 0usize;
        while i < win.len() {
            let end = (i + block).min(win.len());
            if win[i..end].iter().all(|b| *b == 0) {
                i = end;
                continue;
            }
            let mut j = end;
            while j < win.len() {
                let e = (j + block).min(win.len());
                if win[j..e].iter().all(|b| *b == 0) {
                    break;
                }
                j = e;
            }
            let at = pos + i as u64;
            match &mut target {
                Image::Raw(r) => r.write(&win[i..j], at)?,
                Image::Qcow2(q) if opts.compress => {
                    let mut chunk = win[i..j].to_vec();
                    chunk.resize(chunk.len().div_ceil(cs) * cs, 0);
                    q.write_compressed(at, &chunk, &no_backing)?
                }
                Image::Qcow2(q) => q.write(at, &win[i..j], &no_backing)?,
            }
            i = j;
        }
        pos += len;
    }
    match &mut target {
        Image::Raw(r) => r.flush()?,
        Image::Qcow2(q) => q.flush()?,
    }
    // The bitmaps, after the data (whose writes must not mark them).
    if let Image::Qcow2(q) = &mut target {
        for (b, bits) in &bitmaps {
            q.edit_bitmap(
                &b.name,
                crate::bitmap::BitmapEdit::Add {
                    granularity: Some(b.granularity),
                    disabled: !b.auto,
                },
            )?;
            q.edit_bitmap(&b.name, crate::bitmap::BitmapEdit::Merge(bits))?;
        }
        q.flush()?;
    }
    progress(size, size);
    Ok(())
}

/// The top image's bitmaps and their bits, for `--bitmaps`; QEMU's
/// refusals (a raw side, an inconsistent bitmap) before anything is
/// written.
fn source_bitmaps(
    src: &Chain,
    format: ImageFormat,
) -> Result<Vec<(crate::bitmap::BitmapInfo, crate::bitmap::DirtyBitmap)>> {
    if format != ImageFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "Format driver 'raw' does not support bitmaps".into(),
        ));
    }
    let Some(q) = src.top().image.as_qcow2() else {
        return Err(Error::InvalidArgument("Source lacks bitmap support".into()));
    };
    let mut out = Vec::new();
    for b in q.bitmaps()? {
        if b.in_use {
            return Err(Error::InvalidArgument(format!(
                "Failed to populate bitmap {0}: Bitmap '{0}' is inconsistent and cannot be used",
                b.name
            )));
        }
        let bits = q.dirty_bitmap(&b.name)?;
        out.push((b, bits));
    }
    Ok(out)
}
