//! Refcount table entries and refcount blocks of every width (1 to 64 bits).

/// Reserved bits of a refcount table entry.
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = !REFTABLE_RESERVED_MASK;

/// Largest refcount representable with `order` (refcount_bits = 1 << order).
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Number of refcount entries in one refcount block.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> order
}

/// Reads refcount `index` of a refcount block. Sub-byte widths are packed
/// least significant bits first, as QEMU does; wider ones are big-endian.
pub fn get(block: &[u8], order: u32, index: u64) -> Option<u64> {
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let byte = *block.get(usize::try_from(index / per_byte).ok()?)?;
            let shift = (index % per_byte) * bits;
            Some(u64::from(byte >> shift) & ((1 << bits) - 1))
        }
        3..=6 => {
            let w = (bits / 8) as usize;
            let at = usize::try_from(index).ok()?.checked_mul(w)?;
            let b = block.get(at..at.checked_add(w)?)?;
            Some(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
        }
        _ => None,
    }
}

/// Sets refcount `index` of a refcount block. Returns `false` when the
/// value does not fit the width or the index is outside the block.
pub fn set(block: &mut [u8], order: u32, index: u64, value: u64) -> bool {
    if order > 6 || value > max_refcount(order) {
        return false;
    }
    let bits = 1u64 << order;
    match order {
        0..=2 => {
            let per_byte = 8 / bits;
            let Some(byte) = usize::try_from(index / per_byte)
                .ok()
                .and_then(|i| block.get_mut(i))
            else {
                return false;
            };
            let shift = (index % per_byte) * bits;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            *byte = (*byte & !mask) | (((value << shift) as u8) & mask);
            true
        }
        _ => {
            let w = (bits / 8) as usize;
            let Some(at) = usize::try_from(index).ok().and_then(|i| i.checked_mul(w)) else {
                return false;
            };
            let Some(dst) = block.get_mut(at..at + w) else {
                return false;
            };
            let be = value.to_be_bytes();
            dst.copy_from_slice(&be[8 - w..]);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_refcounts_pack_lsb_first() {
        // 0b0000_0101: refcounts 1, 0, 1, 0...
        let block = [0x05u8, 0x80];
        assert_eq!(get(&block, 0, 0), Some(1));
        assert_eq!(get(&block, 0, 1), Some(0));
        assert_eq!(get(&block, 0, 2), Some(1));
        assert_eq!(get(&block, 0, 15), Some(1));
        assert_eq!(get(&block, 0, 16), None);
    }

    #[test]
    fn sixteen_bit_refcounts_are_big_endian() {
        let block = [0x00u8, 0x01, 0x12, 0x34];
        assert_eq!(get(&block, 4, 0), Some(1));
        assert_eq!(get(&block, 4, 1), Some(0x1234));
    }

    #[test]
    fn every_width_round_trips_and_refuses_overflow() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let max = max_refcount(order);
            let n = entries_per_block(9, order).min((64 * 8) >> order);
            for i in 0..n {
                assert!(set(&mut block, order, i, (i * 7) & max));
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    Some((i * 7) & max),
                    "order {order} i {i}"
                );
            }
            if order < 6 {
                assert!(!set(&mut block, order, 0, max + 1));
            }
        }
    }
}
