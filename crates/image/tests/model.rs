//! Model-based property tests: random writes, zero writes, discards and
//! reopens on chains of 1 to 3 layers, against a `Vec<u8>` per layer. After
//! each sequence every layer reads as its model, `qemu-img check` is clean
//! and `qemu-img convert -O raw` of the top equals the model.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(200_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct LayerSpec {
    cluster_size: u64,
    extended_l2: bool,
    ops: Vec<Op>,
}

fn layer() -> impl Strategy<Value = LayerSpec> {
    (
        prop_oneof![Just(512u64), Just(4096), Just(65536), Just(16384)],
        any::<bool>(),
        prop::collection::vec(op(), 1..12),
    )
        .prop_map(|(cluster_size, ext, ops)| LayerSpec {
            cluster_size,
            extended_l2: ext && cluster_size >= 16384,
            ops,
        })
}

/// Applies an op to the model of a v3 image (discard: whole clusters read zero).
fn model_apply(m: &mut [u8], op: &Op, cluster: u64) {
    match *op {
        Op::Write { off, len, byte } => m[off as usize..(off + len) as usize].fill(byte),
        Op::Zero { off, len, .. } => m[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            let end = off + len;
            let first = off.div_ceil(cluster) * cluster;
            let last = if end == SIZE {
                SIZE
            } else {
                end / cluster * cluster
            };
            if first < last {
                m[first as usize..last as usize].fill(0);
            }
        }
        Op::Reopen => {}
    }
}

fn open_rw(p: &Path) -> Chain {
    Chain::open(p, &OpenOptions::new().writable(true)).unwrap()
}

fn read_all(p: &Path) -> Vec<u8> {
    let c = Chain::open(p, &OpenOptions::default()).unwrap();
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

fn run(layers: Vec<LayerSpec>) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut paths: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for (i, spec) in layers.iter().enumerate() {
        let p = dir.path().join(format!("l{i}.qcow2"));
        let backing = (i > 0).then(|| (format!("l{}.qcow2", i - 1), ImageFormat::Qcow2));
        let opts = CreateOptions {
            size: SIZE,
            cluster_size: spec.cluster_size,
            extended_l2: spec.extended_l2,
            backing,
            ..Default::default()
        };
        drop(create_qcow2(Box::new(FileStorage::create(&p).unwrap()), &p, &opts).unwrap());
        let mut chain = open_rw(&p);
        for op in &spec.ops {
            match *op {
                Op::Write { off, len, byte } => {
                    chain.write_at(&vec![byte; len as usize], off).unwrap()
                }
                Op::Zero { off, len, unmap } => chain.write_zeroes(off, len, unmap).unwrap(),
                Op::Discard { off, len } => chain.discard(off, len).unwrap(),
                Op::Reopen => {
                    chain.flush().unwrap();
                    drop(chain);
                    chain = open_rw(&p);
                }
            }
            model_apply(&mut model, op, spec.cluster_size);
        }
        chain.flush().unwrap();
        drop(chain);
        paths.push((p, model.clone()));
    }
    for (p, m) in &paths {
        assert!(
            read_all(p) == *m,
            "{} does not read as its model",
            p.display()
        );
        let out = std::process::Command::new("qemu-img")
            .args(["check", p.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check {}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let (top, m) = paths.last().unwrap();
    assert!(
        qemu_raw(top, dir.path()) == *m,
        "qemu-img convert of the top differs from the model"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn chains_read_as_their_model_and_check_clean(layers in prop::collection::vec(layer(), 1..=3)) {
        if !skip() {
            run(layers);
        }
    }
}
