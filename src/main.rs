//! The `troupe` command line. Each subcommand lives in its own file under `src/cli/`; this file
//! only parses arguments, sets up logging and maps errors to exit codes.

mod cli;

use clap::Parser;

/// mimalloc keeps freed memory for reuse: the runtime passes activations, gradients and their
/// messages as fresh vectors of tens of megabytes, which the system allocator maps and unmaps
/// each time (paying a page fault per 4 KiB on every first touch).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if let Some(h) = cli::hint(&err) {
                eprintln!("hint: {h}");
            }
            std::process::ExitCode::from(cli::exit_code(&err))
        }
    }
}
