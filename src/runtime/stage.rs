//! A model chunk as the runtime holds it: the host [`Gpt`] (parameters, gradients, the table the
//! reducer, optimizer shard and checkpoints work on) and, on a GPU run, the chunk's
//! [`DeviceStage`] that does its forwards and backwards (see `crate::gpu::stage`).
//!
//! [`Stage`] dereferences to the host model, so the runtime reads and writes parameters and
//! gradients as on the CPU; any mutable access marks the host parameters as newer than the
//! device's, and the next device forward uploads them first. The compute calls (`forward`,
//! `backward_with`, `output`, `input_grad`, …) are the stage's own and go to the device when
//! there is one.
//!
//! Where the step's gradients go after the chunk's last backward ([`Stage::finish_grads`]):
//! - with a device group ([`Stage::with_device_group`]: data parallelism, optimizer on the
//!   device): nowhere; the last backward queues each finished range's sum over the group on
//!   the device (with the distributed optimizer, [`Stage::shard_optimizer`]: each finished
//!   bucket's parts reduced to their owners), `finish_grads` the rest, and every read waits for
//!   them;
//! - with data parallelism through the host, or the optimizer on the host: added into the host
//!   arena (most of them during that backward, range by range as it finishes them, so the
//!   data-parallel reduction overlaps the rest of the backward: [`Stage::backward_report`];
//!   adding keeps a gradient the host already holds, an injected NaN);
//! - with the optimizer on the device and no data parallelism: nowhere; [`Stage::read_grads`],
//!   [`Stage::write_grads`] (the tied embedding's sum) and [`Stage::grad_sum_squares`] (the
//!   global norm) work on them in place.
//!
//! [`Stage::optimizer_step`] then updates on the host (the device gets the parameters before
//! its next forward) or on the device (host gradients go up first if the reducer left them on
//! the host; a sharded device optimizer gathers the other ranks' shards over the device group;
//! the host parameters are stale until [`Stage::pull_params`], which checkpoints and the end of
//! the run call; the moments are read with [`Stage::optimizer_state_into`]).

use std::ops::{Deref, DerefMut};

use crate::gpu::stage::{DeviceStage, Finished, StageFactory};
use crate::kernels::Backend;
use crate::models::gpt::{Gpt, GradRef, Hidden, ModelError, StageInput};
use crate::optim::AdamWConfig;

use super::shard::ChunkShard;

/// See the module docs.
pub struct Stage {
    host: Gpt,
    dev: Option<Box<dyn DeviceStage>>,
    /// The host parameters changed since the device last got them.
    params_dirty: bool,
    /// The device gradients must be zeroed before the next backward.
    dev_zero: bool,
    /// The device holds gradients not yet added into the host arena.
    dev_grads: bool,
    /// The device's latest input gradient, on the host (in the device's storage type).
    dinput: Hidden,
    /// Arena ranges drained to the host since the last sync (zero on the device).
    drained: Vec<std::ops::Range<usize>>,
    /// AdamW runs on the device (which then owns the parameters and moments).
    optimizer_on_device: bool,
    /// This step's gradients stay on the device (the host arena's are stale).
    grads_on_device: bool,
    /// The device's parameters are newer than the host's (after a device update).
    host_params_stale: bool,
    /// An injected non-finite gradient for the device's arena (see [`Stage::poison_grad`]).
    poison: Option<f32>,
    /// The step's last backward sums the gradients over the data-parallel group on the device
    /// (a device group: [`Stage::with_device_group`]) instead of draining them to the host.
    reduce_on_device: bool,
    /// When the backward that queues this step's device reductions began, and when they were
    /// all done.
    reduce_span: (Option<std::time::Instant>, Option<std::time::Instant>),
    /// The distributed optimizer on the device: this rank's shard of the arena
    /// ([`Stage::shard_optimizer`]).
    opt_shard: Option<Vec<std::ops::Range<usize>>>,
    /// Microbatches whose loss the device keeps until [`Stage::take_losses`], in forward order,
    /// each with an injected value to report instead.
    deferred: Vec<(u64, Option<f32>)>,
    /// The previous stage is on another rank, linked on the device ([`Stage::set_links`]).
    input_grad_linked: bool,
    /// The input gradient of each backward stays on the device for the link instead of
    /// coming to the host (this step's messages use the links: [`Stage::use_links`]).
    keep_input_grad: bool,
}

fn dev_err(e: crate::gpu::GpuError) -> ModelError {
    ModelError::Device(e.to_string())
}

/// Gives `dev` the host parameters if they changed since it last got them (`dirty`).
fn push_params(dev: &mut dyn DeviceStage, host: &Gpt, dirty: &mut bool) -> Result<(), ModelError> {
    if std::mem::take(dirty) {
        dev.set_params(host.params()).map_err(|e| {
            *dirty = true;
            dev_err(e)
        })?;
    }
    Ok(())
}

impl Stage {
    /// The chunk `host`, computing on the CPU.
    pub fn cpu(host: Gpt) -> Self {
        Stage {
            host,
            dev: None,
            params_dirty: false,
            dev_zero: false,
            dev_grads: false,
            dinput: Hidden::default(),
            drained: Vec::new(),
            optimizer_on_device: false,
            grads_on_device: false,
            host_params_stale: false,
            poison: None,
            reduce_on_device: false,
            reduce_span: (None, None),
            opt_shard: None,
            deferred: Vec::new(),
            input_grad_linked: false,
            keep_input_grad: false,
        }
    }

    /// The chunk `host` with its compute on the device `factory` makes (from the host's
    /// current parameters), or on the CPU without a factory.
    ///
    /// With `optimizer_on_device` (and a device) the AdamW update runs on the device too, which
    /// then owns the parameters and moments: see [`Stage::optimizer_step`].
    ///
    /// # Errors
    /// The device stage cannot be built (an unsupported shape, out of device memory).
    pub fn with_optimizer(
        host: Gpt,
        factory: Option<&StageFactory>,
        optimizer_on_device: bool,
    ) -> Result<Self, ModelError> {
        let Some(f) = factory else { return Ok(Self::cpu(host)) };
        let dev = f.make(host.config(), host.range(), host.params(), None).map_err(dev_err)?;
        Ok(Stage { dev: Some(dev), optimizer_on_device, ..Self::cpu(host) })
    }

    /// The chunk `host` on the device `factory` makes, with the optimizer on the device and the
    /// data-parallel reduction too: the step's last backward queues the sum of each gradient
    /// range over `group` as soon as it has finished it (NCCL on its own stream, overlapping
    /// the rest of the backward), and the gradients never come to the host (see
    /// [`Stage::finish_grads`]). The runtime's reducer then has nothing to do for this chunk.
    ///
    /// # Errors
    /// As [`Stage::with_optimizer`]; a group from another device.
    pub fn with_device_group(
        host: Gpt,
        factory: &StageFactory,
        group: &crate::gpu::stage::DeviceGroup,
    ) -> Result<Self, ModelError> {
        let dev = factory.make(host.config(), host.range(), host.params(), Some(group)).map_err(dev_err)?;
        Ok(Stage { dev: Some(dev), optimizer_on_device: true, reduce_on_device: true, ..Self::cpu(host) })
    }

    /// Runs the distributed optimizer (ZeRO-1) on the device of a [`Stage::with_device_group`]
    /// stage, over the chunk's gradient `buckets` (arena ranges, the reducer's; each split over
    /// the data-parallel ranks by `chunk_range`, as [`ChunkShard`] does): the step's last
    /// backward reduces each finished bucket's parts to their owners, the device holds moments
    /// (and fp32 master weights) for this rank's parts only, [`Stage::optimizer_step`] updates
    /// them and gathers the others' from their owners over the device group (broadcasts of the
    /// parameters the kernels read, which the next forward waits for layer by layer), and the
    /// host's parameter all-gather is not needed; the host parameters [`Stage::pull_params`]
    /// reads are then exact in the shard only (the callers all-gather the rest). Returns this
    /// rank's shard (its parts, in arena order: the ranges of its [`ChunkShard`]). Call before
    /// restoring optimizer state.
    ///
    /// # Errors
    /// A stage without a device group; buckets the device refuses.
    pub fn shard_optimizer(
        &mut self,
        buckets: &[std::ops::Range<usize>],
    ) -> Result<Vec<std::ops::Range<usize>>, ModelError> {
        let Some(dev) = self.dev.as_mut().filter(|_| self.reduce_on_device && self.optimizer_on_device)
        else {
            return Err(ModelError::Device(
                "the distributed optimizer runs on the device only beside a device group".into(),
            ));
        };
        let own = dev.shard_optimizer(buckets).map_err(dev_err)?;
        self.opt_shard = Some(own.clone());
        Ok(own)
    }

    /// Whether [`Stage::optimizer_step`] gathers the data-parallel ranks' parameter shards on
    /// the device ([`Stage::shard_optimizer`]).
    pub fn gathers_on_device(&self) -> bool {
        self.opt_shard.is_some() && self.optimizer_on_device()
    }

    /// Whether the data-parallel reduction runs on the device ([`Stage::with_device_group`]).
    pub fn reduces_on_device(&self) -> bool {
        self.reduce_on_device && self.dev.is_some()
    }

    /// Waits for the device's queued data-parallel reductions (anything that reads or changes
    /// the gradients does so first).
    ///
    /// # Errors
    /// Communication errors and timeouts.
    pub fn wait_reduced(&mut self) -> Result<(), ModelError> {
        match self.dev.as_mut() {
            Some(d) if self.reduce_on_device => {
                d.wait_reduced().map_err(dev_err)?;
                if self.reduce_span.0.is_some() && self.reduce_span.1.is_none() {
                    self.reduce_span.1 = Some(std::time::Instant::now());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// This step's device reduction, from the start of the backward that queues its ranges to
    /// the end of the wait for them all (for traces), if it ran; ends the wait first.
    ///
    /// # Errors
    /// As [`Stage::wait_reduced`].
    pub fn take_reduce_span(
        &mut self,
    ) -> Result<Option<(std::time::Instant, std::time::Instant)>, ModelError> {
        self.wait_reduced()?;
        Ok(match std::mem::take(&mut self.reduce_span) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        })
    }

    /// Pipeline messages on the device: `links` as for [`DeviceStage::set_links`] (the rank's
    /// two-rank device groups with its pipeline peers). With `input_grads_on_device` (any stage
    /// but the first) each backward keeps its input gradient on the device — for a
    /// `LinkOp::SendInputGrad`, or [`Stage::hand_input_grad`] to a previous stage of the same
    /// rank — instead of downloading it for [`Stage::take_input_grad`].
    ///
    /// # Errors
    /// A chunk on the CPU; links the device refuses.
    pub fn set_links(
        &mut self,
        links: &[(usize, crate::gpu::stage::DeviceGroup)],
        input_grads_on_device: bool,
    ) -> Result<(), ModelError> {
        let dev = self.device("Stage::set_links")?;
        dev.set_links(links).map_err(dev_err)?;
        self.input_grad_linked = input_grads_on_device;
        self.keep_input_grad = input_grads_on_device;
        Ok(())
    }

    /// Whether the coming step's messages use the device links (on by [`Stage::set_links`]):
    /// off, the input gradients come to the host for [`Stage::take_input_grad`] as without
    /// links.
    ///
    /// # Errors
    /// As [`DeviceStage::use_links`].
    pub fn use_links(&mut self, on: bool) -> Result<(), ModelError> {
        self.keep_input_grad = on && self.input_grad_linked;
        match self.dev.as_mut() {
            Some(d) => d.use_links(on).map_err(dev_err),
            None => Ok(()),
        }
    }

    fn device(&mut self, op: &str) -> Result<&mut Box<dyn DeviceStage>, ModelError> {
        self.dev.as_mut().ok_or_else(|| ModelError::Device(format!("{op}: this chunk computes on the CPU")))
    }

    /// Queues pipeline messages on the device links (several to one peer as a group): see
    /// [`DeviceStage::post_messages`]. A received input is then given to the forward as
    /// [`StageInput::Arrived`]; a received output gradient is found by a backward given none.
    ///
    /// # Errors
    /// As [`DeviceStage::post_messages`].
    pub fn post_messages(
        &mut self,
        ops: &[crate::gpu::stage::LinkOp],
        damage: &[usize],
    ) -> Result<(), ModelError> {
        self.device("Stage::post_messages")?.post_messages(ops, damage).map_err(dev_err)
    }

    /// Checksums the messages on the device links ([`DeviceStage::check_links`]; `peers`:
    /// pipeline rank → world rank of each link's peer).
    ///
    /// # Errors
    /// A chunk on the CPU; a link without its peer's world rank.
    pub fn check_links(&mut self, peers: &[(usize, usize)]) -> Result<(), ModelError> {
        self.device("Stage::check_links")?.check_links(peers).map_err(dev_err)
    }

    /// Hands `mb`'s output to `next` (the next stage, on the same device) as its arrived input.
    ///
    /// # Errors
    /// Either chunk on the CPU; as [`DeviceStage::hand_output`].
    pub fn hand_output(&mut self, mb: u64, next: &mut Stage) -> Result<(), ModelError> {
        let to = next.device("Stage::hand_output")?;
        let dev =
            self.dev.as_mut().ok_or_else(|| ModelError::Device("Stage::hand_output: on the CPU".into()))?;
        dev.hand_output(mb, &mut **to).map_err(dev_err)
    }

    /// Hands `mb`'s kept input gradient to `prev` (the previous stage, on the same device) as its
    /// arrived output gradient.
    ///
    /// # Errors
    /// Either chunk on the CPU; as [`DeviceStage::hand_input_grad`].
    pub fn hand_input_grad(&mut self, mb: u64, prev: &mut Stage) -> Result<(), ModelError> {
        let to = prev.device("Stage::hand_input_grad")?;
        let dev = self
            .dev
            .as_mut()
            .ok_or_else(|| ModelError::Device("Stage::hand_input_grad: on the CPU".into()))?;
        dev.hand_input_grad(mb, &mut **to).map_err(dev_err)
    }

    /// Waits for the messages queued on the device links (nothing on the CPU).
    ///
    /// # Errors
    /// As [`DeviceStage::finish_links`].
    pub fn finish_links(&mut self) -> Result<Option<crate::gpu::stage::LinkTiming>, ModelError> {
        match self.dev.as_mut() {
            Some(d) => d.finish_links().map_err(dev_err),
            None => Ok(None),
        }
    }

    /// Writes `value` over the first element of in-flight `mb`'s output on the device.
    ///
    /// # Errors
    /// As [`DeviceStage::poison_output`].
    pub fn poison_output(&mut self, mb: u64, value: f32) -> Result<(), ModelError> {
        self.device("Stage::poison_output")?.poison_output(mb, value).map_err(dev_err)
    }

    /// [`Stage::with_optimizer`] with the optimizer on the host.
    ///
    /// # Errors
    /// As [`Stage::with_optimizer`].
    pub fn new(host: Gpt, factory: Option<&StageFactory>) -> Result<Self, ModelError> {
        Self::with_optimizer(host, factory, false)
    }

    /// Whether the compute runs on a device.
    pub fn on_device(&self) -> bool {
        self.dev.is_some()
    }

    /// Whether the AdamW update runs on the device.
    pub fn optimizer_on_device(&self) -> bool {
        self.optimizer_on_device && self.dev.is_some()
    }

    /// Forward of microbatch `mb` (see `Gpt::forward`).
    ///
    /// # Errors
    /// As `Gpt::forward`; device errors as [`ModelError::Device`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, ModelError> {
        let Some(dev) = self.dev.as_mut() else {
            return self.host.forward(be, mb, batch, seq, input, targets, loss_scale);
        };
        push_params(&mut **dev, &self.host, &mut self.params_dirty)?;
        dev.forward(mb, batch, seq, input, targets, loss_scale).map_err(dev_err)
    }

    /// [`Stage::forward`] of a training step: on a device, a head stage's loss stays there (no
    /// host sync between the forward and the backward) and this returns `None` for it;
    /// [`Stage::take_losses`] gives the step's losses at its end. Elsewhere as `forward`.
    ///
    /// # Errors
    /// As [`Stage::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<Option<f32>, ModelError> {
        let head = self.host.range().head && targets.is_some();
        let Some(dev) = self.dev.as_mut().filter(|_| head) else {
            return self.forward(be, mb, batch, seq, input, targets, loss_scale);
        };
        push_params(&mut **dev, &self.host, &mut self.params_dirty)?;
        dev.forward_deferred(mb, batch, seq, input, targets, loss_scale).map_err(dev_err)?;
        self.deferred.push((mb, None));
        Ok(None)
    }

    /// Reports `value` as microbatch `mb`'s loss (fault injection) if its loss is deferred
    /// ([`Stage::forward_train`]); returns whether it was.
    pub fn override_deferred_loss(&mut self, mb: u64, value: f32) -> bool {
        match self.deferred.iter_mut().find(|(m, _)| *m == mb) {
            Some((_, v)) => {
                *v = Some(value);
                true
            }
            None => false,
        }
    }

    /// The losses [`Stage::forward_train`] left on the device, as (microbatch, loss) in forward
    /// order (one copy from the device; nothing when none were deferred).
    ///
    /// # Errors
    /// Device errors; a device that returns another number of losses.
    pub fn take_losses(&mut self) -> Result<Vec<(u64, f32)>, ModelError> {
        let deferred = std::mem::take(&mut self.deferred);
        let Some(dev) = self.dev.as_mut().filter(|_| !deferred.is_empty()) else { return Ok(Vec::new()) };
        let losses = dev.take_losses().map_err(dev_err)?;
        if losses.len() != deferred.len() {
            return Err(ModelError::Device(format!(
                "the device kept {} losses for {} deferred forwards",
                losses.len(),
                deferred.len()
            )));
        }
        Ok(deferred.into_iter().zip(losses).map(|((mb, injected), l)| (mb, injected.unwrap_or(l))).collect())
    }

    /// Output hidden states of in-flight `mb` (what a stage without the head sends).
    ///
    /// # Errors
    /// Device errors.
    pub fn output(&self, mb: u64) -> Result<Option<Hidden>, ModelError> {
        match &self.dev {
            None => Ok(self.host.output(mb).map(|h| Hidden::F32(h.to_vec()))),
            Some(d) => d.output(mb).map_err(dev_err),
        }
    }

    /// Full backward of `mb` (see `Gpt::backward_with`). On a device, `ready` is not called:
    /// the gradients reach the host at [`Stage::sync_grads`].
    ///
    /// # Errors
    /// As `Gpt::backward_with`; device errors.
    pub fn backward_with(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        dout: Option<GradRef<'_>>,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        self.backward_report(be, mb, dout, false, ready)
    }

    /// [`Stage::backward_with`] for the chunk's last weight-producing backward of a step when
    /// `report` is set: on a device, each finished range's gradients are drained to the host
    /// (added into the host arena) and `ready` called with it while the rest of the backward runs
    /// on the GPU — the reducer's overlap, as on the CPU. Without `report` (earlier
    /// microbatches) the device keeps accumulating. On the CPU, `ready` is always called.
    ///
    /// # Errors
    /// As `Gpt::backward_with`; device errors.
    pub fn backward_report(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        dout: Option<GradRef<'_>>,
        report: bool,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        if self.dev.is_none() {
            let wide = dout.map(|g| g.to_f32());
            return self.host.backward_with(be, mb, wide.as_deref(), ready);
        }
        self.device_backward(Half::Both(mb, dout), report, ready)
    }

    /// The input half of a split backward (zero-bubble schedules); see `Gpt::backward_input`.
    ///
    /// # Errors
    /// As `Gpt::backward_input`; device errors.
    pub fn backward_input(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        dout: Option<GradRef<'_>>,
    ) -> Result<(), ModelError> {
        if self.dev.is_none() {
            let wide = dout.map(|g| g.to_f32());
            return self.host.backward_input(be, mb, wide.as_deref());
        }
        self.device_backward(Half::Input(mb, dout), false, &mut |_, _| {})
    }

    /// The weight half of a split backward; see `Gpt::backward_weight_with`. On a device, as
    /// for [`Stage::backward_with`], `ready` is not called.
    ///
    /// # Errors
    /// As `Gpt::backward_weight_with`; device errors.
    pub fn backward_weight_with(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        self.backward_weight_report(be, mb, false, ready)
    }

    /// [`Stage::backward_weight_with`] that drains to the host only with `report`, as
    /// [`Stage::backward_report`] does.
    ///
    /// # Errors
    /// As `Gpt::backward_weight_with`; device errors.
    pub fn backward_weight_report(
        &mut self,
        be: &dyn Backend,
        mb: u64,
        report: bool,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        if self.dev.is_none() {
            return self.host.backward_weight_with(be, mb, ready);
        }
        self.device_backward(Half::Weight(mb), report, ready)
    }

    /// A backward, or half of one, on the device; see [`Stage::backward_report`].
    fn device_backward(
        &mut self,
        half: Half<'_>,
        report: bool,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        self.wait_reduced()?;
        let Stage {
            host,
            dev,
            dev_zero,
            dev_grads,
            dinput,
            drained: done,
            reduce_on_device,
            poison,
            reduce_span: self_span_start,
            keep_input_grad,
            ..
        } = self;
        let Some(dev) = dev.as_mut() else { return Ok(()) };
        let weights = !matches!(half, Half::Input(..));
        if *dev_zero && weights {
            dev.zero_grads().map_err(dev_err)?;
            *dev_zero = false;
        }
        let reduce = report && *reduce_on_device;
        if reduce && self_span_start.0.is_none() {
            self_span_start.0 = Some(std::time::Instant::now());
        }
        if reduce && let Some(v) = poison.take() {
            // Into the device arena before the reduction, so that every data-parallel rank
            // sees it (the backward's accumulation keeps it non-finite).
            let n = host.grads().len();
            if n > 0 {
                dev.set_grads(n - 1..n, &[v]).map_err(dev_err)?;
            }
        }
        let mut drain = |range: std::ops::Range<usize>, values: Vec<f32>| {
            let n = host.grads().len();
            let dst = host.grads_mut().get_mut(range.clone()).ok_or_else(|| crate::gpu::GpuError::Shape {
                op: "Stage::backward_report",
                detail: format!("range {range:?} outside {n} gradients"),
            })?;
            for (h, d) in dst.iter_mut().zip(&values) {
                *h += d;
            }
            done.push(range.clone());
            ready(range, host.grads());
            Ok(())
        };
        let finished = match (report, reduce) {
            (_, true) => Finished::Reduce,
            (true, false) => Finished::Drain(&mut drain),
            (false, _) => Finished::Keep,
        };
        match half {
            Half::Both(mb, dout) => dev.backward(mb, dout, finished),
            Half::Input(mb, dout) => dev.backward_input(mb, dout),
            Half::Weight(mb) => dev.backward_weight(mb, finished),
        }
        .map_err(dev_err)?;
        // Gradients not drained (all of them, or ranges never reported such as a head-only
        // stage's tied wte) wait on the device for `sync_grads`.
        *dev_grads |= weights;
        match half {
            Half::Both(mb, _) | Half::Input(mb, _) if !host.range().embedding && *keep_input_grad => {
                // Sent from the device by a device link: no host sync.
                dev.keep_input_grad(mb).map_err(dev_err)
            }
            Half::Both(..) | Half::Input(..) if !host.range().embedding => {
                *dinput = dev.input_grad().map_err(dev_err)?;
                Ok(())
            }
            // Nothing comes back: wait for the device, so the job's time (in traces and the
            // bubble report) is the device's.
            _ => dev.synchronize().map_err(dev_err),
        }
    }

    /// Gradient of the range input after the latest backward, as fp32 (a copy).
    pub fn input_grad(&self) -> Vec<f32> {
        match self.dev {
            None => self.host.input_grad().to_vec(),
            Some(_) => self.dinput.clone().into_f32(),
        }
    }

    /// Gradient of the range input after the latest backward, for sending: the device's is
    /// handed over as it came down (bf16 from a bf16 stage), not copied.
    pub fn take_input_grad(&mut self) -> Hidden {
        match self.dev {
            None => Hidden::F32(self.host.input_grad().to_vec()),
            Some(_) => std::mem::take(&mut self.dinput),
        }
    }

    /// Drops `mb`'s activations without a backward.
    pub fn release(&mut self, mb: u64) {
        match self.dev.as_mut() {
            None => self.host.release(mb),
            Some(d) => d.release(mb),
        }
    }

    /// Microbatches holding activations.
    pub fn in_flight(&self) -> usize {
        self.dev.as_ref().map_or_else(|| self.host.in_flight(), |d| d.in_flight())
    }

    /// Zeroes the host gradients, and the device's before its next backward.
    pub fn zero_grads(&mut self) {
        self.host.zero_grads();
        self.dev_zero = self.dev.is_some();
        self.dev_grads = false;
        self.grads_on_device = false;
        self.poison = None;
        self.drained.clear();
    }

    /// Injects a non-finite gradient (fault injection): the arena's last element becomes `v`
    /// before the backward, and the backward's accumulation keeps it; on a device the value
    /// also goes into the device's arena when the step's gradients stay there.
    pub fn poison_grad(&mut self, v: f32) {
        if let Some(x) = self.host.grads_mut().last_mut() {
            *x = v;
        }
        if self.dev.is_some() {
            self.poison = Some(v);
        }
    }

    /// Ends the chunk's gradient accumulation for the step (after its last weight-producing
    /// backward). On the CPU the head's tied gradient is folded into `wte`. On a device, with
    /// `keep_on_device` and the optimizer on the device, the gradients stay there (the norm,
    /// the embedding group's sum and the update read and write them in place); otherwise they
    /// are added into the host arena ([`Stage::sync_grads`]).
    ///
    /// # Errors
    /// Device errors.
    pub fn finish_grads(&mut self, be: &dyn Backend, keep_on_device: bool) -> Result<(), ModelError> {
        if self.reduces_on_device()
            && let Some(dev) = self.dev.as_mut()
        {
            // The ranges the backward did not report (a head-only stage's tied wte) are summed
            // now; every read of the gradients waits for the reductions first.
            dev.reduce_remaining().map_err(dev_err)?;
            self.grads_on_device = true;
            return Ok(());
        }
        if keep_on_device && self.optimizer_on_device() {
            if let (Some(v), Some(dev)) = (self.poison.take(), self.dev.as_mut()) {
                let n = self.host.grads().len();
                if n > 0 {
                    dev.set_grads(n - 1..n, &[v]).map_err(dev_err)?;
                }
            }
            self.grads_on_device = true;
            return Ok(());
        }
        self.sync_grads()?;
        self.host.fold_tied_grad(be);
        Ok(())
    }

    /// Sums an arena range of this step's gradients over a device `group` in place, when they
    /// live on the device; `Ok(false)` (nothing done) when they are on the host.
    ///
    /// # Errors
    /// A range outside the arena; device and communication errors.
    pub fn all_reduce_grads_on_device(
        &mut self,
        range: std::ops::Range<usize>,
        group: &crate::gpu::stage::DeviceGroup,
    ) -> Result<bool, ModelError> {
        self.wait_reduced()?;
        match self.dev.as_mut() {
            Some(dev) if self.grads_on_device => {
                dev.all_reduce_grads(range, group).map_err(dev_err)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A copy of the gradients of an arena range, wherever this step's live.
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    pub fn read_grads(&mut self, range: std::ops::Range<usize>) -> Result<Vec<f32>, ModelError> {
        self.wait_reduced()?;
        if self.grads_on_device
            && let Some(dev) = &self.dev
        {
            return dev.grads(range).map_err(dev_err);
        }
        let n = self.host.grads().len();
        self.host
            .grads()
            .get(range.clone())
            .map(<[f32]>::to_vec)
            .ok_or_else(|| ModelError::Device(format!("gradient range {range:?} outside the arena of {n}")))
    }

    /// Overwrites the gradients of an arena range, wherever this step's live.
    ///
    /// # Errors
    /// A range outside the arena or a length mismatch; device errors.
    pub fn write_grads(&mut self, range: std::ops::Range<usize>, values: &[f32]) -> Result<(), ModelError> {
        self.wait_reduced()?;
        if self.grads_on_device
            && let Some(dev) = self.dev.as_mut()
        {
            return dev.set_grads(range, values).map_err(dev_err);
        }
        let n = self.host.grads().len();
        match self.host.grads_mut().get_mut(range.clone()) {
            Some(dst) if dst.len() == values.len() => {
                dst.copy_from_slice(values);
                Ok(())
            }
            _ => Err(ModelError::Device(format!(
                "{} gradient values for range {range:?} of an arena of {n}",
                values.len()
            ))),
        }
    }

    /// `Σ g²` of each arena range of the gradients (double), wherever they live.
    ///
    /// # Errors
    /// A range outside the arena; device errors.
    pub fn grad_sum_squares(
        &mut self,
        be: &dyn Backend,
        ranges: &[std::ops::Range<usize>],
    ) -> Result<Vec<f64>, ModelError> {
        self.wait_reduced()?;
        if self.grads_on_device
            && let Some(dev) = self.dev.as_mut()
        {
            return dev.grad_sum_squares(ranges).map_err(dev_err);
        }
        let g = self.host.grads();
        ranges
            .iter()
            .map(|r| {
                g.get(r.clone()).map(|x| be.sum_squares(x)).ok_or_else(|| {
                    ModelError::Device(format!("gradient range {r:?} outside the arena of {}", g.len()))
                })
            })
            .collect()
    }

    /// One AdamW update (number `step`) of this rank's `shard` of the chunk, gradients
    /// multiplied by `clip` first when given. On the host: the shard's moments and the host
    /// parameters (the device gets them before its next forward). With the optimizer on the
    /// device: the shard on the device (the whole arena, or the one given to
    /// [`Stage::shard_optimizer`], after which the other ranks' shards are gathered; its host
    /// moments are not used until [`Stage::optimizer_state_into`]); host gradients go up first
    /// when the step's gradients are on the host (data-parallel reduction), and the host
    /// parameters are stale until [`Stage::pull_params`].
    ///
    /// # Errors
    /// The optimizer is on the device but `shard` is not the device's (the whole arena, or the
    /// shard it was given); communication errors and timeouts of the gather; device errors.
    #[allow(clippy::too_many_arguments)]
    pub fn optimizer_step(
        &mut self,
        be: &dyn Backend,
        shard: &mut ChunkShard,
        cfg: &AdamWConfig,
        step: u64,
        lr: f32,
        clip: Option<f32>,
    ) -> Result<(), ModelError> {
        self.wait_reduced()?;
        let on_device = self.optimizer_on_device();
        let Some(dev) = self.dev.as_mut().filter(|_| on_device) else {
            let (table, params, grads) = self.host.split_mut();
            if let Some(coef) = clip {
                for r in &shard.ranges {
                    be.scale(&mut grads[r.clone()], coef);
                }
            }
            shard.update(be, table, params, grads, cfg, step, lr);
            self.params_dirty = self.dev.is_some();
            return Ok(());
        };
        let n = self.host.grads().len();
        match &self.opt_shard {
            Some(own) if *own != shard.ranges => {
                return Err(ModelError::Device(format!(
                    "the device optimizer holds shard {own:?}; asked to update {:?}",
                    shard.ranges
                )));
            }
            None if shard.ranges.iter().map(std::ops::Range::len).sum::<usize>() != n => {
                return Err(ModelError::Device(format!(
                    "the device optimizer updates whole chunks; this rank's shard covers {:?} of {n}",
                    shard.ranges
                )));
            }
            _ => {}
        }
        push_params(&mut **dev, &self.host, &mut self.params_dirty)?;
        if !self.grads_on_device {
            dev.set_grads(0..n, self.host.grads()).map_err(dev_err)?;
        }
        dev.adamw(lr, cfg, step, clip.unwrap_or(1.0)).map_err(dev_err)?;
        if self.opt_shard.is_some() {
            dev.gather_params().map_err(dev_err)?;
        }
        self.host_params_stale = true;
        Ok(())
    }

    /// Makes the host parameters current (downloads the device's after a device update).
    ///
    /// # Errors
    /// Device errors.
    pub fn pull_params(&mut self) -> Result<(), ModelError> {
        if !self.host_params_stale {
            return Ok(());
        }
        let Some(dev) = &self.dev else { return Ok(()) };
        let p = dev.params().map_err(dev_err)?;
        let n = self.host.params().len();
        if p.len() != n {
            return Err(ModelError::Device(format!("the device returned {} parameters for {n}", p.len())));
        }
        self.host.params_mut().copy_from_slice(&p);
        self.host_params_stale = false;
        Ok(())
    }

    /// Copies the device's AdamW moments into `shard` (for a checkpoint) when the optimizer
    /// runs on the device; otherwise the shard already holds them.
    ///
    /// # Errors
    /// A shard of another size than the device's; device errors.
    pub fn optimizer_state_into(&self, shard: &mut ChunkShard) -> Result<(), ModelError> {
        let Some(dev) = self.dev.as_ref().filter(|_| self.optimizer_on_device) else { return Ok(()) };
        let (m, v) = dev.moments().map_err(dev_err)?;
        if m.len() != shard.m.len() || v.len() != shard.v.len() {
            return Err(ModelError::Device(format!(
                "device moments of {} values for a shard of {}",
                m.len(),
                shard.m.len()
            )));
        }
        shard.m = m;
        shard.v = v;
        Ok(())
    }

    /// Gives the device the moments of `shard` and the update count `step` (resuming) when the
    /// optimizer runs on the device.
    ///
    /// # Errors
    /// A shard of another size than the device's; device errors.
    pub fn load_optimizer_state(&mut self, shard: &ChunkShard, step: u64) -> Result<(), ModelError> {
        let on_device = self.optimizer_on_device();
        let Some(dev) = self.dev.as_mut().filter(|_| on_device) else { return Ok(()) };
        dev.set_moments(&shard.m, &shard.v, step).map_err(dev_err)
    }

    /// Adds the gradients the device accumulated since the last sync into the host arena (a
    /// no-op on the CPU). Call after the chunk's last backward of the step, before reading them.
    ///
    /// # Errors
    /// Device errors.
    pub fn sync_grads(&mut self) -> Result<(), ModelError> {
        self.wait_reduced()?;
        let Some(dev) = self.dev.as_mut() else { return Ok(()) };
        if !self.dev_grads {
            return Ok(());
        }
        // Only what was not drained during the backward (drained ranges are zero there).
        let n = self.host.grads().len();
        for gap in crate::gpu::stage::complement(&mut self.drained, n) {
            let g = dev.grads(gap.clone()).map_err(dev_err)?;
            for (h, d) in self.host.grads_mut()[gap].iter_mut().zip(&g) {
                *h += d;
            }
        }
        dev.zero_grads().map_err(dev_err)?;
        self.dev_grads = false;
        self.dev_zero = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::gpu::stage::complement as undrained;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of ranges, one of them
    fn undrained_is_the_complement() {
        assert_eq!(undrained(&mut vec![], 5), vec![0..5]);
        assert_eq!(undrained(&mut vec![0..5], 5), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(undrained(&mut vec![6..9, 2..4], 10), vec![0..2, 4..6, 9..10]);
        assert_eq!(undrained(&mut vec![3..6, 2..4], 8), vec![0..2, 6..8]);
    }
}

/// Which backward [`Stage::device_backward`] runs.
#[derive(Clone, Copy)]
enum Half<'a> {
    Both(u64, Option<GradRef<'a>>),
    Input(u64, Option<GradRef<'a>>),
    Weight(u64),
}

impl Deref for Stage {
    type Target = Gpt;
    fn deref(&self) -> &Gpt {
        &self.host
    }
}

impl DerefMut for Stage {
    /// Mutable access to the host model: its parameters may change, so the device gets them
    /// again before its next forward.
    fn deref_mut(&mut self) -> &mut Gpt {
        // While the device holds newer parameters (its optimizer ran) the host's are a stale
        // copy nobody writes: uploading them would undo the update.
        self.params_dirty = self.dev.is_some() && !self.host_params_stale;
        &mut self.host
    }
}
