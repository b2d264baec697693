//! Reads, map and check through chains of depth 1 to 16.
#![allow(missing_docs)] // criterion_group! generates undocumented functions

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata_benches::{make_chain, map_all, read_all, SIZE};
use strata_image::{FileStorage, Qcow2Image};

fn chains(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("chain");
    g.sample_size(10);
    for depth in [1usize, 2, 4, 8, 16] {
        let d = dir.path().join(format!("d{depth}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let top = make_chain(&d, depth);
        g.throughput(Throughput::Bytes(SIZE));
        g.bench_with_input(BenchmarkId::new("read", depth), &top, |b, top| {
            b.iter(|| read_all(top))
        });
        g.bench_with_input(BenchmarkId::new("map", depth), &top, |b, top| {
            b.iter(|| map_all(top))
        });
        if depth == 16 {
            g.bench_with_input(BenchmarkId::new("check", depth), &top, |b, top| {
                b.iter(|| {
                    let img = Qcow2Image::open(
                        Box::new(FileStorage::open(top, false).expect("open")),
                        top,
                    )
                    .expect("qcow2");
                    strata_image::check::check(&img).expect("check").corruptions
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, chains);
criterion_main!(benches);
