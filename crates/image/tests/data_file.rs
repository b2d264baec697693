//! External data files (qcow2 `data_file`): crash consistency at every
//! write and sync of both files, QEMU's locks on the data file, hostile
//! data file names, and compressed entries (invalid with a data file).
//! iotest 244's scenarios are in iotests.rs; the command line's in
//! crates/cli/tests/data_file.rs.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::create::{create_qcow2_with_data_file, CreateOptions};
use strata_image::{Chain, FaultStorage, Image, Layer, MemStorage, OpenOptions, Qcow2Image};

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    /// Empty the image (what commit does to its top): every table dropped.
    MakeEmpty,
    Flush,
}

fn apply(chain: &mut Chain, op: Op) -> strata_image::Result<()> {
    match op {
        Op::Write(off, len, p) => chain.write_at(&vec![p; len as usize], off),
        Op::Zero(off, len, unmap) => chain.write_zeroes(off, len, unmap),
        Op::Discard(off, len) => chain.discard(off, len),
        Op::MakeEmpty => match &mut chain.layers_mut()[0].image {
            Image::Qcow2(q) => q.make_empty(),
            Image::Raw(_) => unreachable!("qcow2 images only"),
        },
        Op::Flush => chain.flush(),
    }
}

fn chain_of(img: Qcow2Image) -> Chain {
    Chain::from_layers(vec![Layer::new(
        "img.qcow2".into(),
        None,
        Image::Qcow2(img),
    )])
    .unwrap()
}

fn open_rw(meta: &FaultStorage, data: &FaultStorage) -> Chain {
    let img = Qcow2Image::open_with_data_file(
        Box::new(meta.clone()),
        Box::new(data.clone()),
        Path::new("img.qcow2"),
        true,
    )
    .unwrap();
    chain_of(img)
}

/// A new image of `size` bytes whose header names `data` as its data file,
/// built on memory: (qcow2 bytes, data file bytes).
fn new_image(data: &Path, size: u64, raw: bool) -> (Vec<u8>, Vec<u8>) {
    let (m, d) = (MemStorage::new(), MemStorage::new());
    let opts = CreateOptions {
        size,
        data_file: Some(data.to_str().unwrap().to_string()),
        data_file_raw: raw,
        ..CreateOptions::default()
    };
    create_qcow2_with_data_file(
        Box::new(m.clone()),
        Box::new(d.clone()),
        Path::new("img.qcow2"),
        &opts,
    )
    .unwrap()
    .close()
    .unwrap();
    (m.to_bytes(), d.to_bytes())
}

/// Makes a chooser of the unsynced writes that reached the disk (one per
/// file, the same choices for both).
type KeepFactory = Box<dyn Fn() -> Box<dyn FnMut(usize) -> bool>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `ops` crashing at every operation of either file (one clock for
/// both, as one machine), and checks every durable state the two files
/// may hold: it opens, every guest byte has a value it had since the last
/// completed flush, and `qemu-img check` finds no corruption.
fn crash_everywhere(raw: bool, ops: &[Op], stride: u64) {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("img.data");
    let (meta0, data0) = new_image(&data_path, 4 << 20, raw);
    let reference = FaultStorage::new(meta0.clone());
    let rdata = reference.new_sharing_clock(data0.clone());
    let mut chain = open_rw(&reference, &rdata);
    let mut views = vec![view(&chain)];
    // The model: what each op makes the guest read (discards in this
    // workload cover whole clusters and there is no backing file).
    let mut model = vec![0u8; 4 << 20];
    for op in ops {
        apply(&mut chain, *op).unwrap();
        match *op {
            Op::Write(o, l, p) => model[o as usize..(o + l) as usize].fill(p),
            Op::Zero(o, l, _) | Op::Discard(o, l) => model[o as usize..(o + l) as usize].fill(0),
            Op::MakeEmpty => model.fill(0),
            Op::Flush => {}
        }
        views.push(view(&chain));
        assert!(
            *views.last().unwrap() == model,
            "raw={raw}: after {op:?}, reads differ from the model"
        );
    }
    if raw {
        // Flushed: the raw data file is the guest view.
        assert!(rdata.current() == *views.last().unwrap(), "raw data file");
    }
    drop(chain);
    assert!(rdata.own_ops() > 4 && reference.own_ops() > 4);
    let total = reference.ops();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut checked_with_qemu = 0;
    for n in (0..total).filter(|n| n % stride == 0 || *n + 1 == total) {
        let meta = FaultStorage::new(meta0.clone());
        let data = meta.new_sharing_clock(data0.clone());
        meta.crash_at(n);
        let mut chain = open_rw(&meta, &data);
        let (mut done, mut last_flush) = (0, 0);
        for (i, op) in ops.iter().enumerate() {
            if apply(&mut chain, *op).is_err() {
                break;
            }
            done = i + 1;
            if let Op::Flush = op {
                last_flush = i + 1;
            }
        }
        drop(chain);
        assert!(meta.crashed(), "crash point {n} not reached");
        let allowed = &views[last_flush..=(done + 1).min(ops.len())];
        let seeds = [rng.next() | 1, rng.next() | 1];
        let subsets: [(&str, KeepFactory); 4] = [
            ("none", Box::new(|| Box::new(|_| false))),
            ("all", Box::new(|| Box::new(|_| true))),
            (
                "random-a",
                Box::new(move || {
                    let mut r = Rng(seeds[0]);
                    Box::new(move |_| r.next().is_multiple_of(2))
                }),
            ),
            (
                "random-b",
                Box::new(move || {
                    let mut r = Rng(seeds[1]);
                    Box::new(move |_| r.next().is_multiple_of(3))
                }),
            ),
        ];
        for (label, keep) in &subsets {
            let m = meta.durable_image(&mut *keep());
            let d = data.durable_image(&mut *keep());
            let label = format!("raw={raw}: crash at op {n}/{total} (subset {label})");
            let img = Qcow2Image::open_with_data_file(
                Box::new(MemStorage::from_bytes(m.clone())),
                Box::new(MemStorage::from_bytes(d.clone())),
                Path::new("img.qcow2"),
                false,
            )
            .unwrap_or_else(|e| panic!("{label}: does not open: {e}"));
            let got = view(&chain_of(img));
            for (i, b) in got.iter().enumerate() {
                assert!(
                    allowed.iter().any(|v| v.get(i) == Some(b)),
                    "{label}: guest byte {i:#x} = {b:#x}, a value it never had since the \
                     last flush"
                );
            }
            if !skip() && (n % 7 == 0 || label.contains("random-a") && n % 7 == 1) {
                let p = dir.path().join("img.qcow2");
                std::fs::write(&p, &m).unwrap();
                std::fs::write(&data_path, &d).unwrap();
                let out = std::process::Command::new("qemu-img")
                    .args(["check", "-U", p.to_str().unwrap()])
                    .output()
                    .unwrap();
                let code = out.status.code().unwrap_or(-1);
                assert!(
                    code == 0 || code == 3,
                    "{label}: qemu-img check exit {code}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked_with_qemu += 1;
            }
        }
    }
    assert!(skip() || checked_with_qemu > 0);
}

/// Partial and whole-cluster writes (the first at guest cluster 0, whose
/// host offset in the data file is 0), a rewrite in place, zero writes
/// with and without unmap, a discard and a write again over the
/// discarded range (its queued data file discard must not destroy the
/// new data), flushes between.
const WORKLOAD: &[Op] = &[
    Op::Write(0x200, 0x1000, 0x11),
    Op::Write(0x10000, 0x30000, 0x22),
    Op::Flush,
    Op::Write(0x20000, 0x800, 0x33),
    Op::Zero(0x30000, 0x10000, false),
    Op::Discard(0x10000, 0x10000),
    Op::Write(0x10000, 0x200, 0x44),
    Op::Flush,
    Op::Zero(0x0, 0x10000, true),
    Op::Write(0x200000, 0x20000, 0x55),
    Op::Flush,
];

#[test]
fn data_file_writes_are_crash_consistent_at_every_write_and_sync() {
    crash_everywhere(false, WORKLOAD, 1);
}

#[test]
fn raw_data_file_writes_are_crash_consistent_at_every_write_and_sync() {
    crash_everywhere(true, WORKLOAD, 1);
}

/// Emptying an image with a data file (commit's last step on its top):
/// the tables go first, durably, then the data file's clusters are
/// discarded; a crash anywhere reads old data or zeros, never stale data
/// elsewhere, and checks clean.
#[test]
fn emptying_a_data_file_image_is_crash_consistent_at_every_write_and_sync() {
    let ops = [
        Op::Write(0, 0x30000, 0x66),
        Op::Write(0x200000, 0x10000, 0x77),
        Op::Flush,
        Op::MakeEmpty,
        Op::Flush,
    ];
    crash_everywhere(false, &ops, 1);
    // And the emptied image's data is discarded in its data file, as
    // qemu-img's commit discards it.
    let dir = tempfile::tempdir().unwrap();
    let (m0, d0) = new_image(&dir.path().join("e.data"), 4 << 20, false);
    let (meta, data) = (FaultStorage::new(m0), FaultStorage::new(d0));
    let mut chain = open_rw(&meta, &data);
    for op in ops {
        apply(&mut chain, op).unwrap();
    }
    drop(chain);
    assert!(
        data.current().iter().all(|&b| b == 0),
        "the data file still holds the data"
    );
}

/// Every barrier syncs the data file before the qcow2 file: no L2 entry
/// that points at new data can be durable while the data is not.
#[test]
fn a_barrier_syncs_the_data_file_before_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (m0, d0) = new_image(&dir.path().join("x.data"), 1 << 20, false);
    let meta = FaultStorage::new(m0);
    let data = meta.new_sharing_clock(d0);
    let mut chain = open_rw(&meta, &data);
    chain.write_at(&[7u8; 4096], 0).unwrap();
    assert_eq!(data.syncs(), 0);
    chain.flush().unwrap();
    assert!(data.syncs() >= 1 && meta.syncs() >= 1);
    assert_eq!(data.pending(), 0, "the data file was synced");
}

// ---- locks ----------------------------------------------------------------

/// The OFD lock bytes held on `path` by any process (`/proc/locks`).
fn lock_bytes(path: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = Vec::new();
    for line in locks.lines().filter(|l| l.contains("OFDLCK")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(id) = f.iter().position(|x| x.matches(':').count() == 2) else {
            continue;
        };
        if f[id].rsplit(':').next() != Some(&ino.to_string()) {
            continue;
        }
        let (a, b): (u64, u64) = (f[id + 1].parse().unwrap(), f[id + 2].parse().unwrap());
        bytes.extend(a..=b);
    }
    bytes.sort_unstable();
    bytes
}

/// The data file is locked as QEMU 10 locks it (observed in /proc/locks
/// with qemu-io holding such an image): read-write 100 101 103 203,
/// read-only 100 203; a tool that wants to resize it is refused while
/// Strata holds it, as while qemu-io does.
#[test]
fn the_data_file_is_locked_as_qemu_locks_it() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    let data = dir.path().join("l.data");
    qemu_create(&[
        "-o",
        &format!("data_file={}", data.display()),
        img.to_str().unwrap(),
        "1M",
    ]);
    for (writable, want) in [(true, vec![100, 101, 103, 203]), (false, vec![100, 203])] {
        let chain = Chain::open(&img, &OpenOptions::new().writable(writable)).unwrap();
        assert_eq!(lock_bytes(&data), want, "writable={writable}");
        let out = std::process::Command::new("qemu-img")
            .args(["resize", "-f", "raw", data.to_str().unwrap(), "2M"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "resize of the held data file succeeded"
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("\"resize\" lock"), "{said}");
        drop(chain);
        assert!(lock_bytes(&data).is_empty());
    }
    // Force-share takes no lock on it.
    let chain = Chain::open(&img, &OpenOptions::new().force_share(true)).unwrap();
    assert!(lock_bytes(&data).is_empty());
    drop(chain);
}

// ---- hostile names and entries ---------------------------------------------

/// An image header with the data file bit and `name` as its data file
/// extension (raw bytes), on memory.
fn image_naming(name: &[u8], dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("h.qcow2");
    qemu_create(&[img.to_str().unwrap(), "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    b[79] |= 4; // incompatible bit 2: external data file
                // Extensions start at 112 (header_length) with the feature table;
                // put the data file extension first and move the rest after it.
    let rest = b[112..0x10000 - 16 - name.len().min(0xf000)].to_vec();
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x4441_5441u32.to_be_bytes());
    ext.extend_from_slice(&(name.len() as u32).to_be_bytes());
    ext.extend_from_slice(name);
    while ext.len() % 8 != 0 {
        ext.push(0);
    }
    let mut out = b[..112].to_vec();
    out.extend_from_slice(&ext);
    out.extend_from_slice(&rest);
    out.resize(0x10000, 0);
    out.extend_from_slice(&b[0x10000..]);
    std::fs::write(&img, &out).unwrap();
    (img, out)
}

/// Absurd data file names (huge, with a NUL byte, not UTF-8, a protocol
/// name, a directory, missing, "../" to nowhere) never panic: each is
/// refused with an error that names the data file, from a file and from
/// memory, read-only and read-write, and nothing is written.
#[test]
fn hostile_data_file_names_error_clearly() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let huge = vec![b'a'; 4000];
    let cases: [(&[u8], &str); 7] = [
        (&huge, "longer than 1023"),
        (b"x\0y", "NUL"),
        (b"\xff\xfe", "not UTF-8"),
        (b"json:{\"driver\":\"file\"}", "protocol"),
        (b"/", "Could not open '/'"),
        (
            b"/nonexistent/dir/x.data",
            "Could not open '/nonexistent/dir/x.data'",
        ),
        (b"../../../../../../../../nowhere.data", "Could not open"),
    ];
    for (name, want) in cases {
        let (img, bytes) = image_naming(name, dir.path());
        for writable in [false, true] {
            let e = Chain::open(&img, &OpenOptions::new().writable(writable))
                .map(|_| ())
                .expect_err("opened");
            let e = e.to_string();
            let shown = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
            assert!(e.contains(want), "{shown:?} writable={writable}: {e}");
        }
        let mem = Qcow2Image::open(Box::new(MemStorage::from_bytes(bytes.clone())), &img);
        if let Ok(q) = mem {
            // Metadata only: data reads fail, naming the data file.
            let mut buf = [0u8; 512];
            let _ = q.read_mapped(strata_image::Mapping::Unallocated, 0, &mut buf);
            assert!(q.data_storage().is_err());
        }
        assert!(
            std::fs::read(&img).unwrap() == bytes,
            "{want}: the image changed"
        );
    }
}

/// A compressed cluster in an image with a data file is a corruption, as
/// QEMU says: reads fail with its message, and the check reports it.
#[test]
fn compressed_entries_with_a_data_file_are_corrupt() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let data = dir.path().join("c.data");
    qemu_create(&[
        "-o",
        &format!("data_file={}", data.display()),
        img.to_str().unwrap(),
        "1M",
    ]);
    qemu_io(&img, &["write -P 1 0 64k"]);
    // L2 table at 0x40000 (qemu-img's layout): entry 0 made compressed.
    let mut b = std::fs::read(&img).unwrap();
    let e = u64::from_be_bytes(b[0x40000..0x40008].try_into().unwrap());
    assert_eq!(e, 1 << 63, "data cluster at host 0 of the data file");
    b[0x40000..0x40008].copy_from_slice(&((1u64 << 62) | 0x50000).to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let (ok, said) = {
        let o = std::process::Command::new("qemu-io")
            .args(["-r", "-c", "read 0 512", img.to_str().unwrap()])
            .output()
            .unwrap();
        let s = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success() && !s.contains("failed"), s)
    };
    assert!(
        !ok && said.contains("Compressed cluster entry found"),
        "{said}"
    );
    let chain = Chain::open(&img, &OpenOptions::new()).unwrap();
    let mut buf = [0u8; 512];
    let e = chain.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(
        e.contains("Compressed cluster entry found in image with external data file"),
        "{e}"
    );
    let q = chain.top().image.as_qcow2().unwrap();
    let report = strata_image::check::check(q).unwrap();
    let qemu = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&qemu.stdout).unwrap();
    assert_eq!(report.corruptions, v["corruptions"].as_u64().unwrap_or(0));
    assert!(report
        .problems
        .iter()
        .any(|p| p.message.contains("with data file")));
}

/// A data cluster not at its guest offset (an L2 entry of a data file
/// image pointing elsewhere in the data file) is a corruption, as QEMU
/// signals it ("External data file host cluster offset ... does not match
/// guest cluster offset"): reads fail in both tools, and a write through
/// it is refused and marks the image corrupt in both.
#[test]
fn a_data_cluster_away_from_its_guest_offset_is_corrupt_as_in_qemu() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut twins = Vec::new();
    for name in ["q", "s"] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let data = dir.path().join(format!("{name}.data"));
        qemu_create(&[
            "-o",
            &format!("data_file={}", data.display()),
            img.to_str().unwrap(),
            "1M",
        ]);
        qemu_io(&img, &["write -P 7 0 192k"]);
        // Guest cluster 2 (L2 entry 2 at 0x40010) pointed at 0x50000.
        let mut b = std::fs::read(&img).unwrap();
        b[0x40010..0x40018].copy_from_slice(&((1u64 << 63) | 0x50000).to_be_bytes());
        std::fs::write(&img, &b).unwrap();
        twins.push(img);
    }
    let (q, s) = (&twins[0], &twins[1]);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "read 0x20000 512",
            "-c",
            "write 0x20000 512",
            q.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains("does not match guest cluster offset"),
        "{said}"
    );
    let chain = Chain::open(s, &OpenOptions::new()).unwrap();
    let mut buf = [0u8; 512];
    let e = chain.read_at(&mut buf, 0x20000).unwrap_err().to_string();
    assert!(
        e.contains("External data file host cluster offset 0x50000 does not match guest cluster offset: 0x20000"),
        "{e}"
    );
    chain.read_at(&mut buf, 0x10000).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    drop(chain);
    let mut chain = Chain::open(s, &OpenOptions::new().writable(true)).unwrap();
    assert!(chain.write_at(&[1u8; 512], 0x20000).is_err());
    drop(chain);
    for img in [q, s] {
        let info = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{}: {info}", img.display());
    }
}
