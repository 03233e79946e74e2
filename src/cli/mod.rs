//! Subcommand table. Add a subcommand by adding a variant to [`Command`], a file beside this one,
//! and one arm in [`run`].

use clap::{Parser, Subcommand};

/// troupe: an actor-based training runtime for transformer language models.
#[derive(Debug, Parser)]
#[command(name = "troupe", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Benchmarks (training throughput against the PyTorch peer, kernels).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Start this node's ranks with a torchrun-compatible environment.
    Launch(launch::LaunchArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) and print one JSON line.
    Train(bench::TrainBenchArgs),
    /// Time a collective over sizes (algbw/busbw like nccl-tests) against the machine's reference.
    Comm(bench_comm::CommBenchArgs),
}

mod bench;
mod bench_comm;
mod launch;

/// Exit code for an error: 2 for bad user input (config, arguments), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err
        .chain()
        .any(|e| e.downcast_ref::<UsageError>().is_some())
    {
        2
    } else {
        1
    }
}

/// An error caused by what the user asked for (bad flag, bad config value); exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bench(BenchCommand::Train(args)) => bench::train(args),
        Command::Bench(BenchCommand::Comm(args)) => bench_comm::comm(args),
        Command::Launch(args) => launch::launch(args),
    }
}
