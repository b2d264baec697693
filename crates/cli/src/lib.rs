//! strata-cli: the `strata` command line.
//!
//! Each command is a library function that writes to an `impl Write` and
//! returns an exit code (or an error, which [`run`] prints to stderr as
//! `strata: <message>` and turns into a nonzero exit). Spelling, JSON and
//! exit codes follow qemu-img so that scripts carry over.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::ffi::OsString;
use std::io::Write;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use strata_image::{ImageFormat, OpenOptions};

pub mod amend;
pub mod bitmap;
pub mod bitmaps;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod demo;
pub mod dot;
pub mod info;
pub mod io;
pub mod localtime;
pub mod map;
pub mod measure;
pub mod merge;
pub mod qjson;
pub mod resize;
pub mod size;
#[cfg(feature = "libvirt")]
pub mod snapshot;
pub mod snapshot_internal;
#[cfg(feature = "libvirt")]
pub use snapshot::cancel_on_signals;
pub mod svg;

/// `--output` of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Text for people, as qemu-img prints it.
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
}

/// Open options for a format name given with `-f`/`-F` (`None`: probe
/// the top image; backing files are never probed).
pub fn open_options(format: Option<&str>, force_share: bool) -> Result<OpenOptions> {
    let format = match format {
        None => None,
        Some(name) => match ImageFormat::from_name(name) {
            Some(f) => Some(f),
            None => bail!("unknown image format {name:?}: Strata reads qcow2 and raw"),
        },
    };
    Ok(OpenOptions::new().format(format).force_share(force_share))
}

/// `--version`: the package version and the git revision built from
/// (`unknown` outside a git checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("STRATA_GIT_REV"),
    ")"
);

/// The whole command line's clap definition (man pages, completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version = VERSION,
    about = "qcow2 backing-chain engine: inspect, compare, convert (qemu-img spelling)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an image's (or a whole chain's) header information.
    Info(info::InfoArgs),
    /// Show which layer holds each guest range, and where.
    Map(map::MapArgs),
    /// Check an image's metadata for consistency.
    Check(check::CheckArgs),
    /// Compare the guest data of two images (exit 0 same, 1 different, 2 error).
    Compare(compare::CompareArgs),
    /// Write the guest view of one or more chains (concatenated) to an
    /// image (built beside DST and renamed over it when complete, or with
    /// -n written into DST; refused while another process has DST open).
    Convert(convert::ConvertArgs),
    /// Create a new image or overlay (qemu-img create). An existing FILE
    /// is replaced only once the new image is complete, and never while
    /// another process has it open.
    Create(create::CreateArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (qemu-img bitmap).
    ///
    /// (--add [-g SIZE] | --remove | --clear | --enable | --disable |
    /// --merge SRC [-b SRC_FILE [-F FMT]])... [-f FMT] FILE BITMAP
    #[command(disable_help_flag = true)]
    Bitmap {
        /// The options and operations, in order, then FILE and BITMAP.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// How large a new image would be (qemu-img measure): for a new
    /// image of --size, or for converting FILE to -O FMT.
    Measure(measure::MeasureArgs),
    /// Change an image's virtual size (qemu-img resize): SIZE, +SIZE or
    /// -SIZE; shrinking needs --shrink.
    Resize(resize::ResizeArgs),
    /// Change a qcow2 image's format options in place (qemu-img amend):
    /// -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N,size=SIZE.
    Amend(amend::AmendArgs),
    /// Run qemu-io style commands on an image (read/write/discard/flush).
    Io(io::IoArgs),
    /// Merge an image's data into its backing file (qemu-img commit).
    ///
    /// Before writing, Strata looks for other images that use the base as
    /// their backing file (and would see it change): every file with a
    /// qcow2 header directly in the base's directory, in the top's
    /// directory and in each --users-in DIR (not in their subdirectories).
    /// If one is found, the commit is refused (--force overrides) and the
    /// refusal lists where Strata looked; --dry-run shows the plan and the
    /// users found instead.
    Commit(merge::CommitArgs),
    /// Copy the backing chain's data into an image (qemu-img rebase -b BASE/'').
    Pull(merge::PullArgs),
    /// Change an image's backing file (qemu-img rebase).
    Rebase(merge::RebaseArgs),
    /// List, create, apply or delete a qcow2 image's internal snapshots
    /// (qemu-img snapshot [-l | -c NAME | -a SNAPSHOT | -d NAME]).
    SnapshotInternal(snapshot_internal::SnapshotInternalArgs),
    /// External snapshots of libvirt domains, shut off or running (virsh's spelling).
    #[cfg(feature = "libvirt")]
    Snapshot {
        /// What to do.
        #[command(subcommand)]
        action: snapshot::SnapshotAction,
    },
    /// Commit a domain disk's active chain into its base and pivot to it.
    #[cfg(feature = "libvirt")]
    Blockcommit(snapshot::BlockcommitArgs),
    /// Pull a domain disk's backing chain into its active image.
    #[cfg(feature = "libvirt")]
    Blockpull(snapshot::BlockpullArgs),
    /// Build a small chain and walk through what Strata can do.
    Demo(demo::DemoArgs),
}

/// Adds `file` as context to an error unless its message already names it
/// (every engine error names its file; this avoids saying it twice).
pub(crate) trait NameFile<T> {
    /// The error with `file` in front, when it does not already say it.
    fn name_file(self, file: impl AsRef<std::path::Path>) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> NameFile<T> for std::result::Result<T, E> {
    fn name_file(self, file: impl AsRef<std::path::Path>) -> Result<T> {
        let file = file.as_ref().display().to_string();
        self.map_err(|e| {
            let named = e.to_string().contains(&file);
            let e = anyhow::Error::new(e);
            if named {
                e
            } else {
                e.context(file)
            }
        })
    }
}

#[cfg(feature = "libvirt")]
fn libvirt_command(c: Command) -> Option<snapshot::LibvirtCommand> {
    use snapshot::LibvirtCommand as L;
    Some(match c {
        Command::Snapshot { action } => L::Snapshot(action),
        Command::Blockcommit(a) => L::Blockcommit(a),
        Command::Blockpull(a) => L::Blockpull(a),
        _ => return None,
    })
}

/// virsh takes `-c URI` before the command (`virsh -c URI snapshot-list
/// vm`); so does strata for the libvirt commands: the option is moved
/// after the subcommand, where clap expects it.
fn hoist_connect(args: Vec<OsString>) -> Vec<OsString> {
    let is_libvirt = |a: Option<&OsString>| {
        a.and_then(|a| a.to_str())
            .is_some_and(|a| matches!(a, "snapshot" | "blockcommit" | "blockpull" | "demo"))
    };
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let (uri, rest) = if first == "-c" || first == "--connect" {
        match args.get(2) {
            Some(u) => (u.clone(), 3),
            None => return args,
        }
    } else if let Some(u) = first.strip_prefix("--connect=") {
        (OsString::from(u), 2)
    } else {
        return args;
    };
    if !is_libvirt(args.get(rest)) {
        return args;
    }
    let mut out: Vec<OsString> = args.iter().take(1).cloned().collect();
    out.extend(args.iter().skip(rest).cloned());
    out.push("-c".into());
    out.push(uri);
    out
}

/// Runs the commands that need libvirt's C library.
type LibvirtRunner = fn(Command, &mut dyn Write, &mut dyn Write) -> Result<i32>;

/// The commands that need libvirt: the snapshot and block commands, and
/// the demo (its snapshot lifecycle).
#[cfg(feature = "libvirt")]
fn libvirt_runner(c: Command, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    match c {
        Command::Demo(a) => demo::run(&a, out, err),
        c => match libvirt_command(c) {
            Some(cmd) => snapshot::run(&cmd, out),
            None => Ok(1),
        },
    }
}

/// Runs `strata` with `args` (the first is the program name), writing to
/// `out` and `err`; returns the exit code.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    #[cfg(feature = "libvirt")]
    let libvirt: Option<LibvirtRunner> = Some(libvirt_runner);
    #[cfg(not(feature = "libvirt"))]
    let libvirt: Option<LibvirtRunner> = None;
    match run_with(args, out, err, libvirt) {
        Outcome::Exit(code) => code,
        Outcome::NeedsLibvirt => {
            let _ = writeln!(
                err,
                "strata: this command needs libvirt: run it with strata-libvirt"
            );
            1
        }
    }
}

/// What [`run_without_libvirt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "NeedsLibvirt means the command has not run"]
pub enum Outcome {
    /// The command ran (or the command line was refused): exit with this code.
    Exit(i32),
    /// The command needs libvirt (snapshot, blockcommit, blockpull, demo):
    /// nothing was done; run the same arguments with `strata-libvirt`.
    NeedsLibvirt,
}

/// [`run`] for every command that does not need libvirt; for the others
/// it does nothing and says so ([`Outcome::NeedsLibvirt`]). The `strata`
/// binary uses it (and hands those commands to `strata-libvirt`), so that
/// it never loads libvirt's C library: the image commands start in a few
/// milliseconds instead of tens. The arguments are parsed once.
pub fn run_without_libvirt<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with(args, out, err, None)
}

fn run_with<I, T>(
    args: I,
    out: &mut dyn Write,
    err: &mut dyn Write,
    libvirt: Option<LibvirtRunner>,
) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cli = match Cli::try_parse_from(hoist_connect(args)) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                err.write_all(text.as_bytes())
            } else {
                out.write_all(text.as_bytes())
            };
            return Outcome::Exit(code);
        }
    };
    // compare reports errors with exit code 2, like qemu-img.
    let error_code = match cli.command {
        Command::Compare(..) => 2,
        _ => 1,
    };
    let result = match cli.command {
        Command::Info(a) => info::run_noting(&a, out, err),
        Command::Map(a) => map::run(&a, out),
        Command::Check(a) => check::run(&a, out, err),
        Command::Compare(a) => compare::run(&a, out),
        Command::Convert(a) => convert::run(&a, out, err),
        Command::Create(a) => create::run(&a, out),
        Command::Bitmap { args } => bitmap::run(&args, out),
        Command::Measure(a) => measure::run(&a, out),
        Command::Resize(a) => resize::run(&a, out, err),
        Command::Amend(a) => amend::run(&a, out, err),
        Command::Io(a) => io::run(&a, out),
        Command::Commit(a) => merge::commit(&a, out),
        Command::Pull(a) => merge::pull(&a, out),
        Command::Rebase(a) => merge::rebase(&a, out),
        Command::SnapshotInternal(a) => snapshot_internal::run(&a, out),
        #[cfg(feature = "libvirt")]
        c @ (Command::Snapshot { .. }
        | Command::Blockcommit(..)
        | Command::Blockpull(..)
        | Command::Demo(..)) => match libvirt {
            Some(f) => f(c, out, err),
            None => return Outcome::NeedsLibvirt,
        },
        #[cfg(not(feature = "libvirt"))]
        Command::Demo(a) => {
            let _ = libvirt;
            demo::run(&a, out, err)
        }
    };
    let _ = out.flush();
    match result {
        Ok(code) => Outcome::Exit(code),
        Err(e) => {
            let _ = writeln!(err, "strata: {}", error_text(&e));
            Outcome::Exit(error_code)
        }
    }
}

/// The error and its causes joined with `: ` (as anyhow's `{:#}`), leaving
/// out each cause whose text the message before it already includes: many
/// errors say their cause in their own message (`open: No such file or
/// directory`), and printing it again would say it twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// [`run`] on the process's standard output and error.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    on_std_streams(|out, err| run(args, out, err))
}

/// [`run_without_libvirt`] on the process's standard output and error.
pub fn main_without_libvirt<I, T>(args: I) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    on_std_streams(|out, err| run_without_libvirt(args, out, err))
}

/// Runs `f` on buffered standard output and standard error.
fn on_std_streams<R>(f: impl FnOnce(&mut dyn Write, &mut dyn Write) -> R) -> R {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = stderr.lock();
    let code = f(&mut out, &mut err);
    let _ = out.flush();
    code
}
