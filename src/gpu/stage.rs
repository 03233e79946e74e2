//! A pipeline stage's layer range on a GPU, as the actor runtime drives it.
//!
//! The runtime (`crate::runtime`) keeps each chunk's host model — the table and arenas its
//! gradient reducer, ZeRO optimizer shards, checkpoints and fault injection work on — and hands
//! the chunk's compute to a [`DeviceStage`] when the run has a device: forwards and backwards of
//! microbatches run on the GPU and activations and input gradients cross stages as host
//! messages (bf16 from bf16 stages: `crate::runtime::wire`). Every schedule runs this way, zero-bubble ones included (the split backward of
//! `model/split.rs`).
//!
//! Without the distributed optimizer the AdamW update runs on the device as well
//! ([`DeviceStage::adamw`]): the device owns the parameters and moments, and a step without
//! data parallelism moves no gradients or parameters across the bus except the tied
//! embedding's gradient, which the embedding group sums on the host (`Stage::optimizer_step` in
//! `crate::runtime::stage`). With data parallelism the gradients come to the host during the
//! chunk's last backward (for the reducer) and the reduced ones go back up; with the
//! distributed optimizer (ZeRO-1) the shards update on the host and the parameters go up once
//! per step (before the first forward that needs them).

use std::sync::Arc;

use super::model::GpuGpt;
use super::{DType, Dev, Gpu, GpuError, MemoryStats, download_f32};
use crate::models::gpt::{GptConfig, GradRef, Hidden, LayerRange, StageInput};
use crate::optim::AdamWConfig;

/// The compute of one model chunk on a device (object safe, so the runtime holds any GPU).
pub trait DeviceStage: Send {
    /// Forward of microbatch `mb`, as [`GpuGpt::forward_mb`].
    ///
    /// # Errors
    /// As [`GpuGpt::forward_mb`].
    fn forward(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, GpuError>;

    /// Output hidden states of in-flight `mb`, in the stage's storage type (bf16 stays bf16).
    ///
    /// # Errors
    /// Device errors.
    fn output(&self, mb: u64) -> Result<Option<Hidden>, GpuError>;

    /// Backward of `mb`, as [`GpuGpt::backward_mb`]; gradients accumulate on the device. With
    /// `drained`, the backward drains finished gradients as it goes: as soon as it has produced
    /// a range of the arena (the ranges of [`GpuGpt::backward_with`]), the range's accumulated
    /// gradients are copied to the host, handed to `drained(range, values)` and zeroed on the
    /// device — so a data-parallel reducer can start on them while the rest of the backward runs
    /// on the GPU. Ranges never reported (the head's tied `wte` on a head-only stage) stay on
    /// the device for [`DeviceStage::grads`].
    ///
    /// # Errors
    /// As [`GpuGpt::backward_mb`], and whatever `drained` returns.
    fn backward(
        &mut self,
        mb: u64,
        dout: Option<GradRef<'_>>,
        drained: Option<&mut Drained<'_>>,
    ) -> Result<(), GpuError>;

    /// The input half of a split backward (zero-bubble schedules), as
    /// [`GpuGpt::backward_input_mb`].
    ///
    /// # Errors
    /// As [`GpuGpt::backward_input_mb`].
    fn backward_input(&mut self, mb: u64, dout: Option<GradRef<'_>>) -> Result<(), GpuError>;

    /// The weight half of a split backward, as [`GpuGpt::backward_weight_mb`], draining as
    /// [`DeviceStage::backward`] does when `drained` is given.
    ///
    /// # Errors
    /// As [`GpuGpt::backward_weight_mb`], and whatever `drained` returns.
    fn backward_weight(&mut self, mb: u64, drained: Option<&mut Drained<'_>>) -> Result<(), GpuError>;

    /// Gradient of the range input after the latest backward, in the stage's storage type.
    ///
    /// # Errors
    /// No backward ran; device errors.
    fn input_grad(&self) -> Result<Hidden, GpuError>;

    /// Drops `mb`'s activations without a backward.
    fn release(&mut self, mb: u64);

    /// Microbatches holding activations.
    fn in_flight(&self) -> usize;

    /// Replaces the parameters (fp32 host arena, the range's order).
    ///
    /// # Errors
    /// A wrong length; device errors.
    fn set_params(&mut self, host: &[f32]) -> Result<(), GpuError>;

    /// The accumulated parameter gradients of an arena range (fp32, the range's order).
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    fn grads(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>, GpuError>;

    /// Zeroes the accumulated gradients.
    ///
    /// # Errors
    /// Device errors.
    fn zero_grads(&mut self) -> Result<(), GpuError>;

    /// Waits until the device has finished the queued work (so a compute job's measured time,
    /// which traces and the bubble report use, is the device's).
    ///
    /// # Errors
    /// Device errors.
    fn synchronize(&self) -> Result<(), GpuError>;

    /// Overwrites an arena range of the accumulated gradients (reduced or injected values
    /// coming back from the host).
    ///
    /// # Errors
    /// A range outside the arena or a length mismatch; device errors.
    fn set_grads(&mut self, range: std::ops::Range<usize>, values: &[f32]) -> Result<(), GpuError>;

    /// `Σ g²` of each arena range of the gradients (double), as [`GpuGpt::grad_sum_squares`].
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    fn grad_sum_squares(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<Vec<f64>, GpuError>;

    /// One AdamW update numbered `step` of every parameter on the device, gradients scaled by
    /// `grad_scale` first; as [`GpuGpt::adamw_update`].
    ///
    /// # Errors
    /// `step == 0`; device errors.
    fn adamw(&mut self, lr: f32, adam: &AdamWConfig, step: u64, grad_scale: f32) -> Result<(), GpuError>;

    /// The (master) parameters, fp32, in the range's arena order.
    ///
    /// # Errors
    /// Device errors.
    fn params(&self) -> Result<Vec<f32>, GpuError>;

    /// The AdamW moments (m, v), fp32, in arena order.
    ///
    /// # Errors
    /// Device errors.
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>), GpuError>;

    /// Replaces the AdamW moments and update count (resuming from a checkpoint).
    ///
    /// # Errors
    /// Wrong lengths; device errors.
    fn set_moments(&mut self, m: &[f32], v: &[f32], step: u64) -> Result<(), GpuError>;
}

impl<G: Gpu> DeviceStage for GpuGpt<'static, G> {
    fn forward(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, GpuError> {
        self.forward_mb(mb, batch, seq, input, targets, loss_scale)
    }

    fn output(&self, mb: u64) -> Result<Option<Hidden>, GpuError> {
        self.output_native(mb)
    }

    fn backward(
        &mut self,
        mb: u64,
        dout: Option<GradRef<'_>>,
        drained: Option<&mut Drained<'_>>,
    ) -> Result<(), GpuError> {
        match drained {
            None => self.backward_mb_grad(mb, dout, &mut |_, _| Ok(())),
            Some(f) => {
                let gpu = self.gpu();
                self.backward_mb_grad(mb, dout, &mut |range, grads| drain(gpu, range, grads, f))
            }
        }
    }

    fn backward_input(&mut self, mb: u64, dout: Option<GradRef<'_>>) -> Result<(), GpuError> {
        self.backward_input_mb_grad(mb, dout)
    }

    fn backward_weight(&mut self, mb: u64, drained: Option<&mut Drained<'_>>) -> Result<(), GpuError> {
        match drained {
            None => self.backward_weight_mb(mb, &mut |_, _| Ok(())),
            Some(f) => {
                let gpu = self.gpu();
                self.backward_weight_mb(mb, &mut |range, grads| drain(gpu, range, grads, f))
            }
        }
    }

    fn input_grad(&self) -> Result<Hidden, GpuError> {
        self.input_grad_native()
    }

    fn release(&mut self, mb: u64) {
        GpuGpt::release(self, mb);
    }

    fn in_flight(&self) -> usize {
        GpuGpt::in_flight(self)
    }

    fn set_params(&mut self, host: &[f32]) -> Result<(), GpuError> {
        GpuGpt::set_params(self, host)
    }

    fn grads(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>, GpuError> {
        self.grads_range_host(range)
    }

    fn zero_grads(&mut self) -> Result<(), GpuError> {
        GpuGpt::zero_grads(self)
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.gpu().synchronize()
    }

    fn set_grads(&mut self, range: std::ops::Range<usize>, values: &[f32]) -> Result<(), GpuError> {
        self.set_grads_range(range, values)
    }

    fn grad_sum_squares(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<Vec<f64>, GpuError> {
        GpuGpt::grad_sum_squares(self, ranges)
    }

    fn adamw(&mut self, lr: f32, adam: &AdamWConfig, step: u64, grad_scale: f32) -> Result<(), GpuError> {
        self.adamw_update(lr, adam, step, grad_scale)
    }

    fn params(&self) -> Result<Vec<f32>, GpuError> {
        self.params_host()
    }

    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        self.moments_host()
    }

    fn set_moments(&mut self, m: &[f32], v: &[f32], step: u64) -> Result<(), GpuError> {
        self.set_optimizer_state(m, v, step)
    }
}

/// Where [`DeviceStage::backward`] hands drained gradient ranges: the arena range and its values.
pub type Drained<'a> = dyn FnMut(std::ops::Range<usize>, Vec<f32>) -> Result<(), GpuError> + 'a;

/// Copies `range` of the fp32 gradient buffer to the host, zeroes it on the device and hands it
/// to `to`.
fn drain<G: Gpu>(
    gpu: &G,
    range: std::ops::Range<usize>,
    grads: &G::Buf,
    to: &mut Drained<'_>,
) -> Result<(), GpuError> {
    let at = Dev::new(grads).at(range.start, DType::F32);
    let values = download_f32(gpu, at, range.len(), DType::F32)?;
    gpu.zero(at, range.len() * 4)?;
    to(range, values)
}

type MakeStage =
    dyn Fn(&GptConfig, LayerRange, &[f32]) -> Result<Box<dyn DeviceStage>, GpuError> + Send + Sync;

/// Builds the [`DeviceStage`] of a chunk (model config, layer range, initial host parameters)
/// on one device in one precision; what the runtime's `RunOptions::device` holds.
#[derive(Clone)]
pub struct StageFactory {
    make: Arc<MakeStage>,
    dtype: DType,
    memory: Arc<dyn Fn() -> MemoryStats + Send + Sync>,
    describe: String,
}

impl StageFactory {
    /// Stages on `gpu` (which lives as long as the process: leak it, or use a `shared()` one)
    /// in `dtype`.
    pub fn new<G: Gpu + 'static>(gpu: &'static G, dtype: DType) -> Self {
        let describe = format!(
            "{} in {}",
            gpu.describe(),
            match dtype {
                DType::F32 => "fp32",
                DType::Bf16 => "bf16",
            }
        );
        StageFactory {
            make: Arc::new(move |cfg: &GptConfig, range: LayerRange, host: &[f32]| {
                let stage = GpuGpt::from_range_params(gpu, cfg, range, host, dtype)?;
                Ok(Box::new(stage) as Box<dyn DeviceStage>)
            }),
            memory: Arc::new(move || gpu.memory()),
            dtype,
            describe,
        }
    }

    /// The device's memory held in buffers (all stages this factory made, and anything else on
    /// that device).
    pub fn memory(&self) -> MemoryStats {
        (self.memory)()
    }

    /// The precision the stages compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device and precision, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The stage of layer `range` with parameters `host`.
    ///
    /// # Errors
    /// As [`GpuGpt::from_range_params`].
    pub fn make(
        &self,
        cfg: &GptConfig,
        range: LayerRange,
        host: &[f32],
    ) -> Result<Box<dyn DeviceStage>, GpuError> {
        (self.make)(cfg, range, host)
    }
}

impl std::fmt::Debug for StageFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageFactory({})", self.describe)
    }
}
