//! Helpers shared by the CLI's integration tests: running strata (in
//! process, or as the built binary), running qemu-img / qemu-io, and the
//! chain shapes made by testdata/make-chains.sh.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Whether the qemu tools may be used. Panics (the test fails) when they
/// are missing, unless STRATA_SKIP_QEMU_TESTS=1, in which case the test
/// should return early.
pub fn qemu_available() -> bool {
    if std::env::var("STRATA_SKIP_QEMU_TESTS").as_deref() == Ok("1") {
        return false;
    }
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is not installed: these differential tests need QEMU 10's tools \
             (run scripts/install-deps.sh), or set STRATA_SKIP_QEMU_TESTS=1 to skip them"
        );
    }
    true
}

/// Output of one strata run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs strata in-process (the library entry point the binary uses).
pub fn strata(args: &[&str]) -> Run {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut argv = vec!["strata"];
    argv.extend_from_slice(args);
    let code = strata_cli::run(argv, &mut out, &mut err);
    Run {
        code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// Runs the built `strata` binary.
pub fn strata_bin(args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata");
    to_run(o)
}

fn to_run(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs qemu-img.
pub fn qemu_img(args: &[&str]) -> Run {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    to_run(o)
}

/// Runs qemu-img and insists on success.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let r = qemu_img(args);
    assert_eq!(r.code, 0, "qemu-img {args:?} failed: {}", r.stderr);
    r.stdout
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 OVERLAY`, insisting on
/// success: a qcow2 overlay of `backing` (the name recorded, as qemu-img
/// resolves it: relative to the overlay's directory), as large as it.
pub fn qemu_overlay(overlay: &Path, backing: &str) {
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        "qcow2",
        s(overlay),
    ]);
}

/// Runs qemu-io commands on an image (format qcow2 unless `fmt` says).
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(img).output().expect("run qemu-io");
    assert!(
        o.status.success(),
        "qemu-io {cmds:?} {} failed: {}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A path as a &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The directory of chain shapes made by testdata/make-chains.sh, built
/// once per test run and shared, read-only, by every test process
/// (testdata/shared-chains.sh).
pub fn chains() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/shared-chains.sh");
        let o = Command::new("bash")
            .arg(&script)
            .arg(env!("CARGO_TARGET_TMPDIR"))
            .output()
            .expect("run shared-chains.sh");
        assert!(
            o.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
    })
}

/// The image to test in chain shape `shape`.
pub fn shape_top(shape: &str) -> PathBuf {
    let dir = chains().join(shape);
    let top = std::fs::read_to_string(dir.join("top")).expect("read the shape's top file");
    dir.join(top.trim())
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("strata-cli-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir")
}

/// Asserts that `r` failed with exit code `code` and an error on stderr
/// that starts with `strata: ` and mentions every one of `needles`.
pub fn assert_fails_with(r: &Run, code: i32, needles: &[&str]) {
    assert_eq!(r.code, code, "{}", r.stderr);
    assert!(r.stderr.starts_with("strata: "), "{}", r.stderr);
    for needle in needles {
        assert!(r.stderr.contains(needle), "{}", r.stderr);
    }
}

/// `qemu-img check` of `img` exits 0.
pub fn check_clean(img: &Path) {
    let r = qemu_img(&["check", s(img)]);
    assert_eq!(
        r.code,
        0,
        "qemu-img check {}: {}{}",
        img.display(),
        r.stdout,
        r.stderr
    );
}

/// `qemu-img compare`: the guest views of `a` and `b` are equal.
pub fn identical(a: &Path, b: &Path) {
    let r = qemu_img(&["compare", s(a), s(b)]);
    assert_eq!(
        r.code,
        0,
        "{} vs {}: {}{}",
        a.display(),
        b.display(),
        r.stdout,
        r.stderr
    );
}

/// qemu-io holding an image open read-write (as a running VM does) until
/// dropped.
pub struct QemuIoHolds {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl QemuIoHolds {
    /// Starts qemu-io on `img` and waits until it has the image open (it
    /// answers a command only then), and so locked.
    pub fn start(img: &Path) -> QemuIoHolds {
        use std::io::{BufRead, Write};
        use std::process::Stdio;
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2", s(img)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"length\n").expect("ask qemu-io");
        let mut answer = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut answer)
            .expect("qemu-io answer");
        assert!(
            answer.contains("iB"),
            "qemu-io did not open {img:?}: {answer:?}"
        );
        QemuIoHolds {
            child,
            stdin: Some(stdin),
        }
    }
}

impl Drop for QemuIoHolds {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.child.wait();
    }
}

/// The `<disk>` element of a qcow2 file disk `dev` (virtio) on `file`.
pub fn qcow2_disk_xml(file: &Path, dev: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
        file.display()
    )
}

/// Writes `dir`/node.xml, the node file of libvirt's test driver with one
/// shut-off domain "vm" whose devices are `devices` (XML elements), and
/// returns its URI (`test://...`; `dir` must have no space in its path).
pub fn test_driver_uri(dir: &Path, devices: &str) -> String {
    let node = format!(
        "<node><domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>vm</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\
         <memory>65536</memory><os><type>hvm</type></os><devices>{devices}</devices>\
         <test:runstate>5</test:runstate></domain></node>"
    );
    let path = dir.join("node.xml");
    std::fs::write(&path, node).unwrap();
    format!("test://{}", path.display())
}
