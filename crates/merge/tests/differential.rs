//! Strata's commit, pull and safe rebase against qemu-img on twins: the
//! same chain copied twice, qemu-img run on one copy, Strata on the other.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::ImageFormat;
use strata_merge::{commit, pull, rebase, CommitOptions, Hooks, PullOptions, RebaseOptions};

/// Shapes with a backing file that the write path can modify.
const SHAPES: &[&str] = &[
    "cluster512",
    "cluster4k",
    "cluster64k",
    "cluster2m",
    "extended_l2",
    "compat010",
    "refcount1",
    "refcount64",
    "compressed_deflate",
    "compressed_zstd",
    "raw_backing",
    "relative_backing",
    "short_backing",
];

fn base_of(top: &Path) -> PathBuf {
    let name = backing_of(top).unwrap();
    top.parent().unwrap().join(name)
}

#[test]
fn commit_matches_qemu_img_commit_on_every_shape() {
    for shape in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let (q_base, s_base) = (base_of(&q_top), base_of(&s_top));
        let before = view(&s_top);

        qemu_img(&["commit", "-q", s(&q_top)]);
        let r = commit(&s_top, &CommitOptions::default(), &mut Hooks::default())
            .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert!(r.top_emptied, "{shape}");
        assert_same(&q_base, &s_base);
        assert_eq!(view(&s_base), before, "{shape}: base holds the top's view");
        assert_eq!(view(&s_top), before, "{shape}: top's view unchanged");
        assert_eq!(own_allocated(&s_top), 0, "{shape}: top emptied");
        assert_eq!(
            own_allocated(&q_top),
            0,
            "{shape}: qemu-img empties the top too"
        );
        for img in [&q_base, &s_base, &q_top, &s_top] {
            assert_clean(img);
        }
    }
}

#[test]
fn pull_matches_qemu_img_rebase_to_nothing_on_every_shape() {
    for shape in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let before = view(&s_top);

        qemu_img(&["rebase", "-q", "-b", "", s(&q_top)]);
        let r = pull(&s_top, &PullOptions::default(), &mut Hooks::default())
            .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert_eq!(r.new_backing, None);
        assert_eq!(backing_of(&s_top), None, "{shape}: no backing left");
        assert_same(&q_top, &s_top);
        assert_eq!(view(&s_top), before, "{shape}");
        assert_clean(&s_top);
    }
}

/// Every image file of a twin directory, sorted by name.
fn images_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
        .collect();
    v.sort();
    v
}

/// Issue 15 defect 9: `qemu-img commit -b BASE TOP` writes BASE alone:
/// the top keeps its data and its backing file, the layers between are
/// unchanged. Every file of the twins reads the same and names the same
/// backing file afterwards; only the base changed.
#[test]
fn commit_with_deep_base_matches_qemu_img_commit_b() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let q_base = q_top.with_file_name("layer4.qcow2");
    let s_base = s_top.with_file_name("layer4.qcow2");
    let before = view(&s_top);
    let s_files = images_in(s_top.parent().unwrap());
    let untouched: Vec<(PathBuf, Vec<u8>)> = s_files
        .iter()
        .filter(|p| **p != s_base)
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();

    qemu_img(&["commit", "-q", "-b", s(&q_base), s(&q_top)]);
    let opts = CommitOptions::default().with_base(s_base.clone());
    let r = commit(&s_top, &opts, &mut Hooks::default()).unwrap();

    assert_eq!(r.layers_merged, 7);
    assert_eq!(r.top_repointed, None);
    assert!(!r.top_emptied);
    for (p, bytes) in &untouched {
        assert!(
            std::fs::read(p).unwrap() == *bytes,
            "{} changed: only the base may",
            p.display()
        );
    }
    let q_files = images_in(q_top.parent().unwrap());
    assert_eq!(q_files.len(), s_files.len());
    for (q, st) in q_files.iter().zip(&s_files) {
        assert_same(q, st);
        assert_eq!(backing_of(q), backing_of(st), "{}", st.display());
        assert_clean(st);
    }
    assert_eq!(view(&s_base), before);
    assert_eq!(view(&s_top), before);
}

/// Strata's own mode (`shorten_chain`, what the libvirt layer uses): the
/// top is re-pointed at the base and emptied, the layers between dropped
/// from its chain. The base is what qemu-img's commit -b leaves.
#[test]
fn commit_shorten_chain_repoints_and_empties_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let q_base = q_top.with_file_name("layer4.qcow2");
    let s_base = s_top.with_file_name("layer4.qcow2");
    let before = view(&s_top);

    qemu_img(&["commit", "-q", "-b", s(&q_base), s(&q_top)]);
    let opts = CommitOptions::default()
        .with_base(s_base.clone())
        .with_shorten_chain(true);
    let r = commit(&s_top, &opts, &mut Hooks::default()).unwrap();

    assert_eq!(r.layers_merged, 7);
    assert_eq!(r.top_repointed.as_deref(), Some("layer4.qcow2"));
    assert_same(&q_base, &s_base);
    assert_eq!(view(&s_base), before);
    assert_eq!(view(&s_top), before);
    assert_eq!(backing_of(&s_top).as_deref(), Some("layer4.qcow2"));
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_base);
    assert_clean(&s_top);
}

/// Issue 15 defect 9, 040's relative paths: a relative `-b` names the
/// base as an image of the chain records it (here, relative to the
/// directory of the layer above it, not to the top's nor the working
/// directory's): qemu-img finds it; so must Strata.
#[test]
fn commit_b_with_a_name_relative_to_the_chain_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut tops = Vec::new();
    for twin_name in ["qemu", "strata"] {
        let d = dir.path().join(twin_name);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let (base, mid, top) = (
            d.join("sub/b.qcow2"),
            d.join("sub/m.qcow2"),
            d.join("t.qcow2"),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
        qemu_overlay(&mid, "b.qcow2");
        qemu_overlay(&top, "sub/m.qcow2");
        qemu_io(&base, &["write -P 1 0 64k"]);
        qemu_io(&mid, &["write -P 2 64k 64k"]);
        qemu_io(&top, &["write -P 3 128k 64k"]);
        tops.push(top);
    }
    let before = view(&tops[1]);
    // The working directory is the test's, where no b.qcow2 exists.
    qemu_img(&["commit", "-q", "-b", "b.qcow2", s(&tops[0])]);
    let opts = CommitOptions::default().with_base(PathBuf::from("b.qcow2"));
    let r = commit(&tops[1], &opts, &mut Hooks::default()).unwrap();
    assert_eq!(r.layers_merged, 2);
    for rel in ["sub/b.qcow2", "sub/m.qcow2", "t.qcow2"] {
        let (q, st) = (
            dir.path().join("qemu").join(rel),
            dir.path().join("strata").join(rel),
        );
        assert_same(&q, &st);
        assert_eq!(backing_of(&q), backing_of(&st), "{rel}");
        assert_clean(&st);
    }
    assert_eq!(view(&dir.path().join("strata/sub/b.qcow2")), before);
}

#[test]
fn pull_with_deep_base_matches_qemu_img_rebase_b() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let before = view(&s_top);

    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "layer3.qcow2",
        "-F",
        "qcow2",
        s(&q_top),
    ]);
    let opts = PullOptions::default().with_base(PathBuf::from("layer3.qcow2"));
    let r = pull(&s_top, &opts, &mut Hooks::default()).unwrap();

    assert_eq!(r.layers_pulled, 7);
    assert_eq!(r.new_backing.as_deref(), Some("layer3.qcow2"));
    assert_eq!(backing_of(&s_top).as_deref(), Some("layer3.qcow2"));
    assert_same(&q_top, &s_top);
    assert_eq!(view(&s_top), before);
    assert_clean(&s_top);
}

#[test]
fn safe_rebase_onto_another_image_matches_qemu_img_rebase() {
    for shape in ["cluster64k", "extended_l2", "compat010", "cluster512"] {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let size = info(&s_top)["virtual-size"].as_u64().unwrap();
        for d in ["qemu", "strata"] {
            let new = dir.path().join(d).join("new.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", s(&new), &size.to_string()]);
            let (a, b) = (
                format!("write -P 0xc1 {} 96k", size / 4),
                format!("write -z {} 64k", size / 2),
            );
            qemu_io(&new, &["write -P 0xa1 0 64k", &a, &b]);
        }
        let before = view(&s_top);

        qemu_img(&["rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", s(&q_top)]);
        let r = rebase(
            &s_top,
            Some(("new.qcow2", ImageFormat::Qcow2)),
            &RebaseOptions::default(),
            &mut Hooks::default(),
        )
        .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert_eq!(r.new_backing.as_deref(), Some("new.qcow2"));
        assert_eq!(backing_of(&s_top).as_deref(), Some("new.qcow2"));
        assert_same(&q_top, &s_top);
        assert_eq!(view(&s_top), before, "{shape}");
        assert_clean(&s_top);
    }
}

#[test]
fn safe_rebase_onto_a_lower_layer_matches_qemu_img_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let before = view(&s_top);

    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "layer2.qcow2",
        "-F",
        "qcow2",
        s(&q_top),
    ]);
    let _ = rebase(
        &s_top,
        Some(("layer2.qcow2", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();

    assert_same(&q_top, &s_top);
    assert_eq!(view(&s_top), before);
    assert_clean(&s_top);
}

#[test]
fn commit_grows_a_smaller_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("short_backing", dir.path(), "t");
    let base = base_of(&top);
    let before = view(&top);
    let r = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(r.base_resized, Some((1024 * 1024 + 4096, 4 * 1024 * 1024)));
    assert_eq!(info(&base)["virtual-size"], 4 * 1024 * 1024);
    assert_eq!(view(&base), before);
}

#[test]
fn commit_keep_top_leaves_the_top_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let own = own_allocated(&top);
    let before = view(&top);
    let opts = CommitOptions::default().with_keep_top(true);
    let r = commit(&top, &opts, &mut Hooks::default()).unwrap();
    assert!(!r.top_emptied);
    assert_eq!(own_allocated(&top), own);
    assert_eq!(view(&base_of(&top)), before);
    assert_eq!(view(&top), before);
}

/// qemu-iotests' `io writev OFFSET SIZE STEP COUNT` (common.pattern):
/// COUNT writes of SIZE bytes, STEP apart, each with its own pattern.
fn io_writev(offset: u64, size: u64, step: u64, count: u64, pattern_base: u64) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "write -P {} {} {size}",
                (pattern_base + i) % 256,
                offset + i * step
            )
        })
        .collect()
}

/// The overlay's map as (start, length, depth, present) runs, merged:
/// which layer answers each range. Strata hides a base's data with zero
/// clusters where qemu-img rebase writes zero-filled data clusters (same
/// guest view, less space; docs/qemu-iotests.md), so `zero`, `data` and
/// offsets are not compared.
fn who_answers(img: &Path) -> Vec<(u64, u64, u64, bool)> {
    let m: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "-U", "--output=json", s(img)])).unwrap();
    let mut out: Vec<(u64, u64, u64, bool)> = Vec::new();
    for e in m.as_array().unwrap() {
        let run = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["depth"].as_u64().unwrap(),
            e["present"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(l) if l.2 == run.2 && l.3 == run.3 && l.0 + l.1 == run.0 => l.1 += run.1,
            _ => out.push(run),
        }
    }
    out
}

fn qemu_io_all(img: &Path, cmds: &[String]) {
    qemu_io(img, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
}

/// 020: commit an image into its backing file, clusters alternating
/// between the two (512-byte writes 1 KiB apart, whole clusters), at
/// offset 0 and past 4 GiB of a 6 GiB disk. The base ends as qemu-img's
/// (the same guest view), the top is emptied on both, both check clean.
#[test]
fn iotest_020_commit_into_the_backing_file_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut tops = Vec::new();
    for name in ["qemu", "strata", "orig"] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (base, top) = (d.join("t.qcow2.base"), d.join("t.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "6G"]);
        let mut cmds = Vec::new();
        for offset in [0u64, 4 << 30] {
            cmds.extend(io_writev(offset, 512, 1024, 64, 0));
            cmds.extend(io_writev(offset + 65536, 65536, 65536, 1, 0x40));
        }
        qemu_io_all(&base, &cmds);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.base",
            "-F",
            "qcow2",
            s(&top),
            "6G",
        ]);
        let mut cmds = Vec::new();
        for offset in [0u64, 4 << 30] {
            cmds.extend(io_writev(offset + 512, 512, 1024, 64, 0x80));
            cmds.extend(io_writev(offset + 131072, 65536, 65536, 1, 0xc0));
        }
        qemu_io_all(&top, &cmds);
        tops.push(top);
    }
    qemu_img(&["commit", "-q", s(&tops[0])]);
    let r = commit(&tops[1], &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert!(r.top_emptied);
    let base = |t: &Path| t.with_file_name("t.qcow2.base");
    assert_same(&base(&tops[0]), &base(&tops[1]));
    // The base now reads as the top did.
    assert_same(&tops[2], &base(&tops[1]));
    assert_same(&tops[2], &tops[1]);
    assert_eq!(own_allocated(&tops[0]), 0);
    assert_eq!(own_allocated(&tops[1]), 0);
    for t in &tops[..2] {
        assert_clean(t);
        assert_clean(&base(t));
    }
}

/// 024: safe rebase onto another backing file, with the allocation table
/// of the test (old base 11 -- 11 --, new base 22 22 -- --, overlay 33 33
/// 33 33 -- -- -- --, twice): the overlay reads the same, maps the same
/// and names the same backing file as after qemu-img's rebase.
#[test]
fn iotest_024_rebase_onto_another_backing_file_matches_qemu_img() {
    const CS: u64 = 65536;
    let dir = tempfile::tempdir().unwrap();
    let mut tops = Vec::new();
    for name in ["qemu", "strata"] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (old, new, top) = (
            d.join("t.qcow2.base_old"),
            d.join("t.qcow2.base_new"),
            d.join("t.qcow2"),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", s(&old), "1G"]);
        qemu_io_all(
            &old,
            &(0..8)
                .map(|i| format!("write -P 0x11 {} {CS}", i * 2 * CS))
                .collect::<Vec<_>>(),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", s(&new), "1G"]);
        qemu_io_all(
            &new,
            &(0..4)
                .map(|i| format!("write -P 0x22 {} {}", i * 4 * CS, 2 * CS))
                .collect::<Vec<_>>(),
        );
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.base_old",
            "-F",
            "qcow2",
            s(&top),
            "1G",
        ]);
        qemu_io(
            &top,
            &[
                &format!("write -P 0x33 0 {}", 4 * CS),
                &format!("write -P 0x33 {} {}", 8 * CS, 4 * CS),
            ],
        );
        tops.push(top);
    }
    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "t.qcow2.base_new",
        "-F",
        "qcow2",
        s(&tops[0]),
    ]);
    let _ = rebase(
        &tops[1],
        Some(("t.qcow2.base_new", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    // The test's reads: what the overlay showed before the rebase.
    let expect = [
        0x33, 0x33, 0x33, 0x33, 0x11, 0, 0x11, 0, 0x33, 0x33, 0x33, 0x33, 0x11, 0, 0x11, 0,
    ];
    let reads: Vec<String> = expect
        .iter()
        .enumerate()
        .map(|(i, p)| format!("read -P {p} {} {CS}", i as u64 * CS))
        .collect();
    qemu_io_all(&tops[1], &reads);
    assert_same(&tops[0], &tops[1]);
    assert_eq!(backing_of(&tops[0]), backing_of(&tops[1]));
    assert_eq!(
        who_answers(&tops[0]),
        who_answers(&tops[1]),
        "the overlays allocate differently"
    );
    assert_clean(&tops[1]);
}

/// 024's "rebase in a subdirectory": the new backing name is relative to
/// the overlay (in subdir/), not to the working directory; cluster 3, the
/// same in both bases, stays unallocated in the overlay, as with qemu-img.
#[test]
fn iotest_024_rebase_in_a_subdirectory_matches_qemu_img() {
    const CS: u64 = 65536;
    let dir = tempfile::tempdir().unwrap();
    let mut tops = Vec::new();
    for name in ["qemu", "strata"] {
        let d = dir.path().join(name).join("subdir");
        std::fs::create_dir_all(&d).unwrap();
        let (old, new, top) = (
            d.join("t.qcow2.base_old"),
            d.join("t.qcow2.base_new"),
            d.join("t.qcow2"),
        );
        qemu_img(&["create", "-q", "-f", "qcow2", s(&old), "1M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&new), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.base_old",
            "-F",
            "qcow2",
            s(&top),
            "1M",
        ]);
        qemu_io(
            &old,
            &[
                &format!("write -P 0x11 0 {}", 2 * CS),
                &format!("write -P 0x11 {} {CS}", 3 * CS),
            ],
        );
        qemu_io(
            &new,
            &[
                &format!("write -P 0x22 {CS} {}", 2 * CS),
                &format!("write -P 0x11 {} {CS}", 3 * CS),
            ],
        );
        tops.push(top);
    }
    let out = std::process::Command::new("qemu-img")
        .current_dir(dir.path().join("qemu"))
        .args([
            "rebase",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.base_new",
            "-F",
            "qcow2",
        ])
        .arg("subdir/t.qcow2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = rebase(
        &tops[1],
        Some(("t.qcow2.base_new", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_same(&tops[0], &tops[1]);
    assert_eq!(backing_of(&tops[1]).as_deref(), Some("t.qcow2.base_new"));
    assert_eq!(backing_of(&tops[0]), backing_of(&tops[1]));
    assert_eq!(
        who_answers(&tops[0]),
        who_answers(&tops[1]),
        "the overlays allocate differently"
    );
    qemu_io(
        &tops[1],
        &[
            &format!("read -P 0x11 0 {CS}"),
            &format!("read -P 0x11 {CS} {CS}"),
            &format!("read -P 0x00 {} {CS}", 2 * CS),
            &format!("read -P 0x11 {} {CS}", 3 * CS),
        ],
    );
}

/// 028: a backing file 1 GiB smaller than the image, not ending on a
/// cluster boundary; sectors written on both sides of its end. A safe
/// rebase onto the same base, then a commit (which grows the base), on
/// twins with qemu-img and Strata: the same views, sizes and backing
/// names; everything clean. (The test's drive_backup needs QMP.)
#[test]
fn iotest_028_backing_file_smaller_than_the_image_matches_qemu_img() {
    let image_size: u64 = 4 * 1024 * 1024 * 1024 + 3 * 512;
    let base_size = image_size - 1024 * 1024 * 1024;
    let offset = base_size - 32 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut tops = Vec::new();
    for name in ["qemu", "strata", "orig"] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (base, top) = (d.join("t.qcow2.base"), d.join("t.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&base),
            &base_size.to_string(),
        ]);
        qemu_io_all(&base, &io_writev(offset, 512, 1024, 32, 0x10));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.qcow2.base",
            "-F",
            "qcow2",
            s(&top),
            &image_size.to_string(),
        ]);
        qemu_io_all(&top, &io_writev(offset + 512, 512, 1024, 64, 0x80));
        tops.push(top);
    }
    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "t.qcow2.base",
        "-F",
        "qcow2",
        s(&tops[0]),
    ]);
    let _ = rebase(
        &tops[1],
        Some(("t.qcow2.base", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_same(&tops[0], &tops[1]);
    assert_same(&tops[2], &tops[1]);
    assert_eq!(backing_of(&tops[0]), backing_of(&tops[1]));
    assert_clean(&tops[1]);

    qemu_img(&["commit", "-q", s(&tops[0])]);
    let r = commit(&tops[1], &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(r.base_resized, Some((base_size, image_size)));
    let base = |t: &Path| t.with_file_name("t.qcow2.base");
    assert_eq!(
        info(&base(&tops[0]))["virtual-size"],
        info(&base(&tops[1]))["virtual-size"]
    );
    assert_same(&base(&tops[0]), &base(&tops[1]));
    assert_same(&tops[2], &base(&tops[1]));
    assert_same(&tops[2], &tops[1]);
    for t in &tops[..2] {
        assert_clean(t);
        assert_clean(&base(t));
    }
}

/// `-b` naming the top's own backing file: qemu-img still implies `-d`
/// (the top keeps its clusters); so does Strata. With `shorten_chain` (the
/// libvirt layer's mode) the top is emptied, as before.
#[test]
fn commit_b_naming_the_backing_file_keeps_the_top_unless_the_chain_is_shortened() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("cluster64k", dir.path(), "qemu");
    let s_top = twin("cluster64k", dir.path(), "strata");
    let l_top = twin("cluster64k", dir.path(), "libvirt");
    let (q_base, s_base, l_base) = (base_of(&q_top), base_of(&s_top), base_of(&l_top));
    let own = own_allocated(&s_top);
    assert!(own > 0);

    qemu_img(&["commit", "-q", "-b", s(&q_base), s(&q_top)]);
    let opts = CommitOptions::default().with_base(s_base.clone());
    let r = commit(&s_top, &opts, &mut Hooks::default()).unwrap();
    assert!(!r.top_emptied);
    assert_eq!(own_allocated(&q_top), own, "qemu-img keeps the top");
    assert_eq!(own_allocated(&s_top), own);
    assert_same(&q_base, &s_base);
    assert_same(&q_top, &s_top);

    let shorten = CommitOptions::default()
        .with_base(l_base.clone())
        .with_shorten_chain(true);
    let r = commit(&l_top, &shorten, &mut Hooks::default()).unwrap();
    assert!(r.top_emptied);
    assert_eq!(own_allocated(&l_top), 0);
    assert_same(&q_base, &l_base);
    assert_same(&q_top, &l_top);
}

/// Bytes a file occupies on disk.
fn on_disk(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A 32 MiB base and a top with data in five L2 tables' spans (4 KiB
/// clusters: 2 MiB each), with zero clusters and compressed clusters.
fn sparse_pair(dir: &Path, name: &str, snapshot: bool) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir(&d).unwrap();
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    let o = "cluster_size=4k";
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, s(&base), "32M"]);
    qemu_io(&base, &["write -P 1 0 1M", "write -P 2 16M 1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        o,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 3 64k 256k",
            "write -z 512k 128k",
            "write -P 4 6M 1M",
            "write -c -P 5 11M 64k",
            "write -c -P 8 12M 8k",
            "write -P 6 16M 64k",
            "write -P 7 31M 1M",
        ],
    );
    if snapshot {
        qemu_img(&["snapshot", "-c", "s1", s(&top)]);
    }
    top
}

#[test]
fn commit_gives_the_emptied_tops_clusters_back_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = sparse_pair(dir.path(), "qemu", false);
    let s_top = sparse_pair(dir.path(), "strata", false);
    let before = view(&s_top);
    qemu_img(&["commit", "-q", s(&q_top)]);
    let _ = commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();

    assert_eq!(view(&s_top), before, "the emptied top reads as before");
    assert_same(&q_top, &s_top);
    assert_same(&base_of(&q_top), &base_of(&s_top));
    assert_eq!(own_allocated(&s_top), 0);
    for img in [&q_top, &s_top, &base_of(&s_top)] {
        // Exit status 0: no corruption and no leaked clusters.
        assert_clean(img);
    }
    // The clusters are given back: no table or data cluster is left (the
    // header, L1 table, refcount table and block remain), as with qemu-img.
    let (q, st) = (on_disk(&q_top), on_disk(&s_top));
    let (ql, sl) = (
        std::fs::metadata(&q_top).unwrap().len(),
        std::fs::metadata(&s_top).unwrap().len(),
    );
    assert!(
        st <= q.max(256 << 10),
        "strata top {st} bytes on disk, qemu-img {q}"
    );
    assert!(sl <= ql, "strata top {sl} bytes long, qemu-img {ql}");
}

#[test]
fn commit_empties_a_top_with_internal_snapshots_keeping_them() {
    let dir = tempfile::tempdir().unwrap();
    let s_top = sparse_pair(dir.path(), "strata", true);
    let before = view(&s_top);
    let _ = commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(view(&s_top), before);
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_top);
    let list = qemu_img(&["snapshot", "-l", "-U", s(&s_top)]);
    assert!(list.contains("s1"), "{list}");
}

/// A chain of `depth` images `l0.qcow2` (1 MiB, `cluster` clusters) …
/// `l{depth-1}.qcow2` (64 KiB clusters) in `dir`; returns the top.
fn deep_chain(dir: &Path, depth: u32, cluster: &str) -> PathBuf {
    let p = |i: u32| dir.join(format!("l{i}.qcow2"));
    let o = format!("cluster_size={cluster}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(&p(0)), "1M"]);
    for i in 1..depth {
        let below = format!("l{}.qcow2", i - 1);
        let o = if i == depth - 1 {
            o.as_str()
        } else {
            "cluster_size=64k"
        };
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            "-b",
            &below,
            "-F",
            "qcow2",
            s(&p(i)),
        ]);
    }
    p(depth - 1)
}

#[test]
fn commit_into_the_parent_of_a_200_deep_chain_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (qd, sd) = (dir.path().join("qemu"), dir.path().join("strata"));
    std::fs::create_dir(&qd).unwrap();
    let q_top = deep_chain(&qd, 200, "64k");
    qemu_io(
        &q_top,
        &[
            "write -P 9 0 64k",
            "write -P 7 128k 128k",
            "write -z 512k 64k",
        ],
    );
    run("cp", &["-a", s(&qd), s(&sd)]);
    let s_top = sd.join("l199.qcow2");
    qemu_img(&["commit", "-q", s(&q_top)]);
    let _ = commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_same(&q_top, &s_top);
    assert_same(&qd.join("l198.qcow2"), &sd.join("l198.qcow2"));
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_top);
    assert_clean(&sd.join("l198.qcow2"));
}

#[test]
fn a_commit_that_would_read_past_the_open_limit_fails_and_changes_nothing_it_reads() {
    // 4 KiB clusters in the top, 64 KiB in the parent: a 4 KiB write needs
    // the rest of the parent's cluster, which only the deepest layer holds.
    let dir = tempfile::tempdir().unwrap();
    let top = deep_chain(dir.path(), 200, "4k");
    qemu_io(&dir.path().join("l0.qcow2"), &["write -P 3 0 64k"]);
    qemu_io(&top, &["write -P 9 0 4k"]);
    let before = view(&top);
    let e = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains("deeper than 128"), "{e}");
    // The top still reads as before (it is emptied only after the copy).
    assert_eq!(view(&top), before);
    assert_clean(&top);
}

#[test]
fn pull_b_of_a_200_deep_chain_matches_qemu_img_rebase() {
    // Data in layers above and below the kept one (l100) and past the
    // open limit (l0, l50): the pull reads only l101..l198, inside it.
    let dir = tempfile::tempdir().unwrap();
    let (qd, sd) = (dir.path().join("qemu"), dir.path().join("strata"));
    std::fs::create_dir(&qd).unwrap();
    let q_top = deep_chain(&qd, 200, "64k");
    for (layer, cmds) in [
        (0, vec!["write -P 1 0 512k"]),
        (50, vec!["write -P 2 64k 64k"]),
        (100, vec!["write -P 3 128k 64k"]),
        (150, vec!["write -P 4 192k 128k", "write -z 448k 64k"]),
        (198, vec!["write -P 5 700k 3000"]),
        (199, vec!["write -P 6 0 64k"]),
    ] {
        qemu_io(&qd.join(format!("l{layer}.qcow2")), &cmds);
    }
    run("cp", &["-a", s(&qd), s(&sd)]);
    let s_top = sd.join("l199.qcow2");
    let before = view(&s_top);
    qemu_img(&["rebase", "-q", "-b", "l100.qcow2", "-F", "qcow2", s(&q_top)]);
    let opts = PullOptions::default().with_base(sd.join("l100.qcow2"));
    let r = pull(&s_top, &opts, &mut Hooks::default()).unwrap();
    assert_eq!(r.layers_pulled, 98);
    assert_eq!(backing_of(&s_top).as_deref(), Some("l100.qcow2"));
    assert_eq!(info(&s_top)["backing-filename-format"], "qcow2");
    assert_same(&q_top, &s_top);
    assert!(view(&s_top) == before, "the guest view changed");
    assert_clean(&s_top);
}

#[test]
fn a_pull_of_a_whole_200_deep_chain_goes_in_stages_and_matches_qemu_img_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let (qd, sd) = (dir.path().join("qemu"), dir.path().join("strata"));
    std::fs::create_dir(&qd).unwrap();
    let q_top = deep_chain(&qd, 200, "64k");
    for (layer, cmds) in [
        (0, vec!["write -P 1 0 512k"]),
        (30, vec!["write -P 2 64k 64k", "write -z 320k 64k"]),
        (72, vec!["write -P 3 128k 3000"]),
        (73, vec!["write -P 4 200k 64k"]),
        (150, vec!["write -P 5 600k 128k"]),
        (199, vec!["write -P 6 0 64k"]),
    ] {
        qemu_io(&qd.join(format!("l{layer}.qcow2")), &cmds);
    }
    run("cp", &["-a", s(&qd), s(&sd)]);
    let s_top = sd.join("l199.qcow2");
    let before = view(&s_top);
    // qemu-img reads all 200 images at once; Strata in two stages of
    // fewer than 128.
    qemu_img(&["rebase", "-q", "-b", "", s(&q_top)]);
    let r = pull(&s_top, &PullOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(r.layers_pulled, 199);
    assert_eq!(r.new_backing, None);
    assert_eq!(backing_of(&s_top), None);
    assert_same(&q_top, &s_top);
    assert!(view(&s_top) == before, "the guest view changed");
    assert_clean(&s_top);
}

#[test]
fn a_pull_keeping_a_layer_past_the_open_limit_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let top = deep_chain(dir.path(), 200, "64k");
    qemu_io(&dir.path().join("l0.qcow2"), &["write -P 1 0 64k"]);
    qemu_io(&top, &["write -P 9 64k 64k"]);
    let before = std::fs::read(&top).unwrap();
    let opts = PullOptions::default().with_base(dir.path().join("l10.qcow2"));
    let e = pull(&top, &opts, &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains("first 128 images"), "{e}");
    assert!(
        std::fs::read(&top).unwrap() == before,
        "the top was written"
    );
    assert_clean(&top);
}
