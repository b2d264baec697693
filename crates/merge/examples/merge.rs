//! A tiny driver for manual runs and timing against qemu-img:
//!
//! ```text
//! cargo run --release -p strata-merge --example merge -- commit TOP [BASE]
//! cargo run --release -p strata-merge --example merge -- pull TOP [BASE]
//! cargo run --release -p strata-merge --example merge -- rebase TOP NEW FMT
//! ```
//! Add `--dry-run` anywhere to print the plan only.

use std::path::PathBuf;
use std::process::ExitCode;

use strata_image::ImageFormat;
use strata_merge::{commit, pull, rebase, CommitOptions, Hooks, PullOptions, RebaseOptions};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let dry_run = args.iter().any(|a| a == "--dry-run");
    args.retain(|a| a != "--dry-run");
    let (Some(op), Some(top)) = (args.first(), args.get(1)) else {
        eprintln!("usage: merge commit|pull|rebase TOP [BASE | NEW FMT] [--dry-run]");
        return ExitCode::from(2);
    };
    let top = PathBuf::from(top);
    let extra = args.get(2).map(PathBuf::from);
    let mut hooks = Hooks::default();
    let result = match op.as_str() {
        "commit" => {
            commit(&top, &commit_options(extra, dry_run), &mut hooks).map(|r| format!("{r:#?}"))
        }
        "pull" => pull(&top, &pull_options(extra, dry_run), &mut hooks).map(|r| format!("{r:#?}")),
        "rebase" => {
            let new = args.get(2).map(String::as_str).unwrap_or("");
            let fmt = args
                .get(3)
                .and_then(|f| ImageFormat::from_name(f))
                .unwrap_or(ImageFormat::Qcow2);
            let nb = (!new.is_empty()).then_some((new, fmt));
            rebase(
                &top,
                nb,
                &RebaseOptions::default().with_dry_run(dry_run),
                &mut hooks,
            )
            .map(|r| format!("{r:#?}"))
        }
        _ => {
            eprintln!("unknown operation {op}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(r) => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Commit options: into `base` when given, else the top's backing file.
fn commit_options(base: Option<PathBuf>, dry_run: bool) -> CommitOptions {
    let o = CommitOptions::default().with_dry_run(dry_run);
    match base {
        Some(b) => o.with_base(b),
        None => o,
    }
}

/// Pull options: keep `base` below the top when given, else pull all.
fn pull_options(base: Option<PathBuf>, dry_run: bool) -> PullOptions {
    let o = PullOptions::default().with_dry_run(dry_run);
    match base {
        Some(b) => o.with_base(b),
        None => o,
    }
}
