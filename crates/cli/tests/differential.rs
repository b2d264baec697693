//! strata against qemu-img on every chain shape of testdata/make-chains.sh:
//! the raw guest view, the map and the info output must be the same.

mod common;

use common::*;

fn json(text: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"))
}

fn convert_is_byte_identical(shape: &str) {
    if !qemu_available() {
        return;
    }
    // Arrange
    let top = shape_top(shape);
    let dir = tempdir();
    let ours = dir.path().join("strata.raw");
    let theirs = dir.path().join("qemu.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(&top), s(&theirs)]);
    // Act
    let r = strata(&["convert", "-O", "raw", s(&top), s(&ours)]);
    // Assert
    assert_eq!(r.code, 0, "strata convert failed: {}", r.stderr);
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "{shape}: sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{shape}: first differing byte at {i:#x}");
    }
}

fn map_json_equals_qemu_img(shape: &str) {
    if !qemu_available() {
        return;
    }
    let top = shape_top(shape);
    let expected = qemu_img_ok(&["map", "--output", "json", s(&top)]);
    let r = strata(&["map", "--output", "json", s(&top)]);
    assert_eq!(r.code, 0, "strata map failed: {}", r.stderr);
    assert_eq!(
        json(&r.stdout, "strata map"),
        json(&expected, "qemu-img map"),
        "{shape}: map differs"
    );
    // Same bytes too: scripts diff this output.
    assert_eq!(r.stdout, expected);
}

fn map_human_equals_qemu_img(shape: &str) {
    if !qemu_available() {
        return;
    }
    let top = shape_top(shape);
    let q = qemu_img(&["map", s(&top)]);
    let r = strata(&["map", s(&top)]);
    if q.code == 0 {
        assert_eq!(r.code, 0, "strata map failed: {}", r.stderr);
        assert_eq!(r.stdout, q.stdout, "{shape}: human map differs");
    } else {
        // Compressed clusters: qemu-img prints the lines before them and
        // refuses; so does strata.
        assert_eq!(r.code, 1);
        assert_eq!(r.stdout, q.stdout);
        assert!(r.stderr.contains("compressed clusters"), "{}", r.stderr);
    }
}

fn info_json_equals_qemu_img(shape: &str, backing_chain: bool) {
    if !qemu_available() {
        return;
    }
    let top = shape_top(shape);
    let mut args = vec!["info", "--output", "json"];
    if backing_chain {
        args.push("--backing-chain");
    }
    args.push(s(&top));
    let expected = qemu_img_ok(&args);
    let r = strata(&args);
    assert_eq!(r.code, 0, "strata info failed: {}", r.stderr);
    assert_eq!(
        json(&r.stdout, "strata info"),
        json(&expected, "qemu-img info"),
        "{shape}: info differs"
    );
    // Same key order and layout as well.
    assert_eq!(r.stdout, expected);
}

fn info_human_equals_qemu_img(shape: &str) {
    if !qemu_available() {
        return;
    }
    let top = shape_top(shape);
    let expected = qemu_img_ok(&["info", "--backing-chain", s(&top)]);
    let r = strata(&["info", "--backing-chain", s(&top)]);
    assert_eq!(r.code, 0, "strata info failed: {}", r.stderr);
    assert_eq!(r.stdout, expected, "{shape}: human info differs");
}

fn compare_finds_chain_identical_to_its_qemu_copy(shape: &str) {
    if !qemu_available() {
        return;
    }
    let top = shape_top(shape);
    let dir = tempdir();
    let copy = dir.path().join("copy.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", s(&top), s(&copy)]);
    let r = strata(&["compare", s(&top), s(&copy)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "Images are identical.\n");
}

fn check_matches_qemu_img(shape: &str, output: &str) {
    if !qemu_available() {
        return;
    }
    // Every image of the chain, not only the top.
    let top = shape_top(shape);
    let dir = top.parent().unwrap();
    let mut images: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    images.sort();
    for img in images {
        let args = ["check", "--output", output, s(&img)];
        let q = qemu_img(&args);
        let r = strata(&args);
        assert_eq!(
            r.code,
            q.code,
            "{}: exit code differs: {}",
            img.display(),
            r.stderr
        );
        assert_eq!(
            r.stdout,
            q.stdout,
            "{}: check output differs",
            img.display()
        );
        if output == "json" {
            assert_eq!(
                json(&r.stdout, "strata check"),
                json(&q.stdout, "qemu-img check")
            );
        }
        // The problem lines qemu-img prints to stderr, in the same order.
        let problems = |e: &str| -> Vec<String> {
            e.lines()
                .filter(|l| !l.starts_with("qemu-img:") && !l.starts_with("strata:"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            problems(&r.stderr),
            problems(&q.stderr),
            "{}",
            img.display()
        );
    }
}

macro_rules! shape_tests {
    ($($shape:ident),* $(,)?) => {$(
        mod $shape {
            #[test]
            fn convert_to_raw_is_byte_identical_to_qemu_img() {
                super::convert_is_byte_identical(stringify!($shape));
            }
            #[test]
            fn map_json_equals_qemu_img() {
                super::map_json_equals_qemu_img(stringify!($shape));
            }
            #[test]
            fn map_human_equals_qemu_img() {
                super::map_human_equals_qemu_img(stringify!($shape));
            }
            #[test]
            fn info_json_equals_qemu_img() {
                super::info_json_equals_qemu_img(stringify!($shape), false);
            }
            #[test]
            fn info_backing_chain_json_equals_qemu_img() {
                super::info_json_equals_qemu_img(stringify!($shape), true);
            }
            #[test]
            fn info_backing_chain_human_equals_qemu_img() {
                super::info_human_equals_qemu_img(stringify!($shape));
            }
            #[test]
            fn check_human_output_and_exit_code_equal_qemu_img() {
                super::check_matches_qemu_img(stringify!($shape), "human");
            }
            #[test]
            fn check_json_output_and_exit_code_equal_qemu_img() {
                super::check_matches_qemu_img(stringify!($shape), "json");
            }
            #[test]
            fn compare_finds_chain_identical_to_its_qemu_copy() {
                super::compare_finds_chain_identical_to_its_qemu_copy(stringify!($shape));
            }
        }
    )*};
}

shape_tests!(
    cluster512,
    cluster4k,
    cluster64k,
    cluster2m,
    extended_l2,
    compat010,
    refcount1,
    refcount64,
    compressed_deflate,
    compressed_zstd,
    raw_backing,
    relative_backing,
    short_backing,
    depth12,
    internal_snapshot,
    dirty_bitmap,
    dirty_lazy_refcounts,
);

#[test]
fn every_generated_shape_is_covered() {
    if !qemu_available() {
        return;
    }
    let listed = std::fs::read_to_string(chains().join("SHAPES")).unwrap();
    let covered = [
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
        "depth12",
        "internal_snapshot",
        "dirty_bitmap",
        "dirty_lazy_refcounts",
    ];
    for shape in listed.lines() {
        assert!(
            covered.contains(&shape),
            "make-chains.sh makes shape {shape:?}, which these tests do not cover yet"
        );
    }
}

#[test]
fn an_odd_sized_raw_image_is_seen_in_whole_sectors_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    // Arrange: 1000 bytes of data; QEMU sees a 1024-byte disk.
    let d = tempdir();
    let f = d.path().join("odd.raw");
    std::fs::write(&f, vec![0x5au8; 1000]).unwrap();
    let theirs = d.path().join("qemu.raw");
    let ours = d.path().join("strata.raw");
    qemu_img_ok(&["convert", "-f", "raw", "-O", "raw", s(&f), s(&theirs)]);
    // Act
    let conv = strata(&["convert", "-f", "raw", "-O", "raw", s(&f), s(&ours)]);
    let map = strata(&["map", "-f", "raw", "--output", "json", s(&f)]);
    let info = strata(&["info", "-f", "raw", "--output", "json", s(&f)]);
    // Assert
    assert_eq!(conv.code, 0, "{}", conv.stderr);
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    let q = qemu_img_ok(&["map", "-f", "raw", "--output", "json", s(&f)]);
    assert_eq!(map.stdout, q);
    let q = qemu_img_ok(&["info", "-f", "raw", "--output", "json", s(&f)]);
    assert_eq!(json(&info.stdout, "strata info"), json(&q, "qemu-img info"));
}
