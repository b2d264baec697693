//! Crash consistency of `resize --preallocation=metadata|falloc|full`
//! on qcow2 (extended and standard L2 entries, with and without a
//! backing file longer than the old size), at every write and sync.
//!
//! The resize runs on a [`FaultStorage`] that "crashes" at operation N,
//! for every N. What a disk could then hold (the durable bytes plus none,
//! all, or random subsets of the unsynced writes) must open, pass
//! `qemu-img check` without corruption (leaks are allowed), keep the old
//! guest data below the old size, and read the grown area as zeros — or,
//! with a backing file longer than the old size, as the backing file's
//! bytes there: the header's new size is made durable before the
//! preallocation, as for `resize` without preallocation (which writes its
//! zeros after the header too), so a crash between them shows the
//! backing file's tail in the new area (QEMU writes the header last).
//! See docs/crash-consistency.md.

mod common;

use std::path::Path;

use common::*;
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::resize::{resize_chain, ResizePrealloc};
use strata_image::{Chain, FaultStorage, Image, ImageFormat, Layer, MemStorage, Qcow2Image};

const OLD: u64 = 503 << 10;
const NEW: u64 = 1013 << 10;

fn base_image() -> Vec<u8> {
    let m = MemStorage::new();
    let mut img = create_qcow2(
        Box::new(m.clone()),
        Path::new("base.qcow2"),
        &CreateOptions {
            size: 2 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    img.write(0, &vec![0xbb; 2 << 20], &zeros).unwrap();
    img.flush().unwrap();
    m.to_bytes()
}

/// The top image: `OLD` bytes, extended L2 or not, over the base or
/// written with 0xaa (the last cluster partly).
fn top_image(extended_l2: bool, backed: bool) -> Vec<u8> {
    let m = MemStorage::new();
    let mut img = create_qcow2(
        Box::new(m.clone()),
        Path::new("top.qcow2"),
        &CreateOptions {
            size: OLD,
            extended_l2,
            backing: backed.then(|| ("base.qcow2".into(), ImageFormat::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    if backed {
        img.write(100_000, &[0xaa; 5000], &zeros).unwrap();
    } else {
        img.write(0, &vec![0xaa; OLD as usize], &zeros).unwrap();
    }
    img.flush().unwrap();
    m.to_bytes()
}

fn chain_of(top: Box<dyn strata_image::Storage>, base: Option<&[u8]>, rw: bool) -> Chain {
    let p = Path::new("top.qcow2");
    let img = if rw {
        Qcow2Image::open_rw(top, p)
    } else {
        Qcow2Image::open(top, p)
    }
    .unwrap_or_else(|e| panic!("does not open: {e}"));
    let mut layers = vec![Layer::new("top.qcow2".into(), None, Image::Qcow2(img))];
    if let Some(b) = base {
        let bi = Qcow2Image::open(
            Box::new(MemStorage::from_bytes(b.to_vec())),
            Path::new("base.qcow2"),
        )
        .unwrap();
        layers.push(Layer::new(
            "base.qcow2".into(),
            Some("base.qcow2".into()),
            Image::Qcow2(bi),
        ));
    }
    Chain::from_layers(layers).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn crash_everywhere(extended_l2: bool, backed: bool, prealloc: ResizePrealloc) {
    let what = format!("extended_l2 {extended_l2}, backed {backed}, {prealloc:?}");
    let dir = tempfile::tempdir().unwrap();
    let base = backed.then(base_image);
    if let Some(b) = &base {
        std::fs::write(dir.path().join("base.qcow2"), b).unwrap();
    }
    let initial = top_image(extended_l2, backed);
    let before = view(&chain_of(
        Box::new(MemStorage::from_bytes(initial.clone())),
        base.as_deref(),
        false,
    ));
    let reference = FaultStorage::new(initial.clone());
    let mut chain = chain_of(Box::new(reference.clone()), base.as_deref(), true);
    resize_chain(&mut chain, NEW, false, prealloc).unwrap();
    let after = view(&chain);
    assert!(
        after[..OLD as usize] == before[..],
        "{what}: old data changed"
    );
    assert!(after[OLD as usize..].iter().all(|b| *b == 0), "{what}");
    drop(chain);
    let total = reference.ops();
    // At least 8 (a metadata preallocation of a bare image; 12 before the
    // barriers that found nothing to write were skipped).
    assert!(total > 6, "{what}: workload too small: {total} operations");
    eprintln!("{what}: {total} storage operations to crash at");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in 0..total {
        let st = FaultStorage::new(initial.clone());
        st.crash_at(n);
        let mut chain = chain_of(Box::new(st.clone()), base.as_deref(), true);
        // The last operations are the close's (after the resize returned).
        let _ = resize_chain(&mut chain, NEW, false, prealloc);
        drop(chain);
        assert!(st.crashed(), "{what}: crash point {n} not reached");
        let seeds = [rng.next() | 1, rng.next() | 1];
        for (label, sub) in [("none", 0u8), ("all", 1), ("random-a", 2), ("random-b", 3)] {
            let mut r = Rng(seeds[usize::from(sub) % 2]);
            let bytes = st.durable_image(&mut |_| match sub {
                0 => false,
                1 => true,
                2 => r.next().is_multiple_of(2),
                _ => r.next().is_multiple_of(3),
            });
            let label = format!("{what}: crash at op {n}/{total}, subset {label}");
            let chain = chain_of(
                Box::new(MemStorage::from_bytes(bytes.clone())),
                base.as_deref(),
                false,
            );
            let got = view(&chain);
            assert!(
                got.len() as u64 == OLD || got.len() as u64 == NEW,
                "{label}: size {}",
                got.len()
            );
            assert!(
                got[..OLD as usize] == before[..],
                "{label}: old data changed"
            );
            for (i, b) in got.iter().enumerate().skip(OLD as usize) {
                assert!(
                    *b == 0 || backed && *b == 0xbb,
                    "{label}: byte {i:#x} of the new area is {b:#x}"
                );
            }
            if n % 3 == 0 || sub == 2 {
                qemu_check_no_corruption(dir.path(), &bytes, &label);
            }
        }
    }
}

#[test]
fn metadata_preallocation_survives_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    for ext in [true, false] {
        for backed in [true, false] {
            crash_everywhere(ext, backed, ResizePrealloc::Metadata);
        }
    }
}

#[test]
fn full_and_falloc_preallocation_survive_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    for ext in [true, false] {
        for backed in [true, false] {
            crash_everywhere(ext, backed, ResizePrealloc::Full);
        }
    }
    crash_everywhere(true, true, ResizePrealloc::Falloc);
}
