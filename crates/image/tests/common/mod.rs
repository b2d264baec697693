//! Helpers shared by the tests that use QEMU's tools as the oracle.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Whether tests needing qemu-img should be skipped (only when asked).
pub fn skip() -> bool {
    std::env::var_os("STRATA_SKIP_QEMU_TESTS").is_some()
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -c CMD... IMG`.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    run("qemu-io", &args);
}

/// `qemu-img create -q -f qcow2 ARGS...`: options, then the image and,
/// unless a backing file gives it, its size.
pub fn qemu_create(args: &[&str]) {
    let mut full = vec!["create", "-q", "-f", "qcow2"];
    full.extend_from_slice(args);
    qemu_img(&full);
}

/// The guest view of `img` as qemu-img reads it.
pub fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.oracle.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}
