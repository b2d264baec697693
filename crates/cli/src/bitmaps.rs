//! The persistent dirty bitmaps' names, granularities and flags, as
//! `qemu-img info` lists them.

use anyhow::{bail, Context, Result};
use strata_format::bitmap::{parse_directory, MAX_BITMAPS, MAX_DIRECTORY_SIZE};
use strata_format::header::Autoclear;
use strata_image::Qcow2Image;

/// One bitmap as qemu-img info lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// "in-use" and/or "auto", in that order.
    pub flags: Vec<&'static str>,
}

/// The image's bitmaps, or `None` when it has none, or when QEMU would
/// ignore them because the bitmaps autoclear bit was cleared (by a program
/// without bitmap support).
pub fn bitmap_infos(q: &Qcow2Image) -> Result<Option<Vec<BitmapInfo>>> {
    let h = q.header();
    let Some((nb, dir_size, dir_offset)) = h.bitmaps() else {
        return Ok(None);
    };
    if !h.autoclear_features().contains(Autoclear::BITMAPS) || nb == 0 {
        return Ok(None);
    }
    let path = q.path().display();
    if nb > MAX_BITMAPS || dir_size > MAX_DIRECTORY_SIZE {
        bail!("{path}: bitmap directory too large ({nb} bitmaps, {dir_size} bytes)");
    }
    let file_len = q.storage().len().with_context(|| format!("{path}: stat"))?;
    if dir_offset
        .checked_add(dir_size)
        .is_none_or(|e| e > file_len)
    {
        bail!("{path}: bitmap directory at {dir_offset:#x} extends past the end of the file");
    }
    let mut dir = vec![0u8; dir_size as usize];
    q.storage()
        .read_at(&mut dir, dir_offset)
        .with_context(|| format!("{path}: read bitmap directory at {dir_offset:#x}"))?;
    let entries = parse_directory(&dir, nb, dir_offset)
        .map_err(|e| anyhow::anyhow!("{path}: invalid bitmap directory: {e}"))?;
    Ok(Some(
        entries
            .into_iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.in_use() {
                    flags.push("in-use");
                }
                if e.auto() {
                    flags.push("auto");
                }
                BitmapInfo {
                    granularity: e.granularity(),
                    name: e.name,
                    flags,
                }
            })
            .collect(),
    ))
}
