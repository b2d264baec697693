//! strata_image::backing against qemu-img on the same files: the chain's
//! files and formats as `qemu-img info --backing-chain` lists them, the
//! header fields as `qemu-img info` reads them, and which images use a
//! file as their backing file.

mod common;

use std::path::{Path, PathBuf};

use common::{qemu_create, qemu_img, skip};
use strata_image::backing::{chain_files, peek, read_backing, users_of, FileId};
use strata_image::{Chain, Error, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img info --backing-chain --output=json`: (filename, format,
/// virtual size, backing name) per image, top first.
fn qemu_chain(top: &Path) -> Vec<(PathBuf, String, u64, Option<String>)> {
    let out = qemu_img(&["info", "-U", "--backing-chain", "--output=json", s(top)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                PathBuf::from(i["filename"].as_str().unwrap()),
                i["format"].as_str().unwrap().to_string(),
                i["virtual-size"].as_u64().unwrap(),
                i["backing-filename"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// raw <- a (relative name, in a subdirectory) <- b (absolute name) <- c.
fn build(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir(dir.join("sub")).unwrap();
    let raw = dir.join("sub/base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "3M"]);
    let a = dir.join("sub/a.qcow2");
    qemu_create(&["-b", "base.raw", "-F", "raw", s(&a), "4M"]);
    let b = dir.join("b.qcow2");
    qemu_create(&["-b", s(&a), "-F", "qcow2", s(&b)]);
    let c = dir.join("c.qcow2");
    qemu_create(&["-b", "b.qcow2", "-F", "qcow2", s(&c)]);
    vec![c, b, a, raw]
}

#[test]
fn chain_files_and_peek_match_qemu_info() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = build(dir.path());
    let q = qemu_chain(&files[0]);
    let ours = chain_files(&files[0], None).unwrap();
    assert_eq!(ours.len(), q.len());
    for (o, (qpath, qfmt, qsize, qbacking)) in ours.iter().zip(&q) {
        assert_eq!(FileId::of(&o.path).unwrap(), FileId::of(qpath).unwrap());
        assert_eq!(o.format.name(), qfmt);
        let p = peek(&o.path, Some(o.format)).unwrap();
        assert_eq!(p.virtual_size, *qsize, "{}", o.path.display());
        assert_eq!(p.backing.as_ref().map(|b| &b.name), qbacking.as_ref());
        assert_eq!(
            read_backing(&o.path).unwrap().map(|b| b.name),
            qbacking.clone()
        );
    }
    // The names each image records, as the layer below is reached.
    assert_eq!(ours[1].named_as.as_deref(), Some("b.qcow2"));
    assert_eq!(ours[3].named_as.as_deref(), Some("base.raw"));
    // The same files Chain::open opens.
    let chain = Chain::open(&files[0], &OpenOptions::default()).unwrap();
    let opened: Vec<_> = chain.layers().iter().map(|l| l.path.clone()).collect();
    let walked: Vec<_> = ours.iter().map(|f| f.path.clone()).collect();
    assert_eq!(opened, walked);
}

#[test]
fn users_of_finds_what_qemu_info_names_as_backing() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = build(dir.path());
    let (c, b, a) = (&files[0], &files[1], &files[2]);
    // A second user of b, and an image elsewhere naming b by a path with
    // `..` in it.
    let sib = dir.path().join("sib.qcow2");
    qemu_create(&["-b", "b.qcow2", "-F", "qcow2", s(&sib)]);
    let far = dir.path().join("sub/far.qcow2");
    qemu_create(&["-b", "../b.qcow2", "-F", "qcow2", s(&far)]);
    // Non-images in the directory are passed over.
    std::fs::write(dir.path().join("notes.txt"), b"QFI").unwrap();

    let root = dir.path().to_path_buf();
    let sub = dir.path().join("sub");
    // What qemu-img says each candidate's backing file is.
    let backs_on = |img: &Path, base: &Path| {
        qemu_chain(img)
            .get(1)
            .is_some_and(|l| FileId::of(&l.0).unwrap() == FileId::of(base).unwrap())
    };
    assert!(backs_on(c, b) && backs_on(&sib, b) && backs_on(&far, b));
    assert_eq!(
        users_of(b, std::slice::from_ref(&root), &[], &[]).unwrap(),
        vec![c.clone(), sib.clone()]
    );
    assert_eq!(
        users_of(b, &[root.clone(), sub.clone()], &[], &[]).unwrap(),
        vec![c.clone(), sib.clone(), far.clone()]
    );
    // Excluded files and files named twice count once or not at all.
    let ex = [FileId::of(c).unwrap()];
    assert_eq!(
        users_of(
            b,
            std::slice::from_ref(&root),
            std::slice::from_ref(&far),
            &ex
        )
        .unwrap(),
        vec![sib.clone(), far.clone()]
    );
    assert!(backs_on(b, a));
    assert_eq!(users_of(a, &[root], &[], &[]).unwrap(), vec![b.clone()]);
    // A named file that does not exist is an error naming it.
    let gone = dir.path().join("gone.qcow2");
    let err = users_of(b, &[], std::slice::from_ref(&gone), &[]).unwrap_err();
    assert!(err.to_string().contains("gone.qcow2"), "{err}");
}

#[test]
fn chain_files_refuses_what_chain_open_refuses() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A loop, which qemu-img refuses too.
    let l1 = d.join("l1.qcow2");
    let l2 = d.join("l2.qcow2");
    qemu_create(&[s(&l1), "1M"]);
    qemu_create(&["-u", "-b", "l1.qcow2", "-F", "qcow2", s(&l2), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", s(&l1)]);
    let ours = chain_files(&l2, None).unwrap_err();
    assert!(matches!(ours, Error::BackingLoop { .. }), "{ours}");
    let opened = Chain::open(&l2, &OpenOptions::default()).unwrap_err();
    assert!(matches!(opened, Error::BackingLoop { .. }), "{opened}");
    let q = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", s(&l2)])
        .output()
        .unwrap();
    assert!(!q.status.success(), "qemu-img follows the loop");
    // A protocol name is refused, naming the image.
    let proto = d.join("proto.qcow2");
    qemu_create(&[
        "-u",
        "-b",
        "nbd://localhost:1/x",
        "-F",
        "raw",
        s(&proto),
        "1M",
    ]);
    let e = chain_files(&proto, None).unwrap_err();
    assert!(e.to_string().contains("proto.qcow2"), "{e}");
    // A missing backing file names the image and the name.
    let orphan = d.join("orphan.qcow2");
    qemu_create(&["-u", "-b", "missing.qcow2", "-F", "qcow2", s(&orphan), "1M"]);
    let e = chain_files(&orphan, None).unwrap_err();
    assert!(
        e.to_string().contains("orphan.qcow2") && e.to_string().contains("missing.qcow2"),
        "{e}"
    );
}
