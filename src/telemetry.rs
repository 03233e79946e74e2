//! Telemetry: training metrics recorded through the `metrics` facade and served over HTTP in the
//! Prometheus text format by `metrics-exporter-prometheus`.
//!
//! The recording helpers ([`record_step`], [`add_bytes_sent`], …) go to whatever recorder is
//! installed; with none (the default) the `metrics` crate routes them to a no-op recorder, so a
//! run without `--metrics-port` pays only for building the labels. Every series carries a `rank`
//! label (the world rank as a decimal string); byte and message counters also carry `kind`, queue
//! depths carry `actor`.
//!
//! Naming: counters end in `_total`; the unit is part of the name (`_seconds`, `_bytes`), so the
//! exporter's unit-suffix option stays off.
//!
//! The `metrics` recorder is process-global by design of that crate. [`serve_prometheus`] is the
//! one place that installs it, and it remembers the address it serves on so that a second call is
//! refused with an error naming both addresses, before anything is bound.

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
use std::net::SocketAddr;
use std::sync::Mutex;

/// Why the Prometheus exporter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// [`serve_prometheus`] already succeeded in this process.
    #[error("metrics are already served on {serving}; cannot also serve them on {addr}")]
    AlreadyServing {
        /// The address of the refused call.
        addr: SocketAddr,
        /// The address the running exporter listens on.
        serving: SocketAddr,
    },
    /// Some other code installed a global `metrics` recorder first.
    #[error("cannot serve metrics on {addr}: another global metrics recorder is already installed")]
    RecorderTaken {
        /// The address of the refused call.
        addr: SocketAddr,
    },
    /// The HTTP listener could not bind (port in use, address not local, no permission).
    #[error("cannot listen for metrics on {addr}: {reason}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The operating system's reason.
        reason: String,
    },
    /// The exporter's runtime or its serving thread could not be created.
    #[error("cannot start the metrics exporter for {addr}: {source}")]
    Runtime {
        /// The address the exporter was to serve on.
        addr: SocketAddr,
        /// The underlying failure.
        source: std::io::Error,
    },
    /// Any other exporter build failure.
    #[error("cannot build the metrics exporter for {addr}: {source}")]
    Exporter {
        /// The address the exporter was to serve on.
        addr: SocketAddr,
        /// The exporter's error.
        source: BuildError,
    },
}

/// One optimizer step's numbers, as [`record_step`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepMetrics {
    /// Step index (the optimizer step this record describes).
    pub step: u64,
    /// Training loss of the step (mean over its tokens).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed per second of wall time in this step.
    pub tokens_per_second: f64,
    /// Fraction of the step this rank spent idle in the pipeline bubble, in `[0, 1]`.
    pub bubble_fraction: f64,
    /// Wall time of the step in seconds.
    pub step_seconds: f64,
    /// Whether the update was skipped (for example non-finite gradients).
    pub skipped: bool,
}

const LOSS: &str = "troupe_loss";
const GRAD_NORM: &str = "troupe_grad_norm";
const TOKENS_PER_SECOND: &str = "troupe_tokens_per_second";
const BUBBLE_FRACTION: &str = "troupe_bubble_fraction";
const STEP_DURATION: &str = "troupe_step_duration_seconds";
const STEP: &str = "troupe_step";
const STEPS_TOTAL: &str = "troupe_steps_total";
const SKIPPED_STEPS_TOTAL: &str = "troupe_skipped_steps_total";
const SENT_BYTES_TOTAL: &str = "troupe_sent_bytes_total";
const MESSAGES_TOTAL: &str = "troupe_messages_total";
const INSTRUCTIONS_TOTAL: &str = "troupe_instructions_total";
const QUEUE_DEPTH: &str = "troupe_queue_depth";
const OPTIMIZER_STATE_BYTES: &str = "troupe_optimizer_state_bytes";
const STRAGGLER_RATIO: &str = "troupe_straggler_ratio";
const NONFINITE_TOTAL: &str = "troupe_nonfinite_steps_total";

/// The address the installed exporter serves on, `None` until [`serve_prometheus`] succeeds.
/// Held across the whole install so concurrent calls cannot both bind.
static SERVING: Mutex<Option<SocketAddr>> = Mutex::new(None);

/// Installs the process-global Prometheus recorder and serves `GET /metrics` on `addr` from a
/// dedicated background thread (its own single-threaded tokio runtime, so callers need none), then
/// registers the metric descriptions ([`describe`]).
///
/// The listener is bound before this returns, so a scrape may connect as soon as it does.
///
/// # Errors
/// [`TelemetryError::AlreadyServing`] on a second successful-looking call (nothing is bound),
/// [`TelemetryError::Bind`] when `addr` cannot be bound (for example the port is in use),
/// [`TelemetryError::RecorderTaken`] when another global `metrics` recorder exists (the listener
/// just bound is closed again), and [`TelemetryError::Runtime`]/[`TelemetryError::Exporter`] for
/// failures to start the exporter itself.
pub fn serve_prometheus(addr: SocketAddr) -> Result<(), TelemetryError> {
    // A poisoned lock only means another caller panicked mid-install; the Option is still valid.
    let mut serving = SERVING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(serving) = *serving {
        return Err(TelemetryError::AlreadyServing { addr, serving });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| TelemetryError::Runtime { addr, source })?;
    // `build` binds the listener and spawns the upkeep task on the runtime entered here.
    let (recorder, exporter) = {
        let _guard = runtime.enter();
        PrometheusBuilder::new().with_http_listener(addr).build().map_err(|e| match e {
            BuildError::FailedToCreateHTTPListener(reason) => TelemetryError::Bind { addr, reason },
            source => TelemetryError::Exporter { addr, source },
        })?
    };
    // Install before spawning the server: if the global slot is taken, dropping `exporter` and
    // `runtime` closes the listener instead of leaving an orphan endpoint serving nothing.
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::RecorderTaken { addr })?;
    std::thread::Builder::new()
        .name("troupe-metrics".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(exporter) {
                tracing::warn!(%addr, "metrics exporter stopped: {e:?}");
            }
        })
        .map_err(|source| TelemetryError::Runtime { addr, source })?;
    *serving = Some(addr);
    drop(serving);
    describe();
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// Registers help text and units for every troupe metric with the installed recorder. Called by
/// [`serve_prometheus`]; call it again after installing some other recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(LOSS, "Training loss of the last step.");
    describe_gauge!(GRAD_NORM, "Global gradient norm of the last step, before clipping.");
    describe_gauge!(TOKENS_PER_SECOND, Unit::CountPerSecond, "Tokens processed per second in the last step.");
    describe_gauge!(
        BUBBLE_FRACTION,
        "Fraction (0 to 1) of the last step this rank spent idle in the pipeline bubble."
    );
    describe_gauge!(STEP_DURATION, Unit::Seconds, "Wall time of the last step.");
    describe_gauge!(STEP, Unit::Count, "Index of the last recorded step.");
    describe_counter!(STEPS_TOTAL, Unit::Count, "Steps recorded, skipped ones included.");
    describe_counter!(SKIPPED_STEPS_TOTAL, Unit::Count, "Steps whose optimizer update was skipped.");
    describe_counter!(
        SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes sent to other ranks, by kind (activation, gradient, collective)."
    );
    describe_counter!(MESSAGES_TOTAL, Unit::Count, "Messages sent to other ranks, by kind.");
    describe_counter!(INSTRUCTIONS_TOTAL, Unit::Count, "Schedule instructions executed.");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Messages waiting in an actor's mailbox or buffer.");
    describe_gauge!(OPTIMIZER_STATE_BYTES, Unit::Bytes, "Bytes of optimizer state held by this rank.");
    describe_gauge!(
        STRAGGLER_RATIO,
        "The rank most behind in the last step (label `slowest`): its compute time over the smaller of its data-parallel peers' and its own best step's."
    );
    describe_counter!(NONFINITE_TOTAL, "Steps in which this rank found a non-finite loss or gradient.");
}

/// Reports one step: sets the per-step gauges and counts the step (and whether it was skipped).
/// The skipped counter is touched even for a normal step so its series exists from the start.
pub fn record_step(rank: usize, s: &StepMetrics) {
    let rank = rank.to_string();
    metrics::gauge!(LOSS, "rank" => rank.clone()).set(f64::from(s.loss));
    metrics::gauge!(GRAD_NORM, "rank" => rank.clone()).set(s.grad_norm);
    metrics::gauge!(TOKENS_PER_SECOND, "rank" => rank.clone()).set(s.tokens_per_second);
    metrics::gauge!(BUBBLE_FRACTION, "rank" => rank.clone()).set(s.bubble_fraction);
    metrics::gauge!(STEP_DURATION, "rank" => rank.clone()).set(s.step_seconds);
    // Exact up to 2^53 steps.
    metrics::gauge!(STEP, "rank" => rank.clone()).set(s.step as f64);
    metrics::counter!(STEPS_TOTAL, "rank" => rank.clone()).increment(1);
    metrics::counter!(SKIPPED_STEPS_TOTAL, "rank" => rank).increment(u64::from(s.skipped));
}

/// Counts `bytes` sent by `rank`; `kind` is `"activation"`, `"gradient"` or `"collective"`.
pub fn add_bytes_sent(rank: usize, kind: &'static str, bytes: u64) {
    metrics::counter!(SENT_BYTES_TOTAL, "rank" => rank.to_string(), "kind" => kind).increment(bytes);
}

/// Counts `n` messages sent by `rank`, of the same kinds as [`add_bytes_sent`].
pub fn add_messages(rank: usize, kind: &'static str, n: u64) {
    metrics::counter!(MESSAGES_TOTAL, "rank" => rank.to_string(), "kind" => kind).increment(n);
}

/// Counts `n` schedule instructions executed by `rank`.
pub fn add_instructions(rank: usize, n: u64) {
    metrics::counter!(INSTRUCTIONS_TOTAL, "rank" => rank.to_string()).increment(n);
}

/// Sets how many messages wait in `actor`'s mailbox or buffer on `rank`.
pub fn set_queue_depth(rank: usize, actor: &'static str, depth: usize) {
    metrics::gauge!(QUEUE_DEPTH, "rank" => rank.to_string(), "actor" => actor).set(depth as f64);
}

/// Sets the bytes of optimizer state `rank` holds (its shard under ZeRO).
pub fn set_optimizer_state_bytes(rank: usize, bytes: u64) {
    metrics::gauge!(OPTIMIZER_STATE_BYTES, "rank" => rank.to_string()).set(bytes as f64);
}

/// Names the rank most behind in the last step (`slowest`) and its compute time over the smaller
/// of its data-parallel peers' and its own best step's.
pub fn set_straggler(rank: usize, slowest: usize, ratio: f64) {
    metrics::gauge!(STRAGGLER_RATIO, "rank" => rank.to_string(), "slowest" => slowest.to_string()).set(ratio);
}

/// Counts a step in which `rank` found a non-finite loss or gradient.
pub fn add_nonfinite_step(rank: usize) {
    metrics::counter!(NONFINITE_TOTAL, "rank" => rank.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no recorder installed every helper is a no-op and must not panic.
    #[test]
    fn helpers_are_noops_without_a_recorder() {
        record_step(3, &StepMetrics { step: 7, loss: f32::NAN, skipped: true, ..StepMetrics::default() });
        add_bytes_sent(3, "activation", 1 << 20);
        add_messages(3, "gradient", 2);
        add_instructions(3, 10);
        set_queue_depth(3, "stage", 4);
        set_optimizer_state_bytes(3, 1 << 30);
        describe();
    }
}
