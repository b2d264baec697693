//! Operations on a chain deeper than the open limit (128 images) that
//! read less than the whole chain, against qemu-img at depth 200.

mod common;

use common::*;

#[test]
fn check_of_the_top_of_a_200_deep_chain_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |i: u32| dir.path().join(format!("l{i}.qcow2"));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p(0)), "1M"]);
    for i in 1..200 {
        let below = format!("l{}.qcow2", i - 1);
        qemu_overlay(&p(i), &below);
    }
    let top = p(199);
    qemu_io("qcow2", &top, &["write -P 9 0 64k"]);
    let expected = qemu_img_ok(&["check", s(&top)]);
    let r = strata(&["check", s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected);
    let expected = qemu_img_ok(&["check", "--output=json", s(&top)]);
    let r = strata(&["check", "--output=json", s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected);
}
