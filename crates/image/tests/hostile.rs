//! Hostile images (testdata/hostile/, made by testdata/make-hostile.sh):
//! for every one, open the chain, read the guest view, map it and convert
//! it to raw, and require
//!
//! - no panic, and an end within a time limit (each image runs in a child
//!   process — this test binary again — killed after IMAGE_TIMEOUT);
//! - bounded memory: the child runs under `prlimit --as=CHILD_AS_LIMIT`
//!   (an allocation past it aborts the child, which fails the test);
//! - errors that name the file they concern;
//! - the outcome testdata/hostile/EXPECT gives (refused with a given
//!   message, or opened);
//! - not one byte written to any input file (every file of the directory is
//!   hashed before and after).
//!
//! `STRATA_HOSTILE_DIR=/some/dir cargo test --test hostile` runs the same
//! checks on a corpus outside the repository (every outcome allowed).
//! docs/hostile-images.md describes the corpus and the backing-file policy.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_image::convert::{convert, ConvertOptions};
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, Error, FileStorage, ImageFormat, OpenOptions};

/// Wall-clock limit for everything done to one image.
const IMAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Address-space limit of the child that handles one image.
const CHILD_AS_LIMIT: u64 = 1 << 30;
/// Guest bytes read from the start of the view (and again at its end).
const READ_CAP: u64 = 16 << 20;
/// Extents mapped at most.
const MAP_CAP: usize = 100_000;
/// Largest virtual size converted (the output is sparse).
const CONVERT_CAP: u64 = 1 << 30;

const CHILD_ENV: &str = "STRATA_HOSTILE_CHILD";
const CHILD_OUT_ENV: &str = "STRATA_HOSTILE_OUT";

fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/hostile")
}

fn hash_dir(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let mut h = DefaultHasher::new();
            std::fs::read(&p).unwrap().hash(&mut h);
            out.insert(p, h.finish());
        }
    }
    out
}

/// What the child printed: `OPEN-OK` or `OPEN-ERR <message>`, then a line
/// per later step.
struct ChildRun {
    status: String,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn run_child(image: &Path, out: &Path) -> ChildRun {
    let exe = std::env::current_exe().unwrap();
    let args = [
        "hostile_child_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ];
    let prlimit = Command::new("prlimit").arg("--version").output().is_ok();
    let mut cmd = if prlimit {
        let mut c = Command::new("prlimit");
        c.arg(format!("--as={CHILD_AS_LIMIT}")).arg("--").arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .env(CHILD_ENV, image)
        .env(CHILD_OUT_ENV, out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    // Drain the pipes in threads so a chatty child cannot block.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut so, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut se, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break if st.success() {
                "ok".to_string()
            } else {
                format!("failed ({st})")
            };
        }
        if start.elapsed() > IMAGE_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            break format!("timed out after {IMAGE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    ChildRun {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Parses testdata/hostile/EXPECT: name -> (outcome, text).
fn expectations(dir: &Path) -> BTreeMap<String, (String, String)> {
    let Ok(text) = std::fs::read_to_string(dir.join("EXPECT")) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let name = f.next()?.to_string();
            let outcome = f.next()?.to_string();
            let text = f.next().unwrap_or("").to_string();
            Some((name, (outcome, text)))
        })
        .collect()
}

/// Runs every image of `dir` in a child; returns the failures.
fn run_corpus(dir: &Path, strict: bool) -> Vec<String> {
    let expect = if strict {
        expectations(dir)
    } else {
        BTreeMap::new()
    };
    let before = hash_dir(dir);
    let out = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for path in before.keys() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "EXPECT" || name.starts_with('.') {
            continue;
        }
        let run = run_child(path, out.path());
        if run.elapsed > slowest.0 {
            slowest = (run.elapsed, name.clone());
        }
        if run.status != "ok" {
            failures.push(format!(
                "{name}: child {}\n  stdout: {}\n  stderr: {}",
                run.status,
                run.stdout.trim(),
                run.stderr
                    .lines()
                    .filter(|l| !l.is_empty())
                    .take(12)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
            continue;
        }
        let open = run
            .stdout
            .lines()
            .find_map(|l| l.find("OPEN-").map(|i| l[i..].to_string()))
            .unwrap_or_default();
        if let Some((outcome, text)) = expect.get(&name) {
            let ok = match outcome.as_str() {
                "opens" => open == "OPEN-OK",
                "open-error" => open.starts_with("OPEN-ERR") && open.contains(text.as_str()),
                _ => true,
            };
            if !ok {
                failures.push(format!("{name}: expected {outcome} {text:?}, got {open}"));
            }
        } else if strict {
            failures.push(format!("{name}: not listed in EXPECT"));
        }
    }
    let after = hash_dir(dir);
    for (p, h) in &before {
        if after.get(p) != Some(h) {
            failures.push(format!("{}: an input file changed", p.display()));
        }
    }
    eprintln!(
        "{} images, slowest {} in {:?}",
        before.len(),
        slowest.1,
        slowest.0
    );
    failures
}

#[test]
fn hostile_images_never_panic_hang_balloon_or_write() {
    let failures = run_corpus(&hostile_dir(), true);
    assert!(
        failures.is_empty(),
        "{} hostile images failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_corpus_outside_the_repository_passes_too() {
    let Ok(dir) = std::env::var("STRATA_HOSTILE_DIR") else {
        return;
    };
    let failures = run_corpus(Path::new(&dir), false);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------- the child

/// Panics unless `msg` names one of `paths` (by file name), or starts
/// with the path of the file at fault (a backing file that failed to open:
/// "/dev/zero: invalid qcow2 image: ...").
fn assert_names(msg: &str, paths: &[PathBuf]) {
    let named = paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| msg.contains(&*n.to_string_lossy()))
    }) || msg
        .split(": ")
        .next()
        .is_some_and(|p| p.starts_with('/') && Path::new(p).exists());
    assert!(named, "error names none of {paths:?}: {msg}");
}

/// Does to one image what `strata info`, `map` and `convert` do, bounded.
/// Only runs in a child started by the test above.
#[test]
fn hostile_child_entry() {
    let Some(image) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let image = PathBuf::from(image);
    let out = PathBuf::from(std::env::var_os(CHILD_OUT_ENV).unwrap());
    let top = vec![image.clone()];
    let chain = match Chain::open(&image, &OpenOptions::default()) {
        Ok(c) => {
            println!("OPEN-OK");
            c
        }
        Err(e) => {
            let msg = e.to_string();
            println!("OPEN-ERR {msg}");
            assert_names(&msg, &top);
            return;
        }
    };
    let paths: Vec<PathBuf> = chain.layers().iter().map(|l| l.path.clone()).collect();
    // info
    for l in chain.layers() {
        let _ = (l.image.virtual_size(), l.image.format(), l.image.backing());
        if let Some(q) = l.image.as_qcow2() {
            let _ = (q.header(), q.snapshots().len(), q.l1().len());
        }
    }
    // read: the start and the end of the view, in 1 MiB pieces.
    let size = chain.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut errors = 0;
    for (start, end) in [
        (0, size.min(READ_CAP)),
        (size.saturating_sub(READ_CAP).max(size.min(READ_CAP)), size),
    ] {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            if let Err(e) = chain.read_at(&mut buf[..n], pos) {
                assert_names(&e.to_string(), &paths);
                errors += 1;
            }
            pos += n as u64;
        }
    }
    println!("READ errors={errors}");
    // map
    let mut pos = 0u64;
    let mut extents = 0;
    while pos < size && extents < MAP_CAP {
        match chain
            .block_status(pos, size - pos)
            .next()
            .expect("an extent")
        {
            Ok(s) => {
                assert!(s.length > 0, "zero-length extent at {pos:#x}");
                assert_eq!(s.start, pos);
                pos += s.length;
            }
            Err(e) => {
                assert_names(&e.to_string(), &paths);
                println!("MAP-ERR {e}");
                break;
            }
        }
        extents += 1;
    }
    println!("MAP extents={extents}");
    // convert to raw
    if size <= CONVERT_CAP {
        let dst = out.join(format!(
            "{}.raw",
            image.file_name().unwrap().to_string_lossy()
        ));
        let opts = ConvertOptions {
            format: ImageFormat::Raw,
            create: CreateOptions::default(),
            compress: false,
            bitmaps: false,
            ..ConvertOptions::default()
        };
        match convert(&chain, &dst, &opts, &mut |_, _| {}) {
            Ok(()) => println!("CONVERT-OK"),
            Err(e) => {
                let mut named = paths.clone();
                named.push(dst.clone());
                assert_names(&e.to_string(), &named);
                println!("CONVERT-ERR {e}");
            }
        }
        std::fs::remove_file(&dst).ok();
    }
    // strata_image::check does not exist yet: when it lands, run it here.
}

// ------------------------------------------------ policies, one by one

fn open(name: &str, opts: &OpenOptions) -> Result<Chain, Error> {
    Chain::open(&hostile_dir().join(name), opts)
}

#[test]
fn a_chain_600_deep_is_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let make = |i: usize| {
        let p = dir.path().join(format!("layer-{i}.qcow2"));
        let storage = FileStorage::create(&p).unwrap();
        let opts = CreateOptions {
            size: 64 << 10,
            cluster_size: 512,
            backing: (i > 0).then(|| (format!("layer-{}.qcow2", i - 1), ImageFormat::Qcow2)),
            ..Default::default()
        };
        create_qcow2(Box::new(storage), &p, &opts).unwrap();
        p
    };
    // Every layer must exist: make them all, keep the last.
    let top = (0..600).fold(PathBuf::new(), |_, i| make(i));
    let start = Instant::now();
    let err = Chain::open(&top, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::ChainTooDeep { limit: 128, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("layer-599.qcow2"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // 128 deep is the most that opens.
    let ok = Chain::open(&dir.path().join("layer-127.qcow2"), &OpenOptions::default()).unwrap();
    assert_eq!(ok.layers().len(), 128);
    assert!(Chain::open(&dir.path().join("layer-128.qcow2"), &OpenOptions::default()).is_err());
}

#[test]
fn backing_loops_of_one_two_and_three_images_are_refused() {
    for name in [
        "loop-self.qcow2",
        "loop-self-dotted.qcow2",
        "loop-a.qcow2",
        "loop-three-a.qcow2",
    ] {
        let err = open(name, &OpenOptions::default()).unwrap_err();
        assert!(matches!(err, Error::BackingLoop { .. }), "{name}: {err}");
    }
}

#[test]
fn protocol_backing_names_are_refused_before_anything_is_opened() {
    for e in std::fs::read_dir(hostile_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("proto-") {
            continue;
        }
        let err = open(&name, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, Error::Backing { ref why, .. } if why.contains("protocol")),
            "{name}: {err}"
        );
    }
}

#[test]
fn backing_formats_are_never_probed() {
    // The name points at a qcow2 image, but no format is recorded.
    let err = open("backing-no-format.qcow2", &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BackingFormatUnknown { .. }), "{err}");
    // A raw disk whose guest wrote a qcow2 header naming /etc/hostname:
    // recorded as raw, it is read as raw, and its "backing file" is never
    // followed.
    let chain = open(
        "backing-is-raw-with-qcow2-header.qcow2",
        &OpenOptions::default(),
    )
    .unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(chain.layers()[1].image.format(), ImageFormat::Raw);
    let err = open("backing-raw-no-format.qcow2", &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, Error::BackingFormatUnknown { .. }), "{err}");
}

#[test]
fn confine_to_refuses_backing_files_outside_the_tree() {
    let opts = OpenOptions::new().confine_to(Some(hostile_dir()));
    for name in [
        "backing-escape.qcow2",
        "backing-absolute.qcow2",
        "backing-dev-zero.qcow2",
    ] {
        let err = open(name, &opts).unwrap_err();
        assert!(
            err.to_string().contains("outside the allowed directory"),
            "{name}: {err}"
        );
    }
    // Inside the tree is fine.
    open("backing-is-raw-with-qcow2-header.qcow2", &opts).unwrap();
}

#[test]
fn huge_tables_are_refused_before_allocating() {
    // Each claims tables of up to 32 GiB; the limits refuse them from the
    // header alone (a child under prlimit runs them in the corpus test).
    for name in [
        "l1-size-max.qcow2",
        "l1-size-limit-plus-one.qcow2",
        "refcount-table-clusters-max.qcow2",
        "nb-snapshots-max.qcow2",
    ] {
        assert!(open(name, &OpenOptions::default()).is_err(), "{name}");
    }
}

#[test]
fn writes_to_an_image_with_the_corrupt_bit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("corrupt.qcow2");
    std::fs::copy(hostile_dir().join("corrupt-bit.qcow2"), &p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let opts = OpenOptions::new().writable(true);
    let refused = match Chain::open(&p, &opts) {
        Err(_) => true,
        Ok(mut chain) => chain.write_at(&[1u8; 512], 0).is_err(),
    };
    assert!(refused, "a write to an image marked corrupt succeeded");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "the corrupt image was changed"
    );
}
