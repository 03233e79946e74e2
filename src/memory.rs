//! Host memory: what a CPU training run will hold, what the machine has available, and what the
//! process used at its peak.
//!
//! The estimate adds what the model instances, optimizer state and in-flight microbatches of a
//! run allocate (see [`crate::models::gpt::RangeMemory`], whose figures are tested against the
//! allocations). It leaves out what does not grow with the model: the binary, thread stacks,
//! the corpus and tokenizer, message buffers in transit, and short-lived buffers of the kernels.
//! A run that resumes also holds the loaded checkpoint while it restores it.
//!
//! Measured against the peak resident memory (`VmHWM`) of runs on the CPU, the estimate comes
//! within the process's baseline (about 0.1 GiB) plus 10–25 % (see `tests/cli_train.rs`).

use crate::config::Config;
use crate::models::gpt::{LayerRange, RangeMemory};

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes a run holds in one process, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// Parameters (fp32).
    pub weights: u64,
    /// Gradient arenas (and the head's tied-embedding gradient).
    pub grads: u64,
    /// AdamW's two moments (a shard of them under the distributed optimizer).
    pub optimizer: u64,
    /// Activations (and split-backward output gradients) of the microbatches in flight at once.
    pub activations: u64,
    /// Scratch buffers of the model instances.
    pub workspace: u64,
    /// Copies the actor runtime makes while it writes a checkpoint (a rank's parameters and
    /// optimizer state, on their way to the writer); the single-process trainer streams its
    /// arenas to the files and makes none.
    pub checkpoint: u64,
    /// Most microbatches one model instance holds at once.
    pub in_flight: usize,
}

impl MemoryEstimate {
    /// The single-process trainer (`troupe train` without the actor runtime): the whole model,
    /// one microbatch in flight at a time (each one's backward follows its forward).
    pub fn single_rank(cfg: &Config) -> Self {
        let m = &cfg.model;
        let r = RangeMemory::of(m, LayerRange::full(m), cfg.train.micro_batch_size, m.seq_length, false);
        MemoryEstimate {
            weights: r.params,
            grads: r.grads,
            optimizer: 2 * r.params,
            activations: r.acts_per_microbatch,
            workspace: r.scratch,
            checkpoint: 0,
            in_flight: 1,
        }
    }

    /// All of it.
    pub fn total(&self) -> u64 {
        self.weights + self.grads + self.optimizer + self.activations + self.workspace + self.checkpoint
    }

    /// The sum of two (ranks sharing a process); `in_flight` is the larger.
    #[must_use]
    pub fn plus(self, o: MemoryEstimate) -> MemoryEstimate {
        MemoryEstimate {
            weights: self.weights + o.weights,
            grads: self.grads + o.grads,
            optimizer: self.optimizer + o.optimizer,
            activations: self.activations + o.activations,
            workspace: self.workspace + o.workspace,
            checkpoint: self.checkpoint + o.checkpoint,
            in_flight: self.in_flight.max(o.in_flight),
        }
    }

    /// One line: the total and its parts, in GiB.
    pub fn describe(&self) -> String {
        let checkpoint = match self.checkpoint {
            0 => String::new(),
            b => format!(", checkpoint copies {}", gib(b)),
        };
        format!(
            "{} (weights {}, gradients {}, AdamW state {}, activations {} for up to {} microbatch{} in flight, \
             scratch {}{checkpoint})",
            gib(self.total()),
            gib(self.weights),
            gib(self.grads),
            gib(self.optimizer),
            gib(self.activations),
            self.in_flight,
            if self.in_flight == 1 { "" } else { "es" },
            gib(self.workspace)
        )
    }
}

/// `bytes` in GiB with two decimals (three below 0.1 GiB), e.g. `1.25 GiB`.
pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / GIB;
    if g < 0.1 { format!("{g:.3} GiB") } else { format!("{g:.2} GiB") }
}

/// Memory this process may still take, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    /// `MemAvailable in /proc/meminfo` or the control group's limit.
    pub source: &'static str,
}

/// What the machine has available now: `MemAvailable` from `/proc/meminfo`, or, when this
/// process's control group (v2 `memory.max`, v1 `memory.limit_in_bytes`) leaves less, its limit
/// minus the group's anonymous memory. `None` where neither can be read (not Linux).
pub fn available() -> Option<Available> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let host = meminfo
        .as_deref()
        .and_then(|t| meminfo_kib(t, "MemAvailable"))
        .map(|k| Available { bytes: k.saturating_mul(1024), source: "MemAvailable in /proc/meminfo" });
    let group = cgroup_room().map(|bytes| Available { bytes, source: "the control group's memory limit" });
    match (host, group) {
        (Some(h), Some(g)) if g.bytes < h.bytes => Some(g),
        (Some(h), _) => Some(h),
        (None, g) => g,
    }
}

/// A `Key:   123 kB` field of `/proc/meminfo`, in KiB.
fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Limit minus anonymous use of this process's memory control group, where one is set.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let stat_field = |text: &str, key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
        })
    };
    // cgroup v2, then v1 (as seen inside a container: the group is the mount's root).
    let (limit, used) = if let Some(max) = read("/sys/fs/cgroup/memory.max") {
        let limit: u64 = max.trim().parse().ok()?; // "max" when unlimited
        let anon = read("/sys/fs/cgroup/memory.stat").and_then(|t| stat_field(&t, "anon"));
        (limit, anon.or_else(|| read("/sys/fs/cgroup/memory.current")?.trim().parse().ok())?)
    } else {
        let limit: u64 = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?.trim().parse().ok()?;
        let stat = read("/sys/fs/cgroup/memory/memory.stat");
        let rss = stat.as_deref().and_then(|t| stat_field(t, "total_rss").or_else(|| stat_field(t, "rss")));
        (limit, rss.or_else(|| read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?.trim().parse().ok())?)
    };
    // An unlimited v1 group reports a limit near 2^63.
    (limit < (1u64 << 60)).then(|| limit.saturating_sub(used))
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_kib(&status, "VmHWM").map(|k| k.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_by_exact_key() {
        let text = "MemTotal:       24683584 kB\nMemAvailableX:  1 kB\nMemAvailable:   24070752 kB\n";
        assert_eq!(meminfo_kib(text, "MemAvailable"), Some(24_070_752));
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(24_683_584));
        assert_eq!(meminfo_kib(text, "SwapTotal"), None);
    }

    /// The single-rank estimate counts AdamW's two moments and the whole model's arenas; the
    /// activations grow with the microbatch, the weights do not.
    #[test]
    fn single_rank_estimate_scales_as_the_model_does() {
        let toml = "[model]\nvocab_size = 100\nseq_length = 16\nnum_layers = 2\nhidden_size = 32\n\
                    num_attention_heads = 4\n";
        let cfg = Config::from_toml_str(toml, "t", &[]).unwrap();
        let a = MemoryEstimate::single_rank(&cfg);
        assert_eq!(a.weights, 4 * cfg.model.num_params() as u64);
        assert_eq!(a.optimizer, 2 * a.weights);
        assert!(a.grads > a.weights, "the head's tied gradient comes on top");
        let mut big = cfg.clone();
        big.train.micro_batch_size *= 2;
        let b = MemoryEstimate::single_rank(&big);
        assert_eq!(b.weights, a.weights);
        assert_eq!(b.activations, 2 * a.activations);
        assert_eq!(a.plus(b).total(), a.total() + b.total());
        assert!(a.describe().starts_with(&gib(a.total())), "{}", a.describe());
    }

    #[test]
    fn this_machine_reports_its_memory() {
        if !cfg!(target_os = "linux") {
            eprintln!("skipped: /proc is Linux-only");
            return;
        }
        let avail = available().expect("MemAvailable");
        assert!(avail.bytes > 0);
        let peak = peak_rss().expect("VmHWM");
        assert!(peak > 0);
    }
}
