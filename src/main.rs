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
    // Megatron-LM flags that troupe takes under other names, ignores or refuses are sorted out
    // before clap sees the command line (see `cli::megatron`).
    let ported = cli::megatron::port(std::env::args_os().collect());
    if !ported.errors.is_empty() {
        let msg: String = ported.errors.iter().map(|e| format!("error: {e}\n")).collect();
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), msg.as_bytes());
        return std::process::ExitCode::from(2);
    }
    let mut args = cli::Cli::parse_from(ported.args);
    args.attach(ported.ported);
    // Launched ranks share one command line: rank 0 says it once.
    if !std::env::var("RANK").is_ok_and(|r| r != "0") {
        for note in &ported.notes {
            eprintln!("troupe: note: {note}");
        }
    }
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One write: ranks of one job share a stderr pipe, and `eprintln!` writes a message
            // in pieces that another rank's message can land between.
            let mut msg = format!("error: {}\n", cli::render(&err));
            if let Some(h) = cli::hint(&err) {
                msg.push_str(&format!("hint: {h}\n"));
            }
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), msg.as_bytes());
            std::process::ExitCode::from(cli::exit_code(&err))
        }
    }
}
