//! L1 and L2 table entries and compressed cluster descriptors.

use crate::error::{FormatError, Result};
use crate::types::{Geometry, HostOffset};

/// Bit 63 of L1 and standard L2 entries: the refcount of the cluster is
/// exactly one (no snapshot shares it), so it may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros (v3).
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits (9-55) of L1 entries and of standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard (uncompressed) L2 entry.
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// An L1 table entry: where an L2 table is, and whether it is COPIED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Decodes big-endian entry bytes.
    pub fn from_be_bytes(b: [u8; 8]) -> L1Entry {
        L1Entry(u64::from_be_bytes(b))
    }
    /// Offset of the L2 table, or `None` when unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset::new(o)),
        }
    }
    /// Whether the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Whether any reserved bit is set.
    pub fn has_reserved_bits(self) -> bool {
        self.0 & L1_RESERVED_MASK != 0
    }
    /// An entry pointing at `l2` with the COPIED flag as given.
    pub fn new(l2: HostOffset, copied: bool) -> L1Entry {
        L1Entry((l2.get() & OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 })
    }
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the first compressed byte (not necessarily aligned).
    pub offset: HostOffset,
    /// Number of bytes to read: the 512-byte sectors the entry names, minus
    /// the offset into the first sector. The compressed stream may end
    /// before this.
    pub len: u64,
}

impl CompressedDescriptor {
    /// Decodes the descriptor part (bits 0-61) of a compressed L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedDescriptor {
        // x = 62 - (cluster_bits - 8): bits 0..x-1 offset, x..61 additional
        // 512-byte sectors.
        let sector_bits = cluster_bits - 8;
        let shift = 62 - sector_bits;
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << sector_bits) - 1)) + 1;
        CompressedDescriptor {
            offset: HostOffset::new(offset),
            len: sectors * 512 - (offset & 511),
        }
    }

    /// Encodes a descriptor for `len` compressed bytes at `offset` (the
    /// COMPRESSED flag included); `None` when it cannot be represented.
    pub fn encode(offset: HostOffset, len: u64, cluster_bits: u32) -> Option<u64> {
        let sector_bits = cluster_bits - 8;
        let shift = 62 - sector_bits;
        if offset.get() >> shift != 0 || len == 0 {
            return None;
        }
        let last = offset.get().checked_add(len - 1)?;
        let sectors = (last >> 9) - (offset.get() >> 9);
        if sectors >> sector_bits != 0 {
            return None;
        }
        Some(OFLAG_COMPRESSED | (sectors << shift) | offset.get())
    }

    /// The host clusters the compressed bytes touch (first and last index,
    /// inclusive), for refcounting.
    pub fn host_clusters(&self, geometry: Geometry) -> (u64, u64) {
        let first = self.offset.get() >> geometry.cluster_bits();
        let last =
            self.offset.get().saturating_add(self.len.saturating_sub(1)) >> geometry.cluster_bits();
        (first, last)
    }
}

/// What one (sub)cluster of a layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Not allocated in this layer: reads fall through to the backing file.
    Unallocated,
    /// Reads as zeros. `host` is the preallocated cluster, if any.
    Zero {
        /// The host cluster still allocated to the entry, if any.
        host: Option<HostOffset>,
    },
    /// Data stored uncompressed at `host` (the start of this subcluster).
    Data {
        /// Host offset of the subcluster's first byte.
        host: HostOffset,
    },
    /// The whole cluster is compressed.
    Compressed(CompressedDescriptor),
}

/// An L2 entry; `bitmap` is the second word of an extended entry (0 for
/// standard entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// The first (or only) 64-bit word.
    pub word: u64,
    /// Extended L2 only: bits 0-31 "allocated", 32-63 "reads as zeros".
    pub bitmap: u64,
}

impl L2Entry {
    /// Reads entry `index` of an L2 table held in `table`. Inlined across
    /// crates: scans of whole tables (check, emptying) call it per entry.
    #[inline]
    pub fn read(table: &[u8], geometry: Geometry, index: u64) -> Result<L2Entry> {
        let size = geometry.l2_entry_size() as usize;
        let at = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(size));
        let get = |off: usize| -> Option<u64> {
            let b = table.get(off..off.checked_add(8)?)?;
            Some(u64::from_be_bytes(b.try_into().ok()?))
        };
        let word = at.and_then(get);
        let bitmap = if geometry.extended_l2() {
            at.and_then(|a| get(a + 8))
        } else {
            Some(0)
        };
        match (word, bitmap) {
            (Some(word), Some(bitmap)) => Ok(L2Entry { word, bitmap }),
            _ => Err(FormatError::new("L2 index outside its table", index)),
        }
    }

    /// Writes this entry as entry `index` of `table`.
    pub fn write(&self, table: &mut [u8], geometry: Geometry, index: u64) -> Result<()> {
        let size = geometry.l2_entry_size() as usize;
        let at = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(size))
            .ok_or(FormatError::new("L2 index outside its table", index))?;
        let dst = table
            .get_mut(at..at + size)
            .ok_or(FormatError::new("L2 index outside its table", index))?;
        dst[..8].copy_from_slice(&self.word.to_be_bytes());
        if geometry.extended_l2() {
            dst[8..16].copy_from_slice(&self.bitmap.to_be_bytes());
        }
        Ok(())
    }

    /// A standard entry for an uncompressed cluster at `host` (`None`: the
    /// cluster is still to be allocated; [`L2Entry::with_host`] fills it
    /// in), with the COPIED flag as given. Extended entries start with no
    /// subcluster allocated ([`L2Entry::with_subclusters`]).
    pub fn data(host: Option<HostOffset>, copied: bool) -> L2Entry {
        let host = host.map_or(0, |h| h.get() & OFFSET_MASK);
        L2Entry {
            word: host | if copied { OFLAG_COPIED } else { 0 },
            bitmap: 0,
        }
    }

    /// A standard (v3) zero entry with no host cluster: reads as zeros.
    pub fn zero() -> L2Entry {
        L2Entry::default().with_zero_flag()
    }

    /// A compressed entry for `len` compressed bytes at `offset`; `None`
    /// when the descriptor cannot represent them.
    pub fn compressed_at(offset: HostOffset, len: u64, geometry: Geometry) -> Option<L2Entry> {
        let word = CompressedDescriptor::encode(offset, len, geometry.cluster_bits())?;
        Some(L2Entry { word, bitmap: 0 })
    }

    /// This entry pointing at the host cluster `host` (flags kept).
    pub fn with_host(self, host: HostOffset) -> L2Entry {
        L2Entry {
            word: (self.word & !OFFSET_MASK) | (host.get() & OFFSET_MASK),
            ..self
        }
    }

    /// This entry with the COPIED flag as given.
    pub fn with_copied(self, copied: bool) -> L2Entry {
        let word = self.word & !OFLAG_COPIED;
        L2Entry {
            word: word | if copied { OFLAG_COPIED } else { 0 },
            ..self
        }
    }

    /// A standard entry with the zero flag added (host and COPIED kept:
    /// a preallocated zero cluster when it has a host).
    pub fn with_zero_flag(self) -> L2Entry {
        L2Entry {
            word: self.word | OFLAG_ZERO,
            ..self
        }
    }

    /// An extended entry with the subcluster bitmap set: bit `i` of
    /// `alloc` marks subcluster `i` allocated, of `zero` reading as zeros
    /// (the first word is kept).
    pub fn with_subclusters(self, alloc: u32, zero: u32) -> L2Entry {
        L2Entry {
            word: self.word,
            bitmap: u64::from(alloc) | (u64::from(zero) << 32),
        }
    }

    /// Extended L2: the subclusters marked allocated (bits 0-31).
    pub fn alloc_bits(&self) -> u32 {
        self.bitmap as u32
    }

    /// Extended L2: the subclusters marked as reading zeros (bits 32-63).
    pub fn zero_bits(&self) -> u32 {
        (self.bitmap >> 32) as u32
    }

    /// Whether the cluster is compressed.
    pub fn compressed(&self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }
    /// Whether the COPIED flag is set.
    pub fn copied(&self) -> bool {
        self.word & OFLAG_COPIED != 0
    }
    /// The host cluster of an uncompressed entry (normal, preallocated
    /// zero, or an extended entry with some subclusters unallocated).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        if self.compressed() {
            return None;
        }
        match self.word & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset::new(o)),
        }
    }
    /// The compressed descriptor of a compressed entry.
    pub fn compressed_descriptor(&self, geometry: Geometry) -> Option<CompressedDescriptor> {
        self.compressed().then(|| {
            CompressedDescriptor::decode(
                self.word & !(OFLAG_COPIED | OFLAG_COMPRESSED),
                geometry.cluster_bits(),
            )
        })
    }

    /// Checks the whole entry as QEMU does before it writes through it
    /// (`qcow2_get_subcluster_type` returning `QCOW2_SUBCLUSTER_INVALID`,
    /// or an unaligned host offset): no subcluster both allocated and
    /// zero, no allocated subcluster without a host cluster, an aligned
    /// host offset. Compressed entries are not checked (QEMU ignores their
    /// bitmap), nor the zero flag of extended entries (unused there).
    pub fn validate(&self, geometry: Geometry) -> std::result::Result<(), &'static str> {
        if self.compressed() {
            return Ok(());
        }
        let host = self.host_cluster();
        if host.is_some_and(|h| !geometry.is_aligned(h.get())) {
            return Err("cluster offset not aligned to the cluster size");
        }
        if !geometry.extended_l2() {
            return Ok(());
        }
        let alloc = self.bitmap & 0xffff_ffff;
        if alloc & (self.bitmap >> 32) != 0 {
            return Err("subcluster both allocated and zero");
        }
        if host.is_none() && alloc != 0 {
            return Err("subcluster allocated in an unallocated cluster");
        }
        Ok(())
    }

    /// How many subclusters from `sc` on, to the end of the cluster, have
    /// the bits of `sc` (so the same state, contiguous on the host): at
    /// least 1; 1 for a standard entry, whose one subcluster is the
    /// cluster.
    pub fn same_state_run(&self, geometry: Geometry, sc: u32) -> u32 {
        if !geometry.extended_l2() || sc >= 32 {
            return 1;
        }
        let alloc = (self.bitmap as u32) >> sc;
        let zero = ((self.bitmap >> 32) as u32) >> sc;
        // Bits that differ from those of `sc` (the ones past the cluster's
        // end differ whenever `sc`'s bit is set; they are cut off below).
        let differ = |bits: u32| if bits & 1 != 0 { !bits } else { bits };
        (differ(alloc) | differ(zero))
            .trailing_zeros()
            .clamp(1, 32 - sc)
    }

    /// The state of subcluster `sc` (always 0 for standard entries).
    /// Combinations the spec forbids are errors (with `sc` as the offset;
    /// the caller adds the location).
    pub fn state(
        &self,
        geometry: Geometry,
        sc: u32,
    ) -> std::result::Result<SubclusterState, &'static str> {
        if let Some(d) = self.compressed_descriptor(geometry) {
            if geometry.extended_l2() && self.bitmap != 0 {
                return Err("compressed cluster with a nonzero subcluster bitmap");
            }
            return Ok(SubclusterState::Compressed(d));
        }
        let host = self.host_cluster();
        if let Some(h) = host {
            if !geometry.is_aligned(h.get()) {
                return Err("cluster offset not aligned to the cluster size");
            }
        }
        if !geometry.extended_l2() {
            if self.word & OFLAG_ZERO != 0 {
                return Ok(SubclusterState::Zero { host });
            }
            return Ok(match host {
                None => SubclusterState::Unallocated,
                Some(host) => SubclusterState::Data { host },
            });
        }
        if sc >= 32 {
            return Err("subcluster index out of range");
        }
        let alloc = self.bitmap & (1u64 << sc) != 0;
        let zero = self.bitmap & (1u64 << (32 + sc)) != 0;
        match (host, alloc, zero) {
            (_, true, true) => Err("subcluster both allocated and zero"),
            (None, true, false) => Err("subcluster allocated in an unallocated cluster"),
            (Some(h), true, false) => Ok(SubclusterState::Data {
                host: HostOffset::new(h.get() + u64::from(sc) * geometry.subcluster_size()),
            }),
            (host, false, true) => Ok(SubclusterState::Zero { host }),
            (_, false, false) => Ok(SubclusterState::Unallocated),
        }
    }
}

/// Decodes a big-endian table of u64 entries (an L1 or refcount table).
pub fn decode_u64_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect()
}

/// Encodes a table of u64 entries big-endian.
pub fn encode_u64_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// The indices, in order, of the entries of the L2 table in `table` whose
/// bytes are not all zero (an all-zero entry is an unallocated cluster
/// with nothing to check or free). Skips zeros a block at a time: a scan
/// of a sparse table costs a fraction of decoding every entry.
pub fn nonzero_entries(table: &[u8], geometry: Geometry) -> impl Iterator<Item = u64> + '_ {
    // A multiple of both entry sizes (8 and 16 bytes).
    const BLOCK: usize = 256;
    let es = geometry.l2_entry_size() as usize;
    let n = usize::try_from(geometry.l2_entries())
        .unwrap_or(usize::MAX)
        .min(table.len() / es);
    let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
    let zero = move |b: &[u8]| b.chunks_exact(8).fold(0, |acc, w| acc | word(w)) == 0;
    table[..n * es]
        .chunks(BLOCK)
        .enumerate()
        .filter(move |(_, b)| !zero(b))
        .flat_map(move |(bi, b)| {
            b.chunks_exact(es)
                .enumerate()
                .filter(move |(_, e)| !zero(e))
                .map(move |(k, _)| (bi * (BLOCK / es) + k) as u64)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32, ext: bool) -> Geometry {
        Geometry::new(bits, ext).unwrap()
    }

    #[test]
    fn same_state_run_counts_subclusters_with_the_bits_of_the_first() {
        let ext = g(16, true);
        let e = |bitmap: u64| L2Entry {
            word: 0x50000,
            bitmap,
        };
        // Unallocated throughout: the rest of the cluster from any start.
        assert_eq!(e(0).same_state_run(ext, 0), 32);
        assert_eq!(e(0).same_state_run(ext, 31), 1);
        assert_eq!(e(0).same_state_run(ext, 7), 25);
        // Subclusters 0-3 allocated, 4-5 zero, the rest unallocated.
        let m = e(0b1111 | (0b11 << 36));
        assert_eq!(m.same_state_run(ext, 0), 4);
        assert_eq!(m.same_state_run(ext, 2), 2);
        assert_eq!(m.same_state_run(ext, 4), 2);
        assert_eq!(m.same_state_run(ext, 6), 26);
        // All allocated; the last one alone.
        let all = e(u64::from(u32::MAX));
        assert_eq!(all.same_state_run(ext, 0), 32);
        assert_eq!(all.same_state_run(ext, 31), 1);
        // Each run agrees with the states of the subclusters it covers.
        for bitmap in [
            0u64,
            0b1111 | (0b11 << 36),
            0xF0F0_F0F0,
            0xFFFF_0000_0000_FFFF,
        ] {
            let x = e(bitmap);
            for sc in 0..32 {
                let run = x.same_state_run(ext, sc);
                let bits = |i: u32| ((bitmap >> i) & 1, (bitmap >> (32 + i)) & 1);
                assert!((sc..sc + run).all(|i| bits(i) == bits(sc)));
                assert!(sc + run == 32 || bits(sc + run) != bits(sc));
            }
        }
        // Standard entries: one subcluster, the cluster.
        assert_eq!(e(0).same_state_run(g(16, false), 0), 1);
    }

    #[test]
    fn l2_entry_constructors_decode_to_the_states_they_name() {
        let std = g(16, false);
        let ext = g(16, true);
        let h = HostOffset::new(0x50000);
        let d = L2Entry::data(Some(h), true);
        assert_eq!(d.state(std, 0), Ok(SubclusterState::Data { host: h }));
        assert!(d.copied());
        assert_eq!(d.word, OFLAG_COPIED | 0x50000);
        assert!(!L2Entry::data(Some(h), false).copied());
        // Not yet allocated, then given its host.
        let fresh = L2Entry::data(None, true);
        assert_eq!(fresh.host_cluster(), None);
        assert_eq!(fresh.with_host(h), d);
        assert_eq!(
            L2Entry::zero().state(std, 0),
            Ok(SubclusterState::Zero { host: None })
        );
        assert_eq!(
            d.with_zero_flag().state(std, 0),
            Ok(SubclusterState::Zero { host: Some(h) })
        );
        assert_eq!(d.with_copied(false).with_copied(true), d);
        assert_eq!(d.with_copied(false).word, 0x50000);
        // Extended: subcluster 0 data, 1 zero, 2 unallocated.
        let x = L2Entry::data(Some(h), true).with_subclusters(0b01, 0b10);
        assert_eq!((x.alloc_bits(), x.zero_bits()), (0b01, 0b10));
        assert_eq!(x.state(ext, 0), Ok(SubclusterState::Data { host: h }));
        assert_eq!(x.state(ext, 1), Ok(SubclusterState::Zero { host: Some(h) }));
        assert_eq!(x.state(ext, 2), Ok(SubclusterState::Unallocated));
        assert_eq!(x.bitmap, 0b01 | (0b10 << 32));
        // Compressed: the descriptor round-trips; unrepresentable is None.
        let c = L2Entry::compressed_at(HostOffset::new(0x60200), 1000, std).unwrap();
        assert!(c.compressed());
        assert_eq!(
            c.compressed_descriptor(std).map(|d| d.offset),
            Some(HostOffset::new(0x60200))
        );
        assert_eq!(
            L2Entry::compressed_at(HostOffset::new(0x60200), 0, std),
            None
        );
    }

    #[test]
    fn l1_entry_exposes_offset_and_copied() {
        // 0x8000_0000_0003_0000: COPIED, L2 table at 0x30000.
        let e = L1Entry(0x8000_0000_0003_0000);
        assert_eq!(e.l2_offset(), Some(HostOffset::new(0x30000)));
        assert!(e.copied());
        assert!(!e.has_reserved_bits());
        assert_eq!(L1Entry(0).l2_offset(), None);
        assert!(L1Entry(0x1).has_reserved_bits());
    }

    #[test]
    fn standard_l2_entries_decode_to_states() {
        let geo = g(16, false);
        let data = L2Entry {
            word: OFLAG_COPIED | 0x50000,
            bitmap: 0,
        };
        assert_eq!(
            data.state(geo, 0),
            Ok(SubclusterState::Data {
                host: HostOffset::new(0x50000)
            })
        );
        assert_eq!(
            L2Entry::default().state(geo, 0),
            Ok(SubclusterState::Unallocated)
        );
        assert_eq!(
            L2Entry { word: 1, bitmap: 0 }.state(geo, 0),
            Ok(SubclusterState::Zero { host: None })
        );
        assert_eq!(
            L2Entry {
                word: 0x60001,
                bitmap: 0
            }
            .state(geo, 0),
            Ok(SubclusterState::Zero {
                host: Some(HostOffset::new(0x60000))
            })
        );
        assert!(L2Entry {
            word: 0x60200,
            bitmap: 0
        }
        .state(geo, 0)
        .is_err());
    }

    #[test]
    fn compressed_descriptor_round_trips() {
        for bits in [9u32, 12, 16, 21] {
            let off = HostOffset::new(0x12345);
            let n = 1000.min(1u64 << bits);
            let w = CompressedDescriptor::encode(off, n, bits).unwrap();
            let e = L2Entry { word: w, bitmap: 0 };
            let d = e.compressed_descriptor(g(bits, false)).unwrap();
            assert_eq!(d.offset, off);
            // Sectors cover 0x12345..0x12345+1000: the length read covers it.
            assert!(d.len >= n && d.len < n + 512, "bits {bits} len {}", d.len);
        }
    }

    #[test]
    fn compressed_descriptor_matches_qemu_layout_for_64k_clusters() {
        // cluster_bits 16: x = 62 - 8 = 54; 3 additional sectors, offset 0x10200.
        let word = OFLAG_COMPRESSED | (3u64 << 54) | 0x10200;
        let d = CompressedDescriptor::decode(word & !OFLAG_COMPRESSED, 16);
        assert_eq!(d.offset, HostOffset::new(0x10200));
        assert_eq!(d.len, 4 * 512);
    }

    #[test]
    fn extended_l2_subclusters_decode_from_the_bitmap() {
        let geo = g(16, true);
        // Allocated at 0x40000: subcluster 0 data, 1 zero, 2 unallocated.
        let e = L2Entry {
            word: 0x40000,
            bitmap: 0b01 | (0b10 << 32),
        };
        assert_eq!(
            e.state(geo, 0),
            Ok(SubclusterState::Data {
                host: HostOffset::new(0x40000)
            })
        );
        assert_eq!(
            e.state(geo, 1),
            Ok(SubclusterState::Zero {
                host: Some(HostOffset::new(0x40000))
            })
        );
        assert_eq!(e.state(geo, 2), Ok(SubclusterState::Unallocated));
        let both = L2Entry {
            word: 0x40000,
            bitmap: 1 | (1 << 32),
        };
        assert!(both.state(geo, 0).is_err());
        let orphan = L2Entry { word: 0, bitmap: 1 };
        assert!(orphan.state(geo, 0).is_err());
    }

    #[test]
    fn l2_entries_read_and_write_in_place() {
        let geo = g(14, true);
        let mut table = vec![0u8; 16384];
        let e = L2Entry {
            word: OFLAG_COPIED | 0x8000,
            bitmap: 0xffff_0000_0000_ffff,
        };
        e.write(&mut table, geo, 5).unwrap();
        assert_eq!(L2Entry::read(&table, geo, 5).unwrap(), e);
        assert!(L2Entry::read(&table, geo, 1024).is_err());
    }

    #[test]
    fn nonzero_entries_lists_exactly_the_entries_with_a_set_byte() {
        for extended in [false, true] {
            let geo = Geometry::new(16, extended).unwrap();
            let es = geo.l2_entry_size() as usize;
            let mut t = vec![0u8; 1 << 16];
            let want = [0u64, 1, 31, 32, 33, geo.l2_entries() - 1];
            for (k, i) in want.iter().enumerate() {
                // A different byte of the entry each time, the bitmap too.
                t[*i as usize * es + (k * 3) % es] = 0x80;
            }
            let got: Vec<u64> = nonzero_entries(&t, geo).collect();
            assert_eq!(got, want, "extended {extended}");
            assert_eq!(nonzero_entries(&vec![0u8; 1 << 16], geo).count(), 0);
        }
    }
}
