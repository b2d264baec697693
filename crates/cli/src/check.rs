//! `strata check`: consistency of an image's metadata (strata-image's
//! read-only check), printed as `qemu-img check` prints it, with its exit
//! codes: 0 clean, 2 corruptions, 3 leaks only, 1 when the check could not
//! run or hit internal errors, 63 for a format without checks (raw).

use std::fmt::Write as _;
use std::io::Write;

use anyhow::{bail, Context, Result};
use strata_image::check::{check, CheckReport, Problem};
use strata_image::repair::{repair, RepairMode, RepairReport};
use strata_image::{Chain, ImageFormat};

use crate::qjson::{to_json_pretty, QDict, QValue};
use crate::{open_options, OutputFormat};

/// qemu-img's exit code for "this image format does not support checks".
pub const EXIT_NOT_SUPPORTED: i32 = 63;

/// Arguments of `strata check`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Image format.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Repair: leaks or all.
    #[arg(short = 'r')]
    pub repair: Option<String>,
    /// Force share: take no locks.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet: print only the problems found.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// The image.
    pub file: std::path::PathBuf,
}

/// The `ImageCheck` dictionary qemu-img prints with `--output json`
/// (zero counts are left out, as QEMU leaves them out).
pub fn report_json(filename: &str, format: &str, r: &CheckReport) -> QDict {
    let mut d = QDict::new();
    d.put("filename", filename);
    d.put("format", format);
    d.put("check-errors", r.check_errors);
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional {
        if v != 0 {
            d.put(k, v);
        }
    }
    d
}

/// qemu-img's `dump_human_image_check`.
pub fn report_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            let _ = write!(
                s,
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            let _ = write!(
                s,
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            let _ = write!(
                s,
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        let _ = writeln!(
            s,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        );
    }
    if r.image_end_offset != 0 {
        let _ = writeln!(s, "Image end offset: {}", r.image_end_offset);
    }
    s
}

/// Runs `strata check`. Problem lines (`ERROR cluster ...`, `Leaked
/// cluster ...`) go to `err`, as qemu-img prints them to stderr.
pub fn run(args: &CheckArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let mode = match args.repair.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(other) => bail!("invalid repair mode {other:?}: use -r leaks or -r all"),
    };
    if let Some(mode) = mode {
        if args.force_share {
            bail!(
                "{}: -r (repair) cannot be combined with -U (force share)",
                args.file.display()
            );
        }
        return run_repair(args, mode, out, err);
    }
    let mut opts = open_options(args.format.as_deref(), args.force_share)?;
    // The backing files are opened (a missing one fails, as in qemu-img),
    // but the check reads the top alone: a chain deeper than the open
    // limit is checked too (qemu-img checks the top of a depth-200 chain).
    let chain = match Chain::open(&args.file, &opts) {
        Err(strata_image::Error::ChainTooDeep { .. }) => {
            opts.no_backing = true;
            Chain::open(&args.file, &opts)?
        }
        r => r?,
    };
    let image = &chain.top().image;
    let Some(q) = image.as_qcow2() else {
        return not_supported(args, image.format(), err);
    };
    let report = check(q)?;
    print_report(args, &report, out, err)
}

/// qemu-img's advice after each refcount overflow (`inc_refcounts`),
/// naming Strata's commands: `strata amend -o refcount_bits=N` and
/// `strata convert` are what a Strata user runs.
pub const OVERFLOW_HINT: &str = "Use strata amend to increase the refcount entry width or \
     strata convert to create a clean copy if the image cannot be opened for writing";

/// The problem lines of a check, to stderr as qemu-img prints them.
fn print_problems(report: &CheckReport, err: &mut dyn Write) -> Result<()> {
    for p in &report.problems {
        writeln!(err, "{}", p.message)?;
        if p.message.starts_with("ERROR: overflow cluster offset=") {
            writeln!(err, "{OVERFLOW_HINT}")?;
        }
    }
    if report.problems_omitted > 0 {
        writeln!(
            err,
            "... and {} more problems not listed",
            report.problems_omitted
        )?;
    }
    Ok(())
}

/// The problem lines of `check -r`, in qemu-img's order and words: the
/// check's lines, then "Repairing cluster ..." for each leak fixed
/// (compare_refcounts), then the COPIED flags as QEMU checks them after
/// the refcounts were fixed (check_oflag_copied): one the leak fixes made
/// right is not reported, one repaired says "Repairing".
fn print_repair_problems(r: &RepairReport, rebuild: bool, err: &mut dyn Write) -> Result<()> {
    let copied = copied_flag;
    let still = |p: &Problem| r.after.problems.iter().any(|a| a.message == p.message);
    let mut first = r.before.clone();
    first.problems.retain(|p| !copied(p));
    print_problems(&first, err)?;
    if rebuild {
        writeln!(err, "Rebuilding refcount structure")?;
    }
    if r.leaks_fixed > 0 {
        for p in &r.before.problems {
            if let Some(rest) = p.message.strip_prefix("Leaked cluster ") {
                if !still(p) {
                    writeln!(err, "Repairing cluster {rest}")?;
                }
            }
        }
    }
    for p in r.before.problems.iter().filter(|p| copied(p)) {
        if still(p) || r.leaks_fixed == 0 && r.corruptions_fixed == 0 {
            writeln!(err, "{}", p.message)?;
        } else if r.corruptions_fixed > 0 {
            let rest = p.message.trim_start_matches("ERROR ");
            writeln!(err, "Repairing {rest}")?;
        }
    }
    Ok(())
}

/// A COPIED flag that disagrees with the refcount.
fn copied_flag(p: &Problem) -> bool {
    p.message.starts_with("ERROR OFLAG_COPIED ")
}

/// `ERROR cluster N refcount=R reference=F` with R < F: what makes
/// qemu-img's check -r rebuild the refcount structures.
fn refcount_too_low(p: &Problem) -> bool {
    let Some(rest) = p.message.strip_prefix("ERROR cluster ") else {
        return false;
    };
    let num = |key: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    matches!((num("refcount="), num("reference=")), (Some(r), Some(f)) if r < f)
}

fn print_report(
    args: &CheckArgs,
    report: &CheckReport,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32> {
    print_problems(report, err)?;
    if !args.quiet {
        match args.output {
            OutputFormat::Json => {
                let d = report_json(&args.file.to_string_lossy(), "qcow2", report);
                writeln!(out, "{}", to_json_pretty(&QValue::Dict(d)))?;
            }
            OutputFormat::Human => out.write_all(report_human(report).as_bytes())?,
        }
    }
    if report.check_errors > 0 {
        writeln!(err, "strata: {}: check failed", args.file.display())?;
        return Ok(1);
    }
    Ok(report.exit_code())
}

fn not_supported(args: &CheckArgs, format: ImageFormat, err: &mut dyn Write) -> Result<i32> {
    writeln!(
        err,
        "strata: {}: this image format ({format}) does not support checks",
        args.file.display()
    )?;
    Ok(EXIT_NOT_SUPPORTED)
}

/// `check -r leaks|all`: repair the image (opened read-write, with a
/// QEMU-compatible write lock), print what was fixed as qemu-img does,
/// then the report of the check that follows; the exit code is that
/// check's.
fn run_repair(
    args: &CheckArgs,
    mode: RepairMode,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32> {
    let mut opts = open_options(args.format.as_deref(), false)?;
    opts.writable = true;
    opts.no_backing = true;
    let mut chain = Chain::open(&args.file, &opts)?;
    let layer = &mut chain.layers_mut()[0];
    let q = match &mut layer.image {
        strata_image::Image::Qcow2(q) => q,
        other => return not_supported(args, other.format(), err),
    };
    if mode == RepairMode::Leaks {
        // A refcount below the references needs a rebuild, which -r leaks
        // does not do: qemu-img prints compare_refcounts' lines and fails
        // before fixing anything.
        let mut first = check(q)?;
        if first.problems.iter().any(refcount_too_low) {
            first.problems.retain(|p| !copied_flag(p));
            print_problems(&first, err)?;
            writeln!(err, "ERROR need to rebuild refcount structures")?;
            bail!("Check failed: Input/output error");
        }
    }
    let mut r =
        repair(q, mode).with_context(|| format!("{}: repair failed", args.file.display()))?;
    let rebuild = r.before.problems.iter().any(refcount_too_low);
    if rebuild {
        // QEMU checks the COPIED flags after its rebuild: those the
        // rebuilt refcounts made right are neither printed nor counted.
        let resolved = r
            .before
            .problems
            .iter()
            .filter(|p| copied_flag(p) && !r.after.problems.iter().any(|a| a.message == p.message))
            .count() as u64;
        r.before
            .problems
            .retain(|p| !copied_flag(p) || r.after.problems.contains(p));
        r.corruptions_fixed = r.corruptions_fixed.saturating_sub(resolved);
    }
    print_repair_problems(&r, rebuild, err)?;
    let fixed = r.leaks_fixed > 0 || r.corruptions_fixed > 0;
    if fixed && args.output == OutputFormat::Human && !args.quiet {
        writeln!(
            out,
            "The following inconsistencies were found and repaired:\n\n    \
             {} leaked clusters\n    {} corruptions\n\n\
             Double checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        )?;
    }
    let mut after = r.after;
    after.leaks_fixed = r.leaks_fixed;
    after.corruptions_fixed = r.corruptions_fixed;
    if !fixed {
        // qemu-img checks once when nothing was repaired: its problems
        // were printed above.
        after.problems.clear();
        after.problems_omitted = 0;
    }
    print_report(args, &after, out, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_report_prints_like_qemu_img() {
        let r = CheckReport {
            image_end_offset: 983040,
            total_clusters: 64,
            allocated_clusters: 10,
            fragmented_clusters: 3,
            ..CheckReport::default()
        };
        assert_eq!(
            report_human(&r),
            "No errors were found on the image.\n\
             10/64 = 15.62% allocated, 30.00% fragmented, 0.00% compressed clusters\n\
             Image end offset: 983040\n"
        );
        let json = to_json_pretty(&QValue::Dict(report_json("t.qcow2", "qcow2", &r)));
        assert_eq!(
            json,
            "{\n    \"image-end-offset\": 983040,\n    \"total-clusters\": 64,\n    \
             \"check-errors\": 0,\n    \"allocated-clusters\": 10,\n    \
             \"filename\": \"t.qcow2\",\n    \"format\": \"qcow2\",\n    \
             \"fragmented-clusters\": 3\n}"
        );
    }
}
