//! Installing like a system tool: `--version` names the git revision,
//! strata-gen writes a man page for every command and completions that the
//! shells accept, `make install` lays them out under DESTDIR/PREFIX, and
//! `make deb` builds the two Debian packages. Everything runs on this
//! test build's own binaries (NO_BUILD=1 BINARIES=...), in temporary
//! directories.

// Without libvirt the install and deb tests are off, and some helpers idle.
#![cfg_attr(not(feature = "libvirt"), allow(dead_code))]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const STRATA: &str = env!("CARGO_BIN_EXE_strata");
const STRATA_GEN: &str = env!("CARGO_BIN_EXE_strata-gen");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn binaries() -> PathBuf {
    Path::new(STRATA).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `make` in the workspace, on this build's binaries, not rebuilding.
fn make(args: &[&str]) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-s")
        .arg("-C")
        .arg(workspace())
        .args(args)
        .arg("NO_BUILD=1")
        .arg(format!("BINARIES={}", binaries().display()))
        // Not the make flags of whatever runs the tests.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL");
    cmd
}

/// The page names the command line calls for: strata, strata-commit, ...,
/// strata-snapshot-create.
fn expected_pages() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, name: &str, out: &mut BTreeSet<String>) {
        out.insert(name.to_string());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, &format!("{name}-{}", sub.get_name()), out);
        }
    }
    let mut pages = BTreeSet::new();
    walk(&strata_cli::command(), "strata", &mut pages);
    if cfg!(feature = "libvirt") {
        pages.insert("strata-libvirt".to_string());
    }
    pages
}

/// The command at `path` (`["snapshot", "create"]`).
fn find<'a>(root: &'a clap::Command, path: &[&str]) -> &'a clap::Command {
    path.iter().fold(root, |c, name| {
        c.find_subcommand(name)
            .unwrap_or_else(|| panic!("no command {name}"))
    })
}

/// The command a man page describes: `strata-snapshot-create` is
/// `snapshot create`, `strata-snapshot-internal` the command of that
/// name (the longest name that matches wins).
fn find_page<'a>(root: &'a clap::Command, page: &str) -> &'a clap::Command {
    let mut cmd = root;
    let mut rest = page.strip_prefix("strata").unwrap_or(page);
    while let Some(r) = rest.strip_prefix('-') {
        let sub = cmd
            .get_subcommands()
            .filter(|s| r == s.get_name() || r.starts_with(&format!("{}-", s.get_name())))
            .max_by_key(|s| s.get_name().len())
            .unwrap_or_else(|| panic!("no command for page {page}"));
        rest = &r[sub.get_name().len()..];
        cmd = sub;
    }
    cmd
}

#[test]
fn version_names_the_package_version_and_git_revision() {
    let line = stdout(Command::new(STRATA).arg("--version"));
    let rev = line
        .strip_prefix(&format!("strata {VERSION} (git "))
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("strata --version: {line:?}"));
    let head = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        // Built from this checkout: its HEAD, perhaps with local changes.
        Some(head) => assert!(
            rev == head || rev == format!("{head}-dirty"),
            "strata --version says {rev:?}, HEAD is {head}"
        ),
        None => assert_eq!(rev, "unknown"),
    }
    if cfg!(feature = "libvirt") {
        let helper = binaries().join("strata-libvirt");
        assert_eq!(stdout(Command::new(helper).arg("--version")), line);
    }
}

/// The build script, compiled on its own and run outside any git checkout
/// (a release tarball), says `unknown`; STRATA_GIT_REV overrides it.
#[test]
fn build_script_falls_back_to_unknown_without_git() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("build-script");
    run(Command::new("rustc")
        .args(["--edition", "2021", "-o"])
        .arg(&script)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("build.rs")));
    let unpacked = tmp.path().join("strata-cli-0.1.0");
    std::fs::create_dir(&unpacked).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
        unpacked.join("Cargo.toml"),
    )
    .unwrap();
    let emitted = |rev: Option<&str>| {
        let mut cmd = Command::new(&script);
        cmd.env("CARGO_MANIFEST_DIR", &unpacked)
            // Outside any repository, even if TMPDIR lies inside one.
            .env("GIT_CEILING_DIRECTORIES", tmp.path())
            .env_remove("STRATA_GIT_REV");
        if let Some(r) = rev {
            cmd.env("STRATA_GIT_REV", r);
        }
        stdout(&mut cmd)
    };
    let out = emitted(None);
    assert!(
        out.lines()
            .any(|l| l == "cargo:rustc-env=STRATA_GIT_REV=unknown"),
        "{out}"
    );
    let out = emitted(Some("abc1234"));
    assert!(
        out.lines()
            .any(|l| l == "cargo:rustc-env=STRATA_GIT_REV=abc1234"),
        "{out}"
    );
}

#[test]
fn man_pages_cover_every_command_and_render() {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new(STRATA_GEN).arg("man").arg(dir.path()));
    let written: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let expected: BTreeSet<String> = expected_pages().iter().map(|p| format!("{p}.1")).collect();
    assert_eq!(written, expected);
    for must in [
        "strata.1",
        "strata-commit.1",
        "strata-map.1",
        "strata-resize.1",
        "strata-measure.1",
    ] {
        assert!(written.contains(must), "{must}");
    }
    #[cfg(feature = "libvirt")]
    for must in ["strata-snapshot-create.1", "strata-blockcommit.1"] {
        assert!(written.contains(must), "{must}");
    }

    let root = strata_cli::command();
    let man = have("man");
    for page in expected_pages() {
        let path = dir.path().join(format!("{page}.1"));
        let roff = std::fs::read_to_string(&path).unwrap();
        assert!(
            roff.lines()
                .any(|l| l.starts_with(&format!(".TH {page} 1 "))),
            "{page}: no .TH line:\n{roff}"
        );
        for section in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH DESCRIPTION",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(roff.contains(section), "{page}: no {section}");
        }
        // Every option of the command is described (roff escapes '-').
        if page != "strata-libvirt" {
            let cmd = find_page(&root, &page);
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    let want = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(roff.contains(&want), "{page}: --{long} missing");
                }
                if let Some(short) = arg.get_short() {
                    assert!(roff.contains(&format!("\\-{short}")), "{page}: -{short}");
                }
            }
        }
        if man {
            let out = run(Command::new("man")
                .arg("-l")
                .arg(&path)
                .env("MANWIDTH", "80")
                .env("MANPAGER", "cat")
                .env("LC_ALL", "C.UTF-8"));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.starts_with(&format!("{page}(1)")),
                "man -l {page}.1:\n{text}"
            );
            assert!(text.contains("SYNOPSIS"), "{page}");
            assert!(
                out.stderr.is_empty(),
                "man -l {page}.1 warns: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let top = std::fs::read_to_string(dir.path().join("strata.1")).unwrap();
    assert!(
        top.contains(&format!("strata {VERSION} (git ")),
        "source line"
    );
}

#[test]
fn completions_parse_and_complete_commands() {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new(STRATA_GEN).arg("completions").arg(dir.path()));
    let bash = dir.path().join("strata.bash");
    run(Command::new("bash").arg("-n").arg(&bash));
    if have("zsh") {
        run(Command::new("zsh")
            .arg("-n")
            .arg(dir.path().join("_strata")));
    }
    if have("fish") {
        run(Command::new("fish")
            .arg("--no-execute")
            .arg(dir.path().join("strata.fish")));
    }
    // What bash offers for a partial command line: COMP_WORDS up to the
    // word being completed.
    let complete = |words: &[&str]| -> BTreeSet<String> {
        let script = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; _strata strata \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display(),
            words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            words.len() - 1
        );
        stdout(Command::new("bash").arg("-c").arg(script))
            .lines()
            .map(String::from)
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(complete(&["strata", "com"]), set(&["commit", "compare"]));
    // An option's values, as the clap definition lists them.
    let root = strata_cli::command();
    let output = find(&root, &["map"])
        .get_arguments()
        .find(|a| a.get_long() == Some("output"))
        .unwrap();
    let values: BTreeSet<String> = output
        .get_possible_values()
        .iter()
        .map(|v| v.get_name().to_string())
        .collect();
    assert!(values.contains("json"), "{values:?}");
    assert_eq!(complete(&["strata", "map", "--output", ""]), values);
    #[cfg(feature = "libvirt")]
    {
        let snap = complete(&["strata", "snapshot", ""]);
        for sub in ["create", "list", "revert", "delete"] {
            assert!(snap.contains(sub), "{snap:?}");
        }
    }
}

/// Every file below `root`, relative, with its permission bits.
fn tree(root: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, e.metadata().unwrap().permissions().mode() & 0o777));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

// The Makefile installs both programs: the default features.
#[cfg(feature = "libvirt")]
#[test]
fn make_install_lays_out_binaries_pages_and_completions_under_destdir_and_uninstall_removes_them() {
    let tmp = tempfile::tempdir().unwrap();
    for (prefix, args) in [("usr", vec!["PREFIX=/usr"]), ("usr/local", vec![])] {
        let dest = tmp
            .path()
            .join(format!("dest-{}", prefix.replace('/', "-")));
        let gen = tmp.path().join(format!("gen-{}", prefix.replace('/', "-")));
        let mut cmd = make(&["install"]);
        cmd.arg(format!("DESTDIR={}", dest.display()))
            .arg(format!("GEN_DIR={}", gen.display()))
            .args(&args);
        run(&mut cmd);
        let files = tree(&dest);
        let mode = |rel: &str| {
            let rel = format!("{prefix}/{rel}");
            files
                .iter()
                .find(|(p, _)| *p == rel)
                .map(|(_, m)| *m)
                .unwrap_or_else(|| panic!("{rel} not installed: {files:#?}"))
        };
        let bins = vec!["strata", "strata-libvirt"];
        for b in &bins {
            assert_eq!(mode(&format!("bin/{b}")), 0o755, "{b}");
        }
        let installed: Vec<&str> = files
            .iter()
            .filter_map(|(p, _)| p.strip_prefix(&format!("{prefix}/bin/")))
            .collect();
        assert_eq!(installed, bins, "only the two programs, not strata-gen");
        for page in expected_pages() {
            assert_eq!(mode(&format!("share/man/man1/{page}.1")), 0o644, "{page}");
        }
        for c in [
            "share/bash-completion/completions/strata",
            "share/zsh/vendor-completions/_strata",
            "share/fish/vendor_completions.d/strata.fish",
        ] {
            assert_eq!(mode(c), 0o644, "{c}");
        }
        assert_eq!(files.len(), bins.len() + expected_pages().len() + 3);
        // The installed program runs.
        let line = stdout(Command::new(dest.join(prefix).join("bin/strata")).arg("--version"));
        assert!(line.starts_with(&format!("strata {VERSION} ")), "{line}");
        // And uninstall takes all of it away again.
        let mut cmd = make(&["uninstall"]);
        cmd.arg(format!("DESTDIR={}", dest.display()))
            .arg(format!("GEN_DIR={}", gen.display()))
            .args(&args);
        run(&mut cmd);
        assert_eq!(tree(&dest), vec![], "left after make uninstall");
    }
}

/// `dpkg-deb -f DEB FIELD`.
fn deb_field(deb: &Path, field: &str) -> String {
    stdout(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))
        .trim()
        .to_string()
}

fn deb_files(deb: &Path) -> BTreeSet<String> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches("./").to_string())
        .collect()
}

#[cfg(feature = "libvirt")]
#[test]
fn make_deb_builds_strata_and_strata_libvirt_with_their_own_depends() {
    if !have("dpkg-deb") {
        eprintln!("no dpkg-deb: not a Debian machine, skipped");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let mut cmd = make(&["deb"]);
    cmd.arg(format!("DEB_OUT={}", out.path().display()))
        .env("DEB_COMPRESS", "gzip");
    run(&mut cmd);
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();
    let strata = out.path().join(format!("strata_{VERSION}_{arch}.deb"));
    let helper = out
        .path()
        .join(format!("strata-libvirt_{VERSION}_{arch}.deb"));
    for (deb, name) in [(&strata, "strata"), (&helper, "strata-libvirt")] {
        assert!(deb.is_file(), "{} missing", deb.display());
        assert_eq!(deb_field(deb, "Package"), name);
        assert_eq!(deb_field(deb, "Version"), VERSION);
        assert_eq!(deb_field(deb, "Architecture"), arch);
    }

    let depends = deb_field(&strata, "Depends");
    assert!(depends.contains("libc6"), "{depends}");
    assert!(
        !depends.contains("libvirt"),
        "strata needs no libvirt: {depends}"
    );
    let depends = deb_field(&helper, "Depends");
    assert!(
        depends.starts_with(&format!("strata (= {VERSION}), ")),
        "{depends}"
    );
    assert!(depends.contains("libvirt0"), "{depends}");

    let files = deb_files(&strata);
    for f in [
        "usr/bin/strata",
        "usr/share/man/man1/strata.1.gz",
        "usr/share/man/man1/strata-commit.1.gz",
        "usr/share/man/man1/strata-snapshot-create.1.gz",
        "usr/share/bash-completion/completions/strata",
        "usr/share/zsh/vendor-completions/_strata",
        "usr/share/fish/vendor_completions.d/strata.fish",
        "usr/share/doc/strata/copyright",
    ] {
        assert!(files.contains(f), "strata lacks {f}: {files:#?}");
    }
    assert!(
        !files.iter().any(|f| f.contains("strata-libvirt")),
        "{files:#?}"
    );
    let files = deb_files(&helper);
    let want: BTreeSet<String> = [
        "usr/bin/strata-libvirt",
        "usr/share/man/man1/strata-libvirt.1.gz",
        "usr/share/doc/strata-libvirt/copyright",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files, want);
}
