//! Writes seed inputs for every target into `fuzz/corpus/<target>/`, from
//! the qcow2 fixtures in testdata/ and, when given, a directory made by
//! `testdata/make-chains.sh OUTDIR`:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --bin make-seeds -- [CHAINS_DIR]
//!
//! Run from the repository root. Seeds are named `seed-<what>`; files the
//! fuzzer adds later are named by their hash, so the two never collide.

use std::fs;
use std::path::{Path, PathBuf};

use strata_format::header::peek_cluster_bits;
use strata_fuzz::harness::encode_chain_input;

/// Largest image used as a seed (keeps the committed corpus small).
const MAX_SEED_IMAGE: usize = 160 << 10;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    fs::create_dir_all(&dir).expect("create corpus directory");
    fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

/// Cluster 0 without its trailing zeros (what Header::parse needs).
fn header_bytes(img: &[u8]) -> Vec<u8> {
    let cs = peek_cluster_bits(img).map_or(4096, |b| 1usize << b);
    let c0 = &img[..cs.min(img.len())];
    let end = c0
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i + 1)
        .max(112);
    c0[..end.min(c0.len())].to_vec()
}

/// A few write operations (see harness::decode_ops).
fn ops() -> Vec<u8> {
    let mut v = Vec::new();
    let mut op = |kind: u8, sector: u32, sub: u16, len4: u16, fill: u8| {
        v.push(kind);
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&sub.to_le_bytes());
        v.extend_from_slice(&len4.to_le_bytes());
        v.push(fill);
    };
    op(0x10, 0, 0, 1024, 0xee); // write 4 KiB at 0
    op(0x10, 9, 17, 300, 0xdd); // unaligned write
    op(0x11, 16, 0, 2048, 1); // zero 8 KiB, unmap
    op(0x12, 128, 0, 16384, 0); // discard 64 KiB
    op(0x13, 0, 0, 0, 0); // flush
    op(0x00, 3, 0, 1024, 0xcc); // at / past the end
    op(0x10, 2000, 5, 40000, 0xbb); // long write further in
    v
}

fn main() {
    let mut images: Vec<(String, PathBuf, Option<PathBuf>)> = Vec::new();
    for e in fs::read_dir("testdata").expect("run from the repository root") {
        let p = e.expect("read testdata").path();
        if p.extension().is_some_and(|x| x == "qcow2") {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let base =
                (name == "overlay-relative").then(|| PathBuf::from("testdata/backing-base.qcow2"));
            images.push((name, p, base));
        }
    }
    if let Some(chains) = std::env::args().nth(1) {
        let shapes =
            fs::read_to_string(Path::new(&chains).join("SHAPES")).expect("CHAINS_DIR/SHAPES");
        for shape in shapes.lines() {
            let dir = Path::new(&chains).join(shape);
            let Ok(top) = fs::read_to_string(dir.join("top")) else {
                continue;
            };
            let top = dir.join(top.trim());
            // The immediate backing file, by the name the top records.
            let base = fs::read_dir(&dir)
                .ok()
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p != &top && p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
                .filter(|_| {
                    let t = fs::read(&top).unwrap_or_default();
                    t.windows(5).any(|w| w == b"base.")
                });
            images.push((format!("chain-{shape}"), top, base));
        }
    }
    images.sort();
    for (name, path, base) in &images {
        let top = fs::read(path).expect("read image");
        put("header", name, &header_bytes(&top));
        if top.len() > MAX_SEED_IMAGE && name != "v3-64k" {
            continue;
        }
        let base_bytes = base.as_ref().map(|b| fs::read(b).expect("read base"));
        let flags = u8::from(base_bytes.is_some());
        let base_bytes = base_bytes.unwrap_or_default();
        put(
            "open_read",
            name,
            &encode_chain_input(flags, 7, &top, &base_bytes, &[]),
        );
        let raw_base: Vec<u8> = (0..(1u32 << 20)).map(|i| (i >> 12) as u8 | 0x80).collect();
        if !name.starts_with("chain-") {
            put(
                "open_read",
                &format!("{name}-rawbase"),
                &encode_chain_input(3, 11, &top, &raw_base[..8192], &[]),
            );
        }
        if top.len() <= MAX_SEED_IMAGE {
            put(
                "write",
                name,
                &encode_chain_input(flags, 3, &top, &base_bytes, &ops()),
            );
            if !name.starts_with("chain-") {
                put(
                    "write",
                    &format!("{name}-rawbase"),
                    &encode_chain_input(3, 3, &top, &raw_base[..8192], &ops()),
                );
            }
            let base_for_merge = if base_bytes.is_empty() {
                fs::read("testdata/backing-base.qcow2").unwrap()
            } else {
                base_bytes.clone()
            };
            put(
                "merge",
                &format!("{name}-commit"),
                &encode_chain_input(0, 0, &top, &base_for_merge, &[]),
            );
            put(
                "merge",
                &format!("{name}-pull"),
                &encode_chain_input(4, 0, &top, &base_for_merge, &[]),
            );
        }
    }
    // l2_refcount: entries of each kind, a refcount block, a snapshot entry.
    let l2 = |bits: u8, ext: u8, word: u64, bitmap: u64, sc: u8, order: u8| {
        let mut v = vec![bits, ext];
        v.extend_from_slice(&word.to_le_bytes());
        v.extend_from_slice(&bitmap.to_le_bytes());
        v.push(sc);
        v.extend_from_slice(&0x1_2345u64.to_le_bytes());
        v.extend_from_slice(&3000u64.to_le_bytes());
        v.extend_from_slice(&64u16.to_le_bytes());
        for i in 0..8u64 {
            v.extend_from_slice(&((word & !0xff) + (i << 16)).to_be_bytes());
        }
        v.push(order);
        v.extend((0..512u32).map(|i| (i * 37) as u8));
        v.extend_from_slice(&1u64.to_le_bytes());
        // A snapshot entry: l1 offset, l1 size, id/name lengths 1, extra 16.
        let mut s = vec![0u8; 40];
        s[7] = 0x30;
        s[11] = 1;
        s[13] = 1;
        s[15] = 1;
        s[39] = 16;
        s.extend_from_slice(&[0u8; 16]);
        s.extend_from_slice(b"1a");
        v.extend(s);
        v
    };
    put(
        "l2_refcount",
        "data",
        &l2(3, 0, 0x8000_0000_0005_0000, 0, 0, 4),
    );
    put(
        "l2_refcount",
        "zero",
        &l2(7, 0, 0x8000_0000_0005_0001, 0, 0, 0),
    );
    put(
        "l2_refcount",
        "compressed",
        &l2(3, 0, 0x4000_0000_0000_3a00 | (3 << 58), 0, 0, 3),
    );
    put(
        "l2_refcount",
        "extended",
        &l2(5, 1, 0x8000_0000_0005_0000, 0x0000_0002_0000_0001, 1, 6),
    );
    put(
        "l2_refcount",
        "extended-compressed",
        &l2(5, 1, 0x4000_0000_0001_0200, 1, 0, 1),
    );
    println!("seeds written under fuzz/corpus/ ({} images)", images.len());
}
