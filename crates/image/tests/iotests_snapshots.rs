//! Crash consistency of the engine changes the CLI ports of iotests 029,
//! 060, 080 and 112 (crates/cli/tests/iotests_snapshots.rs) made: a
//! downgrade refused over an unaligned L2 table or preallocated zero
//! cluster marks the image corrupt (as QEMU's zero-cluster expansion
//! does) and writes nothing else, whatever the crash point.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use common::*;
use strata_image::amend::{amend_chain, AmendOptions, Compat};
use strata_image::{Chain, FaultStorage, Image, Layer, Qcow2Image};

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

fn chain_on(st: &FaultStorage) -> Chain {
    let img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("t.qcow2")).unwrap();
    Chain::from_layers(vec![Layer::new("t.qcow2".into(), None, Image::Qcow2(img))]).unwrap()
}

/// 060 "unaligned L1 entry" and "unaligned pre-allocated zero cluster",
/// `amend -o compat=0.10`: refused, and the file is the image as built
/// or the image with the corrupt bit set (byte 79), at every crash point
/// and for every subset of the pending writes.
#[test]
fn iotest_060_refused_downgrade_writes_only_the_corrupt_bit_at_any_crash() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = AmendOptions {
        compat: Some(Compat::V2),
        ..Default::default()
    };
    let cases: [(u64, &[u8]); 2] = [
        (0x30000, b"\x80\x00\x00\x00\x00\x04\x2a\x00"),
        (0x40000, b"\x80\x00\x00\x00\x00\x05\x2a\x01"),
    ];
    for (at, bytes) in cases {
        let img = dir.path().join("img.qcow2");
        qemu_create(&["-o", "compat=1.1", img.to_str().unwrap(), "64M"]);
        qemu_io(&img, &["write 0 64k"]);
        poke(&img, at, bytes);
        let initial = std::fs::read(&img).unwrap();
        let mut marked = initial.clone();
        marked[79] |= 2;
        let reference = FaultStorage::new(initial.clone());
        let mut chain = chain_on(&reference);
        assert!(amend_chain(&mut chain, &opts).is_err(), "{at:#x}");
        drop(chain);
        let total = reference.ops();
        assert!(total >= 1, "{at:#x}: nothing written");
        assert!(reference.current() == marked, "{at:#x}: not just the bit");
        for n in 0..total {
            let st = FaultStorage::new(initial.clone());
            st.crash_at(n);
            assert!(amend_chain(&mut chain_on(&st), &opts).is_err());
            for keep in [false, true] {
                let after = st.durable_image(&mut |_| keep);
                assert!(
                    after == initial || after == marked,
                    "{at:#x}: crash at {n}/{total} (keep {keep}) wrote more than the bit"
                );
            }
        }
    }
}

/// 112 "compressed clusters with refcount_bits=1": two compressed writes
/// that fit in one host cluster. With 1-bit refcounts the second cannot
/// share the first's cluster (its refcount would be 2): QEMU allocates a
/// new one; so must Strata. Same view, both clean.
#[test]
fn iotest_112_compressed_clusters_with_one_bit_refcounts() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, t) = (dir.path().join("q.qcow2"), dir.path().join("t.qcow2"));
    for img in [&q, &t] {
        qemu_create(&["-o", "refcount_bits=1", img.to_str().unwrap(), "64M"]);
    }
    qemu_io(&q, &["write -P 0 -c 0 64k", "write -P 1 -c 64k 64k"]);
    {
        let st = strata_image::FileStorage::open(&t, true).unwrap();
        let mut img = Qcow2Image::open_rw(Box::new(st), &t).unwrap();
        let none = |b: &mut [u8], _: u64| -> strata_image::Result<()> {
            b.fill(0);
            Ok(())
        };
        img.write_compressed(0, &[0u8; 65536], &none).unwrap();
        img.write_compressed(65536, &[1u8; 65536], &none).unwrap();
        img.close().unwrap();
    }
    for img in [&q, &t] {
        let out = std::process::Command::new("qemu-img")
            .args(["check", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(qemu_raw(&q, dir.path()), qemu_raw(&t, dir.path()));
    qemu_io(&t, &["read -P 0 0 64k", "read -P 1 64k 64k"]);
}
