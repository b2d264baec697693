//! Named limits, checked before anything is allocated from a value read
//! from an image. They follow QEMU's where QEMU has one, so that every image
//! QEMU accepts is accepted here too.

/// Smallest cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster_bits that may use extended L2 entries (16 KiB), as QEMU.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest L1 table, in bytes (QEMU's QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// Largest refcount table, in bytes (QEMU's QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Largest backing file name, in bytes (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest number of internal snapshots (QEMU's QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table, in bytes (QEMU's QCOW_MAX_SNAPSHOTS_SIZE).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest extra data in one snapshot table entry (QEMU's limit).
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Largest virtual size accepted (QEMU's QCOW_MAX_IMAGE_SIZE... and i64).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;
/// Smallest v3 header length.
pub const V3_HEADER_MIN_LEN: u32 = 104;
/// Length of a v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Largest refcount_order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Deepest backing chain Strata opens (the top image counts as one).
pub const MAX_CHAIN_DEPTH: usize = 128;
/// Largest number of header extensions read from one image.
pub const MAX_EXTENSIONS: usize = 1024;
