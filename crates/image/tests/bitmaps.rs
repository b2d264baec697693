//! Persistent dirty bitmaps through Strata's write path, with QEMU as the
//! oracle: the same writes, zero writes and discards applied through
//! qemu-io and through Strata to twin images must leave the same bitmap
//! list (`qemu-img info`) and the same dirty ranges, as QEMU reads them
//! back over NBD (`qemu-nbd -B NAME` + `qemu-img map` with
//! `x-dirty-bitmap`, where dirty ranges are `"data": false`).

mod common;

use std::path::Path;

use common::{qemu_create, qemu_img, qemu_io, run, skip, Keep, Rng};
use strata_image::{Chain, FileStorage, OpenOptions, Qcow2Image};

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One guest operation, in qemu-io's spelling and as Strata applies it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    /// Grow the disk to this size.
    Resize(u64),
}

impl Op {
    fn qemu_io(self) -> String {
        match self {
            Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            Op::Zero(o, l, false) => format!("write -z {o} {l}"),
            Op::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
            Op::Flush => "flush".into(),
            Op::Resize(n) => format!("truncate {n}"),
        }
    }

    fn strata(self, c: &mut Chain) {
        self.try_strata(c).unwrap()
    }

    fn try_strata(self, c: &mut Chain) -> strata_image::Result<()> {
        match self {
            Op::Write(o, l, p) => c.write_at(&vec![p; l as usize], o),
            Op::Zero(o, l, unmap) => c.write_zeroes(o, l, unmap),
            Op::Discard(o, l) => c.discard(o, l),
            Op::Flush => c.flush(),
            Op::Resize(n) => match &mut c.layers_mut()[0].image {
                Image::Qcow2(q) => q.resize(n),
                Image::Raw(_) => unreachable!("qcow2 only"),
            },
        }
    }
}

fn open_writable(img: &Path) -> Chain {
    Chain::open(img, &OpenOptions::new().writable(true)).unwrap()
}

fn apply_both(q: &Path, s: &Path, ops: &[Op]) {
    let cmds: Vec<String> = ops.iter().map(|o| o.qemu_io()).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(q, &cmds);
    let mut c = open_writable(s);
    for op in ops {
        op.strata(&mut c);
    }
    c.flush().unwrap();
}

/// The bitmaps `qemu-img info` lists: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["info", "-U", "--output=json", arg(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Bitmap `name`'s dirty ranges as QEMU reads them.
pub fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    run(
        "qemu-nbd",
        &[
            "--fork",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            arg(&sock),
            arg(img),
        ],
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        arg(&sock)
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == false {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match ranges.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += l,
                _ => ranges.push((s, l)),
            }
        }
    }
    ranges
}

/// Bitmap `name`'s dirty ranges as Strata's library reads them.
fn strata_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let q = Qcow2Image::open(Box::new(FileStorage::open(img, false).unwrap()), img).unwrap();
    let b = q.dirty_bitmap(name).unwrap();
    b.extents(0, q.virtual_size()).collect()
}

fn check_clean(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", arg(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {img:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_twins_agree(q: &Path, s: &Path) {
    let (qb, sb) = (qemu_bitmaps(q), qemu_bitmaps(s));
    assert_eq!(qb, sb, "bitmap lists differ");
    assert!(!qb.is_empty(), "the twins have no bitmaps");
    for b in &qb {
        let name = b["name"].as_str().unwrap();
        let qd = qemu_dirty(q, name);
        assert!(
            !qd.is_empty(),
            "{name} has no dirty range: the test proves nothing"
        );
        assert_eq!(qd, qemu_dirty(s, name), "dirty ranges of {name} differ");
        if !b["flags"].as_array().unwrap().iter().any(|f| f == "in-use") {
            assert_eq!(qd, strata_dirty(s, name), "library view of {name}");
        }
    }
    check_clean(s);
    let qr = dir_raw(q);
    assert!(qr == dir_raw(s), "guest views differ");
}

fn dir_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    qemu_img(&["convert", "-U", "-O", "raw", arg(img), arg(&out)]);
    std::fs::read(out).unwrap()
}

/// An image with an enabled bitmap "on" (granularity `g`, already dirty
/// at 0-64k), an enabled default "b64" and a disabled "off"; and its twin.
fn twins(
    dir: &Path,
    create_opts: &[&str],
    size: &str,
    g: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let q = dir.join("q.qcow2");
    let mut args: Vec<&str> = create_opts.to_vec();
    args.push(arg(&q));
    args.push(size);
    qemu_create(&args);
    qemu_io(&q, &["write -P 7 0 256k"]);
    qemu_img(&["bitmap", "--add", "-g", g, arg(&q), "on"]);
    qemu_img(&["bitmap", "--add", arg(&q), "b64"]);
    qemu_img(&["bitmap", "--add", "-g", g, arg(&q), "off"]);
    qemu_io(&q, &["write -P 8 0 64k"]);
    qemu_img(&["bitmap", "--disable", arg(&q), "off"]);
    let s = dir.join("s.qcow2");
    std::fs::copy(&q, &s).unwrap();
    (q, s)
}

const OPS: &[Op] = &[
    Op::Write(100 << 10, 4 << 10, 1),
    Op::Write((1 << 20) - 512, 1024, 2),
    Op::Zero(3 << 20, 300 << 10, false),
    Op::Flush,
    Op::Zero(5 << 20, 1 << 20, true),
    Op::Discard(10 << 20, 64 << 10),
    Op::Discard((12 << 20) + 4096, 8192),
    Op::Write((16 << 20) - 4096, 4096, 3),
];

#[test]
fn writes_zeroes_and_discards_dirty_the_same_granules_as_qemu_for_each_granularity() {
    if skip() {
        return;
    }
    for g in ["64k", "128k", "4k", "1M", "512"] {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), &[], "16M", g);
        apply_both(&q, &s, OPS);
        assert_twins_agree(&q, &s);
    }
}

#[test]
fn bitmaps_spanning_several_clusters_with_small_clusters_agree_with_qemu() {
    if skip() {
        return;
    }
    // 512-byte clusters: the 4k bitmap of 16 MiB takes 512 bytes of bits
    // (one cluster); at 512 bytes it takes 8 clusters.
    for g in ["512", "4k"] {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), &["-o", "cluster_size=512"], "16M", g);
        apply_both(&q, &s, OPS);
        assert_twins_agree(&q, &s);
    }
}

#[test]
fn several_sessions_accumulate_dirty_bits_like_qemu() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, s) = twins(dir.path(), &[], "16M", "64k");
    apply_both(&q, &s, &OPS[..3]);
    apply_both(&q, &s, &OPS[3..]);
    apply_both(&q, &s, &[Op::Write(8 << 20, 1, 9)]);
    assert_twins_agree(&q, &s);
}

#[test]
fn an_image_written_by_strata_keeps_autoclear_and_no_bitmap_in_use() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, s) = twins(dir.path(), &[], "16M", "64k");
    {
        let mut c = open_writable(&s);
        c.write_at(&[1; 512], 0).unwrap();
        // Mid-session the enabled bitmaps are flagged in use on disk.
        let b = qemu_bitmaps(&s);
        let in_use: Vec<_> = b
            .iter()
            .filter(|b| b["flags"].as_array().unwrap().iter().any(|f| f == "in-use"))
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(in_use, ["on", "b64"]);
    }
    let b = qemu_bitmaps(&s);
    assert_eq!(b.len(), 3);
    for b in &b {
        assert!(!b["flags"].as_array().unwrap().iter().any(|f| f == "in-use"));
    }
    let q = Qcow2Image::open(Box::new(FileStorage::open(&s, false).unwrap()), &s).unwrap();
    assert_eq!(q.header().autoclear_features().bits() & 1, 1);
    let names: Vec<_> = q
        .bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| (b.name, b.auto))
        .collect();
    assert_eq!(
        names,
        [
            ("on".into(), true),
            ("b64".into(), true),
            ("off".into(), false)
        ]
    );
}

#[test]
fn v2_images_have_no_bitmaps() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.qcow2");
    qemu_create(&["-o", "compat=0.10", arg(&p), "1M"]);
    let q = Qcow2Image::open(Box::new(FileStorage::open(&p, false).unwrap()), &p).unwrap();
    assert!(q.bitmaps().unwrap().is_empty());
}

// ---------------------------------------------------------------------
// Crashes at every write and sync (FaultStorage): every bitmap is either
// flagged in use or consistent and dirty wherever the guest view changed.
// ---------------------------------------------------------------------

use strata_image::{FaultStorage, Image, Layer, MemStorage};

fn mem_image(bytes: Vec<u8>) -> Qcow2Image {
    Qcow2Image::open(
        Box::new(MemStorage::from_bytes(bytes)),
        Path::new("b.qcow2"),
    )
    .unwrap()
}

fn guest_view(img: Qcow2Image) -> Vec<u8> {
    let c =
        Chain::from_layers(vec![Layer::new("b.qcow2".into(), None, Image::Qcow2(img))]).unwrap();
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

/// Per bitmap of `initial`: its name, flags and dirty granules.
fn bitmap_state(img: &Qcow2Image) -> Vec<(String, bool, bool, Option<strata_image::DirtyBitmap>)> {
    img.bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| {
            let bits = (!b.in_use).then(|| img.dirty_bitmap(&b.name).unwrap());
            (b.name, b.in_use, b.auto, bits)
        })
        .collect()
}

fn check_crash_state(label: &str, bytes: Vec<u8>, initial: &[u8], dir: &Path, qemu: bool) {
    let before = bitmap_state(&mem_image(initial.to_vec()));
    let before_view = guest_view(mem_image(initial.to_vec()));
    let img = mem_image(bytes.clone());
    let after = bitmap_state(&img);
    let view = guest_view(img);
    let names = |s: &[(String, bool, bool, Option<_>)]| -> Vec<String> {
        s.iter().map(|b| b.0.clone()).collect()
    };
    assert_eq!(
        names(&before),
        names(&after),
        "{label}: bitmap list changed"
    );
    for ((name, _, auto, old), (_, in_use, auto_now, new)) in before.iter().zip(&after) {
        assert_eq!(auto, auto_now, "{label}: {name} auto flag changed");
        if !auto {
            // Disabled: exactly as it was.
            assert!(!in_use, "{label}: disabled {name} flagged in use");
            let (o, n) = (old.as_ref().unwrap(), new.as_ref().unwrap());
            let a: Vec<_> = o.extents(0, u64::MAX).collect();
            assert_eq!(
                a,
                n.extents(0, u64::MAX).collect::<Vec<_>>(),
                "{label}: {name}"
            );
            continue;
        }
        let Some(new) = new else {
            continue; // in use: untrusted, which is allowed
        };
        let old = old.as_ref().unwrap();
        let g = new.granularity() as usize;
        for start in (0..view.len()).step_by(g) {
            let end = (start + g).min(view.len());
            // Past the old end the disk grew: it read as nothing before,
            // zeros now (QEMU leaves such granules clean).
            let prev = before_view
                .get(start..end.min(before_view.len()))
                .unwrap_or(&[]);
            let changed = view[start..start + prev.len()] != *prev
                || view[start + prev.len()..end].iter().any(|b| *b != 0);
            let was = old.is_dirty(start as u64);
            if (changed || was) && !new.is_dirty(start as u64) {
                panic!(
                    "{label}: bitmap {name} claims granule {start:#x} clean, but it {}",
                    if was { "was dirty before" } else { "changed" }
                );
            }
        }
    }
    if qemu {
        let p = dir.join("crash.qcow2");
        std::fs::write(&p, &bytes).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-U", arg(&p)])
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 3,
            "{label}: qemu-img check exit {code}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // QEMU reads the same flags and the same bits.
        let qb = qemu_bitmaps(&p);
        for (b, (name, in_use, _, bits)) in qb.iter().zip(&after) {
            assert_eq!(b["name"], name.as_str());
            let q_in_use = b["flags"].as_array().unwrap().iter().any(|f| f == "in-use");
            assert_eq!(
                q_in_use, *in_use,
                "{label}: {name} in-use flag as QEMU reads it"
            );
            if let Some(bits) = bits {
                let ours: Vec<_> = bits.extents(0, u64::MAX).collect();
                assert_eq!(
                    qemu_dirty(&p, name),
                    ours,
                    "{label}: {name} as QEMU reads it"
                );
            }
        }
    }
}

fn crash_everywhere_with_bitmaps(initial: Vec<u8>, ops: &[Op], qemu_every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let reference = FaultStorage::new(initial.clone());
    {
        let img = Qcow2Image::open_rw(Box::new(reference.clone()), Path::new("b.qcow2")).unwrap();
        let mut c = Chain::from_layers(vec![Layer::new("b.qcow2".into(), None, Image::Qcow2(img))])
            .unwrap();
        for op in ops {
            op.strata(&mut c);
        }
    }
    let total = reference.ops();
    assert!(total > 10, "workload too small: {total} operations");
    eprintln!("{total} storage operations to crash at");
    check_crash_state("no crash", reference.current(), &initial, dir.path(), true);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for n in 0..total {
        let st = FaultStorage::new(initial.clone());
        st.crash_at(n);
        {
            let img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("b.qcow2")).unwrap();
            let mut c =
                Chain::from_layers(vec![Layer::new("b.qcow2".into(), None, Image::Qcow2(img))])
                    .unwrap();
            for op in ops {
                if op.try_strata(&mut c).is_err() {
                    break;
                }
            }
        }
        assert!(st.crashed(), "crash point {n} not reached");
        let seed = rng.next() | 1;
        let subsets: Vec<(&str, Keep)> = vec![
            ("none", Box::new(|_| false)),
            ("all", Box::new(|_| true)),
            ("random", {
                let mut r = Rng(seed);
                Box::new(move |_| r.next().is_multiple_of(2))
            }),
        ];
        for (i, (name, mut keep)) in subsets.into_iter().enumerate() {
            let label = format!("crash at op {n}/{total}, subset {name}");
            let qemu = (n + i as u64).is_multiple_of(qemu_every);
            check_crash_state(
                &label,
                st.durable_image(&mut *keep),
                &initial,
                dir.path(),
                qemu,
            );
        }
    }
}

#[test]
fn growing_bitmaps_survive_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    qemu_create(&["-o", "cluster_size=4096", arg(&p), "512k"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", arg(&p), "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", arg(&p), "off"]);
    qemu_io(&p, &["write -P 6 8k 4k"]);
    qemu_img(&["bitmap", "--disable", arg(&p), "off"]);
    let initial = std::fs::read(&p).unwrap();
    let ops = [
        Op::Write(1000, 10_000, 1),
        Op::Resize(3 << 20),
        Op::Write(2 << 20, 5000, 2),
        Op::Flush,
    ];
    crash_everywhere_with_bitmaps(initial, &ops, 5);
}

#[test]
fn bitmaps_survive_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu_create(&["-o", "cluster_size=4096", arg(&p), "1M"]);
    qemu_io(&p, &["write -P 5 0 64k"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", arg(&p), "fine"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", arg(&p), "coarse"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", arg(&p), "off"]);
    qemu_io(&p, &["write -P 6 8k 4k", "write -P 6 900k 1k"]);
    qemu_img(&["bitmap", "--disable", arg(&p), "off"]);
    let initial = std::fs::read(&p).unwrap();
    let ops = [
        Op::Write(1000, 10_000, 1),
        Op::Write(300_000, 70_000, 2),
        Op::Flush,
        Op::Zero(4096, 8192, false),
        Op::Discard(0, 16384),
        Op::Write(600_000, 100, 4),
        Op::Flush,
        Op::Zero(700_000, 200_000, true),
        Op::Write(1_000_000, 48_576, 5),
    ];
    crash_everywhere_with_bitmaps(initial, &ops, 7);
}

// ---------------------------------------------------------------------
// Hostile bytes in the bitmap directory and tables: errors, never panics.
// ---------------------------------------------------------------------

/// The bitmap directory's and first bitmap table's offsets and lengths.
fn bitmap_regions(bytes: &[u8]) -> Vec<(usize, usize)> {
    let h = strata_format::Header::parse(&bytes[..65536.min(bytes.len())]).unwrap();
    let (nb, size, off) = h.bitmaps().unwrap();
    let dir = &bytes[off as usize..(off + size) as usize];
    let es = strata_format::bitmap::parse_directory(dir, nb, off).unwrap();
    let mut out = vec![(off as usize, size as usize)];
    for e in es {
        out.push((e.table_offset as usize, e.table_bytes() as usize));
    }
    out
}

#[test]
fn damaged_bitmap_directories_and_tables_give_errors_not_panics() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = twins(dir.path(), &["-o", "cluster_size=4096"], "4M", "4k");
    let good = std::fs::read(&q).unwrap();
    let regions = bitmap_regions(&good);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    for round in 0..400 {
        let mut bytes = good.clone();
        let (off, len) = regions[(rng.next() % regions.len() as u64) as usize];
        for _ in 0..1 + rng.next() % 4 {
            let at = off + (rng.next() % len as u64) as usize;
            bytes[at] = match rng.next() % 3 {
                0 => 0xff,
                1 => 0,
                _ => rng.next() as u8,
            };
        }
        let img = mem_image(bytes.clone());
        if let Ok(list) = img.bitmaps() {
            for b in list {
                if let Ok(d) = img.dirty_bitmap(&b.name) {
                    let _ = d.extents(0, u64::MAX).count();
                }
            }
        }
        // Writing through it: the bitmaps are kept, or the write is
        // refused when they cannot be read; never a panic.
        let m = MemStorage::from_bytes(bytes);
        if let Ok(mut w) = Qcow2Image::open_rw(Box::new(m.clone()), Path::new("h.qcow2")) {
            let r = w.write(4096, &[round as u8; 512], &zeros);
            let r = r.and_then(|()| w.flush());
            if r.is_ok() {
                let back = mem_image(m.to_bytes());
                let _ = back.bitmaps();
            }
        }
    }
}

/// A damaged bitmap directory (an unaligned bitmap table offset): QEMU
/// refuses to open the image for writing; Strata refuses the write, says
/// why, and leaves the file byte for byte as it was. (Dropping the bitmaps
/// instead would make the next incremental backup miss every change.)
#[test]
fn a_damaged_bitmap_directory_refuses_writes_like_qemu_and_changes_nothing() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, s) = twins(dir.path(), &[], "16M", "64k");
    let mut bytes = std::fs::read(&q).unwrap();
    let (dir_off, _) = bitmap_regions(&bytes)[0];
    // The first entry's bitmap_table_offset (its first 8 bytes).
    bytes[dir_off..dir_off + 8].copy_from_slice(&0x12345u64.to_be_bytes());
    std::fs::write(&q, &bytes).unwrap();
    std::fs::write(&s, &bytes).unwrap();

    let qemu = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 9 0 4k", arg(&q)])
        .output()
        .unwrap();
    let mut c = open_writable(&s);
    let r = c.write_at(&[9u8; 4096], 0).and_then(|()| c.flush());
    drop(c);

    let qtext =
        String::from_utf8_lossy(&qemu.stdout).into_owned() + &String::from_utf8_lossy(&qemu.stderr);
    assert!(
        !qemu.status.success() || qtext.contains("Could not open"),
        "QEMU refuses it: {qtext}"
    );
    assert_eq!(std::fs::read(&q).unwrap(), bytes, "QEMU wrote nothing");
    let err = r.expect_err("Strata refuses the write").to_string();
    assert!(err.contains("bitmaps cannot be read"), "{err}");
    assert_eq!(std::fs::read(&s).unwrap(), bytes, "Strata wrote nothing");
}

#[test]
fn bitmap_edits_survive_a_crash_at_every_write_and_sync() {
    if skip() {
        return;
    }
    use strata_image::BitmapEdit;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    qemu_create(&["-o", "cluster_size=4096", arg(&p), "1M"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", arg(&p), "a"]);
    qemu_io(&p, &["write -P 5 0 64k", "write -P 6 512k 4k"]);
    let initial = std::fs::read(&p).unwrap();
    let src = mem_image(initial.clone()).dirty_bitmap("a").unwrap();
    let edits = |img: &mut Qcow2Image| -> strata_image::Result<()> {
        img.edit_bitmap(
            "b",
            BitmapEdit::Add {
                granularity: Some(65536),
                disabled: false,
            },
        )?;
        img.edit_bitmap("b", BitmapEdit::Merge(&src))?;
        img.edit_bitmap("a", BitmapEdit::Disable)?;
        img.edit_bitmap("a", BitmapEdit::Remove)?;
        img.edit_bitmap("b", BitmapEdit::Clear)
    };
    // The states each step leaves: the bitmap list with each one's bits.
    let reference = FaultStorage::new(initial.clone());
    let mut states = vec![summary(&mem_image(initial.clone()))];
    {
        let mut img = Qcow2Image::open_rw(Box::new(reference.clone()), Path::new("e")).unwrap();
        edits(&mut img).unwrap();
    }
    let total = reference.ops();
    // Rebuild the intermediate states by stopping after each edit.
    for k in 1..=5 {
        let st = FaultStorage::new(initial.clone());
        let mut img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("e")).unwrap();
        let all = [
            BitmapEdit::Add {
                granularity: Some(65536),
                disabled: false,
            },
            BitmapEdit::Merge(&src),
            BitmapEdit::Disable,
            BitmapEdit::Remove,
            BitmapEdit::Clear,
        ];
        let names = ["b", "b", "a", "a", "b"];
        for i in 0..k {
            img.edit_bitmap(names[i], all[i]).unwrap();
        }
        drop(img);
        states.push(summary(&mem_image(st.current())));
    }
    assert!(total > 20, "{total} operations");
    let mut rng = Rng(0x5151_7788_9911_2233);
    for n in 0..total {
        let st = FaultStorage::new(initial.clone());
        st.crash_at(n);
        if let Ok(mut img) = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("e")) {
            let _ = edits(&mut img);
        }
        assert!(st.crashed());
        let seed = rng.next() | 1;
        let subsets: Vec<(&str, Keep)> = vec![
            ("none", Box::new(|_| false)),
            ("all", Box::new(|_| true)),
            ("random", {
                let mut r = Rng(seed);
                Box::new(move |_| r.next().is_multiple_of(2))
            }),
        ];
        for (name, mut keep) in subsets {
            let label = format!("crash at op {n}/{total}, subset {name}");
            let bytes = st.durable_image(&mut *keep);
            let got = summary(&mem_image(bytes.clone()));
            assert!(
                states.contains(&got),
                "{label}: {got:?} is none of {states:?}"
            );
            if n % 5 == 0 {
                let c = dir.path().join("crash.qcow2");
                std::fs::write(&c, &bytes).unwrap();
                let out = std::process::Command::new("qemu-img")
                    .args(["check", "-U", arg(&c)])
                    .output()
                    .unwrap();
                let code = out.status.code().unwrap_or(-1);
                assert!(
                    code == 0 || code == 3,
                    "{label}: qemu-img check exit {code}"
                );
            }
        }
    }
}

/// A bitmap's name, in_use and auto flags, and dirty extents.
type Summary = (String, bool, bool, Vec<(u64, u64)>);

/// Each bitmap's name, flags and dirty extents.
fn summary(img: &Qcow2Image) -> Vec<Summary> {
    img.bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| {
            let d = img.dirty_bitmap(&b.name).unwrap();
            (b.name, b.in_use, b.auto, d.extents(0, u64::MAX).collect())
        })
        .collect()
}

#[test]
fn growing_an_image_grows_its_bitmaps_clean_like_qemu_img_resize() {
    if skip() {
        return;
    }
    for g in ["64k", "4k", "1M"] {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), &["-o", "cluster_size=4096"], "4M", g);
        qemu_img(&["resize", "-q", arg(&q), "40M"]);
        qemu_io(&q, &["write -P 3 30M 8k", "write -P 4 1M 4k"]);
        {
            let mut img =
                Qcow2Image::open_rw(Box::new(FileStorage::open(&s, true).unwrap()), &s).unwrap();
            img.resize(40 << 20).unwrap();
            let zeros = |b: &mut [u8], _| {
                b.fill(0);
                Ok(())
            };
            img.write(30 << 20, &[3; 8192], &zeros).unwrap();
            img.write(1 << 20, &[4; 4096], &zeros).unwrap();
            img.flush().unwrap();
        }
        assert_twins_agree(&q, &s);
    }
}

// ---------------------------------------------------------------------
// Model: a set of granules per bitmap. Random writes, zero writes,
// discards, flushes, reopens and edits; after each step the bits are
// exactly the model's (QEMU marks exactly the granules a request
// touches).
// ---------------------------------------------------------------------

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use strata_image::create::{create_qcow2, CreateOptions};
    use strata_image::BitmapEdit;

    const SIZE: u64 = 2 << 20;

    #[derive(Debug, Clone)]
    enum Step {
        Write(u64, u64),
        Zero(u64, u64, bool),
        Discard(u64, u64),
        Flush,
        Reopen,
        Clear(usize),
        Toggle(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let range = (0..SIZE - 1).prop_flat_map(|o| (Just(o), 1..(SIZE - o).min(300_000)));
        prop_oneof![
            4 => range.clone().prop_map(|(o, l)| Step::Write(o, l)),
            2 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Step::Zero(o, l, u)),
            2 => range.prop_map(|(o, l)| Step::Discard(o, l)),
            1 => Just(Step::Flush),
            1 => Just(Step::Reopen),
            1 => (0..3usize).prop_map(Step::Clear),
            1 => (0..3usize).prop_map(Step::Toggle),
        ]
    }

    const NAMES: [&str; 3] = ["g4k", "g64k", "g1m"];
    const GRAN: [u64; 3] = [4096, 65536, 1 << 20];

    fn open(m: &MemStorage) -> Qcow2Image {
        Qcow2Image::open_rw(Box::new(m.clone()), Path::new("m.qcow2")).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn bitmaps_hold_exactly_the_granules_the_requests_touched(
            steps in proptest::collection::vec(step(), 1..25),
            cluster_bits in prop_oneof![Just(12u32), Just(16u32)],
        ) {
            let m = MemStorage::new();
            let mut img = create_qcow2(
                Box::new(m.clone()),
                Path::new("m.qcow2"),
                &CreateOptions { size: SIZE, cluster_size: 1 << cluster_bits, ..Default::default() },
            )
            .unwrap();
            for (n, g) in NAMES.iter().zip(GRAN) {
                img.edit_bitmap(n, BitmapEdit::Add { granularity: Some(g), disabled: false }).unwrap();
            }
            let mut model: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 3];
            let mut enabled = [true; 3];
            let zeros = |b: &mut [u8], _| {
                b.fill(0);
                Ok(())
            };
            for s in &steps {
                let touched = match *s {
                    Step::Write(o, l) => {
                        img.write(o, &vec![0x5a; l as usize], &zeros).unwrap();
                        Some((o, l))
                    }
                    Step::Zero(o, l, u) => {
                        img.write_zeroes(o, l, u, &zeros).unwrap();
                        Some((o, l))
                    }
                    Step::Discard(o, l) => {
                        img.discard(o, l, false).unwrap();
                        Some((o, l))
                    }
                    Step::Flush => {
                        img.flush().unwrap();
                        None
                    }
                    Step::Reopen => {
                        drop(img);
                        img = open(&m);
                        None
                    }
                    Step::Clear(i) => {
                        img.edit_bitmap(NAMES[i], BitmapEdit::Clear).unwrap();
                        model[i].clear();
                        None
                    }
                    Step::Toggle(i) => {
                        let e = if enabled[i] { BitmapEdit::Disable } else { BitmapEdit::Enable };
                        img.edit_bitmap(NAMES[i], e).unwrap();
                        enabled[i] = !enabled[i];
                        None
                    }
                };
                if let Some((o, l)) = touched {
                    for i in 0..3 {
                        if enabled[i] {
                            model[i].extend(o / GRAN[i]..=(o + l - 1) / GRAN[i]);
                        }
                    }
                }
                for i in 0..3 {
                    let d = img.dirty_bitmap(NAMES[i]).unwrap();
                    let got: BTreeSet<u64> = d
                        .extents(0, SIZE)
                        .flat_map(|(s, l)| s / GRAN[i]..(s + l).div_ceil(GRAN[i]))
                        .collect();
                    prop_assert_eq!(&got, &model[i], "{} after {:?}", NAMES[i], s);
                }
            }
            drop(img);
            // What is on disk after close is the model too, and consistent.
            let img = mem_image(m.to_bytes());
            for (i, b) in img.bitmaps().unwrap().iter().enumerate() {
                prop_assert!(!b.in_use);
                prop_assert_eq!(b.auto, enabled[i]);
                let got: BTreeSet<u64> = img
                    .dirty_bitmap(&b.name)
                    .unwrap()
                    .extents(0, SIZE)
                    .flat_map(|(s, l)| s / GRAN[i]..(s + l).div_ceil(GRAN[i]))
                    .collect();
                prop_assert_eq!(&got, &model[i]);
            }
        }
    }
}
