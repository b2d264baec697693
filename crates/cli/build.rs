//! Records the git revision the binaries are built from, for `--version`.
//!
//! `STRATA_GIT_REV` is set for the crate: `git rev-parse --short HEAD`, with
//! `-dirty` when tracked files differ from HEAD; `unknown` when the sources
//! are not a git checkout (a release tarball) or git is missing. Setting
//! `STRATA_GIT_REV` in the environment overrides it (packagers building from
//! a tarball know the revision).
//!
//! The script reruns when HEAD moves (a checkout, a commit on the current
//! branch) or the index changes (staging, committing); the dirty flag is the
//! state at that moment, not of every later edit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The revision, and the files whose change should rerun this script.
fn revision(dir: &Path) -> Option<(String, Vec<PathBuf>)> {
    // Only when this crate's own files are tracked: sources unpacked inside
    // some other repository must not take that repository's revision.
    git(dir, &["ls-files", "--error-unmatch", "Cargo.toml"])?;
    let rev = git(dir, &["rev-parse", "--short", "HEAD"])?;
    if rev.is_empty() {
        return None;
    }
    let mut watch = Vec::new();
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    // In a linked worktree HEAD and the index live in the worktree's git
    // directory, branch refs in the common one.
    if let Some(git_dir) = git(dir, &["rev-parse", "--git-dir"]).map(abs) {
        watch.push(git_dir.join("HEAD"));
        watch.push(git_dir.join("index"));
    }
    if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]).map(abs) {
        if let Some(head_ref) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(head_ref));
        }
        watch.push(common.join("packed-refs"));
    }
    let dirty =
        git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let rev = if dirty { format!("{rev}-dirty") } else { rev };
    Some((rev, watch))
}

fn main() {
    println!("cargo:rerun-if-env-changed=STRATA_GIT_REV");
    let rev = match std::env::var("STRATA_GIT_REV") {
        Ok(r) if !r.is_empty() => r,
        _ => {
            let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            match revision(&dir) {
                Some((rev, watch)) => {
                    for p in watch.iter().filter(|p| p.exists()) {
                        println!("cargo:rerun-if-changed={}", p.display());
                    }
                    rev
                }
                None => {
                    // Not a checkout: rerun only if this script changes.
                    println!("cargo:rerun-if-changed=build.rs");
                    "unknown".to_string()
                }
            }
        }
    };
    println!("cargo:rustc-env=STRATA_GIT_REV={rev}");
}
