//! The persistent dirty bitmaps' names, granularities and flags, for
//! `info`.
//!
//! Stop-gap: strata-format does not parse the bitmap directory yet, so the
//! CLI reads the few fields `qemu-img info` shows, with every length
//! checked against the extension and the file. Replace with the format
//! crate's parser when it lands.

use anyhow::{bail, Context, Result};
use strata_format::header::AUTOCLEAR_BITMAPS;
use strata_image::Qcow2Image;

/// QEMU's limit on the bitmap directory size (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// QEMU's limit on the number of bitmaps (QCOW2_MAX_BITMAPS).
const MAX_BITMAPS: u32 = 65535;
/// Fixed part of a directory entry.
const ENTRY_FIXED: usize = 24;
/// Flag bit: the bitmap was not saved cleanly.
const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit: the bitmap is enabled (tracks writes).
const FLAG_AUTO: u32 = 1 << 1;

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

/// The image's bitmaps, or `None` when it has none (or QEMU would ignore
/// them because the autoclear bit was cleared by a program without bitmap
/// support).
pub fn bitmap_infos(q: &Qcow2Image) -> Result<Option<Vec<BitmapInfo>>> {
    let h = q.header();
    let Some((nb, dir_size, dir_offset)) = h.bitmaps() else {
        return Ok(None);
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || nb == 0 {
        return Ok(None);
    }
    let path = q.path().display();
    if nb > MAX_BITMAPS || dir_size > MAX_DIRECTORY_BYTES {
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
    parse_directory(&dir, nb)
        .map(Some)
        .map_err(|what| anyhow::anyhow!("{path}: invalid bitmap directory: {what}"))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Parses `nb` directory entries.
fn parse_directory(dir: &[u8], nb: u32) -> std::result::Result<Vec<BitmapInfo>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..nb {
        let trunc = || format!("entry {i} at byte {at} truncated");
        let flags = be32(dir, at + 12).ok_or_else(trunc)?;
        let gran_bits = u32::from(*dir.get(at + 17).ok_or_else(trunc)?);
        let name_size = usize::from(be16(dir, at + 18).ok_or_else(trunc)?);
        let extra = be32(dir, at + 20).ok_or_else(trunc)? as usize;
        if gran_bits > 63 {
            return Err(format!("entry {i}: granularity 2^{gran_bits} too large"));
        }
        let name_at = at + ENTRY_FIXED + extra;
        let name = dir.get(name_at..name_at + name_size).ok_or_else(trunc)?;
        let mut f = Vec::new();
        if flags & FLAG_IN_USE != 0 {
            f.push("in-use");
        }
        if flags & FLAG_AUTO != 0 {
            f.push("auto");
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1u64 << gran_bits,
            flags: f,
        });
        at = (name_at + name_size).div_ceil(8) * 8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_entries() {
        let mut d = Vec::new();
        for (name, flags, gbits) in [("bm0", 2u32, 16u8), ("b1", 0, 17)] {
            d.extend_from_slice(&0x30000u64.to_be_bytes()); // bitmap table offset
            d.extend_from_slice(&1u32.to_be_bytes()); // table size
            d.extend_from_slice(&flags.to_be_bytes());
            d.push(1); // type: dirty tracking
            d.push(gbits);
            d.extend_from_slice(&(name.len() as u16).to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes()); // extra data size
            d.extend_from_slice(name.as_bytes());
            d.resize(d.len().div_ceil(8) * 8, 0);
        }
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!(v[0].name, "bm0");
        assert_eq!(v[0].granularity, 65536);
        assert_eq!(v[0].flags, ["auto"]);
        assert_eq!(v[1].name, "b1");
        assert_eq!(v[1].granularity, 131072);
        assert!(v[1].flags.is_empty());
    }

    #[test]
    fn truncated_directories_are_errors() {
        assert!(parse_directory(&[0u8; 10], 1).is_err());
        assert!(parse_directory(&[0u8; 24], 2).is_err());
    }
}
