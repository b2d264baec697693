//! `strata-gen`: writes the man pages and shell completions of `strata`
//! from its clap definitions (`make install` and `make deb` run it).
//!
//! ```text
//! strata-gen man DIR          DIR/strata.1, DIR/strata-commit.1, ...,
//!                             DIR/strata-snapshot-create.1, DIR/strata-libvirt.1
//! strata-gen completions DIR  DIR/strata.bash, DIR/_strata (zsh), DIR/strata.fish
//! ```
//!
//! A separate program so that the `strata` binary carries none of this.
//! The libvirt commands (snapshot, blockcommit, blockpull, demo) are part of
//! the same clap definition (`strata` hands them to `strata-libvirt`), so
//! they get pages and completions like every other command when the crate
//! is built with its default `libvirt` feature.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, ValueHint};
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

const USAGE: &str = "usage: strata-gen man DIR | strata-gen completions DIR";

/// Positional arguments and options whose values are files or directories:
/// the shells complete paths there.
fn value_hint(id: &str) -> Option<ValueHint> {
    Some(match id {
        "file" | "file1" | "file2" | "src" | "dst" | "backing" | "base" => ValueHint::FilePath,
        "dir" => ValueHint::DirPath,
        _ => return None,
    })
}

/// `cmd` and its subcommands, with path hints on path arguments (in
/// place: `mut_arg` would move a positional argument to the end).
fn with_hints(cmd: Command) -> Command {
    cmd.mut_args(|a| match value_hint(a.get_id().as_str()) {
        Some(hint) => a.value_hint(hint),
        None => a,
    })
    .mut_subcommands(with_hints)
}

/// The command line as the pages and completions describe it.
fn strata() -> Command {
    let mut cmd = with_hints(strata_cli::command()).disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Every visible command below `cmd` (depth first, `cmd` excluded).
fn subcommands(cmd: &Command, out: &mut Vec<Command>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out.push(sub.clone());
        subcommands(sub, out);
    }
}

/// The SYNOPSIS line, `strata commit [-b BASE] [-d] ... FILE` (clap_mangen
/// drops the value names of short-only options).
fn synopsis(cmd: &Command) -> String {
    let mut s = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_string();
    let value = |a: &clap::Arg| match a.get_value_names() {
        Some(names) => names.join(" "),
        None => a.get_id().as_str().to_uppercase(),
    };
    let many = |a: &clap::Arg| matches!(a.get_action(), clap::ArgAction::Append);
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let id = a.get_id().as_str();
        if a.is_positional() || id == "help" {
            continue;
        }
        let flag = match (a.get_short(), a.get_long()) {
            (Some(c), _) => format!("-{c}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => continue,
        };
        let takes = a.get_num_args().is_some_and(|n| n.takes_values());
        let mut item = if takes {
            format!("{flag} {}", value(a))
        } else {
            flag
        };
        if many(a) {
            item.push_str("...");
        }
        if a.is_required_set() {
            s.push_str(&format!(" {item}"));
        } else {
            s.push_str(&format!(" [{item}]"));
        }
    }
    for a in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        let mut item = value(a);
        if many(a) {
            item.push_str("...");
        }
        if a.is_required_set() {
            s.push_str(&format!(" {item}"));
        } else {
            s.push_str(&format!(" [{item}]"));
        }
    }
    if cmd.has_subcommands() {
        s.push_str(" COMMAND");
    }
    s
}

fn page_name(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

/// A `SEE ALSO` section naming `pages` (as `name(1)`).
fn see_also(pages: &[String]) -> Roff {
    let mut roff = Roff::default();
    roff.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(p.as_str()));
        line.push(roman("(1)"));
    }
    roff.text(line);
    roff
}

/// A few worked examples per page: (command line, what it does).
fn examples(page: &str) -> &'static [(&'static str, &'static str)] {
    match page {
        "strata-info" => &[
            (
                "strata info --backing-chain top.qcow2",
                "Describe every image of the chain.",
            ),
            (
                "strata info --output json base.qcow2",
                "The same keys as qemu-img info.",
            ),
        ],
        "strata-map" => &[
            (
                "strata map --output json top.qcow2",
                "Which layer answers each range, as qemu-img map.",
            ),
            (
                "strata map --output svg top.qcow2 > chain.svg",
                "The same as a picture: a strip per layer.",
            ),
        ],
        "strata-check" => &[
            (
                "strata check img.qcow2",
                "Exit 0 clean, 2 corrupted, 3 leaked clusters only.",
            ),
            ("strata check -r leaks img.qcow2", "Free leaked clusters."),
        ],
        "strata-create" => &[
            (
                "strata create -f qcow2 disk.qcow2 20G",
                "A new empty image.",
            ),
            (
                "strata create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2",
                "An overlay on base.qcow2 (an external snapshot by hand).",
            ),
        ],
        "strata-convert" => &[(
            "strata convert -O qcow2 -c top.qcow2 flat.qcow2",
            "The chain's guest view as one compressed image.",
        )],
        "strata-commit" => &[
            (
                "strata commit top.qcow2",
                "Merge top.qcow2 into its backing file and empty it.",
            ),
            (
                "strata commit -b base.qcow2 --dry-run top.qcow2",
                "Show what committing down to base.qcow2 would do.",
            ),
        ],
        "strata-pull" => &[
            (
                "strata pull top.qcow2",
                "Copy the whole chain into top.qcow2; it stands alone after.",
            ),
            (
                "strata pull -b base.qcow2 top.qcow2",
                "Copy the layers above base.qcow2 only.",
            ),
        ],
        "strata-rebase" => &[
            (
                "strata rebase -b new.qcow2 -F qcow2 top.qcow2",
                "Change the backing file, copying what differs so that top reads the same.",
            ),
            (
                "strata rebase -u -b moved/base.qcow2 -F qcow2 top.qcow2",
                "Only rewrite the name (the file was moved).",
            ),
        ],
        "strata-io" => &[(
            "strata io -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' img.qcow2",
            "Write a pattern and read it back, as qemu-io does.",
        )],
        "strata-snapshot-create" => &[(
            "strata snapshot create vm take-1",
            "A disk-only external snapshot of the shut-off domain vm.",
        )],
        "strata-snapshot-revert" => &[(
            "strata snapshot revert vm take-1",
            "Return vm's disks to take-1 (libvirt cannot, for external snapshots).",
        )],
        "strata-snapshot-delete" => &[(
            "strata snapshot delete vm take-2",
            "Remove take-2, keeping the state of every other snapshot.",
        )],
        "strata-snapshot-list" => &[("strata snapshot list --tree vm", "The snapshots as a tree.")],
        _ => &[],
    }
}

fn examples_section(page: &str) -> Option<Roff> {
    let list = examples(page);
    if list.is_empty() {
        return None;
    }
    let mut roff = Roff::default();
    roff.control("SH", ["EXAMPLES"]);
    for (cmd, what) in list {
        roff.control("TP", []);
        roff.text([bold(*cmd)]);
        roff.text([roman(*what)]);
    }
    Some(roff)
}

fn render(man: &Man, extra: &[Roff], path: &Path) -> Result<()> {
    let mut buf = Vec::new();
    man.render(&mut buf)?;
    for r in extra {
        r.to_writer(&mut buf)?;
    }
    std::fs::write(path, buf).with_context(|| format!("writing {}", path.display()))
}

fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let root = strata();
    let source = format!("strata {}", strata_cli::VERSION);
    let manual = "Strata Manual";
    let man = |cmd: Command| {
        let usage = synopsis(&cmd);
        Man::new(cmd.override_usage(usage))
            .source(source.as_str())
            .manual(manual)
    };
    let mut subs = Vec::new();
    subcommands(&root, &mut subs);
    let libvirt: Vec<&str> = ["snapshot", "blockcommit", "blockpull", "demo"]
        .into_iter()
        .filter(|n| root.find_subcommand(n).is_some())
        .collect();
    let mut written = Vec::new();

    // strata.1: the overview, pointing at every command's page.
    let mut notes = Roff::default();
    if !libvirt.is_empty() {
        notes.control("SH", ["LIBVIRT COMMANDS"]);
        notes.text([roman(format!(
            "{} need libvirt's C library. strata runs them through strata-libvirt, \
             installed in the same directory, so that the image commands start fast \
             and work on machines without libvirt.",
            libvirt.join(", ")
        ))]);
    }
    notes.control("SH", ["EXIT STATUS"]);
    notes.text([roman(
        "0 on success, 1 on error. check exits 2 when the image is corrupted and 3 \
         when it only leaks clusters; compare exits 1 when the images differ and 2 \
         on error; as qemu-img does.",
    )]);
    let mut pages: Vec<String> = subs.iter().map(page_name).collect();
    if !libvirt.is_empty() {
        pages.push("strata-libvirt".to_string());
    }
    pages.push("qemu-img".to_string());
    let path = dir.join("strata.1");
    render(&man(root.clone()), &[notes, see_also(&pages)], &path)?;
    written.push(path);

    // One page per command and per subcommand (strata-snapshot-create.1).
    for sub in &subs {
        let name = page_name(sub);
        let parent = name.rsplit_once('-').map_or("strata", |(p, _)| p);
        let mut also = vec![parent.to_string()];
        also.extend(
            sub.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(page_name),
        );
        let path = dir.join(format!("{name}.1"));
        let extra: Vec<Roff> = examples_section(&name)
            .into_iter()
            .chain([see_also(&also)])
            .collect();
        render(&man(sub.clone()), &extra, &path)?;
        written.push(path);
    }

    // strata-libvirt.1: the helper, which takes strata's whole command line.
    if !libvirt.is_empty() {
        let helper = Command::new("strata-libvirt")
            .about("the strata commands that need libvirt")
            .long_about(format!(
                "strata-libvirt runs {} for strata, which executes it from its own \
                 directory for those commands. It accepts the whole strata command line \
                 (every other command too), and loads libvirt's C library.",
                libvirt.join(", ")
            ))
            .version(strata_cli::VERSION)
            .arg(
                clap::Arg::new("args")
                    .value_name("COMMAND [ARGS]")
                    .num_args(0..)
                    .help("as for strata"),
            )
            .disable_help_flag(true)
            .disable_version_flag(true);
        let path = dir.join("strata-libvirt.1");
        let also: Vec<String> = std::iter::once("strata")
            .chain(libvirt.iter().copied().map(|n| match n {
                "snapshot" => "strata-snapshot",
                "blockcommit" => "strata-blockcommit",
                "blockpull" => "strata-blockpull",
                _ => "strata-demo",
            }))
            .map(String::from)
            .collect();
        render(&man(helper), &[see_also(&also)], &path)?;
        written.push(path);
    }
    Ok(written)
}

fn completions(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = strata();
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "strata.bash"),
        (Shell::Zsh, "_strata"),
        (Shell::Fish, "strata.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "strata", &mut buf);
        let path = dir.join(file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn run(args: &[String]) -> Result<()> {
    let (what, dir) = match args {
        [what, dir] => (what.as_str(), Path::new(dir)),
        _ => bail!("{USAGE}"),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let written = match what {
        "man" => man_pages(dir)?,
        "completions" => completions(dir)?,
        _ => bail!("{USAGE}"),
    };
    let mut out = std::io::stdout().lock();
    for p in written {
        writeln!(out, "{}", p.display())?;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("strata-gen: {e:#}");
        std::process::exit(1);
    }
}
