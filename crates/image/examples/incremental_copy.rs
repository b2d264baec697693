//! An incremental copy of a backing chain: what the top `LAYERS` images
//! of the chain hold (data, and ranges they made read as zeros) is written
//! into a raw copy that already holds the guest view of the layers below,
//! so that it then holds the guest view of the whole chain. With `LAYERS`
//! equal to the chain's length (the default), every allocated range is
//! copied: a full copy into a new file.
//!
//! ```text
//! cargo run -p strata-image --example incremental_copy -- TOP DEST.raw [LAYERS]
//! ```
//!
//! For example, after `qemu-img convert -O raw base.qcow2 backup.raw`,
//! `incremental_copy top.qcow2 backup.raw 1` brings `backup.raw` up to
//! the guest view of `top.qcow2` (whose backing file is `base.qcow2`),
//! reading only what `top.qcow2` allocates.
//!
//! It walks the chain's extents with `Chain::block_status` (which layer
//! answers for each range, as `qemu-img map` reports it).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use strata_image::{Chain, FileStorage, OpenOptions, Storage};

/// What [`incremental_copy`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of data read from the chain and written.
    pub data_bytes: u64,
    /// Bytes written as zeros (ranges the top layers made read as zeros).
    pub zero_bytes: u64,
}

/// Copies into `dest` (a raw file, created or grown to the chain's virtual
/// size) every range that one of the top `layers` layers of `top`'s chain
/// allocates, as the chain reads it; everything else in `dest` is left as
/// it is. The chain is opened read-only, sharing locks as `qemu-img -U`
/// does (a running VM may hold it).
pub fn incremental_copy(
    top: &Path,
    dest: &Path,
    layers: Option<usize>,
) -> Result<CopyStats, String> {
    let opts = OpenOptions::new().force_share(true);
    let chain = Chain::open(top, &opts).map_err(|e| e.to_string())?;
    let layers = layers.unwrap_or(chain.layers().len());
    let out = FileStorage::open(dest, true)
        .or_else(|_| FileStorage::create(dest))
        .map_err(|e| format!("{}: open: {e}", dest.display()))?;
    let size = chain.virtual_size();
    if out.len().map_err(|e| format!("{}: {e}", dest.display()))? < size {
        out.set_len(size)
            .map_err(|e| format!("{}: resize: {e}", dest.display()))?;
    }
    const STEP: u64 = 4 << 20;
    let mut buf = vec![0u8; STEP as usize];
    let mut stats = CopyStats::default();
    for extent in chain.block_status(0, size) {
        let e = extent.map_err(|e| e.to_string())?;
        // Only what the top `layers` layers allocate (data or zeros);
        // the rest is in an earlier backup, or nobody wrote it.
        if e.layer.is_none_or(|l| l >= layers) {
            continue;
        }
        let mut pos = e.start;
        while pos < e.end() {
            let len = (e.end() - pos).min(STEP);
            let chunk = &mut buf[..len as usize];
            if e.zero {
                chunk.fill(0);
                stats.zero_bytes += len;
            } else {
                chain.read_at(chunk, pos).map_err(|e| e.to_string())?;
                stats.data_bytes += len;
            }
            out.write_at(chunk, pos)
                .map_err(|e| format!("{}: write at {pos:#x}: {e}", dest.display()))?;
            pos += len;
        }
    }
    out.sync()
        .map_err(|e| format!("{}: sync: {e}", dest.display()))?;
    Ok(stats)
}

#[allow(dead_code)] // the tests include this file for incremental_copy alone
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(top), Some(dest)) = (args.first(), args.get(1)) else {
        eprintln!("usage: incremental_copy TOP DEST.raw [LAYERS]");
        return ExitCode::from(2);
    };
    let layers = match args.get(2).map(|n| n.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            eprintln!("incremental_copy: LAYERS: {e}");
            return ExitCode::from(2);
        }
    };
    match incremental_copy(&PathBuf::from(top), &PathBuf::from(dest), layers) {
        Ok(s) => {
            println!(
                "copied {} bytes of data, {} bytes of zeros",
                s.data_bytes, s.zero_bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("incremental_copy: {e}");
            ExitCode::FAILURE
        }
    }
}
