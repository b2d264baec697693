//! Helpers for tests that use QEMU's tools as the oracle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-io -c CMD... IMG` (qcow2 unless the name ends in .raw).
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let fmt = if s(img).ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    };
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 OVERLAY`: a qcow2 overlay
/// of `backing` (the name recorded, as qemu-img resolves it: relative to the
/// overlay's directory), as large as it.
pub fn qemu_overlay(overlay: &Path, backing: &str) {
    qemu_img(&[
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

/// The chain shapes of testdata/make-chains.sh, made once per test run and
/// shared by every test process (testdata/shared-chains.sh). Read-only:
/// tests work on twins.
pub fn shapes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/shared-chains.sh");
        PathBuf::from(run("bash", &[s(&script), env!("CARGO_TARGET_TMPDIR")]).trim())
    })
}

/// Copies a shape's directory to `dest/name` (a twin); returns the top.
pub fn twin(shape: &str, dest: &Path, name: &str) -> PathBuf {
    let src = shapes().join(shape);
    let to = dest.join(name);
    run("cp", &["-a", s(&src), s(&to)]);
    let top = std::fs::read_to_string(to.join("top")).unwrap();
    to.join(top.trim())
}

/// The guest view of an image as qemu-img reads it.
pub fn view(img: &Path) -> Vec<u8> {
    let out = img.with_extension("view.raw");
    qemu_img(&["convert", "-U", "-O", "raw", s(img), s(&out)]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// `qemu-img compare` says identical.
pub fn assert_same(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", s(a), s(b)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` finds nothing wrong (qcow2 only).
pub fn assert_clean(img: &Path) {
    if !s(img).ends_with(".qcow2") {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-U", s(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` as a value.
pub fn info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(img)])).unwrap()
}

/// The backing file name qemu-img sees in the header.
pub fn backing_of(img: &Path) -> Option<String> {
    info(img)["backing-filename"].as_str().map(str::to_string)
}

/// Bytes the image itself (depth 0) maps with data or zeros.
pub fn own_allocated(img: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "-U", "--output=json", s(img)])).unwrap();
    m.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The moment of kill `i` of `n` in a SIGKILL test: spread over a run
/// that takes `full`, plus up to `jitter` taken from the clock.
pub fn kill_moment(
    i: u32,
    n: u32,
    full: std::time::Duration,
    jitter: std::time::Duration,
) -> std::time::Duration {
    let j = u64::from(std::time::Instant::now().elapsed().subsec_nanos())
        % (jitter.as_nanos() as u64).max(1);
    full.mul_f64(f64::from(i) / f64::from(n)) + std::time::Duration::from_nanos(j)
}

/// Lets `child` run for `at`, then SIGKILLs it and reaps it; whether it
/// was still running (killed mid-way rather than after finishing).
pub fn kill_after(mut child: std::process::Child, at: std::time::Duration) -> bool {
    std::thread::sleep(at);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    !finished
}

/// `qemu-img check -U -q`'s exit code (0 clean, 3 leaks only, 2 corrupt).
pub fn check_exit(img: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", "-U", "-q", s(img)])
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

/// Whether qcow2 `img` reads as the raw file `raw` (`qemu-img compare`).
pub fn same_as_raw(img: &Path, raw: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw", s(img), s(raw)])
        .output()
        .unwrap()
        .status
        .success()
}

/// After a merge was killed at `at`: every image of `imgs` is consistent
/// (`qemu-img check` finds no corruption; leaks are allowed).
pub fn assert_no_corruption_after_kill(op: &str, at: std::time::Duration, imgs: &[&Path]) {
    for img in imgs {
        let rc = check_exit(img);
        assert!(
            rc == 0 || rc == 3,
            "{op} killed at {at:?}: qemu-img check {} exited {rc}",
            img.display()
        );
    }
}

/// Runs `op` ("commit" or "pull", default options) on `top`, insisting on
/// success: what the SIGKILL tests' children run, and their reruns.
pub fn run_op(op: &str, top: &Path) {
    use strata_merge::{commit, pull, CommitOptions, Hooks, PullOptions};
    match op {
        "commit" => {
            let _ = commit(top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
        }
        "pull" => {
            let _ = pull(top, &PullOptions::default(), &mut Hooks::default()).unwrap();
        }
        _ => panic!("unknown op {op}"),
    }
}

/// Starts this test binary again as a child running only its
/// `child_entry` test, with `env` set to `OP:TOP` (the child runs
/// [`run_op`] and exits), its output discarded.
pub fn spawn_child(env: &str, op: &str, top: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(env, format!("{op}:{}", top.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}
