//! `Qcow2Image::close` after a write refused for corrupt metadata: `Ok`
//! when the refusal left nothing to flush (the caller already has the
//! refusal's error), the flush's error when writes made before it are
//! lost.

use std::path::Path;

use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{MemStorage, Qcow2Image};

/// An extended-L2 image whose first subcluster is both allocated and zero
/// (271's "corrupted L2 entries"): writes through that entry are refused.
fn bad_bitmap_image() -> Vec<u8> {
    let m = MemStorage::new();
    let mut img = create_qcow2(
        Box::new(m.clone()),
        Path::new("t.qcow2"),
        &CreateOptions {
            size: 1 << 20,
            extended_l2: true,
            ..Default::default()
        },
    )
    .unwrap();
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    img.write(0, &[1; 65536], &zeros).unwrap();
    img.close().unwrap();
    let mut b = m.to_bytes();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&b, 40) as usize;
    let l2 = (be(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2 + 8..l2 + 16].copy_from_slice(&0x0000_0001_0000_0001u64.to_be_bytes());
    b
}

fn zeros(b: &mut [u8], _: u64) -> strata_image::Result<()> {
    b.fill(0);
    Ok(())
}

#[test]
fn close_after_a_refusal_that_wrote_nothing_is_quiet() {
    let m = MemStorage::from_bytes(bad_bitmap_image());
    let mut img = Qcow2Image::open_rw(Box::new(m.clone()), Path::new("t.qcow2")).unwrap();
    let e = img.write(0, &[2; 512], &zeros).unwrap_err();
    assert!(e.to_string().contains("both allocated and zero"), "{e}");
    img.close().unwrap();
}

#[test]
fn close_after_a_refusal_that_loses_writes_fails() {
    let m = MemStorage::from_bytes(bad_bitmap_image());
    let mut img = Qcow2Image::open_rw(Box::new(m.clone()), Path::new("t.qcow2")).unwrap();
    // A new cluster: its L2 entry waits for the flush.
    img.write(128 << 10, &[3; 512], &zeros).unwrap();
    img.write(0, &[2; 512], &zeros).unwrap_err();
    let e = img.close().unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
}
