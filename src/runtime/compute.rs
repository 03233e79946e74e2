//! The compute thread of a rank: it owns the rank's model chunks and the kernel backend, and runs
//! jobs strictly in ticket order — the order of the compute instructions in the rank's program —
//! whichever actor submits them first. Actors await the result on a oneshot channel, so no tokio
//! worker ever blocks on a matrix product. A panic inside a job is caught and reported as an error
//! naming the job; the thread keeps serving.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::kernels::Backend;

use super::plan::Bucket;
use super::stage::Stage;

/// A finished bucket of gradients, handed to the data-parallel reducer.
#[derive(Debug)]
pub struct ReadyBucket {
    pub chunk: usize,
    pub index: usize,
    pub range: std::ops::Range<usize>,
    pub data: Vec<f32>,
}

/// What the compute thread owns.
pub struct Engine {
    pub be: Box<dyn Backend + Send>,
    pub chunks: Vec<Stage>,
    /// Microbatches per step (the last weight-producing backward of a chunk is number m).
    pub microbatches: usize,
    /// Buckets of each chunk (see [`super::plan::buckets`]).
    pub buckets: Vec<Vec<Bucket>>,
    /// Where finished buckets go (`None` without data parallelism, or when the chunks reduce
    /// on their device).
    pub bucket_tx: Option<Box<dyn Fn(ReadyBucket) + Send>>,
    /// The gradients are summed over a data-parallel group (on the host through `bucket_tx`, or
    /// on the device by the chunks themselves).
    pub reduce: bool,
    /// Per chunk, this step: weight-gradient backwards done (B or W) and buckets handed over.
    pub weight_done: Vec<usize>,
    pub handed: Vec<Vec<bool>>,
    /// Per chunk, this step: largest number of microbatches holding activations.
    pub peak_in_flight: Vec<usize>,
    /// A non-finite gradient was found this step (and kept out of every collective).
    pub nonfinite: bool,
}

/// `data`, or zeros with `flag` raised when it holds NaN or Inf: a non-finite gradient never
/// enters a collective; the step-end agreement then skips or aborts the step on every rank.
pub fn finite_or_zero(mut data: Vec<f32>, flag: &mut bool) -> Vec<f32> {
    if data.iter().any(|x| !x.is_finite()) {
        *flag = true;
        data.fill(0.0);
    }
    data
}

impl Engine {
    pub fn new_step(&mut self) {
        self.weight_done.iter_mut().for_each(|d| *d = 0);
        self.handed.iter_mut().for_each(|h| h.iter_mut().for_each(|x| *x = false));
        self.peak_in_flight.iter_mut().for_each(|p| *p = 0);
        self.nonfinite = false;
        self.chunks.iter_mut().for_each(Stage::zero_grads);
    }

    pub fn note_in_flight(&mut self, chunk: usize) {
        let n = self.chunks[chunk].in_flight();
        self.peak_in_flight[chunk] = self.peak_in_flight[chunk].max(n);
    }

    /// Hands every not-yet-handed bucket of `chunk` (with the tied `wte`) to the reducer, from
    /// the chunk's current gradients.
    pub fn hand_remaining_buckets(&mut self, chunk: usize) {
        let Engine { chunks, buckets, bucket_tx, handed, nonfinite, .. } = self;
        let Some(tx) = bucket_tx.as_ref() else { return };
        let arena = chunks[chunk].grads();
        for (index, b) in buckets[chunk].iter().enumerate() {
            if !handed[chunk][index] {
                handed[chunk][index] = true;
                let data = finite_or_zero(arena[b.range.clone()].to_vec(), nonfinite);
                tx(ReadyBucket { chunk, index, range: b.range.clone(), data });
            }
        }
    }
}

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// Handle to a rank's compute thread.
pub struct Compute {
    /// Total time jobs waited for their turn after submission.
    pub queued_ns: std::sync::atomic::AtomicU64,
    tx: Option<mpsc::Sender<(u64, Job)>>,
    thread: Option<JoinHandle<()>>,
}

/// Why a job produced no result.
#[derive(Debug)]
pub enum JobError {
    /// The job panicked; the text is the panic message.
    Panicked(String),
    /// The compute thread is gone.
    Gone,
}

impl Compute {
    /// Starts the thread (named `troupe-compute-<rank>`).
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn start(rank: usize, engine: Engine) -> std::io::Result<Compute> {
        let (tx, rx) = mpsc::channel::<(u64, Job)>();
        let thread = std::thread::Builder::new().name(format!("troupe-compute-{rank}")).spawn(move || {
            let mut engine = engine;
            let mut waiting: BTreeMap<u64, Job> = BTreeMap::new();
            let mut next = 0u64;
            while let Ok((ticket, job)) = rx.recv() {
                waiting.insert(ticket, job);
                while let Some(job) = waiting.remove(&next) {
                    job(&mut engine);
                    next += 1;
                }
            }
        })?;
        Ok(Compute { queued_ns: std::sync::atomic::AtomicU64::new(0), tx: Some(tx), thread: Some(thread) })
    }

    /// Runs `f` as job number `ticket` (tickets start at 0 and must all be used, in any
    /// submission order); returns its result and the job's start and end time. The time between
    /// this call and the job's start (waiting for earlier tickets) is added to `queued_ns`.
    ///
    /// # Errors
    /// [`JobError`] when the job panics or the thread is gone.
    pub async fn run<R: Send + 'static>(
        &self,
        ticket: u64,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<(R, Instant, Instant), JobError> {
        let submitted = Instant::now();
        let r = self.run_inner(ticket, f).await;
        if let Ok((_, start, _)) = &r {
            let q = start.saturating_duration_since(submitted).as_nanos() as u64;
            self.queued_ns.fetch_add(q, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    async fn run_inner<R: Send + 'static>(
        &self,
        ticket: u64,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<(R, Instant, Instant), JobError> {
        let (otx, orx) = oneshot::channel();
        let job: Job = Box::new(move |e: &mut Engine| {
            let start = Instant::now();
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(e)));
            let end = Instant::now();
            let _ = otx.send(r.map(|r| (r, start, end)).map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "unknown panic".into())
            }));
        });
        self.tx.as_ref().ok_or(JobError::Gone)?.send((ticket, job)).map_err(|_| JobError::Gone)?;
        match orx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(msg)) => Err(JobError::Panicked(msg)),
            Err(_) => Err(JobError::Gone),
        }
    }
}

impl Drop for Compute {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
