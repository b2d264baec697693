//! The bitmaps extension: bitmap directory entries and bitmap table
//! entries (persistent dirty bitmaps).
//!
//! The layout and the constraints follow `docs/interop/qcow2.rst`
//! ("Bitmaps") and the checks QEMU applies when it loads a bitmap
//! directory (`block/qcow2-bitmap.c`: `bitmap_list_load`,
//! `check_dir_entry`, `check_table_entry`). [`parse_directory`] splits the
//! directory into entries and checks its structure; [`BitmapDirEntry::validate`]
//! applies QEMU's per-entry constraints; [`BitmapTableEntry::parse`]
//! decodes one bitmap table entry.

use crate::error::{FormatError, Result};

/// Largest number of bitmaps in one image (QEMU's QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory, in bytes (QEMU's
/// QCOW2_MAX_BITMAP_DIRECTORY_SIZE: 1024 bytes per bitmap).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Largest bitmap table, in entries (QEMU's BME_MAX_TABLE_SIZE).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Largest bitmap data a table may describe, in bytes
/// (QEMU's BME_MAX_PHYS_SIZE).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest granularity_bits (one bit per 512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity_bits (one bit per 2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name, in bytes.
pub const MAX_NAME_SIZE: u16 = 1023;
/// Length of the fixed part of a directory entry.
pub const ENTRY_FIXED_LEN: usize = 24;
/// Size of one bitmap table entry.
pub const TABLE_ENTRY_SIZE: u64 = 8;

/// Flag bit 0: the bitmap was in use and was not saved cleanly; its data
/// is inconsistent.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap must track writes (it is enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bits no version of the format defines.
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);

/// The only bitmap type: a dirty tracking bitmap.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Reserved bits of a bitmap table entry (bits 1-8 and 56-63).
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset bits (9-55) of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry whose offset is 0: the cluster's bits
/// are all ones (all zeros when clear).
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirEntry {
    /// Offset into the image file at which the bitmap table starts. Must be
    /// aligned to a cluster boundary.
    pub table_offset: u64,
    /// Number of entries in the bitmap table.
    pub table_size: u32,
    /// Flags: bit 0 in_use, bit 1 auto; the rest are reserved.
    pub flags: u32,
    /// Bitmap type (1: dirty tracking bitmap; others are reserved).
    pub kind: u8,
    /// Granularity = 1 << granularity_bits: bytes of guest data per bit.
    pub granularity_bits: u8,
    /// Extra data of the entry (no version of the format defines any).
    pub extra_data: Vec<u8>,
    /// The bitmap's name, as stored (not NUL terminated on disk).
    pub name: String,
    /// Byte offset of the entry inside the directory.
    pub dir_offset: u64,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Length of a directory entry with the given name and extra data sizes,
/// padding to 8 bytes included.
pub fn entry_len(name_size: u16, extra_data_size: u32) -> u64 {
    (ENTRY_FIXED_LEN as u64 + u64::from(name_size) + u64::from(extra_data_size)).div_ceil(8) * 8
}

/// Appends one directory entry (no extra data), padded to 8 bytes, to
/// `out`. `name` must be at most [`MAX_NAME_SIZE`] bytes (longer names are
/// cut there).
pub fn encode_entry(
    out: &mut Vec<u8>,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
    name: &[u8],
) {
    let name = name.get(..usize::from(MAX_NAME_SIZE)).unwrap_or(name);
    let start = out.len();
    out.extend_from_slice(&table_offset.to_be_bytes()); // bitmap_table_offset
    out.extend_from_slice(&table_size.to_be_bytes()); // bitmap_table_size
    out.extend_from_slice(&flags.to_be_bytes()); // flags
    out.push(TYPE_DIRTY_TRACKING); // type
    out.push(granularity_bits); // granularity_bits
    out.extend_from_slice(&(name.len() as u16).to_be_bytes()); // name_size
    out.extend_from_slice(&0u32.to_be_bytes()); // extra_data_size
    out.extend_from_slice(name);
    let len = out.len() - start;
    out.resize(start + len.div_ceil(8) * 8, 0);
}

impl BitmapDirEntry {
    /// Whether the in_use flag is set (the data is inconsistent).
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Whether the auto flag is set (the bitmap is enabled).
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// Bytes of guest data one bit covers.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }
    /// Byte length of the bitmap table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * TABLE_ENTRY_SIZE
    }

    /// QEMU's constraints on a directory entry (`check_dir_entry`, plus
    /// the refusal of extra data in `bitmap_list_load`), for an image with
    /// `cluster_size`-byte clusters and a `virtual_size`-byte disk.
    /// `base` is the directory's offset in the file (for the error).
    pub fn validate(&self, cluster_size: u64, virtual_size: u64, base: u64) -> Result<()> {
        let at = base.saturating_add(self.dir_offset);
        let fail = |what| Err(FormatError::with_detail(what, at, self.name.clone()));
        if !self.extra_data.is_empty() {
            return fail("bitmap extra data is not supported");
        }
        if self.table_size == 0 || self.table_offset == 0 {
            return fail("bitmap has no bitmap table");
        }
        if cluster_size == 0 || !self.table_offset.is_multiple_of(cluster_size) {
            return fail("bitmap table offset not aligned to the cluster size");
        }
        if self.table_size > MAX_TABLE_SIZE {
            return fail("bitmap table too large");
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return fail("bitmap granularity_bits out of range (9..=31)");
        }
        if self.flags & RESERVED_FLAGS != 0 {
            return fail("bitmap has reserved flags set");
        }
        if self.name.len() > usize::from(MAX_NAME_SIZE) {
            return fail("bitmap name longer than 1023 bytes");
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return fail("unknown bitmap type");
        }
        let phys = u64::from(self.table_size).saturating_mul(cluster_size);
        if phys > MAX_PHYS_SIZE {
            return fail("bitmap data too large");
        }
        // A consistent bitmap must cover the whole disk; an in-use one may
        // be stale (saved before a resize).
        // phys <= 2^29 and granularity_bits <= 31: at most 2^63, no overflow.
        let covered = (phys * 8) << self.granularity_bits;
        if !self.in_use() && virtual_size > covered {
            return fail("bitmap table too small for the disk size");
        }
        Ok(())
    }
}

/// Parses the bitmap directory held in `dir` (exactly the directory's
/// bytes), which must contain exactly `nb_bitmaps` entries that end
/// exactly at the end of `dir`. `base` is the directory's offset in the
/// image file, used in errors.
///
/// This checks the structure only; apply [`BitmapDirEntry::validate`] to
/// each entry for QEMU's constraints on the values.
pub fn parse_directory(dir: &[u8], nb_bitmaps: u32, base: u64) -> Result<Vec<BitmapDirEntry>> {
    if dir.is_empty() {
        return Err(FormatError::new("bitmap directory is empty", base));
    }
    if dir.len() as u64 > MAX_DIRECTORY_SIZE {
        return Err(FormatError::new("bitmap directory too large", base));
    }
    if nb_bitmaps > MAX_BITMAPS {
        return Err(FormatError::new("too many bitmaps", base));
    }
    // Each entry takes at least 24 bytes: the count is bounded by the
    // directory length, itself bounded above.
    let mut out = Vec::with_capacity((nb_bitmaps as usize).min(dir.len() / ENTRY_FIXED_LEN));
    let mut at = 0usize;
    while at < dir.len() {
        let here = base.saturating_add(at as u64);
        let broken = || FormatError::new("broken bitmap directory", here);
        let fixed = dir
            .get(at..at.checked_add(ENTRY_FIXED_LEN).ok_or_else(broken)?)
            .ok_or_else(broken)?;
        if out.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(FormatError::new(
                "more bitmaps found than the bitmaps extension says",
                here,
            ));
        }
        let table_offset = be64(fixed, 0).ok_or_else(broken)?;
        let table_size = be32(fixed, 8).ok_or_else(broken)?;
        let flags = be32(fixed, 12).ok_or_else(broken)?;
        let kind = *fixed.get(16).ok_or_else(broken)?;
        let granularity_bits = *fixed.get(17).ok_or_else(broken)?;
        let name_size = be16(fixed, 18).ok_or_else(broken)?;
        let extra_data_size = be32(fixed, 20).ok_or_else(broken)?;
        let len = usize::try_from(entry_len(name_size, extra_data_size)).map_err(|_| broken())?;
        let end = at
            .checked_add(len)
            .filter(|e| *e <= dir.len())
            .ok_or_else(broken)?;
        let extra_start = at + ENTRY_FIXED_LEN;
        let extra_end = extra_start + extra_data_size as usize;
        let name_end = extra_end + usize::from(name_size);
        let extra_data = dir.get(extra_start..extra_end).ok_or_else(broken)?.to_vec();
        let raw_name = dir.get(extra_end..name_end).ok_or_else(broken)?;
        // QEMU copies the name with g_strndup: it stops at a NUL byte.
        let n = raw_name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(raw_name.len());
        let name = String::from_utf8_lossy(raw_name.get(..n).unwrap_or_default()).into_owned();
        out.push(BitmapDirEntry {
            table_offset,
            table_size,
            flags,
            kind,
            granularity_bits,
            extra_data,
            name,
            dir_offset: at as u64,
        });
        at = end;
    }
    if out.len() as u64 != u64::from(nb_bitmaps) {
        return Err(FormatError::new(
            "fewer bitmaps found than the bitmaps extension says",
            base,
        ));
    }
    Ok(out)
}

/// One entry of a bitmap table: what one cluster's worth of bitmap holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapTableEntry {
    /// Offset 0, bit 0 clear: all bits of the cluster are zero.
    AllZeros,
    /// Offset 0, bit 0 set: all bits of the cluster are one.
    AllOnes,
    /// The bitmap data is stored in the cluster at this host offset.
    Data(u64),
}

impl BitmapTableEntry {
    /// Decodes a bitmap table entry, with QEMU's checks
    /// (`check_table_entry`): no reserved bits, a cluster-aligned offset,
    /// and bit 0 clear when there is an offset. `at` locates the entry in
    /// errors.
    pub fn parse(raw: u64, cluster_size: u64, at: u64) -> Result<BitmapTableEntry> {
        if raw & TABLE_ENTRY_RESERVED_MASK != 0 {
            return Err(FormatError::with_detail(
                "bitmap table entry has reserved bits set",
                at,
                format!("{raw:#x}"),
            ));
        }
        match raw & TABLE_ENTRY_OFFSET_MASK {
            0 if raw & TABLE_ENTRY_ALL_ONES != 0 => Ok(BitmapTableEntry::AllOnes),
            0 => Ok(BitmapTableEntry::AllZeros),
            _ if raw & TABLE_ENTRY_ALL_ONES != 0 => Err(FormatError::with_detail(
                "bitmap table entry has both an offset and the all-ones bit",
                at,
                format!("{raw:#x}"),
            )),
            o if cluster_size == 0 || !o.is_multiple_of(cluster_size) => {
                Err(FormatError::with_detail(
                    "bitmap data cluster not aligned to the cluster size",
                    at,
                    format!("{raw:#x}"),
                ))
            }
            o => Ok(BitmapTableEntry::Data(o)),
        }
    }

    /// The host offset of the data cluster, if any.
    pub fn data_offset(self) -> Option<u64> {
        match self {
            BitmapTableEntry::Data(o) => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory entry: table at `off` with `size` entries, flags,
    /// granularity 16 (64 KiB), name `name`, no extra data.
    fn entry(off: u64, size: u32, flags: u32, name: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&off.to_be_bytes()); // bitmap_table_offset
        e.extend_from_slice(&size.to_be_bytes()); // bitmap_table_size
        e.extend_from_slice(&flags.to_be_bytes()); // flags
        e.push(1); // type: dirty tracking
        e.push(16); // granularity_bits
        e.extend_from_slice(&(name.len() as u16).to_be_bytes()); // name_size
        e.extend_from_slice(&0u32.to_be_bytes()); // extra_data_size
        e.extend_from_slice(name);
        e.resize(e.len().div_ceil(8) * 8, 0); // padding to 8
        e
    }

    #[test]
    fn parses_two_entries_with_padding() {
        let mut dir = entry(0x50000, 1, FLAG_AUTO, b"b0");
        assert_eq!(dir.len(), 32);
        dir.extend(entry(0x60000, 1, FLAG_IN_USE | FLAG_AUTO, b"longer-name"));
        let es = parse_directory(&dir, 2, 0x70000).unwrap();
        assert_eq!(es.len(), 2);
        assert_eq!(es[0].name, "b0");
        assert_eq!(es[0].table_offset, 0x50000);
        assert!(es[0].auto() && !es[0].in_use());
        assert_eq!(es[0].granularity(), 65536);
        assert_eq!(es[1].name, "longer-name");
        assert_eq!(es[1].dir_offset, 32);
        assert!(es[1].in_use());
        for e in &es {
            e.validate(65536, 1 << 30, 0x70000).unwrap();
        }
    }

    #[test]
    fn encoded_entries_parse_back() {
        let mut dir = Vec::new();
        encode_entry(&mut dir, 0x50000, 1, FLAG_AUTO, 16, b"b0");
        encode_entry(&mut dir, 0x60000, 2, 0, 9, b"longer-name");
        let es = parse_directory(&dir, 2, 0).unwrap();
        assert_eq!(
            dir,
            [entry(0x50000, 1, FLAG_AUTO, b"b0"), {
                let mut e = entry(0x60000, 2, 0, b"longer-name");
                e[17] = 9;
                e
            }]
            .concat()
        );
        assert_eq!(es[1].granularity_bits, 9);
        assert_eq!(es[1].table_size, 2);
    }

    #[test]
    fn count_mismatches_and_truncation_are_errors() {
        let dir = entry(0x50000, 1, 0, b"b0");
        assert!(parse_directory(&dir, 2, 0).is_err());
        assert!(parse_directory(&dir, 0, 0).is_err());
        assert!(parse_directory(&dir[..20], 1, 0).is_err());
        assert!(parse_directory(&dir[..28], 1, 0).is_err());
        assert!(parse_directory(&[], 1, 0).is_err());
        // A name_size that reaches past the directory.
        let mut lying = dir.clone();
        lying[18..20].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(parse_directory(&lying, 1, 0).is_err());
        // Trailing bytes after the last entry.
        let mut trailing = dir;
        trailing.extend_from_slice(&[0u8; 8]);
        assert!(parse_directory(&trailing, 1, 0).is_err());
    }

    #[test]
    fn huge_counts_allocate_nothing_before_failing() {
        let mut dir = entry(0x50000, 1, 0, b"b0");
        dir[20..24].copy_from_slice(&u32::MAX.to_be_bytes()); // extra_data_size
        assert!(parse_directory(&dir, MAX_BITMAPS, 0).is_err());
        assert!(parse_directory(&dir, u32::MAX, 0).is_err());
    }

    #[test]
    fn qemu_constraints_are_enforced_by_validate() {
        let ok = &parse_directory(&entry(0x50000, 1, 0, b"x"), 1, 0).unwrap()[0];
        ok.validate(65536, 1 << 30, 0).unwrap();
        let mut e = ok.clone();
        e.granularity_bits = 8;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        e.granularity_bits = 32;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        let mut e = ok.clone();
        e.table_offset = 0x50200;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        let mut e = ok.clone();
        e.flags = 4;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        let mut e = ok.clone();
        e.kind = 2;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        let mut e = ok.clone();
        e.table_size = 0;
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        let mut e = ok.clone();
        e.extra_data = vec![0; 8];
        assert!(e.validate(65536, 1 << 30, 0).is_err());
        // One 64 KiB cluster of bits at 64 KiB granularity covers 32 GiB.
        assert!(ok.validate(65536, 32 << 30, 0).is_ok());
        assert!(ok.validate(65536, (32 << 30) + 1, 0).is_err());
        let mut stale = ok.clone();
        stale.flags = FLAG_IN_USE;
        assert!(stale.validate(65536, 64 << 30, 0).is_ok());
    }

    #[test]
    fn table_entries_decode_like_qemu() {
        let cs = 65536;
        assert_eq!(
            BitmapTableEntry::parse(0, cs, 0),
            Ok(BitmapTableEntry::AllZeros)
        );
        assert_eq!(
            BitmapTableEntry::parse(1, cs, 0),
            Ok(BitmapTableEntry::AllOnes)
        );
        assert_eq!(
            BitmapTableEntry::parse(0x30000, cs, 0),
            Ok(BitmapTableEntry::Data(0x30000))
        );
        // Offset and all-ones together, misaligned data, reserved bits.
        assert!(BitmapTableEntry::parse(0x30001, cs, 0).is_err());
        assert!(BitmapTableEntry::parse(0x30200, cs, 0).is_err());
        assert!(BitmapTableEntry::parse(0x30002, cs, 0).is_err());
        assert!(BitmapTableEntry::parse(1 << 56, cs, 0).is_err());
        assert_eq!(
            BitmapTableEntry::parse(0x30200, 512, 0),
            Ok(BitmapTableEntry::Data(0x30200))
        );
    }
}
