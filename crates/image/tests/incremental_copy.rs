//! The incremental_copy example against qemu-img on the same chain: a raw
//! copy of the base brought up to date with the overlay's allocated ranges
//! reads exactly as `qemu-img convert` of the whole chain, and only the
//! overlay's ranges were copied.

mod common;

#[path = "../examples/incremental_copy.rs"]
mod example;

use std::path::Path;

use common::{qemu_create, qemu_img, qemu_io, qemu_raw, skip};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_incremental_copy_of_the_overlay_matches_qemu_img_convert_of_the_chain() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&["-o", "cluster_size=65536", s(&base), "8M"]);
    qemu_io(&base, &["write -P 0x11 0 4M", "write -P 0x12 6M 1M"]);
    let top = d.join("top.qcow2");
    qemu_create(&["-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    // Data over base data, data over nothing, zeros over base data, and a
    // partial cluster (copy-on-write).
    qemu_io(
        &top,
        &[
            "write -P 0x21 64k 128k",
            "write -P 0x22 5M 64k",
            "write -z 1M 256k",
            "write -P 0x23 6400k 1k",
        ],
    );
    let backup = d.join("backup.raw");
    qemu_img(&["convert", "-O", "raw", s(&base), s(&backup)]);

    let st = example::incremental_copy(&top, &backup, Some(1)).unwrap();
    assert!(std::fs::read(&backup).unwrap() == qemu_raw(&top, d));
    // Only what the overlay allocates: 4 data clusters (2 + 1 + the one
    // copied on write) and 256k of zeros.
    assert_eq!(st.data_bytes, 4 * 65536);
    assert_eq!(st.zero_bytes, 256 << 10);

    // The full copy into a new file is the same view.
    let full = d.join("full.raw");
    let st = example::incremental_copy(&top, &full, None).unwrap();
    assert!(std::fs::read(&full).unwrap() == qemu_raw(&top, d));
    // The base's 5M less the 256k the overlay zeroed, plus its cluster at 5M.
    assert_eq!(st.data_bytes, (5 << 20) - (256 << 10) + 65536);
    assert_eq!(st.zero_bytes, 256 << 10);
}
