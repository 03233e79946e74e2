//! `troupe bench train`: placeholder until the model lands.

#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    /// Model/training config (TOML).
    #[arg(long)]
    pub config: std::path::PathBuf,
}

pub fn train(_args: TrainBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
