//! `strata check`: consistency of an image's metadata, with qemu-img
//! check's exit codes (0 clean, 2 corruptions, 3 leaks only, 1 could not
//! check).
//!
//! The check engine (strata-image `check`) has not landed yet; until it
//! does, this command says so and exits 1 ("could not check").

use std::io::Write;

use anyhow::{bail, Result};

use crate::OutputFormat;

/// Arguments of `strata check`.
#[derive(Debug, Clone)]
pub struct CheckArgs {
    /// The image.
    pub file: String,
    /// Its format.
    pub format: Option<String>,
    /// Repair mode (`-r leaks|all`).
    pub repair: Option<String>,
    /// Human or JSON.
    pub output: OutputFormat,
    /// Take no locks (`-U`).
    pub force_share: bool,
}

/// Runs `strata check`.
pub fn run(args: &CheckArgs, _out: &mut dyn Write) -> Result<i32> {
    bail!(
        "{}: check is not implemented yet (the check engine has not landed in strata-image); \
         use `qemu-img check` meanwhile",
        args.file
    )
}
