//! The write policy of `OpenOptions`: what the first write does with an
//! unknown autoclear bit and with unreadable bitmaps, compared with what
//! qemu-io does to a twin. (The dirty image is in write_oracle.rs.) By
//! default each is refused and nothing is written.

mod common;

use std::path::Path;

use common::{qemu_create, qemu_img, qemu_io, qemu_raw, skip};
use strata_format::Header;
use strata_image::{Chain, OnBadBitmaps, OnDirty, OnUnknownAutoclear, OpenOptions, WritePolicy};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open(img: &Path, policy: WritePolicy) -> Chain {
    let opts = OpenOptions::new().writable(true).write_policy(policy);
    Chain::open(img, &opts).unwrap()
}

fn autoclear(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    u64::from_be_bytes(b[88..96].try_into().unwrap())
}

fn qemu_info(p: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", s(p)])).unwrap()
}

#[test]
fn an_unknown_autoclear_bit_is_refused_by_default_and_cleared_as_qemu_io_clears_it() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    qemu_create(&[s(&q), "4M"]);
    qemu_io(&q, &["write -P 0x11 0 128k"]);
    let mut bytes = std::fs::read(&q).unwrap();
    bytes[88] |= 0x80; // autoclear bit 63
    std::fs::write(&q, &bytes).unwrap();
    let st = dir.path().join("s.qcow2");
    std::fs::write(&st, &bytes).unwrap();

    {
        let mut c = open(&st, WritePolicy::default());
        let e = c.write_at(&[0x22; 4096], 64 << 10).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("s.qcow2") && msg.contains("autoclear"),
            "{msg}"
        );
    }
    assert!(
        std::fs::read(&st).unwrap() == bytes,
        "a refused write changed the file"
    );

    qemu_io(&q, &["write -P 0x22 64k 4k"]);
    let policy = WritePolicy::default().unknown_autoclear(OnUnknownAutoclear::Clear);
    {
        let mut c = open(&st, policy);
        c.write_at(&[0x22; 4096], 64 << 10).unwrap();
        c.flush().unwrap();
    }
    assert_eq!(autoclear(&q), 0, "QEMU clears the unknown bit");
    assert_eq!(autoclear(&st), autoclear(&q));
    assert!(qemu_raw(&st, dir.path()) == qemu_raw(&q, dir.path()));
    qemu_img(&["check", s(&st)]);
}

/// A bitmap directory whose first entry's table offset is unaligned.
fn damage_bitmaps(p: &Path) {
    let mut bytes = std::fs::read(p).unwrap();
    let h = Header::parse(&bytes[..65536]).unwrap();
    let (_, _, dir_off) = h.bitmaps().expect("a bitmaps extension");
    let d = dir_off as usize;
    bytes[d..d + 8].copy_from_slice(&0x12345u64.to_be_bytes());
    std::fs::write(p, &bytes).unwrap();
}

#[test]
fn unreadable_bitmaps_are_refused_by_default_and_dropped_only_when_asked() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("s.qcow2");
    qemu_create(&[s(&st), "4M"]);
    qemu_img(&["bitmap", "--add", s(&st), "b0"]);
    qemu_io(&st, &["write -P 0x31 0 64k"]);
    damage_bitmaps(&st);
    let bytes = std::fs::read(&st).unwrap();

    // Refused by default, and by QEMU's policy too (QEMU will not open it
    // read-write).
    for policy in [WritePolicy::default(), WritePolicy::qemu()] {
        let mut c = open(&st, policy);
        let e = c.write_at(&[0x32; 4096], 0).unwrap_err();
        assert!(e.to_string().contains("bitmaps cannot be read"), "{e}");
        drop(c);
        assert!(std::fs::read(&st).unwrap() == bytes, "{policy:?} wrote");
    }

    let policy = WritePolicy::default()
        .bitmaps(OnBadBitmaps::Drop)
        .dirty(OnDirty::Refuse);
    {
        let mut c = open(&st, policy);
        c.write_at(&[0x32; 4096], 0).unwrap();
        c.flush().unwrap();
    }
    // QEMU now ignores the bitmaps (their autoclear bit is clear) and
    // reads the write.
    assert_eq!(autoclear(&st) & 1, 0);
    let info = qemu_info(&st);
    let listed = &info["format-specific"]["data"]["bitmaps"];
    assert!(
        listed.is_null() || listed.as_array().is_some_and(|a| a.is_empty()),
        "{info}"
    );
    let view = qemu_raw(&st, dir.path());
    assert!(view[..4096].iter().all(|&b| b == 0x32));
    assert!(view[4096..65536].iter().all(|&b| b == 0x31));
}
