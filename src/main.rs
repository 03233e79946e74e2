//! The `troupe` command line. Each subcommand lives in its own file under `src/cli/`; this file
//! only parses arguments, sets up logging and maps errors to exit codes.

mod cli;

use clap::Parser;

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
