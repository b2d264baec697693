//! Where `strata commit` looks for other users of the base (`--users-in`,
//! the refusal, `--help`, `--dry-run`), and `--confine` on commit, pull and
//! rebase, through the command line.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// images/base.qcow2 <- images/top.qcow2, and elsewhere/sibling.qcow2
/// over the same base.
fn shared_base(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let images = dir.join("images");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let base = images.join("base.qcow2");
    let top = images.join("top.qcow2");
    let sibling = elsewhere.join("sibling.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 1M"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io("qcow2", &top, &["write -P 0x22 0 64k"]);
    qemu_overlay(&sibling, "../images/base.qcow2");
    (base, top, sibling)
}

#[test]
fn commit_finds_a_sibling_overlay_in_a_users_in_directory_and_says_where_it_looked() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (base, top, sibling) = shared_base(dir.path());
    let elsewhere = sibling.parent().unwrap();
    let before = std::fs::read(&base).unwrap();
    let r = strata(&["commit", "--users-in", s(elsewhere), s(&top)]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    let images = base.parent().unwrap().canonicalize().unwrap();
    let elsewhere_c = elsewhere.canonicalize().unwrap();
    assert!(r.stderr.contains("refusing to commit"), "{}", r.stderr);
    assert!(
        r.stderr.contains(s(&sibling.canonicalize().unwrap())),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "Looked for users of the base in: {}, {}",
            images.display(),
            elsewhere_c.display()
        )),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&base).unwrap(), before, "base written");

    // --dry-run shows the plan and the user instead of the refusal.
    let d = strata(&["commit", "--dry-run", "--users-in", s(elsewhere), s(&top)]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(
        d.stdout.contains("Dry run: commit 1 layer(s)"),
        "{}",
        d.stdout
    );
    assert!(
        d.stdout.contains("without --force the commit is refused"),
        "{}",
        d.stdout
    );
    assert!(
        d.stdout
            .contains(&format!("looked in: {}", images.display())),
        "{}",
        d.stdout
    );
    assert_eq!(std::fs::read(&base).unwrap(), before, "base written");
}

#[test]
fn commit_help_says_where_the_guard_looks() {
    let r = strata(&["commit", "--help"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for needle in [
        "--users-in <DIR>",
        "the base's directory, in the top's",
        "directory and in each --users-in DIR",
        "--confine <DIR>",
    ] {
        assert!(
            r.stdout.contains(needle),
            "{needle:?} not in:\n{}",
            r.stdout
        );
    }
}

/// jail/top.qcow2 names ../outside/base.qcow2.
fn climbing_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let jail = dir.join("jail");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&jail).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let base = outside.join("base.qcow2");
    let top = jail.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 1M"]);
    qemu_overlay(&top, "../outside/base.qcow2");
    qemu_io("qcow2", &top, &["write -P 0x22 0 64k"]);
    (jail, top, base)
}

#[test]
fn confine_refuses_a_backing_file_that_climbs_out_and_the_default_still_follows_it() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (jail, top, base) = climbing_chain(dir.path());
    let (top0, base0) = (std::fs::read(&top).unwrap(), std::fs::read(&base).unwrap());
    for args in [
        vec!["commit", "--confine", s(&jail), s(&top)],
        vec!["pull", "--confine", s(&jail), s(&top)],
        vec!["rebase", "--confine", s(&jail), "-b", "", s(&top)],
    ] {
        let r = strata(&args);
        assert_ne!(r.code, 0, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.contains("is outside the allowed directory"),
            "{args:?}: {}",
            r.stderr
        );
        assert_eq!(std::fs::read(&top).unwrap(), top0, "{args:?} wrote the top");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            base0,
            "{args:?} wrote the base"
        );
    }
    // Without --confine, qemu-img's behaviour: the name is followed, and
    // the result is qemu-img's.
    let twin = dir.path().join("twin");
    std::fs::create_dir_all(twin.join("jail")).unwrap();
    std::fs::create_dir_all(twin.join("outside")).unwrap();
    std::fs::copy(&top, twin.join("jail/top.qcow2")).unwrap();
    std::fs::copy(&base, twin.join("outside/base.qcow2")).unwrap();
    let r = strata(&["commit", s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    qemu_img_ok(&["commit", "-q", s(&twin.join("jail/top.qcow2"))]);
    qemu_img_ok(&["compare", s(&base), s(&twin.join("outside/base.qcow2"))]);
    // Confined to a directory holding the whole chain: allowed.
    let r = strata(&["pull", "--confine", s(dir.path()), s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
