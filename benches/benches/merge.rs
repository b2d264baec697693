//! The commit and pull paths on a two-layer chain: on fresh copies of the
//! files (`merge/commit`, `merge/pull`), and on memory storage
//! (`merge/commit_mem`, `merge/pull_mem`: the engine's own cost, without
//! system calls or the disk).
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use strata_benches::{make_chain, SIZE};
use strata_image::{Chain, Image, Layer, MemStorage, Qcow2Image};
use strata_merge::{
    commit, commit_open, pull, pull_open, CommitOptions, CommitParts, Hooks, PullOptions,
};

/// An image on memory storage holding `bytes`, read-only or writable.
fn mem_layer(name: &str, bytes: &[u8], writable: bool, named: bool) -> Layer {
    let st = Box::new(MemStorage::from_bytes(bytes.to_vec()));
    let q = if writable {
        Qcow2Image::open_rw(st, Path::new(name))
    } else {
        Qcow2Image::open(st, Path::new(name))
    }
    .expect("open");
    Layer::new(name.into(), named.then(|| name.into()), Image::Qcow2(q))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn merges(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    make_chain(&src, 2);
    let mut g = c.benchmark_group("merge");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE / 8));
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        let d = dir.path().join(format!("run{n}"));
        copy_dir(&src, &d);
        d
    };
    g.bench_function("commit", |b| {
        b.iter_batched(
            &mut fresh,
            |d| {
                commit(
                    &d.join("l1.qcow2"),
                    &CommitOptions::default(),
                    &mut Hooks::default(),
                )
                .expect("commit")
            },
            BatchSize::PerIteration,
        )
    });
    let mut fresh = || {
        n += 1;
        let d = dir.path().join(format!("pull{n}"));
        copy_dir(&src, &d);
        d
    };
    g.bench_function("pull", |b| {
        b.iter_batched(
            &mut fresh,
            |d| {
                pull(
                    &d.join("l1.qcow2"),
                    &PullOptions::default(),
                    &mut Hooks::default(),
                )
                .expect("pull")
            },
            BatchSize::PerIteration,
        )
    });
    // The same merges on memory storage: the images' bytes are copied
    // into fresh memory storages for each iteration (not timed).
    let base = std::fs::read(src.join("l0.qcow2")).expect("read base");
    let top = std::fs::read(src.join("l1.qcow2")).expect("read top");
    g.bench_function("commit_mem", |b| {
        b.iter_batched(
            || {
                // Top and its read view share one storage, as commit() has.
                let st = MemStorage::from_bytes(top.clone());
                let rw = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("l1.qcow2"))
                    .expect("open top");
                let ro = Qcow2Image::open(Box::new(st), Path::new("l1.qcow2")).expect("open");
                let top_chain =
                    Chain::from_layers(vec![Layer::new("l1.qcow2".into(), None, Image::Qcow2(rw))])
                        .expect("chain");
                let upper = vec![Layer::new("l1.qcow2".into(), None, Image::Qcow2(ro))];
                let base_chain =
                    Chain::from_layers(vec![mem_layer("l0.qcow2", &base, true, false)])
                        .expect("chain");
                (upper, base_chain, top_chain)
            },
            |(upper, mut base_chain, mut top_chain)| {
                commit_open(
                    CommitParts {
                        upper: &upper,
                        base: &mut base_chain,
                        top: &mut top_chain,
                        backing: None,
                    },
                    &CommitOptions::default(),
                    &mut Hooks::default(),
                )
                .expect("commit")
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("pull_mem", |b| {
        b.iter_batched(
            || {
                Chain::from_layers(vec![
                    mem_layer("l1.qcow2", &top, true, false),
                    mem_layer("l0.qcow2", &base, false, true),
                ])
                .expect("chain")
            },
            |mut chain| pull_open(&mut chain, 2, None, false, &mut Hooks::default()).expect("pull"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, merges);
criterion_main!(benches);
