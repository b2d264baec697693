//! Crash consistency of the write path, at every write and sync.
//!
//! A workload runs on a [`FaultStorage`] that "crashes" at operation N, for
//! every N the workload performs. What a disk could then hold (the durable
//! bytes plus none, all, or random subsets of the unsynced writes) must
//! open, read every guest byte as a value that byte had since the last
//! completed flush, and pass `qemu-img check` without corruption (leaks
//! are allowed). See docs/crash-consistency.md.

mod common;

use std::path::Path;

use common::*;
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FaultStorage, Image, ImageFormat, Layer, MemStorage, Qcow2Image};

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// Applies one op; the error of a crashed storage is returned.
fn apply(chain: &mut Chain, op: Op) -> strata_image::Result<()> {
    match op {
        Op::Write(off, len, p) => chain.write_at(&vec![p; len as usize], off),
        Op::Zero(off, len, unmap) => chain.write_zeroes(off, len, unmap),
        Op::Discard(off, len) => chain.discard(off, len),
        Op::Flush => chain.flush(),
    }
}

/// Runs `ops` on `initial` (with optional backing `base`) crashing at every
/// operation, and checks every possible durable state.
fn crash_everywhere(
    initial: Vec<u8>,
    base: Option<Vec<u8>>,
    ops: &[Op],
    qemu_every: u64,
    stride: u64,
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    if let Some(b) = &base {
        std::fs::write(dir.path().join("base.qcow2"), b).unwrap();
    }
    // Reference run: the view after each op, and flush points.
    let reference = FaultStorage::new(initial.clone());
    let mut chain = fault_chain(&reference, base.as_deref());
    let mut views = vec![view(&chain)];
    for op in ops {
        apply(&mut chain, *op).unwrap();
        views.push(view(&chain));
    }
    drop(chain);
    let total = reference.ops();
    assert!(total > 10, "workload too small: {total} operations");
    eprintln!("{total} storage operations to crash at");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in (0..total).filter(|n| n % stride == 0 || *n + 1 == total) {
        let st = FaultStorage::new(initial.clone());
        st.crash_at(n);
        let mut chain = fault_chain(&st, base.as_deref());
        let mut done = 0;
        let mut last_flush = 0;
        for (i, op) in ops.iter().enumerate() {
            if apply(&mut chain, *op).is_err() {
                break;
            }
            done = i + 1;
            if let Op::Flush = op {
                last_flush = i + 1;
            }
        }
        drop(chain);
        assert!(st.crashed(), "crash point {n} not reached");
        // States a byte may show: from the last completed flush up to the
        // state after the op that crashed.
        let allowed = &views[last_flush..=(done + 1).min(ops.len())];
        let pending = st.pending();
        let seeds: [u64; 2] = [rng.next(), rng.next()];
        let subsets: Vec<(&str, Keep)> = vec![
            ("none", Box::new(|_| false)),
            ("all", Box::new(|_| true)),
            ("random-a", {
                let mut r = Rng(seeds[0] | 1);
                Box::new(move |_| r.next().is_multiple_of(2))
            }),
            ("random-b", {
                let mut r = Rng(seeds[1] | 1);
                Box::new(move |_| r.next().is_multiple_of(3))
            }),
        ];
        for (label, mut keep) in subsets {
            let bytes = st.durable_image(&mut *keep);
            let label = format!("crash at op {n}/{total} ({pending} pending, subset {label})");
            let img = Qcow2Image::open(
                Box::new(MemStorage::from_bytes(bytes.clone())),
                Path::new("top.qcow2"),
            )
            .unwrap_or_else(|e| panic!("{label}: does not open: {e}"));
            let mut layers = vec![Layer::new("top.qcow2".into(), None, Image::Qcow2(img))];
            if let Some(b) = &base {
                let bi = Qcow2Image::open(
                    Box::new(MemStorage::from_bytes(b.clone())),
                    Path::new("base.qcow2"),
                )
                .unwrap();
                layers.push(Layer::new(
                    "base.qcow2".into(),
                    Some("base.qcow2".into()),
                    Image::Qcow2(bi),
                ));
            }
            let got = view(&Chain::from_layers(layers).unwrap());
            for (i, b) in got.iter().enumerate() {
                if !allowed.iter().any(|v| v.get(i) == Some(b)) {
                    panic!("{label}: guest byte {i:#x} = {b:#x}, a value it never had since the last flush");
                }
            }
            if n % qemu_every == 0 || label.contains("random-a") && n % qemu_every == 1 {
                qemu_check_no_corruption(dir.path(), &bytes, &label);
            }
        }
    }
    reference.current()
}

fn new_image(opts: CreateOptions) -> Vec<u8> {
    let m = MemStorage::new();
    create_qcow2(Box::new(m.clone()), Path::new("new.qcow2"), &opts).unwrap();
    m.to_bytes()
}

fn base_with_data(size: u64) -> Vec<u8> {
    let m = MemStorage::new();
    let mut img = create_qcow2(
        Box::new(m.clone()),
        Path::new("base.qcow2"),
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    img.write(0, &vec![0xbb; 200_000], &zeros).unwrap();
    img.write(size / 2, &vec![0xcc; 300_000], &zeros).unwrap();
    img.flush().unwrap();
    m.to_bytes()
}

#[test]
fn an_overlay_survives_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    let size = 2 << 20;
    let base = base_with_data(size);
    let top = new_image(CreateOptions {
        size,
        cluster_size: 4096,
        backing: Some(("base.qcow2".into(), ImageFormat::Qcow2)),
        ..Default::default()
    });
    let ops = [
        Op::Write(1000, 10_000, 1),
        Op::Write(190_000, 20_000, 2),
        Op::Flush,
        Op::Zero(4096, 8192, false),
        Op::Write(1_100_000, 70_000, 3),
        Op::Discard(0, 16384),
        Op::Write(500, 100, 4),
        Op::Zero(1_000_000, 200_000, true),
        Op::Flush,
        Op::Write(1_048_000, 5000, 5),
        Op::Flush,
    ];
    crash_everywhere(top, Some(base), &ops, 3, 1);
}

#[test]
fn refcount_blocks_and_table_growth_survive_a_crash_at_every_step() {
    if skip() {
        return;
    }
    // 512-byte clusters with 64-bit refcounts: a refcount block covers
    // 32 KiB and the first refcount table 2 MiB, so this workload creates
    // refcount blocks and moves the refcount table.
    let size = 4 << 20;
    let top = new_image(CreateOptions {
        size,
        cluster_size: 512,
        refcount_bits: 64,
        ..Default::default()
    });
    let ops = [
        Op::Write(0, 600_000, 7),
        Op::Flush,
        Op::Write(1_500_000, 900_000, 8),
        Op::Zero(100_000, 50_000, true),
        Op::Flush,
        Op::Write(2_600_000, 300_000, 9),
        Op::Flush,
        Op::Write(3_200_000, 500_000, 10),
        Op::Flush,
    ];
    let last = crash_everywhere(top, None, &ops, 10, 2);
    let h = strata_format::Header::parse(&last[..512]).unwrap();
    assert_ne!(
        h.refcount_table_offset(),
        512,
        "the workload should have moved the refcount table"
    );
}

#[test]
fn clusters_shared_with_an_internal_snapshot_survive_a_crash_at_every_step() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p.to_str().unwrap(),
        "1M",
    ]);
    qemu_io(&p, &["write -P 0x51 0 300k", "write -P 0x52 600k 100k"]);
    qemu_img(&["snapshot", "-c", "snap1", p.to_str().unwrap()]);
    let initial = std::fs::read(&p).unwrap();
    let ops = [
        Op::Write(10_000, 50_000, 1),
        Op::Flush,
        Op::Zero(600 << 10, 40_000, true),
        Op::Write(0, 4096, 2),
        Op::Flush,
    ];
    crash_everywhere(initial, None, &ops, 3, 1);
}
