//! `close()` returns the flush error a drop can only log: on a storage
//! that fails from some operation on, the writes go through, the close
//! fails naming the image, and a close that succeeds leaves an image
//! qemu-img finds clean and reading as written.

mod common;

use std::path::Path;

use common::{qemu_create, qemu_img, skip};
use strata_image::{Chain, FaultStorage, Image, Layer, Qcow2Image};

fn chain_on(st: &FaultStorage, path: &Path) -> Chain {
    let q = Qcow2Image::open_rw(Box::new(st.clone()), path).unwrap();
    Chain::from_layers(vec![Layer::new(path.to_path_buf(), None, Image::Qcow2(q))]).unwrap()
}

#[test]
fn close_returns_the_flush_error_and_a_clean_close_leaves_a_clean_image() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&[p.to_str().unwrap(), "4M"]);
    let initial = std::fs::read(&p).unwrap();

    // The writes' metadata waits in memory for the flush; the storage
    // fails from its next operation on, so the flush in close() fails.
    let st = FaultStorage::new(initial.clone());
    let mut chain = chain_on(&st, &p);
    chain.write_at(&[0x5a; 65536], 0).unwrap();
    chain.write_at(&[0x5b; 4096], 1 << 20).unwrap();
    st.crash_at(st.ops());
    let e = chain.close().expect_err("the failed flush is returned");
    assert!(e.to_string().contains("a.qcow2"), "{e}");
    assert!(st.crashed());

    // The same on a storage that does not fail: close() is Ok and the
    // image is what qemu-img reads.
    let st = FaultStorage::new(initial);
    let mut chain = chain_on(&st, &p);
    chain.write_at(&[0x5a; 65536], 0).unwrap();
    chain.write_at(&[0x5b; 4096], 1 << 20).unwrap();
    chain.close().unwrap();
    std::fs::write(&p, st.current()).unwrap();
    qemu_img(&["check", p.to_str().unwrap()]);
    let raw = dir.path().join("a.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let v = std::fs::read(&raw).unwrap();
    assert!(v[..65536].iter().all(|&b| b == 0x5a));
    assert!(v[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x5b));
}
