//! `strata demo` builds its chain with Strata alone and walks through the
//! inspection commands.

mod common;

use common::*;

#[test]
fn demo_builds_a_chain_and_walks_through_every_step() {
    // Arrange
    let d = tempdir();
    let dir = d.path().join("demo");
    // Act
    let r = strata_bin(&["demo", s(&dir)]);
    // Assert
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for step in [
        "== 1.",
        "== 2.",
        "$ strata info --backing-chain",
        "backing file: base.qcow2",
        "$ strata map --output json",
        "$ strata convert -O raw",
        "$ strata compare",
        "Images are identical.",
        "$ strata create -f qcow2 -b top.qcow2 -F qcow2",
        "$ strata io -c",
        "$ strata commit --dry-run",
        "Image committed.",
        "$ strata rebase -u -b base-copy.qcow2 -F qcow2",
        "$ strata pull",
        "$ strata snapshot create strata-demo take-1 -c test://",
        "+- take-2 (current)",
        "$ strata snapshot revert strata-demo take-1",
        "$ strata snapshot delete strata-demo take-2",
        "$ strata blockcommit strata-demo --delete-snapshots",
        "Successfully committed and pivoted",
        "Done.",
    ] {
        assert!(
            r.stdout.contains(step),
            "missing {step:?} in:\n{}",
            r.stdout
        );
    }
    assert!(dir.join("top.raw").exists());
}

#[test]
fn demo_chain_reads_the_same_through_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let dir = d.path().join("demo");
    let r = strata(&["demo", s(&dir)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let top = dir.join("top.qcow2");
    // After the commit, rebase -u and pull, top.qcow2 reads as the raw
    // copy taken before the rebase.
    let raw = dir.join("top-view.raw");
    // Every image Strata wrote is clean.
    for f in ["top.qcow2", "base.qcow2", "over.qcow2", "vm.qcow2"] {
        qemu_img_ok(&["check", s(&dir.join(f))]);
    }
    let out = qemu_img_ok(&["compare", "-F", "raw", s(&top), s(&raw)]);
    assert_eq!(out, "Images are identical.\n");
    // And strata's map of it equals qemu-img's.
    let expected = qemu_img_ok(&["map", "--output", "json", s(&top)]);
    assert_eq!(
        strata(&["map", "--output", "json", s(&top)]).stdout,
        expected
    );
}
