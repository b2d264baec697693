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
    let opts = CommitOptions {
        base: Some(s_base.clone()),
        ..CommitOptions::default()
    };
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
    let opts = CommitOptions {
        base: Some(s_base.clone()),
        shorten_chain: true,
        ..CommitOptions::default()
    };
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
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "sub/m.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ]);
        qemu_io(&base, &["write -P 1 0 64k"]);
        qemu_io(&mid, &["write -P 2 64k 64k"]);
        qemu_io(&top, &["write -P 3 128k 64k"]);
        tops.push(top);
    }
    let before = view(&tops[1]);
    // The working directory is the test's, where no b.qcow2 exists.
    qemu_img(&["commit", "-q", "-b", "b.qcow2", s(&tops[0])]);
    let opts = CommitOptions {
        base: Some(PathBuf::from("b.qcow2")),
        ..CommitOptions::default()
    };
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
    let opts = PullOptions {
        base: Some(PathBuf::from("layer3.qcow2")),
        ..PullOptions::default()
    };
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
    rebase(
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
    let opts = CommitOptions {
        keep_top: true,
        ..CommitOptions::default()
    };
    let r = commit(&top, &opts, &mut Hooks::default()).unwrap();
    assert!(!r.top_emptied);
    assert_eq!(own_allocated(&top), own);
    assert_eq!(view(&base_of(&top)), before);
    assert_eq!(view(&top), before);
}
