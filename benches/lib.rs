//! Image builders shared by the benchmarks: chains of qcow2 images made
//! with Strata's own writer, on files in a temporary directory.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};

/// Virtual size of the benchmark images.
pub const SIZE: u64 = 64 << 20;

/// Deterministic pseudo-random bytes (xorshift), so runs compare.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes `depth` images in `dir` (l0 the base, with `SIZE/2` of data;
/// each overlay writes `SIZE/(4*depth)` bytes in scattered 64 KiB pieces).
/// Returns the path of the top.
pub fn make_chain(dir: &Path, depth: usize) -> PathBuf {
    let mut prev: Option<String> = None;
    let mut top = PathBuf::new();
    for i in 0..depth {
        let name = format!("l{i}.qcow2");
        let p = dir.join(&name);
        let opts = CreateOptions {
            size: SIZE,
            backing: prev.clone().map(|b| (b, ImageFormat::Qcow2)),
            ..Default::default()
        };
        drop(
            create_qcow2(
                Box::new(FileStorage::create(&p).expect("create")),
                &p,
                &opts,
            )
            .expect("create image"),
        );
        let mut c = Chain::open(&p, &OpenOptions::new().writable(true)).expect("open");
        if i == 0 {
            c.write_at(&noise(1, (SIZE / 2) as usize), 0)
                .expect("write");
        } else {
            let pieces = (SIZE / (4 * depth as u64)) / 65536;
            for k in 0..pieces {
                let off = ((k * 7919 + i as u64 * 104_729) % (SIZE / 65536)) * 65536;
                c.write_at(&noise(i as u64 * 1000 + k, 65536), off)
                    .expect("write");
            }
        }
        c.flush().expect("flush");
        prev = Some(name);
        top = p;
    }
    top
}

/// Reads the whole guest view of `top` in 1 MiB pieces; returns a checksum.
pub fn read_all(top: &Path) -> u64 {
    let c = Chain::open(top, &OpenOptions::new().force_share(true)).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = 0u64;
    let mut off = 0;
    while off < c.virtual_size() {
        c.read_at(&mut buf, off).expect("read");
        sum = sum.wrapping_add(buf.iter().step_by(4096).map(|b| u64::from(*b)).sum::<u64>());
        off += buf.len() as u64;
    }
    sum
}

/// Walks the block status extents of `top` (what `map` merges into its
/// lines); returns their number.
pub fn map_all(top: &Path) -> usize {
    let c = Chain::open(top, &OpenOptions::new().force_share(true)).expect("open");
    let mut n = 0;
    let mut off = 0;
    while off < c.virtual_size() {
        let s = c
            .block_status(off, c.virtual_size() - off)
            .next()
            .expect("an extent");
        off += s.expect("block status").length;
        n += 1;
    }
    n
}
