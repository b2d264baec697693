//! The commit and pull paths on fresh copies of a two-layer chain.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use strata_benches::{make_chain, SIZE};
use strata_merge::{commit, pull, CommitOptions, Hooks, PullOptions};

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
    g.finish();
}

criterion_group!(benches, merges);
criterion_main!(benches);
