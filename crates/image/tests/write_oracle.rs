//! The write path against QEMU: images Strata creates and writes pass
//! `qemu-img check`, and the same operations applied by `qemu-io` to a twin
//! give `qemu-img compare`-identical images.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::repair::{repair, RepairMode, RepairReport};
use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions, Qcow2Image};

/// One guest operation, applied to both twins.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, pattern } => format!("write -P {pattern} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
        }
    }
    fn apply(&self, chain: &mut Chain) {
        match *self {
            Op::Write { off, len, pattern } => {
                chain.write_at(&vec![pattern; len as usize], off).unwrap()
            }
            Op::Zero { off, len } => chain.write_zeroes(off, len, false).unwrap(),
            Op::Discard { off, len } => chain.discard(off, len).unwrap(),
        }
    }
}

/// Applies `ops` with qemu-io to `q` and with Strata to `s`.
fn apply_to_twins(ops: &[Op], q: &Path, s: &Path) {
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(q, &cmd_refs);
    let mut chain = open_writable(s);
    for op in ops {
        op.apply(&mut chain);
    }
    chain.flush().unwrap();
}

fn random_ops(seed: u64, size: u64, n: usize, align: u64) -> Vec<Op> {
    let mut r = Rng(seed | 1);
    (0..n)
        .map(|_| {
            let kind = r.below(10);
            // Mostly unaligned, sometimes cluster-sized, ranges.
            let off = if r.below(2) == 0 {
                r.below(size / align) * align
            } else {
                r.below(size - 1)
            };
            let max = (size - off).min(align * 5);
            let len = (r.below(max) + 1).min(size - off);
            match kind {
                0..=5 => Op::Write {
                    off,
                    len,
                    pattern: (r.below(255) + 1) as u8,
                },
                6..=8 => Op::Zero { off, len },
                _ => Op::Discard { off, len },
            }
        })
        .collect()
}

/// A path as a command-line argument (test paths are UTF-8).
fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img info --output json IMG`.
fn qemu_info(img: &Path) -> String {
    qemu_img(&["info", "--output", "json", arg(img)])
}

/// The guest view of internal snapshot `snapshot` of `img`, as qemu-img
/// converts it to the raw file `out`.
fn qemu_snapshot_raw(img: &Path, snapshot: &str, out: &Path) -> Vec<u8> {
    qemu_img(&["convert", "-l", snapshot, "-O", "raw", arg(img), arg(out)]);
    std::fs::read(out).unwrap()
}

/// Runs `qemu-img ARGS` and returns its output, whatever its exit status.
fn qemu_img_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap()
}

/// Creates `img` with Strata.
fn strata_create(img: &Path, opts: &CreateOptions) {
    create_qcow2(Box::new(FileStorage::create(img).unwrap()), img, opts).unwrap();
}

/// Opens the chain whose top is `img` for writing.
/// Opens `img` writable as qemu-io does (the twin of its writes): a dirty
/// image is repaired, unknown autoclear bits cleared.
fn open_writable(img: &Path) -> Chain {
    Chain::open(
        img,
        &OpenOptions::new()
            .writable(true)
            .write_policy(strata_image::WritePolicy::qemu()),
    )
    .unwrap()
}

fn check_clean(img: &Path) {
    let out = qemu_img_output(&["check", "-U", arg(img)]);
    assert!(
        out.status.success(),
        "qemu-img check {} failed:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &Path, b: &Path) {
    let out = qemu_img_output(&["compare", "-U", arg(a), arg(b)]);
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Asserts that Strata's image `s` passes `qemu-img check` and reads the
/// same as its twin `q`.
fn assert_twin_matches(q: &Path, s: &Path) {
    check_clean(s);
    compare(q, s);
}

/// Makes a base with data, and two overlays on it: one by qemu-img, one by Strata.
fn twins(dir: &Path, create_opts: &str, opts: &CreateOptions, size: u64) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    qemu_create(&[arg(&base), &size.to_string()]);
    qemu_io(
        &base,
        &[
            "write -P 0xb1 0 100k",
            &format!("write -P 0xb2 {} 300k", size / 2),
        ],
    );
    let q = dir.join("q.qcow2");
    let o = format!("{create_opts}backing_file=base.qcow2,backing_fmt=qcow2");
    qemu_create(&["-o", &o, arg(&q), &size.to_string()]);
    let s = dir.join("s.qcow2");
    let mut opts = opts.clone();
    opts.size = size;
    opts.backing = Some(("base.qcow2".into(), ImageFormat::Qcow2));
    strata_create(&s, &opts);
    (q, s)
}

fn run_twin(create_opts: &str, opts: CreateOptions, seed: u64, align: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let (q, s) = twins(dir.path(), create_opts, &opts, size);
    check_clean(&s);
    let ops = random_ops(seed, size, 40, align);
    apply_to_twins(&ops, &q, &s);
    assert_twin_matches(&q, &s);
}

#[test]
fn strata_overlays_match_qemu_io_twins_for_every_cluster_size() {
    if skip() {
        return;
    }
    for (cs, seed) in [(512u64, 7u64), (4096, 11), (65536, 13), (2 << 20, 17)] {
        let opts = CreateOptions {
            cluster_size: cs,
            ..Default::default()
        };
        run_twin(&format!("cluster_size={cs},"), opts, seed, cs);
    }
}

#[test]
fn strata_overlays_match_qemu_io_twins_with_extended_l2_v2_and_refcount_widths() {
    if skip() {
        return;
    }
    for (create_opts, opts, seed, align) in [
        (
            "extended_l2=on,",
            CreateOptions {
                extended_l2: true,
                ..Default::default()
            },
            23,
            2048,
        ),
        (
            "compat=0.10,",
            CreateOptions {
                compat_v2: true,
                ..Default::default()
            },
            29,
            65536,
        ),
        (
            "refcount_bits=1,",
            CreateOptions {
                refcount_bits: 1,
                ..Default::default()
            },
            31,
            65536,
        ),
        (
            "refcount_bits=64,cluster_size=512,",
            CreateOptions {
                refcount_bits: 64,
                cluster_size: 512,
                ..Default::default()
            },
            37,
            512,
        ),
    ] {
        run_twin(create_opts, opts, seed, align);
    }
}

#[test]
fn created_images_pass_qemu_img_check_and_report_their_options() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, CreateOptions)> = vec![
        ("default", CreateOptions::default()),
        (
            "v2",
            CreateOptions {
                compat_v2: true,
                ..Default::default()
            },
        ),
        (
            "ext",
            CreateOptions {
                extended_l2: true,
                cluster_size: 32768,
                ..Default::default()
            },
        ),
        (
            "rc1",
            CreateOptions {
                refcount_bits: 1,
                ..Default::default()
            },
        ),
        (
            "rc64",
            CreateOptions {
                refcount_bits: 64,
                cluster_size: 512,
                ..Default::default()
            },
        ),
        (
            "lazy",
            CreateOptions {
                lazy_refcounts: true,
                ..Default::default()
            },
        ),
        (
            "zstd",
            CreateOptions {
                compression_type: strata_format::CompressionType::Zstd,
                ..Default::default()
            },
        ),
        (
            "prealloc",
            CreateOptions {
                preallocation: strata_image::create::Preallocation::Metadata,
                cluster_size: 4096,
                ..Default::default()
            },
        ),
        (
            "big512",
            CreateOptions {
                cluster_size: 512,
                ..Default::default()
            },
        ),
    ];
    for (name, mut opts) in cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        opts.size = if name == "big512" { 3 << 30 } else { 64 << 20 };
        strata_create(&p, &opts);
        check_clean(&p);
        let info = qemu_img(&["info", "-U", "--output", "json", arg(&p)]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], opts.size, "{name}");
        assert_eq!(info["cluster-size"], opts.cluster_size, "{name}");
        let data = &info["format-specific"]["data"];
        assert_eq!(
            data["compat"],
            if opts.compat_v2 { "0.10" } else { "1.1" },
            "{name}"
        );
        assert_eq!(data["refcount-bits"], opts.refcount_bits, "{name}");
        if !opts.compat_v2 {
            assert_eq!(data["lazy-refcounts"], opts.lazy_refcounts, "{name}");
            assert_eq!(data["extended-l2"], opts.extended_l2, "{name}");
            assert_eq!(
                data["compression-type"],
                opts.compression_type.name(),
                "{name}"
            );
        }
    }
}

#[test]
fn convert_flattens_a_chain_into_qcow2_and_raw_that_qemu_reads_the_same() {
    if skip() {
        return;
    }
    use strata_format::CompressionType::{Deflate, Zstd};
    use strata_image::convert::{convert, ConvertOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&["-o", "cluster_size=4096", arg(&base), "6M"]);
    qemu_io(&base, &["write -P 0x11 0 1M", "write -P 0x22 2100k 100k"]);
    let top = d.join("top.qcow2");
    qemu_create(&["-b", "base.qcow2", "-F", "qcow2", arg(&top)]);
    qemu_io(
        &top,
        &[
            "write -P 0x33 500k 700k",
            "write -z 0 64k",
            "write -P 0x44 5000k 10k",
        ],
    );
    let chain = Chain::open(&top, &OpenOptions::default()).unwrap();
    for (name, format, compress, ct) in [
        ("flat.qcow2", ImageFormat::Qcow2, false, Deflate),
        ("zlib.qcow2", ImageFormat::Qcow2, true, Deflate),
        ("zstd.qcow2", ImageFormat::Qcow2, true, Zstd),
        ("flat.raw", ImageFormat::Raw, false, Deflate),
    ] {
        let out = d.join(name);
        let create = CreateOptions {
            compression_type: ct,
            ..Default::default()
        };
        convert(
            &chain,
            &out,
            &ConvertOptions {
                format,
                create,
                compress,
                bitmaps: false,
                ..ConvertOptions::default()
            },
            &mut |_, _| {},
        )
        .unwrap();
        if format == ImageFormat::Qcow2 {
            check_clean(&out);
        }
        compare(&top, &out);
        if compress {
            let map = qemu_img(&["map", "--output", "json", arg(&out)]);
            assert!(
                map.contains("\"compressed\": true"),
                "{name}: no compressed cluster in {map}"
            );
        }
    }
}

#[test]
fn writes_to_an_image_with_an_internal_snapshot_keep_the_snapshot_intact() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = d.join("q.qcow2");
    let size = 4u64 << 20;
    qemu_create(&["-o", "cluster_size=4096", arg(&q), "4M"]);
    qemu_io(&q, &["write -P 0x61 0 1M", "write -P 0x62 2M 512k"]);
    qemu_img(&["snapshot", "-c", "snap1", arg(&q)]);
    let snap_before = qemu_snapshot_raw(&q, "snap1", &d.join("snap-before.raw"));
    let s = d.join("s.qcow2");
    std::fs::copy(&q, &s).unwrap();
    let ops = random_ops(41, size, 40, 4096);
    apply_to_twins(&ops, &q, &s);
    assert_twin_matches(&q, &s);
    let snap_after = qemu_snapshot_raw(&s, "snap1", &d.join("snap-after.raw"));
    assert!(snap_before == snap_after, "snapshot changed");
}

#[test]
fn writing_past_the_end_or_to_a_read_only_or_corrupt_image_changes_nothing() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&[arg(&p), "1M"]);
    let before = std::fs::read(&p).unwrap();
    {
        let mut c = open_writable(&p);
        let e = c.write_at(&[1u8; 100], (1 << 20) - 50).unwrap_err();
        assert!(e.to_string().contains("outside the virtual disk"), "{e}");
        assert!(c.write_zeroes(2 << 20, 10, false).is_err());
    }
    {
        let mut c = Chain::open(&p, &OpenOptions::default()).unwrap();
        let e = c.write_at(&[1u8; 100], 0).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a refused write changed the file"
    );
    // Set the corrupt bit (incompatible feature bit 1, header byte 79).
    let mut bytes = before.clone();
    bytes[79] |= 2;
    std::fs::write(&p, &bytes).unwrap();
    {
        let mut c = open_writable(&p);
        let e = c.write_at(&[1u8; 100], 0).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    assert!(
        std::fs::read(&p).unwrap() == bytes,
        "a write to a corrupt image changed the file"
    );
}

#[test]
fn invalid_create_options_are_refused_with_a_clear_error() {
    let m = strata_image::MemStorage::new();
    let p = Path::new("x.qcow2");
    for (opts, needle) in [
        (
            CreateOptions {
                cluster_size: 3000,
                ..Default::default()
            },
            "power of two",
        ),
        (
            CreateOptions {
                cluster_size: 256,
                ..Default::default()
            },
            "512 B",
        ),
        (
            CreateOptions {
                cluster_size: 4 << 20,
                ..Default::default()
            },
            "2 MiB",
        ),
        (
            CreateOptions {
                refcount_bits: 3,
                ..Default::default()
            },
            "refcount_bits",
        ),
        (
            CreateOptions {
                compat_v2: true,
                extended_l2: true,
                ..Default::default()
            },
            "compat=1.1",
        ),
        (
            CreateOptions {
                extended_l2: true,
                cluster_size: 4096,
                ..Default::default()
            },
            "16 KiB",
        ),
        (
            CreateOptions {
                compat_v2: true,
                refcount_bits: 8,
                ..Default::default()
            },
            "refcount_bits=16",
        ),
    ] {
        let e = create_qcow2(Box::new(m.clone()), p, &opts).unwrap_err();
        assert!(e.to_string().contains(needle), "{e} (wanted {needle:?})");
    }
    assert_eq!(m.to_bytes().len(), 0, "a refused create wrote something");
}

fn qemu_check_code(img: &Path) -> i32 {
    qemu_img_output(&["check", "-U", arg(img)])
        .status
        .code()
        .unwrap_or(-1)
}

#[test]
fn a_dirty_lazy_refcounts_image_is_repaired_before_the_first_write() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    qemu_create(&["-o", "lazy_refcounts=on", arg(&q), "4M"]);
    // qemu-io's abort leaves the dirty bit set and refcounts stale.
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x71 0 300k",
            "-c",
            "write -P 0x72 1M 64k",
            "-c",
            "abort",
            arg(&q),
        ])
        .output()
        .unwrap();
    assert_eq!(
        qemu_check_code(&q),
        2,
        "the aborted image should be dirty with stale refcounts"
    );
    let s = dir.path().join("s.qcow2");
    std::fs::copy(&q, &s).unwrap();
    qemu_io(&q, &["write -P 0x73 2M 100k"]);
    // The default write policy refuses, naming the state, and writes nothing.
    let before = std::fs::read(&s).unwrap();
    {
        let opts = OpenOptions::new().writable(true);
        let mut c = Chain::open(&s, &opts).unwrap();
        let e = c.write_at(&vec![0x73; 100 << 10], 2 << 20).unwrap_err();
        assert!(e.to_string().contains("dirty"), "{e}");
    }
    assert!(
        std::fs::read(&s).unwrap() == before,
        "a refused write changed the file"
    );
    {
        // What qemu-io does: repair, then write.
        let mut c = open_writable(&s);
        c.write_at(&vec![0x73; 100 << 10], 2 << 20).unwrap();
        c.flush().unwrap();
    }
    assert_twin_matches(&q, &s);
    let info: serde_json::Value = serde_json::from_str(&qemu_info(&s)).unwrap();
    assert_eq!(info["dirty-flag"], false);
}

#[test]
fn writing_an_image_with_bitmaps_keeps_them_and_checks_clean() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    qemu_create(&[arg(&q), "4M"]);
    qemu_io(&q, &["write -P 0x21 0 1M"]);
    qemu_img(&["bitmap", "--add", arg(&q), "bm0"]);
    qemu_img(&["bitmap", "--add", "--disable", arg(&q), "bm1"]);
    qemu_io(&q, &["write -P 0x22 2M 64k"]);
    let s = dir.path().join("s.qcow2");
    std::fs::copy(&q, &s).unwrap();
    qemu_io(&q, &["write -P 0x23 100k 10k"]);
    {
        let mut c = open_writable(&s);
        c.write_at(&vec![0x23; 10 << 10], 100 << 10).unwrap();
    }
    assert_twin_matches(&q, &s);
    // The bitmaps are kept, as QEMU keeps them (issue 14; the dirty
    // ranges are compared in tests/bitmaps.rs).
    let tail = |info: String| info[info.find("\"bitmaps\"").expect("bitmaps listed")..].to_string();
    let (qi, si) = (tail(qemu_info(&q)), tail(qemu_info(&s)));
    let cut = |t: &str| t[..t.find("\"refcount-bits\"").unwrap_or(t.len())].to_string();
    assert_eq!(cut(&qi), cut(&si));
}

#[test]
fn check_repair_fixes_leaks_and_rebuilds_refcounts_like_qemu_img() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu_create(&["-o", "cluster_size=4096", arg(&p), "4M"]);
    qemu_io(
        &p,
        &[
            "write -P 0x31 0 200k",
            "write -P 0x32 1M 100k",
            "discard 0 64k",
        ],
    );
    let view = qemu_raw(&p, dir.path());
    // Leak: raise the refcount of a cluster the discard freed (refcount
    // block at 0x2000, 16-bit entries; data clusters start after the L2
    // table at cluster 4).
    let mut bytes = std::fs::read(&p).unwrap();
    let free_ci = 6;
    assert_eq!(
        bytes[0x2000 + 2 * free_ci + 1],
        0,
        "cluster 6 should be free"
    );
    bytes[0x2000 + 2 * free_ci + 1] = 1;
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(qemu_check_code(&p), 3);
    let r = repair_to_clean(&p, RepairMode::Leaks);
    assert_eq!(r.before.leaks, 1);
    assert_eq!(qemu_check_code(&p), 0);
    // Corruption: zero the refcount of a used data cluster; -r all rebuilds.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0x2000 + 2 * 30] = 0;
    bytes[0x2000 + 2 * 30 + 1] = 0;
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(qemu_check_code(&p), 2);
    let r = repair_to_clean(&p, RepairMode::All);
    assert!(r.before.corruptions > 0);
    assert_eq!(qemu_check_code(&p), 0);
    assert!(
        qemu_raw(&p, dir.path()) == view,
        "repair changed the guest view"
    );
}

/// Repairs the qcow2 image `p` with Strata in `mode` and asserts that it
/// checks clean afterwards.
fn repair_to_clean(p: &Path, mode: RepairMode) -> RepairReport {
    let mut img = Qcow2Image::open_rw(Box::new(FileStorage::open(p, true).unwrap()), p).unwrap();
    let r = repair(&mut img, mode).unwrap();
    assert!(r.after.is_clean(), "{:?}", r.after.problems);
    r
}

/// Copies a directory tree (the layers of one chain shape).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn strata_writes_match_qemu_io_twins_on_every_chain_shape() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/shared-chains.sh");
    let shapes = PathBuf::from(run("bash", &[arg(&script), env!("CARGO_TARGET_TMPDIR")]).trim());
    let names = std::fs::read_to_string(shapes.join("SHAPES")).unwrap();
    let mut seen = 0;
    for (i, name) in names.lines().filter(|l| !l.is_empty()).enumerate() {
        let src = shapes.join(name);
        let top = std::fs::read_to_string(src.join("top"))
            .unwrap()
            .trim()
            .to_string();
        let (q, s) = (
            dir.path().join(format!("q-{name}")),
            dir.path().join(format!("s-{name}")),
        );
        copy_tree(&src, &q);
        copy_tree(&src, &s);
        let (qt, st) = (q.join(&top), s.join(&top));
        let size = Chain::open(&st, &OpenOptions::default())
            .unwrap()
            .virtual_size();
        let ops = random_ops(101 + i as u64, size, 25, 4096);
        apply_to_twins(&ops, &qt, &st);
        assert_twin_matches(&qt, &st);
        seen += 1;
    }
    assert!(seen >= 15, "only {seen} shapes generated");
}

#[test]
fn an_io_error_poisons_the_image_against_further_writes() {
    use strata_image::{MemStorage, Storage};
    /// Fails the first write after `arm` is set, then works again.
    #[derive(Debug, Clone)]
    struct FailOnce(MemStorage, std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Storage for FailOnce {
        fn read_at(&self, b: &mut [u8], o: u64) -> std::io::Result<usize> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> std::io::Result<()> {
            if self.1.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("injected EIO"));
            }
            self.0.write_at(b, o)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, l: u64) -> std::io::Result<()> {
            self.0.set_len(l)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
    }
    let mem = MemStorage::new();
    drop(
        create_qcow2(
            Box::new(mem.clone()),
            Path::new("p.qcow2"),
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let arm = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut img =
        Qcow2Image::open_rw(Box::new(FailOnce(mem, arm.clone())), Path::new("p.qcow2")).unwrap();
    let none = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    img.write(0, &[1u8; 4096], &none).unwrap();
    arm.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = img.write(65536, &[2u8; 4096], &none).unwrap_err();
    assert!(e.to_string().contains("injected EIO"), "{e}");
    assert!(img.is_poisoned());
    let e = img.write(131072, &[3u8; 4096], &none).unwrap_err();
    assert!(e.to_string().contains("earlier I/O error"), "{e}");
    assert!(img.flush().is_err());
}
