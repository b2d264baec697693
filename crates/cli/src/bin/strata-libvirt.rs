//! `strata-libvirt`: the `strata` command line with the commands that need
//! libvirt's C library (snapshot, blockcommit, blockpull, demo). `strata`
//! execs it for those; it accepts every other command too.

#![forbid(unsafe_code)]

fn main() {
    // Ctrl-C / SIGTERM abort a live block job cleanly (before any thread).
    strata_cli::cancel_on_signals();
    let code = strata_cli::main_with_args(std::env::args_os());
    std::process::exit(code);
}
