//! `strata_image::check::check` against `qemu-img check --output json` on
//! images made by QEMU's tools, clean and deliberately damaged: the
//! corruption, leak and check-error counts, the exit-code class and the
//! allocation statistics must be the same.
//!
//! These tests fail when qemu-img / qemu-io are missing, unless
//! `STRATA_SKIP_QEMU_TESTS` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_format::refcount;
use strata_format::table::{OFFSET_MASK, OFLAG_COPIED};
use strata_image::check::{check, compute_refcounts, CheckReport, ProblemKind};
use strata_image::{FileStorage, Qcow2Image};
use tempfile::TempDir;

/// What `qemu-img check --output json` said, and its exit code.
#[derive(Debug)]
struct QemuCheck {
    code: i32,
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
    stderr: String,
}

fn qemu_check(img: &Path) -> QemuCheck {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output", "json", img.to_str().unwrap()])
        .output()
        .expect("qemu-img not runnable (set STRATA_SKIP_QEMU_TESTS=1 to skip)");
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // No JSON: qemu-img could not open the image (exit 1).
    let v: serde_json::Value = match serde_json::from_str(&stdout) {
        Ok(v) => v,
        Err(e) => {
            assert_eq!(
                code, 1,
                "qemu-img check gave no JSON ({e}): {stdout} {stderr}"
            );
            serde_json::Value::Null
        }
    };
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    QemuCheck {
        code,
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
        image_end_offset: n("image-end-offset"),
        total_clusters: n("total-clusters"),
        allocated_clusters: n("allocated-clusters"),
        fragmented_clusters: n("fragmented-clusters"),
        compressed_clusters: n("compressed-clusters"),
        stderr,
    }
}

fn open(img: &Path) -> Qcow2Image {
    let storage = FileStorage::open(img, false).unwrap();
    Qcow2Image::open(Box::new(storage), img).unwrap()
}

fn strata_check(img: &Path) -> CheckReport {
    check(&open(img)).unwrap()
}

/// Asserts that Strata's check of `img` agrees with qemu-img's, and
/// returns both.
fn assert_same(img: &Path) -> (CheckReport, QemuCheck) {
    let q = qemu_check(img);
    let s = strata_check(img);
    let ctx = format!(
        "{}\nqemu: {q:#?}\nstrata problems: {:#?}",
        img.display(),
        s.problems
    );
    assert_eq!(s.corruptions, q.corruptions, "corruptions\n{ctx}");
    assert_eq!(s.leaks, q.leaks, "leaks\n{ctx}");
    assert_eq!(s.check_errors, q.check_errors, "check errors\n{ctx}");
    assert_eq!(s.exit_code(), q.code, "exit code\n{ctx}");
    assert_eq!(s.image_end_offset, q.image_end_offset, "image end\n{ctx}");
    assert_eq!(s.total_clusters, q.total_clusters, "total clusters\n{ctx}");
    assert_eq!(
        s.allocated_clusters, q.allocated_clusters,
        "allocated\n{ctx}"
    );
    assert_eq!(
        s.fragmented_clusters, q.fragmented_clusters,
        "fragmented\n{ctx}"
    );
    assert_eq!(
        s.compressed_clusters, q.compressed_clusters,
        "compressed\n{ctx}"
    );
    // Every line Strata reports, qemu-img printed too.
    for p in &s.problems {
        if p.message.starts_with("ERROR cluster")
            || p.message.starts_with("Leaked cluster")
            || p.message.starts_with("ERROR OFLAG_COPIED")
        {
            assert!(
                q.stderr.contains(&p.message),
                "qemu-img did not print {:?}\n{ctx}",
                p.message
            );
        }
    }
    (s, q)
}

struct Lab {
    dir: TempDir,
}

impl Lab {
    fn new() -> Option<Lab> {
        if common::skip() {
            eprintln!("STRATA_SKIP_QEMU_TESTS set: skipping");
            return None;
        }
        Some(Lab {
            dir: TempDir::new().unwrap(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f qcow2 -o OPTS NAME SIZE`.
    fn create(&self, name: &str, opts: &str, size: &str) -> PathBuf {
        let p = self.path(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p.to_str().unwrap(), size]);
        common::qemu_img(&args);
        p
    }
}

/// A few writes that leave allocated, zero and fragmented clusters.
fn scribble(img: &Path) {
    common::qemu_io(
        img,
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 8k",
            "write -P 3 300k 100k",
            "write -z 2M 64k",
            "write -P 4 3M 4k",
            "write -P 5 128k 4k",
        ],
    );
}

// ---- byte surgery ------------------------------------------------------

fn read_u64(img: &Path, off: u64) -> u64 {
    let b = std::fs::read(img).unwrap();
    u64::from_be_bytes(b[off as usize..off as usize + 8].try_into().unwrap())
}

fn write_u64(img: &Path, off: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// Host offset of the L2 entry mapping guest offset `g` (an allocated L2
/// table is required).
fn l2_entry_offset(img: &Path, g: u64) -> u64 {
    let q = open(img);
    let geo = q.geometry();
    let l1i = geo.l1_index(strata_format::GuestOffset::new(g));
    let l2 = q.l1()[l1i as usize] & OFFSET_MASK;
    assert_ne!(l2, 0, "no L2 table for {g:#x}");
    l2 + geo.l2_index(strata_format::GuestOffset::new(g)) * geo.l2_entry_size()
}

/// Sets the stored refcount of host cluster `ci` (its refcount block must
/// exist).
fn set_refcount(img: &Path, ci: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let q = open(img);
    let h = q.header().clone();
    let per_block = refcount::entries_per_block(h.cluster_bits(), h.refcount_order());
    let rt_entry = read_u64(img, h.refcount_table_offset() + (ci / per_block) * 8);
    let block_off = rt_entry & !0x1ff;
    assert_ne!(block_off, 0, "no refcount block for cluster {ci}");
    let cs = h.cluster_size() as usize;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut block = vec![0u8; cs];
    f.read_exact_at(&mut block, block_off).unwrap();
    assert!(refcount::set(
        &mut block,
        h.refcount_order(),
        ci % per_block,
        value
    ));
    f.write_all_at(&block, block_off).unwrap();
}

// ---- clean images --------------------------------------------------------

#[test]
fn clean_images_of_every_cluster_size_agree() {
    let Some(lab) = Lab::new() else { return };
    for cs in ["512", "4k", "64k", "2M"] {
        let img = lab.create(&format!("c{cs}.qcow2"), &format!("cluster_size={cs}"), "8M");
        scribble(&img);
        let (s, _) = assert_same(&img);
        assert!(s.is_clean(), "{cs}: {:?}", s.problems);
        assert!(s.allocated_clusters > 0);
    }
}

#[test]
fn extended_l2_v2_and_refcount_widths_agree() {
    let Some(lab) = Lab::new() else { return };
    for (name, opts) in [
        ("ext64k", "extended_l2=on,cluster_size=64k"),
        ("ext2m", "extended_l2=on,cluster_size=2M"),
        ("v2", "compat=0.10"),
        ("rc1", "refcount_bits=1"),
        ("rc8", "refcount_bits=8"),
        ("rc64", "refcount_bits=64"),
        ("rc1-512", "refcount_bits=1,cluster_size=512"),
    ] {
        let img = lab.create(&format!("{name}.qcow2"), opts, "8M");
        scribble(&img);
        let (s, _) = assert_same(&img);
        assert!(s.is_clean(), "{name}: {:?}", s.problems);
    }
}

#[test]
fn compressed_images_agree() {
    let Some(lab) = Lab::new() else { return };
    let src = lab.create("src.qcow2", "", "8M");
    scribble(&src);
    for (name, opts) in [
        ("zlib64k", "compression_type=zlib"),
        ("zstd64k", "compression_type=zstd"),
        ("zlib4k", "compression_type=zlib,cluster_size=4k"),
        ("zstd512", "compression_type=zstd,cluster_size=512"),
    ] {
        let dst = lab.path(&format!("{name}.qcow2"));
        common::qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ]);
        let (s, _) = assert_same(&dst);
        assert!(s.is_clean(), "{name}: {:?}", s.problems);
        assert!(s.compressed_clusters > 0, "{name}");
    }
}

#[test]
fn internal_snapshots_agree() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("snap.qcow2", "", "8M");
    scribble(&img);
    common::qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    common::qemu_io(&img, &["write -P 7 0 4k", "write -P 8 5M 64k"]);
    common::qemu_img(&["snapshot", "-c", "s2", img.to_str().unwrap()]);
    common::qemu_io(&img, &["write -P 9 1M 4k"]);
    let (s, _) = assert_same(&img);
    assert!(s.is_clean(), "{:?}", s.problems);
    // Shared clusters have refcount 2 or 3.
    let refs = compute_refcounts(&open(&img)).unwrap();
    assert!(refs.iter().any(|r| *r >= 2));
}

#[test]
fn bitmaps_agree() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("bm.qcow2", "cluster_size=4k", "8M");
    common::qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    common::qemu_img(&["bitmap", "--add", "-g", "512", img.to_str().unwrap(), "b1"]);
    scribble(&img);
    let (s, _) = assert_same(&img);
    assert!(s.is_clean(), "{:?}", s.problems);
}

#[test]
fn preallocated_metadata_agrees() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("pre.qcow2", "preallocation=metadata", "8M");
    let (s, _) = assert_same(&img);
    assert!(s.is_clean());
    common::qemu_io(&img, &["write -P 1 0 4k", "write -z 1M 64k"]);
    let _ = assert_same(&img);
}

#[test]
fn a_dirty_lazy_refcount_image_reports_what_qemu_reports() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("lazy.qcow2", "lazy_refcounts=on", "4M");
    // qemu-io aborts without flushing refcounts: the dirty bit stays set.
    let st = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 1 0 64k",
            "-c",
            "abort",
            img.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-io not runnable");
    assert!(!st.status.success());
    assert!(open(&img).header().dirty());
    let (s, q) = assert_same(&img);
    assert_eq!(q.code, 2);
    assert!(s
        .problems
        .iter()
        .any(|p| p.message.starts_with("ERROR OFLAG_COPIED data cluster")));
}

// ---- damaged images ------------------------------------------------------

#[test]
fn a_used_cluster_with_refcount_zero_is_a_corruption() {
    let Some(lab) = Lab::new() else { return };
    for opts in ["", "refcount_bits=1", "refcount_bits=64,cluster_size=4k"] {
        let img = lab.create("rc0.qcow2", opts, "4M");
        scribble(&img);
        let data = read_u64(&img, l2_entry_offset(&img, 0)) & OFFSET_MASK;
        let cs = open(&img).geometry().cluster_size();
        set_refcount(&img, data / cs, 0);
        let (s, q) = assert_same(&img);
        assert_eq!(q.code, 2, "{opts}");
        assert!(s.problems.iter().any(|p| p.kind == ProblemKind::Corruption
            && p.message == format!("ERROR cluster {} refcount=0 reference=1", data / cs)));
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn an_extra_refcount_is_a_leak() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("leak.qcow2", "", "4M");
    scribble(&img);
    // A cluster appended to the file, counted but referenced by nothing.
    let len = std::fs::metadata(&img).unwrap().len();
    let cs = open(&img).geometry().cluster_size();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len.div_ceil(cs) * cs + cs).unwrap();
    drop(f);
    set_refcount(&img, len.div_ceil(cs), 1);
    let (s, q) = assert_same(&img);
    assert_eq!(q.code, 3);
    assert_eq!(s.leaks, 1);
    assert_eq!(s.exit_code(), 3);
}

#[test]
fn a_refcount_of_two_on_an_unshared_cluster_is_a_leak_and_a_copied_error() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("rc2.qcow2", "refcount_bits=8", "4M");
    scribble(&img);
    let data = read_u64(&img, l2_entry_offset(&img, 1 << 20)) & OFFSET_MASK;
    let cs = open(&img).geometry().cluster_size();
    set_refcount(&img, data / cs, 2);
    let (s, _) = assert_same(&img);
    assert_eq!((s.leaks, s.corruptions), (1, 1));
}

#[test]
fn an_l2_entry_past_the_end_of_the_file_is_a_corruption() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("eof.qcow2", "", "4M");
    scribble(&img);
    let at = l2_entry_offset(&img, 3 << 20);
    write_u64(&img, at, OFLAG_COPIED | (1 << 40));
    let (s, q) = assert_same(&img);
    assert_eq!(q.code, 2);
    assert!(s.corruptions >= 1);
}

#[test]
fn a_wrong_copied_flag_is_a_corruption() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("copied.qcow2", "", "4M");
    scribble(&img);
    // Clear COPIED on a data cluster with refcount 1.
    let at = l2_entry_offset(&img, 0);
    let e = read_u64(&img, at);
    write_u64(&img, at, e & !OFLAG_COPIED);
    // And on the L1 entry.
    let l1 = open(&img).header().l1_table_offset();
    let e1 = read_u64(&img, l1);
    write_u64(&img, l1, e1 & !OFLAG_COPIED);
    let (s, _) = assert_same(&img);
    assert_eq!(s.corruptions, 2);
    assert!(s.problems.iter().any(|p| p
        .message
        .starts_with("ERROR OFLAG_COPIED L2 cluster: l1_index=0")));
}

#[test]
fn misaligned_and_reserved_l2_entries_are_corruptions() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("misc.qcow2", "", "4M");
    scribble(&img);
    let at = l2_entry_offset(&img, 0);
    let e = read_u64(&img, at);
    write_u64(&img, at, e + 0x200);
    let at = l2_entry_offset(&img, 1 << 20);
    let e = read_u64(&img, at);
    write_u64(&img, at, e | 0x2);
    let _ = assert_same(&img);
}

#[test]
fn a_refcount_block_outside_the_file_is_a_corruption() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("rb.qcow2", "cluster_size=4k", "4M");
    scribble(&img);
    let h = open(&img).header().clone();
    // A second refcount table entry pointing far past the end.
    write_u64(&img, h.refcount_table_offset() + 8, 1 << 40);
    let _ = assert_same(&img);
}

#[test]
fn an_unused_l2_table_in_a_snapshot_l1_is_counted() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("snapdmg.qcow2", "", "4M");
    scribble(&img);
    common::qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    common::qemu_io(&img, &["write -P 9 0 4k"]);
    // Drop the refcount of the snapshot's L1 table cluster.
    let q = open(&img);
    let sn_l1 = q.snapshots()[0].l1_table_offset;
    let cs = q.geometry().cluster_size();
    drop(q);
    set_refcount(&img, sn_l1 / cs, 0);
    let (s, _) = assert_same(&img);
    assert!(s.corruptions >= 1);
}

#[test]
fn an_unaligned_refcount_block_gives_check_errors_like_qemu() {
    let Some(lab) = Lab::new() else { return };
    let img = lab.create("rbalign.qcow2", "cluster_size=4k", "4M");
    common::qemu_io(&img, &["write -P 1 0 64k"]);
    let rt = open(&img).header().refcount_table_offset();
    let e = read_u64(&img, rt);
    write_u64(&img, rt, e + 0x200);
    let (s, q) = assert_same(&img);
    assert_eq!(q.code, 1);
    assert!(s.check_errors > 0);
}

/// xorshift64*: a small deterministic generator for damage.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn randomly_damaged_metadata_never_panics_and_agrees_with_qemu() {
    let Some(lab) = Lab::new() else { return };
    let base = lab.create("base.qcow2", "cluster_size=4k", "4M");
    scribble(&base);
    common::qemu_img(&["snapshot", "-c", "s1", base.to_str().unwrap()]);
    common::qemu_io(&base, &["write -P 9 0 8k"]);
    common::qemu_img(&["bitmap", "--add", base.to_str().unwrap(), "b0"]);
    common::qemu_io(&base, &["write -P 10 64k 8k"]);
    let pristine = std::fs::read(&base).unwrap();
    // Metadata clusters: everything Strata counts that is not guest data.
    let q = open(&base);
    let cs = q.geometry().cluster_size();
    let mut data = std::collections::HashSet::new();
    let mut g = 0;
    while g < q.virtual_size() {
        let e = q.map(g, q.virtual_size() - g).unwrap();
        if let strata_image::Mapping::Data { host } = e.mapping {
            let mut h = host.get();
            while h < host.get() + e.len {
                data.insert(h / cs);
                h += cs;
            }
        }
        g = e.end();
    }
    drop(q);
    let meta: Vec<u64> = (1..pristine.len() as u64 / cs)
        .filter(|c| !data.contains(c))
        .collect();
    let mut state = std::env::var("STRATA_CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut compared = 0;
    let img = lab.path("damaged.qcow2");
    for round in 0..150 {
        let mut bytes = pristine.clone();
        for _ in 0..1 + next(&mut state) % 4 {
            let c = meta[(next(&mut state) % meta.len() as u64) as usize];
            // Damage an 8-byte word near the start of the cluster, where
            // the entries in use are.
            let word = next(&mut state) % 64;
            let at = (c * cs + word * 8) as usize;
            let v = next(&mut state);
            let v = match next(&mut state) % 4 {
                0 => 0,
                1 => v & 0x00ff_ffff_ffff_fe00,
                2 => v & 0x00ff_ffff_0000_0000 | 0x8000_0000_0000_0000,
                _ => v,
            };
            bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        std::fs::write(&img, &bytes).unwrap();
        let storage = FileStorage::open(&img, false).unwrap();
        let Ok(q) = Qcow2Image::open(Box::new(storage), &img) else {
            continue;
        };
        let started = std::time::Instant::now();
        let s = check(&q);
        assert!(started.elapsed().as_secs() < 10, "round {round}: too slow");
        let Ok(s) = s else { continue };
        let qc = qemu_check(&img);
        // qemu-img may refuse to open what Strata opens (exit 1, no counts).
        if qc.code == 1 && qc.check_errors == 0 {
            continue;
        }
        assert_eq!(
            (s.corruptions, s.leaks, s.check_errors, s.exit_code()),
            (qc.corruptions, qc.leaks, qc.check_errors, qc.code),
            "round {round}\nqemu: {qc:#?}\nstrata: {:#?}",
            s.problems
        );
        compared += 1;
    }
    eprintln!("{compared} damaged images compared with qemu-img check");
    assert!(compared > 30, "only {compared} rounds compared");
}
