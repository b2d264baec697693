//! `strata commit`, `strata pull` and `strata rebase`: the offline merges
//! of strata-merge (and the header-only `rebase -u`), with qemu-img's
//! spelling, a dry run that prints the plan, and a progress bar on a
//! terminal.

use crate::NameFile;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_image::ImageFormat;
use strata_merge::{CommitOptions, Hooks, Plan, Progress, PullOptions, RebaseOptions};

use crate::size::size_to_str;

/// Arguments of `strata commit`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommitArgs {
    /// The image to commit into (default: the immediate backing file).
    /// As qemu-img, only BASE changes then: the top keeps its data and
    /// its backing file (-b implies -d). A relative BASE is found as
    /// qemu-img finds it, through the names and directories of the chain.
    #[arg(short = 'b')]
    pub base: Option<PathBuf>,
    /// Do not empty the top image afterwards.
    #[arg(short = 'd')]
    pub keep_top: bool,
    /// With -b: then re-point the top at BASE and empty it (unless -d),
    /// dropping the images between from its chain.
    #[arg(long = "shorten-chain", requires = "base")]
    pub shorten_chain: bool,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print the plan and change nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Commit even when other images use the base as their backing file.
    #[arg(long = "force")]
    pub force: bool,
    /// Also look for users of the base directly in DIR (repeatable).
    #[arg(long = "users-in", value_name = "DIR")]
    pub users_in: Vec<PathBuf>,
    /// Refuse any image of the chain whose path, with `..` and symbolic
    /// links resolved, is not under DIR.
    #[arg(long = "confine", value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// The top image.
    pub file: PathBuf,
}

/// Arguments of `strata pull`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PullArgs {
    /// Keep this image of the chain as backing file (default: none).
    #[arg(short = 'b')]
    pub base: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print the plan and change nothing.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Refuse any image of the chain whose path, with `..` and symbolic
    /// links resolved, is not under DIR.
    #[arg(long = "confine", value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `strata rebase`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RebaseArgs {
    /// Unsafe: rewrite the header only.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// The new backing file ('' for none).
    #[arg(short = 'b')]
    pub backing: String,
    /// The new backing file's format.
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print the plan and change nothing (safe mode).
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Refuse any image of the old or new chain whose path, with `..`
    /// and symbolic links resolved, is not under DIR (safe mode).
    #[arg(long = "confine", value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// The image.
    pub file: PathBuf,
}

/// A progress bar on stderr when asked for and stderr is a terminal;
/// nothing otherwise.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(wanted: bool) -> Bar {
        if !wanted || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("    {bar:40} {percent:>3}% {bytes}/{total_bytes} {eta}")
        {
            pb.set_style(style);
        }
        Bar(Some(pb))
    }

    fn update(&self, p: Progress) {
        if let Some(pb) = &self.0 {
            pb.set_length(p.total_bytes);
            pb.set_position(p.done_bytes);
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// Prints a plan for people.
pub fn print_plan(out: &mut dyn Write, what: &str, plan: &Plan) -> Result<()> {
    writeln!(out, "Dry run: {what}; nothing was changed.")?;
    let bound = if plan.exact { "" } else { "at most " };
    writeln!(
        out,
        "  data to copy:   {bound}{} ({} bytes, {} clusters)",
        size_to_str(plan.copy_bytes),
        plan.copy_bytes,
        plan.copy_clusters
    )?;
    writeln!(
        out,
        "  to make zero:   {} ({} bytes)",
        size_to_str(plan.zero_bytes),
        plan.zero_bytes
    )?;
    writeln!(out, "  extents:        {}", plan.extents)?;
    if plan.growth.is_empty() {
        writeln!(out, "  no file grows")?;
    }
    for g in &plan.growth {
        writeln!(
            out,
            "  {} grows by up to {} ({} bytes)",
            g.path.display(),
            size_to_str(g.bytes),
            g.bytes
        )?;
    }
    Ok(())
}

/// Runs `strata commit`.
pub fn commit(args: &CommitArgs, out: &mut dyn Write) -> Result<i32> {
    let mut opts = CommitOptions::default()
        .with_keep_top(args.keep_top)
        .with_shorten_chain(args.shorten_chain)
        .with_force(args.force)
        .with_dry_run(args.dry_run)
        .with_users_in(args.users_in.clone());
    opts.base = args.base.clone();
    opts.confine_to = args.confine.clone();
    let bar = Bar::new(args.progress && !args.dry_run);
    let mut cb = |p: Progress| bar.update(p);
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let r = strata_merge::commit(&args.file, &opts, &mut hooks);
    bar.finish();
    let r = r.name_file(&args.file)?;
    if r.dry_run {
        let what = format!(
            "commit {} layer(s) of {} into {}",
            r.layers_merged,
            args.file.display(),
            r.base.display()
        );
        print_plan(out, &what, &r.plan)?;
        if !args.keep_top && (args.base.is_none() || args.shorten_chain) {
            writeln!(out, "  {} would be emptied afterwards", args.file.display())?;
        }
        print_guard(out, &r)?;
        return Ok(0);
    }
    if r.leaks_reclaimed > 0 {
        writeln!(
            out,
            "Reclaimed {} leaked cluster(s) of {} (left by an earlier failed run) before committing.",
            r.leaks_reclaimed,
            r.base.display()
        )?;
    }
    writeln!(out, "Image committed.")?;
    Ok(0)
}

/// Runs `strata pull`.
pub fn pull(args: &PullArgs, out: &mut dyn Write) -> Result<i32> {
    let mut opts = PullOptions::default().with_dry_run(args.dry_run);
    opts.base = args.base.clone();
    let confine = args.confine.clone();
    let bar = Bar::new(args.progress && !args.dry_run);
    let mut cb = |p: Progress| bar.update(p);
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let r = strata_merge::pull_confined(&args.file, &opts, confine.as_deref(), &mut hooks);
    bar.finish();
    let r = r.name_file(&args.file)?;
    if r.dry_run {
        let onto = match &args.base {
            Some(b) => format!("keeping {} as backing file", b.display()),
            None => "leaving it without backing file".to_string(),
        };
        let what = format!(
            "pull {} layer(s) into {}, {onto}",
            r.layers_pulled,
            args.file.display()
        );
        print_plan(out, &what, &r.plan)?;
    } else if r.leaks_reclaimed > 0 {
        writeln!(
            out,
            "Reclaimed {} leaked cluster(s) of {} (left by an earlier failed run) before pulling.",
            r.leaks_reclaimed,
            args.file.display()
        )?;
    }
    Ok(0)
}

/// What the shared-base guard found, for a dry run.
fn print_guard(out: &mut dyn Write, r: &strata_merge::CommitReport) -> Result<()> {
    if r.users_searched.is_empty() {
        return Ok(());
    }
    let places = r
        .users_searched
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if r.base_users.is_empty() {
        writeln!(
            out,
            "  no other image uses {} as backing file (looked in: {places})",
            r.base.display()
        )?;
    } else {
        let users = r
            .base_users
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            out,
            "  {} is the backing file of {users}, whose view the commit would change: \
             without --force the commit is refused (looked in: {places})",
            r.base.display()
        )?;
    }
    Ok(())
}

fn format_by_name(name: &str) -> Result<ImageFormat> {
    ImageFormat::from_name(name)
        .ok_or_else(|| anyhow::anyhow!("unknown image format {name:?}: use qcow2 or raw"))
}

/// Runs `strata rebase`.
pub fn rebase(args: &RebaseArgs, out: &mut dyn Write) -> Result<i32> {
    let path = args.file.as_path();
    let file = path.display().to_string();
    let file = file.as_str();
    let new = if args.backing.is_empty() {
        None
    } else {
        let Some(f) = &args.backing_format else {
            bail!(
                "{file}: backing file {:?} specified without backing format: give it with -F",
                args.backing
            );
        };
        Some((args.backing.as_str(), format_by_name(f)?))
    };
    if args.unsafe_mode {
        if args.dry_run {
            bail!("{file}: --dry-run applies to the safe rebase only (without -u)");
        }
        if args.confine.is_some() {
            bail!("{file}: --confine applies to the safe rebase only (without -u)");
        }
        // As `qemu-img rebase -u`: a dirty image is repaired, unknown
        // autoclear bits cleared.
        strata_image::set_backing_file(path, new, strata_image::WritePolicy::qemu())
            .name_file(file)?;
        return Ok(0);
    }
    let bar = Bar::new(args.progress && !args.dry_run);
    let mut cb = |p: Progress| bar.update(p);
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let mut opts = RebaseOptions::default().with_dry_run(args.dry_run);
    opts.confine_to = args.confine.clone();
    let r = strata_merge::rebase(path, new, &opts, &mut hooks);
    bar.finish();
    let r = r.name_file(file)?;
    if r.dry_run {
        let what = format!(
            "rebase {file} from {} onto {}",
            r.old_backing.as_deref().unwrap_or("(none)"),
            new.map(|(n, _)| n).unwrap_or("(none)")
        );
        print_plan(out, &what, &r.plan)?;
    }
    Ok(0)
}
