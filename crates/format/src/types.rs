//! Typed addresses and the cluster geometry that converts between them.

use crate::error::{FormatError, Result};
use crate::limits;

/// An offset in the guest's view of the disk (the virtual disk). Opaque:
/// built with [`GuestOffset::new`], read with [`GuestOffset::get`], and
/// turned into table indices by [`Geometry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(u64);

/// An offset in an image file (where bytes live on the host). Opaque:
/// built with [`HostOffset::new`], read with [`HostOffset::get`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(u64);

impl GuestOffset {
    /// The guest offset `offset`.
    pub const fn new(offset: u64) -> GuestOffset {
        GuestOffset(offset)
    }
    /// The offset in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// `self + n`, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<GuestOffset> {
        self.0.checked_add(n).map(GuestOffset)
    }
}

impl HostOffset {
    /// The host offset `offset`.
    pub const fn new(offset: u64) -> HostOffset {
        HostOffset(offset)
    }
    /// The offset in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// `self + n`, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<HostOffset> {
        self.0.checked_add(n).map(HostOffset)
    }
}

/// The cluster geometry of one image: cluster size and L2 entry layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
}

impl Geometry {
    /// 64 KiB clusters with standard L2 entries, qemu-img's default.
    pub const DEFAULT: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
    };

    /// A geometry; refuses cluster_bits outside the limits, and extended L2
    /// entries on clusters smaller than 16 KiB.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<Geometry> {
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::with_detail(
                "cluster_bits out of range (9..=21)",
                20,
                cluster_bits.to_string(),
            ));
        }
        if extended_l2 && cluster_bits < limits::MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(FormatError::new(
                "extended L2 entries need clusters of at least 16 KiB",
                20,
            ));
        }
        Ok(Geometry {
            cluster_bits,
            extended_l2,
        })
    }

    /// log2 of the cluster size.
    pub const fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are extended (128 bits, 32 subclusters).
    pub const fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Size of one L2 entry in bytes (8, or 16 when extended).
    pub const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// log2 of the number of entries in an L2 table.
    pub const fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// Number of entries in one L2 table.
    pub const fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    /// Bytes of guest space one L2 table maps.
    pub const fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }
    /// Subclusters per cluster (32 with extended L2, else 1).
    pub const fn subclusters(&self) -> u64 {
        if self.extended_l2 {
            32
        } else {
            1
        }
    }
    /// Subcluster size in bytes (the cluster size without extended L2).
    pub const fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }
    /// Index in the L1 table of the L2 table mapping `g`.
    pub const fn l1_index(&self, g: GuestOffset) -> u64 {
        g.0 >> (self.cluster_bits + self.l2_bits())
    }
    /// Index in its L2 table of the entry mapping `g`.
    pub const fn l2_index(&self, g: GuestOffset) -> u64 {
        (g.0 >> self.cluster_bits) & (self.l2_entries() - 1)
    }
    /// Index of the host cluster holding `h`.
    pub const fn cluster_index(&self, h: HostOffset) -> u64 {
        h.0 >> self.cluster_bits
    }
    /// Host offset of the first byte of host cluster `index`.
    pub const fn cluster_start(&self, index: u64) -> HostOffset {
        HostOffset(index << self.cluster_bits)
    }
    /// Index of the guest cluster holding `g`.
    pub const fn guest_cluster(&self, g: GuestOffset) -> u64 {
        g.0 >> self.cluster_bits
    }
    /// Guest offset of the first byte of guest cluster `index`.
    pub const fn guest_cluster_start(&self, index: u64) -> GuestOffset {
        GuestOffset(index << self.cluster_bits)
    }
    /// Bytes in `n` clusters (the length of a run of clusters, or of a
    /// table counted in clusters).
    pub const fn clusters_bytes(&self, n: u64) -> u64 {
        n << self.cluster_bits
    }
    /// Indices of the host clusters `[h, h+len)` touches (empty when
    /// `len` is 0; an end past `u64::MAX` is cut there).
    pub fn host_clusters(&self, h: HostOffset, len: u64) -> std::ops::Range<u64> {
        self.cluster_run(h.0, len)
    }
    /// Indices of the guest clusters `[g, g+len)` touches (empty when
    /// `len` is 0).
    pub fn guest_clusters(&self, g: GuestOffset, len: u64) -> std::ops::Range<u64> {
        self.cluster_run(g.0, len)
    }
    fn cluster_run(&self, start: u64, len: u64) -> std::ops::Range<u64> {
        let first = start >> self.cluster_bits;
        if len == 0 {
            return first..first;
        }
        first..(start.saturating_add(len - 1) >> self.cluster_bits) + 1
    }
    /// Index inside its cluster of the subcluster holding `g` (0 without
    /// extended L2).
    pub const fn subcluster_index(&self, g: GuestOffset) -> u32 {
        (self.in_cluster(g.0) / self.subcluster_size()) as u32
    }
    /// Offset of `g` inside its subcluster (inside its cluster without
    /// extended L2).
    pub const fn in_subcluster(&self, g: GuestOffset) -> u64 {
        g.0 & (self.subcluster_size() - 1)
    }
    /// Offset of `g` inside its cluster.
    pub const fn in_cluster(&self, g: u64) -> u64 {
        g & (self.cluster_size() - 1)
    }
    /// `x` rounded down to a cluster boundary.
    pub const fn align_down(&self, x: u64) -> u64 {
        x & !(self.cluster_size() - 1)
    }
    /// `x` rounded up to a cluster boundary, or `None` on overflow.
    pub fn align_up(&self, x: u64) -> Option<u64> {
        Some(x.checked_add(self.cluster_size() - 1)? & !(self.cluster_size() - 1))
    }
    /// Whether `x` is cluster-aligned.
    pub const fn is_aligned(&self, x: u64) -> bool {
        self.in_cluster(x) == 0
    }
    /// Number of L1 entries needed to map `size` bytes of guest space.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_span())
    }
    /// Number of clusters covering `bytes` (rounded up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_geometry_methods_split_offsets_into_indices() {
        let g = Geometry::new(16, true).unwrap();
        // Extended entries are 16 bytes: 4096 per table, 256 MiB each.
        assert_eq!(g.l2_span(), 1 << 28);
        let guest = GuestOffset::new((3 << 28) + (5 << 16) + 0x1234);
        assert_eq!(g.l1_index(guest), 3);
        assert_eq!(g.l2_index(guest), 5);
        assert_eq!(g.guest_cluster(guest), (3 << 12) + 5);
        assert_eq!(g.in_cluster(guest.get()), 0x1234);
        // 2 KiB subclusters: 0x1234 is in subcluster 2.
        assert_eq!(g.subcluster_index(guest), 2);
        assert_eq!(g.in_subcluster(guest), 0x1234 - 0x1000);
        let standard = Geometry::new(16, false).unwrap();
        assert_eq!(standard.in_subcluster(guest), 0x1234);
        let host = HostOffset::new(0x7_0000 + 17);
        assert_eq!(g.cluster_index(host), 7);
        assert_eq!(g.cluster_start(7), HostOffset::new(0x7_0000));
        assert_eq!(Geometry::new(16, false).unwrap().subcluster_index(guest), 0);
    }

    #[test]
    fn cluster_runs_cover_every_cluster_a_range_touches() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.guest_cluster_start(3), GuestOffset::new(3 << 16));
        assert_eq!(g.clusters_bytes(5), 5 << 16);
        // One byte at the end of cluster 1, then into cluster 2.
        assert_eq!(g.host_clusters(HostOffset::new(0x1_ffff), 1), 1..2);
        assert_eq!(g.host_clusters(HostOffset::new(0x1_ffff), 2), 1..3);
        // Whole clusters: [2, 4) exactly.
        assert_eq!(g.guest_clusters(GuestOffset::new(2 << 16), 2 << 16), 2..4);
        assert!(g.guest_clusters(GuestOffset::new(7 << 16), 0).is_empty());
        // A hostile length stops at the last cluster of the address space.
        let last = u64::MAX >> 16;
        assert_eq!(
            g.host_clusters(HostOffset::new(1 << 16), u64::MAX),
            1..last + 1
        );
        for c in g.guest_clusters(GuestOffset::new(0x1234), 3 << 16) {
            let start = g.guest_cluster_start(c);
            assert_eq!(g.guest_cluster(start), c);
            assert_eq!(g.in_cluster(start.get()), 0);
        }
    }

    #[test]
    fn standard_64k_geometry_maps_512_mib_per_l2_table() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        let off = GuestOffset((512 << 20) * 3 + 65536 * 5 + 7);
        assert_eq!(g.l1_index(off), 3);
        assert_eq!(g.l2_index(off), 5);
        assert_eq!(g.in_cluster(off.0), 7);
    }

    #[test]
    fn extended_l2_halves_the_entries_per_table() {
        let g = Geometry::new(16, true).unwrap();
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
    }

    #[test]
    fn cluster_bits_outside_limits_are_refused() {
        assert!(Geometry::new(8, false).is_err());
        assert!(Geometry::new(22, false).is_err());
        assert!(Geometry::new(13, true).is_err());
        assert!(Geometry::new(9, false).is_ok());
        assert!(Geometry::new(21, true).is_ok());
    }

    #[test]
    fn align_up_reports_overflow() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.align_up(1), Some(65536));
        assert_eq!(g.align_up(u64::MAX), None);
    }
}
