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

/// A xorshift generator: the tests' reproducible randomness.
pub struct Rng(pub u64);

impl Rng {
    /// The next number (never 0 when the seed is not).
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Chooses which unsynced writes reached the disk (for
/// `FaultStorage::durable_image`).
pub type Keep = Box<dyn FnMut(usize) -> bool>;

/// A writable chain whose top ("top.qcow2") lives on the fault-injecting
/// storage `top`, above an in-memory qcow2 base ("base.qcow2") holding
/// `base` when given.
pub fn fault_chain(top: &strata_image::FaultStorage, base: Option<&[u8]>) -> strata_image::Chain {
    use strata_image::{Chain, Image, Layer, MemStorage, Qcow2Image};
    let img = Qcow2Image::open_rw(Box::new(top.clone()), Path::new("top.qcow2")).unwrap();
    let mut layers = vec![Layer::new("top.qcow2".into(), None, Image::Qcow2(img))];
    if let Some(b) = base {
        let bi = Qcow2Image::open(
            Box::new(MemStorage::from_bytes(b.to_vec())),
            Path::new("base.qcow2"),
        )
        .unwrap();
        layers.push(Layer::new(
            "base.qcow2".into(),
            Some("base.qcow2".into()),
            Image::Qcow2(bi),
        ));
    }
    Chain::from_layers(layers).unwrap()
}

/// The whole guest view of `chain`.
pub fn view(chain: &strata_image::Chain) -> Vec<u8> {
    let mut v = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut v, 0).unwrap();
    v
}

/// Writes `top` (an image's bytes after a simulated crash) into `dir` and
/// insists that `qemu-img check` finds no corruption (leaks, exit 3, are
/// allowed: a crash may leak clusters).
pub fn qemu_check_no_corruption(dir: &Path, top: &[u8], label: &str) {
    let p = dir.join("top.qcow2");
    std::fs::write(&p, top).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", p.to_str().unwrap()])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{label}: qemu-img check exit {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
