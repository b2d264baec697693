//! Chain reads equal `qemu-img convert -O raw` on chains qemu-img made.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::{Chain, OpenOptions};

fn strata_raw(img: &Path) -> Vec<u8> {
    let chain = Chain::open(img, &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    // Read in odd-sized pieces to cross cluster and extent boundaries.
    let mut off = 0;
    let step = 100_003;
    while off < buf.len() {
        let n = step.min(buf.len() - off);
        chain.read_at(&mut buf[off..off + n], off as u64).unwrap();
        off += n;
    }
    buf
}

fn assert_reads_like_qemu(img: &Path, dir: &Path) {
    let ours = strata_raw(img);
    let theirs = qemu_raw(img, dir);
    assert_eq!(ours.len(), theirs.len());
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("{}: first difference at guest offset {i:#x}", img.display());
    }
}

fn two_layer(dir: &Path, opts: &str, top_opts: &str) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_create(&["-o", opts, base.to_str().unwrap(), "4M"]);
    qemu_io(
        &base,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1536k 100k",
            "write -z 3M 512k",
        ],
    );
    let o = format!("{top_opts}backing_file=base.qcow2,backing_fmt=qcow2");
    qemu_create(&["-o", &o, top.to_str().unwrap()]);
    qemu_io(
        &top,
        &[
            "write -P 0x33 4096 8192",
            "write -z 512k 64k",
            "write -P 0x44 3100k 300k",
            "discard 1600k 4k",
        ],
    );
    top
}

#[test]
fn two_layer_chains_of_every_cluster_size_read_like_qemu() {
    if skip() {
        return;
    }
    for cs in ["512", "4k", "64k", "2M"] {
        let dir = tempfile::tempdir().unwrap();
        let top = two_layer(
            dir.path(),
            &format!("cluster_size={cs}"),
            &format!("cluster_size={cs},"),
        );
        assert_reads_like_qemu(&top, dir.path());
    }
}

#[test]
fn extended_l2_and_v2_chains_read_like_qemu() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = two_layer(
        dir.path(),
        "cluster_size=64k,extended_l2=on",
        "extended_l2=on,",
    );
    assert_reads_like_qemu(&top, dir.path());
    let dir = tempfile::tempdir().unwrap();
    let top = two_layer(dir.path(), "compat=0.10", "compat=0.10,");
    assert_reads_like_qemu(&top, dir.path());
}

#[test]
fn compressed_images_read_like_qemu() {
    if skip() {
        return;
    }
    for ct in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = d.join("src.raw");
        let mut data = vec![0u8; 2 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i / 777) % 251) as u8;
        }
        data[1 << 20..(1 << 20) + 65536].fill(0);
        std::fs::write(&raw, &data).unwrap();
        let img = d.join("c.qcow2");
        let o = format!("compression_type={ct}");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &o,
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        assert_reads_like_qemu(&img, d);
        assert_eq!(strata_raw(&img), data);
    }
}

#[test]
fn a_backing_file_shorter_than_its_overlay_reads_zeros_past_its_end() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = short_raw_backed(dir.path());
    assert_reads_like_qemu(&top, dir.path());
}

/// A 3 MiB overlay (4 KiB written at 2 MiB) of a 1 MiB raw backing file.
fn short_raw_backed(d: &Path) -> PathBuf {
    std::fs::write(d.join("base.raw"), vec![0x55u8; 1 << 20]).unwrap();
    let top = d.join("top.qcow2");
    qemu_create(&["-b", "base.raw", "-F", "raw", top.to_str().unwrap(), "3M"]);
    qemu_io(&top, &["write -P 0x66 2M 4k"]);
    top
}

/// `Qcow2Image::map` remembers its last extent on read-only images; answers
/// must not depend on the order of the questions. Every layer of a chain
/// is asked about pseudo-random ranges (inside, overlapping and after the
/// remembered extent) by one image and, fresh each time, by another.
#[test]
fn map_answers_do_not_depend_on_the_order_of_questions() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (opts, top_opts) in [
        ("cluster_size=4096", ""),
        ("cluster_size=65536,extended_l2=on", "extended_l2=on,"),
    ] {
        let top = two_layer(dir.path(), opts, top_opts);
        let remembering = Chain::open(&top, &OpenOptions::default()).unwrap();
        let size = remembering.virtual_size();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut prev = 0u64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half the questions start a little after the previous one.
            let start = if x & 1 == 0 {
                x % size
            } else {
                (prev + (x >> 8) % 65536).min(size - 1)
            };
            prev = start;
            let len = 1 + (x >> 32) % (size - start);
            for depth in 0..remembering.layers().len() {
                let fresh = Chain::open(&top, &OpenOptions::default()).unwrap();
                let want = fresh.layers()[depth].image.map(start, len).unwrap();
                let got = remembering.layers()[depth].image.map(start, len).unwrap();
                assert_eq!(
                    got, want,
                    "{opts}: layer {depth}, map({start:#x}, {len:#x})"
                );
            }
        }
    }
}

/// Walks the view of `img` in odd-sized steps, mapping what can be mapped
/// (block status, then `Image::mapped_data` of the layer holding the
/// data, as the merge walk does) and checking it against a copying read of
/// the same bytes. Returns the bytes that came mapped.
fn mapped_bytes_equal_read_bytes(img: &Path) -> u64 {
    use strata_image::block_status::{block_status_at, StatusCache};
    use strata_image::chain::read_below;
    let chain = Chain::open(img, &OpenOptions::default()).unwrap();
    let layers = chain.layers();
    let size = chain.virtual_size();
    let (mut pos, mut mapped) = (0u64, 0u64);
    let step = 100_003u64;
    let mut cache = StatusCache::new();
    while pos < size + step {
        let s = block_status_at(layers, &mut cache, pos, step).unwrap();
        let m = match s.layer {
            Some(d) if s.reads_data() => {
                let n = usize::try_from(s.length).unwrap();
                layers[d].image.mapped_data(s.mapping, n).unwrap()
            }
            _ => None,
        };
        match m {
            Some(m) => {
                assert!(!m.is_empty() && m.len() as u64 <= step.min(size - pos));
                let mut want = vec![0u8; m.len()];
                read_below(layers, &mut want, pos).unwrap();
                assert!(
                    *m == want[..],
                    "{}: mapped bytes at {pos:#x}",
                    img.display()
                );
                mapped += m.len() as u64;
                pos += m.len() as u64;
            }
            None => pos += step,
        }
    }
    mapped
}

/// A merge passes stored data on mapped rather than copied where it can;
/// the mapped bytes are the bytes a read gives, and only uncompressed data
/// inside the file is ever mapped (zeros, compressed clusters and the space
/// past a short backing file are read).
#[test]
fn mapped_data_is_the_data_a_read_gives() {
    if skip() {
        return;
    }
    for (opts, top_opts) in [
        ("cluster_size=512", "cluster_size=512,"),
        ("cluster_size=65536,extended_l2=on", "extended_l2=on,"),
        ("cluster_size=2M", ""),
        ("compat=0.10", "compat=0.10,"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let top = two_layer(dir.path(), opts, top_opts);
        // Data: 1 MiB + 100 KiB in the base, 8 KiB + 300 KiB in the top
        // (more where a partial write copied whole clusters up).
        let mapped = mapped_bytes_equal_read_bytes(&top);
        assert!(mapped > 1 << 20, "{opts}: {mapped} bytes mapped");
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("src.raw"), vec![0x5au8; 1 << 20]).unwrap();
    let img = d.join("c.qcow2");
    let (src, dst) = (d.join("src.raw"), img.clone());
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert_eq!(mapped_bytes_equal_read_bytes(&img), 0, "compressed");

    // Metadata preallocation: every cluster is a data cluster, stored in
    // a hole of the file until written. Holes are read, never mapped
    // (touching one through a mapping would allocate it on tmpfs).
    let pre = d.join("pre.qcow2");
    qemu_create(&["-o", "preallocation=metadata", pre.to_str().unwrap(), "4M"]);
    qemu_io(&pre, &["write -P 0x77 1M 64k"]);
    let mapped = mapped_bytes_equal_read_bytes(&pre);
    assert!(
        mapped <= 65536,
        "{mapped} bytes of a preallocated image mapped"
    );

    let top = short_raw_backed(d);
    // The raw backing file's 1 MiB and the top's cluster at 2 MiB, and
    // nothing past the backing file's end.
    let mapped = mapped_bytes_equal_read_bytes(&top);
    assert!((1 << 20..=(1 << 20) + 65536).contains(&mapped), "{mapped}");
}
