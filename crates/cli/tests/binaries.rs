//! `strata` does not load libvirt; it hands the libvirt commands to
//! `strata-libvirt`, found next to it.

use std::process::Command;

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

#[test]
fn strata_is_not_linked_with_libvirt_and_strata_libvirt_is() {
    let ldd = |bin: &str| {
        let out = Command::new("ldd").arg(bin).output().unwrap();
        assert!(out.status.success(), "ldd {bin}");
        String::from_utf8(out.stdout).unwrap()
    };
    let strata = ldd(STRATA);
    assert!(
        !strata.contains("libvirt"),
        "strata links libvirt:\n{strata}"
    );
    let helper = std::path::Path::new(STRATA).with_file_name("strata-libvirt");
    let lv = ldd(helper.to_str().unwrap());
    assert!(lv.contains("libvirt.so"), "strata-libvirt:\n{lv}");
}

#[test]
fn libvirt_commands_run_through_strata_libvirt() {
    // The test driver knows no domain "nosuch": the error comes from
    // libvirt, so strata-libvirt ran; it names the program as strata.
    let out = Command::new(STRATA)
        .args(["snapshot", "list", "nosuch", "-c", "test:///default"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("strata: nosuch: "), "{err}");
    assert!(err.contains("Domain not found"), "{err}");
    // libvirt's message is said once, not again as the error's source.
    assert_eq!(err.matches("Domain not found").count(), 1, "{err}");
}

#[test]
fn without_strata_libvirt_the_libvirt_commands_fail_clearly_and_the_rest_work() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("strata");
    std::fs::copy(STRATA, &alone).unwrap();
    let out = Command::new(&alone)
        .args(["blockpull", "vm", "-c", "test:///default"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("strata-libvirt was not found"), "{err}");
    let img = dir.path().join("a.qcow2");
    let out = Command::new(&alone)
        .args(["create", "-f", "qcow2", img.to_str().unwrap(), "1M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&alone)
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
