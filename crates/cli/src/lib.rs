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
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use strata_image::{ImageFormat, OpenOptions};

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
    Ok(OpenOptions {
        format,
        force_share,
        ..OpenOptions::default()
    })
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
    Info {
        /// Image format (qcow2 or raw); probed when omitted.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Force share: take no locks, tolerate other users of the image.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Describe every image of the backing chain.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Output format (dot: a Graphviz graph of the chain).
        #[arg(long = "output", value_enum, default_value_t)]
        output: dot::GraphOutput,
        /// The image.
        file: PathBuf,
    },
    /// Show which layer holds each guest range, and where.
    Map {
        /// Image format (qcow2 or raw); probed when omitted.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Force share: take no locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Output format.
        #[arg(long = "output", value_enum, default_value_t)]
        output: map::MapOutput,
        /// The image.
        file: PathBuf,
    },
    /// Check an image's metadata for consistency.
    Check {
        /// Image format.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Repair: leaks or all.
        #[arg(short = 'r')]
        repair: Option<String>,
        /// Force share: take no locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Quiet: print only the problems found.
        #[arg(short = 'q')]
        quiet: bool,
        /// Output format.
        #[arg(long = "output", value_enum, default_value_t)]
        output: OutputFormat,
        /// The image.
        file: PathBuf,
    },
    /// Compare the guest data of two images (exit 0 same, 1 different, 2 error).
    Compare {
        /// Format of the first image.
        #[arg(short = 'f')]
        format1: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: sizes and allocation must match too.
        #[arg(short = 's')]
        strict: bool,
        /// Quiet: print nothing, only the exit code tells.
        #[arg(short = 'q')]
        quiet: bool,
        /// Force share: take no locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// First image.
        file1: PathBuf,
        /// Second image.
        file2: PathBuf,
    },
    /// Write the chain's guest view to a new image (built beside DST and
    /// renamed over it when complete; refused while another process has
    /// DST open).
    Convert {
        /// Source format.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw or qcow2.
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Compress data clusters (qcow2 output).
        #[arg(short = 'c')]
        compress: bool,
        /// qcow2 options: cluster_size, compat, refcount_bits, lazy_refcounts,
        /// extended_l2, compression_type (comma-separated name=value).
        #[arg(short = 'o')]
        options: Option<String>,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Force share on the source: take no locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Copy the source's persistent dirty bitmaps (qcow2 to qcow2).
        #[arg(long = "bitmaps")]
        bitmaps: bool,
        /// Source image.
        src: PathBuf,
        /// Destination file.
        dst: PathBuf,
    },
    /// Create a new image or overlay (qemu-img create). An existing FILE
    /// is replaced only once the new image is complete, and never while
    /// another process has it open.
    Create {
        /// Format: qcow2 (default) or raw.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Backing file, stored as given (relative: to the new image's directory).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format (required with -b).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Options: cluster_size, compat, extended_l2, refcount_bits,
        /// lazy_refcounts, compression_type, preallocation, backing_file,
        /// backing_fmt (comma-separated name=value).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Do not open the backing file (SIZE is then required).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        /// Quiet: do not print the Formatting line.
        #[arg(short = 'q')]
        quiet: bool,
        /// The new image.
        file: PathBuf,
        /// Virtual size (k, M, G, T suffixes), rounded up to 512 bytes; the
        /// backing file's by default.
        size: Option<String>,
    },
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
    Measure {
        /// Input format (qcow2 or raw); probed when omitted.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw (default) or qcow2.
        #[arg(short = 'O')]
        output_format: Option<String>,
        /// Output format options: cluster_size, compat, refcount_bits,
        /// extended_l2, preallocation, backing_file (comma-separated name=value).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Measure a new empty image of this size (instead of FILE).
        #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
        size: Option<String>,
        /// Force share: take no locks on the input.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Output format.
        #[arg(long = "output", value_enum, default_value_t)]
        output: OutputFormat,
        /// The input image.
        file: Option<PathBuf>,
    },
    /// Change an image's virtual size (qemu-img resize): SIZE, +SIZE or
    /// -SIZE; shrinking needs --shrink.
    Resize {
        /// Image format (qcow2 or raw); probed when omitted.
        #[arg(short = 'f')]
        format: Option<String>,
        /// Allow the image to shrink (data past the new end is lost).
        #[arg(long = "shrink")]
        shrink: bool,
        /// Preallocation of the new area: off, falloc or full (metadata is
        /// refused: raw has none, and Strata does not do it for qcow2 yet).
        #[arg(long = "preallocation", value_name = "MODE")]
        preallocation: Option<String>,
        /// Quiet: do not print `Image resized.`.
        #[arg(short = 'q')]
        quiet: bool,
        /// The image.
        file: PathBuf,
        /// New size, or +SIZE / -SIZE relative to the current one (k, M, G, T suffixes).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Run qemu-io style commands on an image (read/write/discard/flush).
    Io {
        /// Image format (qcow2 or raw); probed when omitted.
        #[arg(short = 'f')]
        format: Option<String>,
        /// A command: read [-P pat] off len, write [-P pat | -z [-u]] off len,
        /// discard off len, flush.
        #[arg(short = 'c')]
        commands: Vec<String>,
        /// The image.
        file: PathBuf,
    },
    /// Merge an image's data into its backing file (qemu-img commit).
    ///
    /// Before writing, Strata looks for other images that use the base as
    /// their backing file (and would see it change): every file with a
    /// qcow2 header directly in the base's directory, in the top's
    /// directory and in each --users-in DIR (not in their subdirectories).
    /// If one is found, the commit is refused (--force overrides) and the
    /// refusal lists where Strata looked; --dry-run shows the plan and the
    /// users found instead.
    Commit {
        /// The image to commit into (default: the immediate backing file).
        /// As qemu-img, only BASE changes then: the top keeps its data and
        /// its backing file (-b implies -d). A relative BASE is found as
        /// qemu-img finds it, through the names and directories of the chain.
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        /// Do not empty the top image afterwards.
        #[arg(short = 'd')]
        keep_top: bool,
        /// With -b: then re-point the top at BASE and empty it (unless -d),
        /// dropping the images between from its chain.
        #[arg(long = "shorten-chain", requires = "base")]
        shorten_chain: bool,
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p')]
        progress: bool,
        /// Print the plan and change nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// Commit even when other images use the base as their backing file.
        #[arg(long = "force")]
        force: bool,
        /// Also look for users of the base directly in DIR (repeatable).
        #[arg(long = "users-in", value_name = "DIR")]
        users_in: Vec<PathBuf>,
        /// Refuse any image of the chain whose path, with `..` and symbolic
        /// links resolved, is not under DIR.
        #[arg(long = "confine", value_name = "DIR")]
        confine: Option<PathBuf>,
        /// The top image.
        file: PathBuf,
    },
    /// Copy the backing chain's data into an image (qemu-img rebase -b BASE/'').
    Pull {
        /// Keep this image of the chain as backing file (default: none).
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p')]
        progress: bool,
        /// Print the plan and change nothing.
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// Refuse any image of the chain whose path, with `..` and symbolic
        /// links resolved, is not under DIR.
        #[arg(long = "confine", value_name = "DIR")]
        confine: Option<PathBuf>,
        /// The image.
        file: PathBuf,
    },
    /// Change an image's backing file (qemu-img rebase).
    Rebase {
        /// Unsafe: rewrite the header only.
        #[arg(short = 'u')]
        unsafe_mode: bool,
        /// The new backing file ('' for none).
        #[arg(short = 'b')]
        backing: String,
        /// The new backing file's format.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Show a progress bar (on a terminal).
        #[arg(short = 'p')]
        progress: bool,
        /// Print the plan and change nothing (safe mode).
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// Refuse any image of the old or new chain whose path, with `..`
        /// and symbolic links resolved, is not under DIR (safe mode).
        #[arg(long = "confine", value_name = "DIR")]
        confine: Option<PathBuf>,
        /// The image.
        file: PathBuf,
    },
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
    Demo {
        /// Directory for the demo files (a new temporary one by default).
        dir: Option<PathBuf>,
        /// libvirt URI for the snapshot steps (default: libvirt's test driver).
        #[arg(short = 'c', long = "connect")]
        uri: Option<String>,
        /// With -c: the existing shut-off domain to use.
        #[arg(long = "domain")]
        domain: Option<String>,
    },
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
        Command::Demo { dir, uri, domain } => {
            demo::run(&demo::DemoArgs { dir, uri, domain }, out, err)
        }
        c => match libvirt_command(c) {
            Some(cmd) => snapshot::run(&cmd, out),
            None => Ok(1),
        },
    }
}

/// Whether the command line asks for a command that needs libvirt (see
/// [`run_without_libvirt`]). False when it does not parse.
pub fn needs_libvirt(args: &[OsString]) -> bool {
    #[cfg(feature = "libvirt")]
    if let Ok(cli) = Cli::try_parse_from(hoist_connect(args.to_vec())) {
        return matches!(
            cli.command,
            Command::Snapshot { .. }
                | Command::Blockcommit(..)
                | Command::Blockpull(..)
                | Command::Demo { .. }
        );
    }
    let _ = args;
    false
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
    run_with(args, out, err, libvirt)
}

/// [`run`] for every command that does not need libvirt; the others fail.
/// The `strata` binary uses it (and hands those commands to
/// `strata-libvirt`), so that it never loads libvirt's C library: the
/// image commands start in a few milliseconds instead of tens.
pub fn run_without_libvirt<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
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
) -> i32
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
            return code;
        }
    };
    // compare reports errors with exit code 2, like qemu-img.
    let error_code = match cli.command {
        Command::Compare { .. } => 2,
        _ => 1,
    };
    let result = match cli.command {
        Command::Info {
            format,
            force_share,
            backing_chain,
            output,
            file,
        } => match output.plain() {
            Some(output) => info::run_noting(
                &info::InfoArgs {
                    file,
                    format,
                    force_share,
                    backing_chain,
                    output,
                },
                out,
                err,
            ),
            None => info::run_dot(
                &info::InfoArgs {
                    file,
                    format,
                    force_share,
                    backing_chain,
                    output: OutputFormat::Json,
                },
                out,
                err,
            ),
        },
        Command::Map {
            format,
            force_share,
            output,
            file,
        } => map::run(
            &map::MapArgs {
                file,
                format,
                force_share,
                output,
            },
            out,
        ),
        Command::Check {
            format,
            repair,
            force_share,
            quiet,
            output,
            file,
        } => check::run(
            &check::CheckArgs {
                file,
                format,
                repair,
                output,
                force_share,
                quiet,
            },
            out,
            err,
        ),
        Command::Compare {
            format1,
            format2,
            strict,
            quiet,
            force_share,
            file1,
            file2,
        } => compare::run(
            &compare::CompareArgs {
                file1,
                file2,
                format1,
                format2,
                strict,
                force_share,
                quiet,
            },
            out,
        ),
        Command::Convert {
            format,
            output_format,
            compress,
            options,
            progress,
            force_share,
            bitmaps,
            src,
            dst,
        } => convert::run(
            &convert::ConvertArgs {
                src,
                dst,
                format,
                output_format,
                progress,
                compress,
                options,
                force_share,
                bitmaps,
            },
            out,
            err,
        ),
        Command::Create {
            format,
            backing,
            backing_format,
            options,
            unsafe_backing,
            quiet,
            file,
            size,
        } => create::run(
            &create::CreateArgs {
                file,
                format,
                backing,
                backing_format,
                options,
                size,
                unsafe_backing,
                quiet,
            },
            out,
        ),
        Command::Bitmap { args } => bitmap::run(&args, out),
        Command::Measure {
            format,
            output_format,
            options,
            size,
            force_share,
            output,
            file,
        } => measure::run(
            &measure::MeasureArgs {
                file,
                size,
                format,
                output_format,
                options,
                force_share,
                output,
            },
            out,
        ),
        Command::Resize {
            format,
            shrink,
            preallocation,
            quiet,
            file,
            size,
        } => resize::run(
            &resize::ResizeArgs {
                file,
                format,
                shrink,
                preallocation,
                quiet,
                size,
            },
            out,
            err,
        ),
        Command::Io {
            format,
            commands,
            file,
        } => io::run(
            &io::IoArgs {
                file,
                format,
                commands,
            },
            out,
        ),
        Command::Commit {
            base,
            keep_top,
            shorten_chain,
            progress,
            dry_run,
            force,
            users_in,
            confine,
            file,
        } => merge::commit(
            &merge::CommitArgs {
                file,
                base,
                keep_top,
                shorten_chain,
                progress,
                dry_run,
                force,
                users_in,
                confine,
            },
            out,
        ),
        Command::Pull {
            base,
            progress,
            dry_run,
            confine,
            file,
        } => merge::pull(
            &merge::PullArgs {
                file,
                base,
                progress,
                dry_run,
                confine,
            },
            out,
        ),
        Command::Rebase {
            unsafe_mode,
            backing,
            backing_format,
            progress,
            dry_run,
            confine,
            file,
        } => merge::rebase(
            &merge::RebaseArgs {
                file,
                backing,
                backing_format,
                unsafe_mode,
                progress,
                dry_run,
                confine,
            },
            out,
        ),
        #[cfg(feature = "libvirt")]
        c @ (Command::Snapshot { .. }
        | Command::Blockcommit(..)
        | Command::Blockpull(..)
        | Command::Demo { .. }) => match libvirt {
            Some(f) => f(c, out, err),
            None => Err(anyhow::anyhow!(
                "this command needs libvirt: run it with strata-libvirt"
            )),
        },
        #[cfg(not(feature = "libvirt"))]
        Command::Demo { dir, uri, domain } => {
            let _ = libvirt;
            demo::run(&demo::DemoArgs { dir, uri, domain }, out, err)
        }
    };
    let _ = out.flush();
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "strata: {}", error_text(&e));
            error_code
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
pub fn main_without_libvirt<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    on_std_streams(|out, err| run_without_libvirt(args, out, err))
}

/// Runs `f` on buffered standard output and standard error.
fn on_std_streams(f: impl FnOnce(&mut dyn Write, &mut dyn Write) -> i32) -> i32 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = stderr.lock();
    let code = f(&mut out, &mut err);
    let _ = out.flush();
    code
}
