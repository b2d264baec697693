//! The `strata` binary: everything lives in the strata-cli library.
//!
//! The commands that need libvirt (snapshot, blockcommit, blockpull, demo)
//! run in the `strata-libvirt` binary installed next to this one: `strata`
//! execs it for them, so that the image commands never load libvirt's C
//! library and its dozens of dependencies (which costs ~20 ms at start).

#![forbid(unsafe_code)]

use std::ffi::OsString;

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let code = match strata_cli::main_without_libvirt(args.iter().cloned()) {
        strata_cli::Outcome::Exit(code) => code,
        strata_cli::Outcome::NeedsLibvirt => exec_libvirt(&args),
    };
    std::process::exit(code);
}

/// Replaces this process with `strata-libvirt` from this binary's
/// directory; returns an exit code only when that fails.
fn exec_libvirt(args: &[OsString]) -> i32 {
    use std::os::unix::process::CommandExt;
    let helper = std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("strata-libvirt"));
    let Some(helper) = helper.filter(|p| p.is_file()) else {
        eprintln!(
            "strata: this command needs libvirt, and strata-libvirt was not found next to \
             the strata binary (install the strata-libvirt package, or build the strata-cli \
             crate with its default features)"
        );
        return 1;
    };
    let mut cmd = std::process::Command::new(&helper);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    let e = cmd.args(args.iter().skip(1)).exec();
    eprintln!("strata: cannot run {}: {e}", helper.display());
    1
}
