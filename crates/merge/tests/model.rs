//! Model-based property test: random three-layer chains (a `Vec<u8>` is
//! the model of the guest view) and a random merge; afterwards the top
//! (and, for a commit, the base) reads exactly the model.

use std::path::Path;

use proptest::prelude::*;
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};
use strata_merge::{commit, pull, CommitOptions, Hooks, PullOptions};

const SIZE: u64 = 192 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Zero { off: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    (0..SIZE, 1..40_000u64, any::<u8>(), 0..4u8).prop_map(|(off, len, byte, k)| {
        let len = len.min(SIZE - off);
        if k == 0 {
            Op::Zero { off, len }
        } else {
            Op::Write { off, len, byte }
        }
    })
}

#[derive(Debug, Clone, Copy)]
enum Merge {
    Commit,
    CommitIntoBase,
    Pull,
    PullToBase,
}

fn build(dir: &Path, cluster: u64, v2: bool, layers: &[Vec<Op>], model: &mut [u8]) {
    for (i, ops) in layers.iter().enumerate() {
        let path = dir.join(format!("l{i}.qcow2"));
        let opts = CreateOptions {
            size: SIZE,
            cluster_size: cluster,
            compat_v2: v2,
            backing: (i > 0).then(|| (format!("l{}.qcow2", i - 1), ImageFormat::Qcow2)),
            ..CreateOptions::default()
        };
        drop(create_qcow2(Box::new(FileStorage::create(&path).unwrap()), &path, &opts).unwrap());
        let mut chain = Chain::open(&path, &OpenOptions::new().writable(true)).unwrap();
        for op in ops {
            match *op {
                Op::Write { off, len, byte } => {
                    chain.write_at(&vec![byte; len as usize], off).unwrap();
                    model[off as usize..(off + len) as usize].fill(byte);
                }
                Op::Zero { off, len } => {
                    chain.write_zeroes(off, len, false).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
            }
        }
        chain.flush().unwrap();
    }
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut buf, 0).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn merges_of_random_chains_read_like_the_model(
        cluster in prop::sample::select(vec![512u64, 4096, 65536]),
        v2 in any::<bool>(),
        layers in prop::collection::vec(prop::collection::vec(op(), 0..6), 3),
        merge in prop::sample::select(vec![Merge::Commit, Merge::CommitIntoBase, Merge::Pull, Merge::PullToBase]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; SIZE as usize];
        build(dir.path(), cluster, v2, &layers, &mut model);
        let top = dir.path().join("l2.qcow2");
        let base = dir.path().join("l0.qcow2");
        let mid = dir.path().join("l1.qcow2");
        let h = &mut Hooks::default();
        match merge {
            Merge::Commit => {
                let _ = commit(&top, &CommitOptions::default(), h).unwrap();
                prop_assert!(read_all(&mid) == model, "mid holds the view");
            }
            Merge::CommitIntoBase => {
                let o = CommitOptions::default().with_base(base.clone());
                let _ = commit(&top, &o, h).unwrap();
                prop_assert!(read_all(&base) == model, "base holds the view");
            }
            Merge::Pull => {
                let _ = pull(&top, &PullOptions::default(), h).unwrap();
            }
            Merge::PullToBase => {
                let o = PullOptions::default().with_base(base.clone());
                let _ = pull(&top, &o, h).unwrap();
            }
        }
        prop_assert!(read_all(&top) == model, "top reads the model");
    }
}
