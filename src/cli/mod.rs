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
    /// NCCL library (file or directory) for --device cuda, e.g. pip's
    /// site-packages/nvidia/nccl/lib (default: $TROUPE_NCCL_LIB, else the library path).
    #[arg(long, global = true, value_name = "PATH")]
    pub nccl_lib: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a GPT (default: the embedded Shakespeare run; see config/default.toml).
    // A flag given twice takes its last value, as Megatron's argparse does (scripts append
    // overrides to a shared list of arguments).
    #[command(args_override_self = true)]
    Train(Box<train::TrainArgs>),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Sample text from a checkpoint (KV-cached decoding).
    Generate(generate::GenerateArgs),
    /// Write a checkpoint as a Hugging Face GPT-2 directory (transformers' from_pretrained loads it).
    Export(hf::ExportArgs),
    /// Read a Hugging Face GPT-2 directory into a checkpoint at step 0 to train on from.
    Import(Box<hf::ImportArgs>),
    /// Draw loss and learning-rate curves of runs (--log-json files, TensorBoard directories).
    Plot(plot::PlotArgs),
    /// Benchmarks (training throughput against the PyTorch peer, kernels).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Tokenize a corpus into a Megatron indexed dataset (.bin/.idx).
    Preprocess(preprocess::PreprocessArgs),
    /// Tokenizer tools (train a BPE or WordPiece tokenizer locally).
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Pipeline schedules: print, validate and simulate them.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Traces: replay under other schedules, render timelines.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Start this node's ranks with a torchrun-compatible environment.
    Launch(launch::LaunchArgs),
    /// What this machine offers the GPU path: driver, GPUs, NVRTC, cuBLASLt, NCCL, the emulator.
    Device(device::DeviceArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print, as TOML, the configuration `troupe train` resolves from the same command line (any
    /// train option is accepted).
    #[command(args_override_self = true)]
    Show(Box<train::ConfigShowArgs>),
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Generate a schedule, print it (text, json, svg, png, chrome, trace) and its simulated stats.
    Show(schedule::ShowArgs),
    /// Validate a hand-written program (text or JSON) and simulate it.
    Check(schedule::CheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Estimate costs from a trace and compare its schedule with others.
    Replay(trace::ReplayArgs),
    /// Draw a trace as a timeline (svg, png) or convert it to Chrome JSON.
    Render(trace::RenderArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) and print one JSON line.
    Train(bench::TrainBenchArgs),
    /// Preprocessing throughput against the raw tokenizer encode, same text and workers.
    Preprocess(bench_preprocess::PreprocessBenchArgs),
    /// Time a collective over sizes (algbw/busbw like nccl-tests) against the machine's reference.
    Comm(bench_comm::CommBenchArgs),
    /// The fault matrix: inject every fault kind in every phase and report detection,
    /// attribution and recovery.
    Faults(bench::FaultBenchArgs),
}

mod bench;
mod bench_comm;
mod bench_preprocess;
mod device;
mod eval_only;
mod generate;
mod hf;
mod launch;
pub(crate) mod megatron;
mod plot;
mod preprocess;
mod schedule;
mod tokenizer;
mod trace;
mod train;
mod train_parallel;

impl Cli {
    /// Hands the flags [`megatron::port`] took out of the command line to the command that
    /// resolves a config.
    pub fn attach(&mut self, ported: megatron::Ported) {
        match &mut self.command {
            Command::Train(t) => t.cfg.ported = ported,
            Command::Config(ConfigCommand::Show(s)) => s.train.cfg.ported = ported,
            _ => {}
        }
    }
}

/// `n` and the noun, plural unless `n` is 1: `1 step`, `2 steps`.
pub(crate) fn count(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// Exit code for an error: 2 for bad user input (config, arguments), 3 when the launcher gave
/// up restarting, 4 for a rank that failed because a peer did, 130 when the launcher was
/// signalled twice and killed its ranks, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.downcast_ref::<UsageError>().is_some()) {
        2
    } else if err.chain().any(|e| e.downcast_ref::<launch::Interrupted>().is_some()) {
        130
    } else if err.chain().any(|e| e.downcast_ref::<launch::GaveUp>().is_some()) {
        3
    } else if err
        .chain()
        .any(|e| e.downcast_ref::<troupe::runtime::RuntimeError>().is_some_and(|r| r.is_consequence()))
    {
        // This rank failed because a peer did (lost or silent): the launcher looks elsewhere
        // for the root cause.
        4
    } else {
        1
    }
}

/// The error and its causes on one line, `outer: cause: cause`, leaving out a cause whose text
/// the line already holds (library errors name their cause in their own message as well).
pub fn render(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Advice for an error whose cause has a usual remedy, printed after it.
pub fn hint(err: &anyhow::Error) -> Option<&'static str> {
    let text = render(err);
    if text.contains("allocating device memory") && text.contains("out of memory") {
        return Some(
            "the GPU ran out of memory: lower --micro-batch-size (the same --global-batch-size then runs as \
             more microbatches), use --dtype bf16, or split the model over GPUs with \
             --pipeline-model-parallel-size",
        );
    }
    let full = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
    });
    (full || text.contains("No space left on device")).then_some(
        "the disk is full: free space where the files go, or point them elsewhere (for checkpoints: \
         --save; a run resumes from its last complete checkpoint with --load)",
    )
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
    // Colours only on a terminal: a launcher's prefixed lines or a log file get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let nccl = cli.nccl_lib.clone().or_else(|| std::env::var_os("TROUPE_NCCL_LIB").map(Into::into));
    match (&nccl, &cli.command) {
        // The launcher hands the path to its ranks, which make the library loadable themselves.
        // SAFETY: nothing else runs yet (no threads), so changing the environment is sound.
        (Some(path), Command::Launch(_)) => unsafe { std::env::set_var("TROUPE_NCCL_LIB", path) },
        (Some(path), _) => device::ensure_nccl(path)?,
        (None, _) => {}
    }
    match cli.command {
        Command::Train(args) => train::train(*args),
        Command::Config(ConfigCommand::Show(args)) => train::config_show(*args),
        Command::Generate(args) => generate::generate(args),
        Command::Plot(args) => plot::plot(args),
        Command::Bench(BenchCommand::Train(args)) => bench::train(args),
        Command::Bench(BenchCommand::Preprocess(args)) => bench_preprocess::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Tokenizer(command) => tokenizer::run(command),
        Command::Schedule(ScheduleCommand::Show(args)) => schedule::show(args),
        Command::Schedule(ScheduleCommand::Check(args)) => schedule::check(args),
        Command::Trace(TraceCommand::Replay(args)) => trace::replay_cmd(args),
        Command::Trace(TraceCommand::Render(args)) => trace::render(args),
        Command::Bench(BenchCommand::Comm(args)) => bench_comm::comm(args),
        Command::Bench(BenchCommand::Faults(args)) => bench::faults(args),
        Command::Launch(args) => launch::launch(args),
        Command::Device(args) => device::run(args),
        Command::Export(args) => hf::export(args),
        Command::Import(args) => hf::import(*args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_plural_unless_one() {
        assert_eq!(super::count(1u64, "step"), "1 step");
        assert_eq!(super::count(0u64, "step"), "0 steps");
        assert_eq!(super::count(12u64, "step"), "12 steps");
    }

    /// A cause the message already names is not repeated; one it does not name is appended.
    #[test]
    fn an_error_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let named = troupe::checkpoint::CheckpointError::Io { op: "write", path: "c/m".into(), source: io };
        let err = anyhow::Error::new(named).context("step 2");
        let text = super::render(&err);
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
        assert!(text.starts_with("step 2: checkpoint I/O: write c/m"), "{text}");
        assert!(super::hint(&err).is_some_and(|h| h.contains("disk is full")));
        let err = anyhow::Error::new(std::io::Error::other("lost")).context("reading x");
        assert_eq!(super::render(&err), "reading x: lost");
        assert_eq!(super::hint(&err), None);
    }

    fn train_args(args: &[&str]) -> Box<super::train::TrainArgs> {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["troupe", "train"].iter().chain(args)).expect("parses");
        match cli.command {
            super::Command::Train(t) => t,
            other => panic!("not train: {other:?}"),
        }
    }

    /// Every Megatron-named flag is a `troupe train` flag setting one key, a key the config has
    /// (an unknown one would be refused by the config's `deny_unknown_fields`, whatever the value).
    #[test]
    fn every_megatron_flag_is_accepted_and_sets_its_key() {
        let flags = super::train::FLAG_KEYS.iter().chain(&[
            ("data-path", "data.data_path"),
            ("train-data-path", "data.train_data_path"),
            ("valid-data-path", "data.valid_data_path"),
            ("test-data-path", "data.test_data_path"),
        ]);
        for (flag, key) in flags {
            let long = format!("--{flag}");
            let sets = train_args(&[&long, "7"]).cfg.megatron.to_sets();
            assert_eq!(sets.len(), 1, "{flag}: {sets:?}");
            assert!(sets[0].starts_with(&format!("{key}=")), "{flag}: {sets:?}");
            let err = troupe::config::Config::from_toml_str(super::train::DEFAULT_CONFIG, "default", &sets)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.contains("unknown key"), "--{flag} sets {key}, which the config lacks: {err}");
        }
    }

    /// The flags' help names the key each sets.
    #[test]
    fn the_flags_help_names_the_keys_they_set() {
        let help = {
            use clap::CommandFactory;
            let mut cmd = super::Cli::command();
            cmd.find_subcommand_mut("train").expect("train").render_long_help().to_string()
        };
        for (flag, key) in super::train::FLAG_KEYS {
            let line = help
                .lines()
                .skip_while(|l| !l.trim_start().starts_with(&format!("--{flag} ")))
                .nth(1)
                .unwrap_or("");
            assert!(line.contains(&format!("`{key}`")), "--{flag}'s help does not name {key}: {line:?}");
        }
        // A negative value is a value, as in Megatron's argparse; the config then judges it.
        let err = train_args(&["--lr", "-1"]).cfg.resolve(&[]).expect_err("negative lr");
        assert!(err.to_string().contains("train.lr = -1"), "{err}");
    }

    /// A flag given twice takes its last value, as Megatron's argparse does (scripts append
    /// overrides to shared argument lists); repeatable options still collect every value.
    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        let t = train_args(&[
            "--lr",
            "1",
            "--lr",
            "2",
            "--set",
            "train.seed=5",
            "--set",
            "train.min_lr=0.5",
            "--inject",
            "crash:rank=0,step=1",
            "--inject",
            "exit:rank=1,step=2",
            "--data-path",
            "a",
            "--data-path",
            "b",
            "c",
            "--threads",
            "1",
            "--threads",
            "2",
        ]);
        assert_eq!(t.cfg.megatron.to_sets(), ["data.data_path=\"b c\"", "train.lr=2"]);
        assert_eq!(t.cfg.sets, ["train.seed=5", "train.min_lr=0.5"]);
        assert_eq!(t.runtime.inject.len(), 2);
        assert_eq!(t.threads, Some(2));
    }

    /// `--data-path` takes Megatron's forms: one prefix, or weights and prefixes as separate words.
    #[test]
    fn data_path_takes_a_blend_as_separate_words() {
        let t = train_args(&["--data-path", "0.3", "data/a_text_document", "0.7", "data/b", "--lr", "1e-3"]);
        let cfg = t.cfg.resolve(&[]).expect("resolves");
        assert_eq!(cfg.data.data_path, ["0.3", "data/a_text_document", "0.7", "data/b"]);
        assert!((cfg.train.lr - 1e-3).abs() < 1e-9);
        // A prefix that looks like a number stays a path.
        let cfg = train_args(&["--data-path", "123"]).cfg.resolve(&[]).expect("resolves");
        assert_eq!(cfg.data.data_path, ["123"]);
        // Each split's own data, in the same forms; not together with --data-path.
        let t =
            train_args(&["--train-data-path", "0.5", "a", "0.5", "b", "--valid-data-path", "v", "--lr", "1"]);
        let cfg = t.cfg.resolve(&[]).expect("resolves");
        assert_eq!(cfg.data.train_data_path, ["0.5", "a", "0.5", "b"]);
        assert_eq!(
            (cfg.data.valid_data_path.as_slice(), cfg.data.test_data_path.len()),
            (&["v".to_string()][..], 0)
        );
        let err = train_args(&["--data-path", "a", "--train-data-path", "b"]).cfg.resolve(&[]).unwrap_err();
        assert!(format!("{err:#}").contains("data.data_path"), "{err:#}");
        let err = train_args(&["--valid-data-path", "v"]).cfg.resolve(&[]).unwrap_err();
        assert!(format!("{err:#}").contains("data.train_data_path"), "{err:#}");
    }
}
