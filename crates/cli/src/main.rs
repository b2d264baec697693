//! The `strata` binary: everything lives in the strata-cli library.

fn main() {
    let code = strata_cli::main_with_args(std::env::args_os());
    std::process::exit(code);
}
