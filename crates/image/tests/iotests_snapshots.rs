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
