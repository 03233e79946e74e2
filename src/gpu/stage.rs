//! A pipeline stage's layer range on a GPU, as the actor runtime drives it.
//!
//! The runtime (`crate::runtime`) keeps each chunk's host model — the table and arenas its
//! gradient reducer, ZeRO optimizer shards, checkpoints and fault injection work on — and hands
//! the chunk's compute to a [`DeviceStage`] when the run has a device: forwards and backwards of
//! microbatches run on the GPU and activations and input gradients cross stages as host
//! messages (bf16 from bf16 stages: `crate::runtime::wire`). Every schedule runs this way,
//! zero-bubble ones included (the split backward of `model/split.rs`).
//!
//! The AdamW update runs on the device as well ([`DeviceStage::adamw`]): the device owns the
//! parameters and moments, and gradients and parameters stay there. The data-parallel sum runs
//! on the device too ([`Finished::Reduce`]: each range as the chunk's last backward finishes
//! it, over a [`DeviceGroup`] — NCCL between launched processes, through the host elsewhere),
//! and so does the embedding group's sum of the tied embedding
//! ([`DeviceStage::all_reduce_grads`]). With the distributed optimizer (ZeRO-1) each
//! data-parallel rank's device updates its shard, holding moments for it only
//! ([`DeviceStage::shard_optimizer`]): the step's last backward then reduces each gradient
//! bucket's parts to their owners as soon as it has finished the bucket (a reduce per part, the
//! reduce-scatter of the CPU path), and after the update the owners broadcast their parts of
//! the parameters to the others ([`DeviceStage::gather_params`]). With
//! `RunOptions::host_grad_reduce` the gradients come to the host during the chunk's last
//! backward instead ([`Finished::Drain`], for the runtime's reducer) and the reduced ones go
//! back up; with the distributed optimizer too, the shards then update on the host and the
//! parameters go up once per step (before the first forward that needs them).

use std::sync::Arc;

use super::cuda::CudaGpu;
use super::dp::{DeviceComm, HostComm};
use super::model::ParamFence;
use super::model::{Arrival, ArrivalCheck, GpuGpt, SumLabel};
use super::nccl::NcclComm;
use super::ops::checksum;
use super::{DType, Dev, Gpu, GpuError, MemoryStats, download_f32};
use crate::comm::Comm;
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

    /// Forward of microbatch `mb` whose loss (a head stage's) stays on the device until
    /// [`DeviceStage::take_losses`], as [`GpuGpt::forward_mb_deferred`]: no host sync.
    ///
    /// # Errors
    /// As [`GpuGpt::forward_mb`].
    #[allow(clippy::too_many_arguments)]
    fn forward_deferred(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<(), GpuError>;

    /// The losses of the deferred forwards since the last call, in their order.
    ///
    /// # Errors
    /// Device errors.
    fn take_losses(&mut self) -> Result<Vec<f32>, GpuError>;

    /// Output hidden states of in-flight `mb`, in the stage's storage type (bf16 stays bf16).
    ///
    /// # Errors
    /// Device errors.
    fn output(&self, mb: u64) -> Result<Option<Hidden>, GpuError>;

    /// Backward of `mb`, as [`GpuGpt::backward_mb`]; gradients accumulate on the device. As
    /// soon as the backward has produced a range of the arena (the ranges of
    /// [`GpuGpt::backward_with`]), `finished` says what happens to it: see [`Finished`].
    ///
    /// # Errors
    /// As [`GpuGpt::backward_mb`], and whatever a drain or a reduction returns.
    fn backward(
        &mut self,
        mb: u64,
        dout: Option<GradRef<'_>>,
        finished: Finished<'_>,
    ) -> Result<(), GpuError>;

    /// The input half of a split backward (zero-bubble schedules), as
    /// [`GpuGpt::backward_input_mb`].
    ///
    /// # Errors
    /// As [`GpuGpt::backward_input_mb`].
    fn backward_input(&mut self, mb: u64, dout: Option<GradRef<'_>>) -> Result<(), GpuError>;

    /// The weight half of a split backward, as [`GpuGpt::backward_weight_mb`], handing finished
    /// ranges over as [`DeviceStage::backward`] does.
    ///
    /// # Errors
    /// As [`GpuGpt::backward_weight_mb`], and whatever a drain or a reduction returns.
    fn backward_weight(&mut self, mb: u64, finished: Finished<'_>) -> Result<(), GpuError>;

    /// Whether the stage has a data-parallel group on the device ([`Finished::Reduce`]).
    fn reduces(&self) -> bool;

    /// Queues the reduction of every arena range the step's backwards did not reduce as they
    /// finished it (the head's tied `wte` on a head-only stage), ending the step's reductions.
    ///
    /// # Errors
    /// No data-parallel group; device or communication errors.
    fn reduce_remaining(&mut self) -> Result<(), GpuError>;

    /// Waits (bounded by the group's timeout) until the queued reductions have finished, and
    /// orders later device work after them. A no-op when none are queued.
    ///
    /// # Errors
    /// Communication errors and timeouts.
    fn wait_reduced(&mut self) -> Result<(), GpuError>;

    /// Sums an arena range of the gradients over `group` in place on the device and waits for
    /// it (the tied embedding's gradient over the embedding group).
    ///
    /// # Errors
    /// A range outside the arena; a group of another device; communication errors.
    fn all_reduce_grads(
        &mut self,
        range: std::ops::Range<usize>,
        group: &DeviceGroup,
    ) -> Result<(), GpuError>;

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

    /// The distributed optimizer (ZeRO-1) over the stage's data-parallel group: each gradient
    /// bucket (arena ranges, in the order the backward finishes them; the same on every rank) is
    /// split over the group's ranks by `chunk_range`, and this rank owns its part of each.
    /// [`Finished::Reduce`] then reduces each finished bucket's parts to their owners (instead
    /// of all-reducing ranges), [`DeviceStage::adamw`] updates the owned parts only (moments
    /// for them only: [`GpuGpt::set_optimizer_shard`]) and [`DeviceStage::gather_params`]
    /// brings the others'. Returns the owned ranges, in arena order. Call before the first
    /// update or restore.
    ///
    /// # Errors
    /// No data-parallel group; buckets that overlap or leave the arena; moments already
    /// allocated.
    fn shard_optimizer(
        &mut self,
        buckets: &[std::ops::Range<usize>],
    ) -> Result<Vec<std::ops::Range<usize>>, GpuError>;

    /// The distributed optimizer's gather over the data-parallel group, on the device: each
    /// bucket part of the parameters the kernels read (bf16 or fp32) is broadcast from its owner,
    /// which rounded it from its master weights, into the others' in place. Returns once queued
    /// (buckets in arena order, each behind a mark): the next forward orders each layer's kernels
    /// after its own buckets only ([`GpuGpt::params_arriving`]), so the gather of later layers
    /// overlaps the compute of earlier ones; anything else that touches the parameters waits for
    /// all of it. Call on every rank of the group after its update.
    ///
    /// # Errors
    /// No data-parallel group or no [`DeviceStage::shard_optimizer`]; communication errors and
    /// timeouts; device errors.
    fn gather_params(&mut self) -> Result<(), GpuError>;

    /// The (master) parameters, fp32, in the range's arena order (outside a sharded bf16
    /// optimizer's own parts, the bf16 copy widened: [`GpuGpt::params_host`]).
    ///
    /// # Errors
    /// Device errors.
    fn params(&self) -> Result<Vec<f32>, GpuError>;

    /// The AdamW moments (m, v), fp32, in arena order (of the optimizer shard's ranges, when
    /// sharded).
    ///
    /// # Errors
    /// Device errors.
    fn moments(&self) -> Result<(Vec<f32>, Vec<f32>), GpuError>;

    /// Replaces the AdamW moments and update count (resuming from a checkpoint).
    ///
    /// # Errors
    /// Wrong lengths; device errors.
    fn set_moments(&mut self, m: &[f32], v: &[f32], step: u64) -> Result<(), GpuError>;

    /// Pipeline messages on the device: `links[i] = (peer, group)`, the two-rank device group
    /// ([`StageFactory::link_group`]) this stage exchanges messages with pipeline rank `peer`
    /// over. Messages between two ranks match in the order queued (NCCL's sends and receives),
    /// so both sides must queue the pair's messages in the same order (the runtime queues them
    /// in program order, which a rendezvous-validated schedule makes the same on both).
    ///
    /// # Errors
    /// A group of another device, or not of two ranks.
    fn set_links(&mut self, links: &[(usize, DeviceGroup)]) -> Result<(), GpuError>;

    /// Checksums every message on the links from now on, as host messages carry a CRC32: the
    /// sender sends its checksum after each message (`crate::gpu::ops::checksum`), the receiver
    /// computes one when it reads the message, and [`DeviceStage::finish_links`] compares them.
    /// `peers` gives the world rank of each pipeline peer (pipeline rank, world rank), for the
    /// error that names a damaging link. Both ends of a link must check, or neither (the
    /// checksums are messages of their own).
    ///
    /// # Errors
    /// A link's peer missing from `peers`.
    fn check_links(&mut self, peers: &[(usize, usize)]) -> Result<(), GpuError>;

    /// Queues `ops` on the device link to their peer, in order; several (all to one peer) are
    /// queued as one group, so an exchange's two directions progress together
    /// ([`DeviceComm::grouped`]). The ops at the indices in `damage` carry an injected fault: a
    /// send goes out as a damaged copy (its checksum is of the intact message), a receive is
    /// damaged as it is read, before its checksum. A send reads the output from the activations
    /// as they are (they live until the microbatch's backward, which waits for a gradient the
    /// peer computed from them) or the input gradient [`DeviceStage::keep_input_grad`] kept
    /// (whose buffer is written again only after the send's mark); a receive lands in a message
    /// buffer that the forward (given [`StageInput::Arrived`]) or the backward (given no output
    /// gradient) waits for.
    ///
    /// # Errors
    /// No link to the peer, ops to several peers, a microbatch not in flight, no kept
    /// gradient, out of device memory; the link's errors.
    fn post_messages(&mut self, ops: &[LinkOp], damage: &[usize]) -> Result<(), GpuError>;

    /// Keeps the input gradient of the latest backward (of `mb`) on the device for a
    /// [`LinkOp::SendInputGrad`] (one device copy; nothing comes to the host).
    ///
    /// # Errors
    /// As [`GpuGpt::keep_input_grad`].
    fn keep_input_grad(&mut self, mb: u64) -> Result<(), GpuError>;

    /// Hands in-flight microbatch `mb`'s output to `next`, a stage on the same device (the next
    /// stage of the same rank: the turn of a V-shaped schedule), as an arrived input — one
    /// device copy, nothing through the host.
    ///
    /// # Errors
    /// `next` on another device; `mb` not in flight; out of device memory.
    fn hand_output(&mut self, mb: u64, next: &mut dyn DeviceStage) -> Result<(), GpuError>;

    /// Hands `mb`'s kept input gradient ([`DeviceStage::keep_input_grad`]) to `prev`, a stage on
    /// the same device, as its arrived output gradient (the buffer moves; no copy).
    ///
    /// # Errors
    /// `prev` on another device; no gradient kept for `mb`.
    fn hand_input_grad(&mut self, mb: u64, prev: &mut dyn DeviceStage) -> Result<(), GpuError>;

    /// The stage as `Any`, for handing messages between stages of one device.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;

    /// Starts a step whose messages use the links (`on`) or go through the host: with links
    /// (and some set), the device's clock of the step starts here (see [`LinkTiming`]).
    ///
    /// # Errors
    /// Recording the device's time fails.
    fn use_links(&mut self, on: bool) -> Result<(), GpuError>;

    /// Waits (bounded by the links' timeout) until every message queued on the links has been
    /// transferred, so that a failed or missing peer shows at the end of the step that needed it,
    /// and compares the checksums of the messages received ([`DeviceStage::check_links`]);
    /// after a step started by [`DeviceStage::use_links`] with links on, returns how the device
    /// spent it.
    ///
    /// # Errors
    /// The first link's error; messages that arrived and were not used, or were kept and not
    /// sent; [`GpuError::Corrupt`] for a message damaged on its way; reading the device's times
    /// fails.
    fn finish_links(&mut self) -> Result<Option<LinkTiming>, GpuError>;

    /// Writes `value` over the first element of in-flight `mb`'s output (fault injection: a
    /// non-finite activation sent on).
    ///
    /// # Errors
    /// `mb` not in flight; device errors.
    fn poison_output(&mut self, mb: u64, value: f32) -> Result<(), GpuError>;
}

/// How a stage's device spent a step whose pipeline messages travelled on its links, on the
/// device's clock ([`crate::gpu::Gpu::stream_time`]): with links the host only queues the
/// waits for messages, so its clock cannot see the pipeline bubble; the compute stream's
/// stalls at those waits are it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkTiming {
    /// Seconds from the step's start ([`DeviceStage::use_links`]) until its messages had all
    /// landed ([`DeviceStage::finish_links`]).
    pub span_s: f64,
    /// Seconds of that span the compute stream stood waiting for a message's transfer.
    pub stalled_s: f64,
}

impl LinkTiming {
    /// Idle over busy time (the runtime's measured bubble), `stalled / (span − stalled)`.
    pub fn bubble(&self) -> f64 {
        let busy = self.span_s - self.stalled_s;
        if busy > 0.0 { self.stalled_s / busy } else { 0.0 }
    }
}

/// What a backward does with each arena range of gradients as soon as it has finished it.
/// A pipeline message on a device link ([`DeviceStage::post_messages`]); `peer` is the other
/// end's pipeline rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOp {
    /// In-flight microbatch `mb`'s output, to the next stage.
    SendOutput { mb: u64, peer: usize },
    /// Microbatch `mb`'s input gradient (kept by its backward), to the previous stage.
    SendInputGrad { mb: u64, peer: usize },
    /// Microbatch `mb`'s input (`batch` × `seq` tokens), from the previous stage.
    RecvInput { mb: u64, batch: usize, seq: usize, peer: usize },
    /// The gradient of microbatch `mb`'s output, from the next stage.
    RecvOutputGrad { mb: u64, batch: usize, seq: usize, peer: usize },
}

impl LinkOp {
    /// The pipeline rank at the other end.
    pub fn peer(&self) -> usize {
        match *self {
            LinkOp::SendOutput { peer, .. }
            | LinkOp::SendInputGrad { peer, .. }
            | LinkOp::RecvInput { peer, .. }
            | LinkOp::RecvOutputGrad { peer, .. } => peer,
        }
    }
}

pub enum Finished<'a> {
    /// Nothing: the gradients keep accumulating on the device.
    Keep,
    /// Drain it: the range's accumulated gradients are copied to the host, handed to the
    /// function and zeroed on the device — so a host data-parallel reducer can start on them
    /// while the rest of the backward runs on the GPU. Ranges never reported (the head's tied
    /// `wte` on a head-only stage) stay on the device for [`DeviceStage::grads`].
    Drain(&'a mut Drained<'a>),
    /// Sum it over the stage's data-parallel group in place, on the device: queued behind the
    /// backward's work so far, so the reduction overlaps the rest of the backward (NCCL on the
    /// communication stream; through the host, blocking, for other devices).
    Reduce,
}

/// A chunk's compute on a GPU: the model range and, with data parallelism on the device, the
/// group its gradients are summed over.
struct GpuStage<G: Gpu + 'static> {
    model: GpuGpt<'static, G>,
    dp: Option<Arc<dyn DeviceComm<G>>>,
    /// Arena ranges reduced since the step's reductions began (in the order queued).
    reduced: Vec<std::ops::Range<usize>>,
    /// Reductions queued and not yet waited for.
    queued: bool,
    /// The distributed optimizer's buckets ([`DeviceStage::shard_optimizer`]).
    zero: Option<Zero>,
    /// Device links by pipeline peer ([`DeviceStage::set_links`]).
    links: std::collections::BTreeMap<usize, Arc<dyn DeviceComm<G>>>,
    /// With checksums on the links ([`DeviceStage::check_links`]): the world rank of each
    /// pipeline peer.
    checked: Option<std::collections::BTreeMap<usize, usize>>,
    /// The device's time at the start of a step that uses the links ([`DeviceStage::use_links`]).
    step_start: Option<crate::gpu::StreamTime>,
}

/// The distributed optimizer's layout on a device group: gradient buckets, each split over the
/// group's ranks by `chunk_range` (part q belongs to rank q), and the step's progress.
struct Zero {
    buckets: Vec<std::ops::Range<usize>>,
    /// Elements of each bucket the step's last backward has finished so far.
    covered: Vec<usize>,
    /// Buckets whose parts are queued for reduction this step.
    queued: Vec<bool>,
}

impl Zero {
    /// Part `q` of bucket `b` among `parts` ranks, as arena positions.
    fn part(&self, b: usize, parts: usize, q: usize) -> std::ops::Range<usize> {
        let r = &self.buckets[b];
        let c = crate::comm::chunk_range(r.len(), parts, q);
        r.start + c.start..r.start + c.end
    }

    /// Queues the reduction of bucket `b`'s parts to their owners.
    fn reduce_bucket<G: Gpu>(
        &mut self,
        b: usize,
        dp: &dyn DeviceComm<G>,
        gpu: &G,
        grads: &G::Buf,
    ) -> Result<(), GpuError> {
        self.queued[b] = true;
        for q in 0..dp.size() {
            let r = self.part(b, dp.size(), q);
            if !r.is_empty() {
                dp.reduce_sum(gpu, Dev::new(grads).at(r.start, DType::F32), r.len(), DType::F32, q)?;
            }
        }
        Ok(())
    }

    /// Counts `range` as finished and queues the buckets it completes, in bucket order.
    fn finished<G: Gpu>(
        &mut self,
        range: &std::ops::Range<usize>,
        dp: &dyn DeviceComm<G>,
        gpu: &G,
        grads: &G::Buf,
    ) -> Result<(), GpuError> {
        for b in 0..self.buckets.len() {
            let r = &self.buckets[b];
            let overlap = range.end.min(r.end).saturating_sub(range.start.max(r.start));
            if overlap == 0 {
                continue;
            }
            self.covered[b] += overlap;
            if self.covered[b] >= r.len() && !self.queued[b] {
                self.reduce_bucket(b, dp, gpu, grads)?;
            }
        }
        Ok(())
    }
}

impl<G: Gpu + 'static> GpuStage<G> {
    fn link(&self, op: &'static str, peer: usize) -> Result<Arc<dyn DeviceComm<G>>, GpuError> {
        self.links.get(&peer).cloned().ok_or_else(|| GpuError::Shape {
            op,
            detail: format!(
                "no device link to pipeline rank {peer} (links to {:?})",
                self.links.keys().collect::<Vec<_>>()
            ),
        })
    }

    fn group(&self, op: &'static str) -> Result<Arc<dyn DeviceComm<G>>, GpuError> {
        self.dp.clone().ok_or(GpuError::Shape {
            op,
            detail: "a reduction on the device, but the stage has no data-parallel group".into(),
        })
    }

    /// The callback of a backward for `finished`.
    fn run(
        &mut self,
        finished: Finished<'_>,
        backward: impl FnOnce(
            &mut GpuGpt<'static, G>,
            &mut super::model::GradsReady<'_, G::Buf>,
        ) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let gpu = self.model.gpu();
        match finished {
            Finished::Keep => backward(&mut self.model, &mut |_, _| Ok(())),
            Finished::Drain(f) => backward(&mut self.model, &mut |range, grads| drain(gpu, range, grads, f)),
            Finished::Reduce => {
                let dp = self.group("DeviceStage::backward")?;
                let (reduced, zero) = (&mut self.reduced, &mut self.zero);
                self.queued = true;
                backward(&mut self.model, &mut |range, grads| {
                    if let Some(z) = zero.as_mut() {
                        z.finished(&range, &*dp, gpu, grads)?;
                    } else {
                        let at = Dev::new(grads).at(range.start, DType::F32);
                        dp.all_reduce_sum(gpu, at, range.len(), DType::F32)?;
                    }
                    reduced.push(range);
                    Ok(())
                })
            }
        }
    }
}

impl<G: Gpu + 'static> std::ops::Deref for GpuStage<G> {
    type Target = GpuGpt<'static, G>;
    fn deref(&self) -> &Self::Target {
        &self.model
    }
}

impl<G: Gpu + 'static> std::ops::DerefMut for GpuStage<G> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.model
    }
}

impl<G: Gpu + 'static> DeviceStage for GpuStage<G> {
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

    fn forward_deferred(
        &mut self,
        mb: u64,
        batch: usize,
        seq: usize,
        input: StageInput<'_>,
        targets: Option<&[u32]>,
        loss_scale: f32,
    ) -> Result<(), GpuError> {
        self.forward_mb_deferred(mb, batch, seq, input, targets, loss_scale)
    }

    fn take_losses(&mut self) -> Result<Vec<f32>, GpuError> {
        GpuGpt::take_losses(&mut self.model)
    }

    fn output(&self, mb: u64) -> Result<Option<Hidden>, GpuError> {
        self.output_native(mb)
    }

    fn backward(
        &mut self,
        mb: u64,
        dout: Option<GradRef<'_>>,
        finished: Finished<'_>,
    ) -> Result<(), GpuError> {
        self.run(finished, |m, ready| m.backward_mb_grad(mb, dout, ready))
    }

    fn backward_input(&mut self, mb: u64, dout: Option<GradRef<'_>>) -> Result<(), GpuError> {
        self.backward_input_mb_grad(mb, dout)
    }

    fn backward_weight(&mut self, mb: u64, finished: Finished<'_>) -> Result<(), GpuError> {
        self.run(finished, |m, ready| m.backward_weight_mb(mb, ready))
    }

    fn reduces(&self) -> bool {
        self.dp.is_some()
    }

    fn reduce_remaining(&mut self) -> Result<(), GpuError> {
        let dp = self.group("DeviceStage::reduce_remaining")?;
        let gpu = self.model.gpu();
        let n = self.model.table().len();
        let grads = self.model.grads_buf();
        let gaps = complement(&mut self.reduced, n);
        if let Some(z) = self.zero.as_mut() {
            // Buckets the backward did not finish (a head-only stage's tied wte).
            for b in 0..z.buckets.len() {
                if !z.queued[b] {
                    z.reduce_bucket(b, &*dp, gpu, grads)?;
                }
            }
            z.covered.iter_mut().for_each(|c| *c = 0);
            z.queued.iter_mut().for_each(|q| *q = false);
        } else {
            for gap in gaps {
                dp.all_reduce_sum(gpu, Dev::new(grads).at(gap.start, DType::F32), gap.len(), DType::F32)?;
            }
        }
        self.queued = true;
        Ok(())
    }

    fn wait_reduced(&mut self) -> Result<(), GpuError> {
        if !std::mem::take(&mut self.queued) {
            return Ok(());
        }
        self.group("DeviceStage::wait_reduced")?.finish(self.model.gpu())
    }

    fn all_reduce_grads(
        &mut self,
        range: std::ops::Range<usize>,
        group: &DeviceGroup,
    ) -> Result<(), GpuError> {
        const OP: &str = "DeviceStage::all_reduce_grads";
        let n = self.model.table().len();
        if range.start > range.end || range.end > n {
            return Err(GpuError::Shape { op: OP, detail: format!("range {range:?} of {n} gradients") });
        }
        self.wait_reduced()?;
        let comm = group.comm::<G>(OP)?;
        let gpu = self.model.gpu();
        let at = Dev::new(self.model.grads_buf()).at(range.start, DType::F32);
        comm.all_reduce_sum(gpu, at, range.len(), DType::F32)?;
        comm.finish(gpu)
    }

    fn input_grad(&self) -> Result<Hidden, GpuError> {
        self.input_grad_native()
    }

    fn release(&mut self, mb: u64) {
        GpuGpt::release(&mut self.model, mb);
    }

    fn in_flight(&self) -> usize {
        GpuGpt::in_flight(&self.model)
    }

    fn set_params(&mut self, host: &[f32]) -> Result<(), GpuError> {
        GpuGpt::set_params(&mut self.model, host)
    }

    fn grads(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>, GpuError> {
        self.grads_range_host(range)
    }

    fn zero_grads(&mut self) -> Result<(), GpuError> {
        GpuGpt::zero_grads(&mut self.model)
    }

    fn synchronize(&self) -> Result<(), GpuError> {
        self.gpu().synchronize()
    }

    fn set_grads(&mut self, range: std::ops::Range<usize>, values: &[f32]) -> Result<(), GpuError> {
        self.set_grads_range(range, values)
    }

    fn grad_sum_squares(&mut self, ranges: &[std::ops::Range<usize>]) -> Result<Vec<f64>, GpuError> {
        GpuGpt::grad_sum_squares(&mut self.model, ranges)
    }

    fn adamw(&mut self, lr: f32, adam: &AdamWConfig, step: u64, grad_scale: f32) -> Result<(), GpuError> {
        self.adamw_update(lr, adam, step, grad_scale)
    }

    fn shard_optimizer(
        &mut self,
        buckets: &[std::ops::Range<usize>],
    ) -> Result<Vec<std::ops::Range<usize>>, GpuError> {
        const OP: &str = "DeviceStage::shard_optimizer";
        let dp = self.group(OP)?;
        let n = self.model.table().len();
        let mut sorted = buckets.to_vec();
        sorted.sort_by_key(|r| r.start);
        if sorted.windows(2).any(|w| w[0].end > w[1].start)
            || sorted.iter().any(|r| r.start > r.end || r.end > n)
        {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("buckets {buckets:?} overlap or leave the arena of {n}"),
            });
        }
        let zero = Zero {
            buckets: buckets.to_vec(),
            covered: vec![0; buckets.len()],
            queued: vec![false; buckets.len()],
        };
        let mut own: Vec<_> = (0..buckets.len())
            .map(|b| zero.part(b, dp.size(), dp.rank()))
            .filter(|r| !r.is_empty())
            .collect();
        own.sort_by_key(|r| r.start);
        self.model.set_optimizer_shard(&own)?;
        self.zero = Some(zero);
        Ok(own)
    }

    fn gather_params(&mut self) -> Result<(), GpuError> {
        const OP: &str = "DeviceStage::gather_params";
        let dp = self.group(OP)?;
        self.wait_reduced()?;
        let Some(zero) = self.zero.as_ref() else {
            return Err(GpuError::Shape { op: OP, detail: "the stage's optimizer is not sharded".into() });
        };
        let (gpu, size) = (self.model.gpu(), dp.size());
        // In arena order, the forward's (the buckets are in the backward's), each bucket's
        // broadcasts followed by a mark: the next forward waits for a layer's buckets only.
        let mut order: Vec<usize> = (0..zero.buckets.len()).collect();
        order.sort_by_key(|&b| zero.buckets[b].start);
        let mut fences = Vec::with_capacity(order.len());
        for b in order {
            for q in 0..size {
                let r = zero.part(b, size, q);
                if !r.is_empty() {
                    let (at, dtype) = self.model.params_range(r.clone())?;
                    dp.broadcast(gpu, at, r.len(), dtype, q)?;
                }
            }
            let (mark, dp) = (dp.mark(gpu)?, dp.clone());
            let ready = Box::new(move || dp.compute_after(gpu, mark));
            fences.push(ParamFence { range: zero.buckets[b].clone(), ready });
        }
        self.model.params_arriving(fences);
        Ok(())
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

    fn set_links(&mut self, links: &[(usize, DeviceGroup)]) -> Result<(), GpuError> {
        const OP: &str = "DeviceStage::set_links";
        for (peer, group) in links {
            let comm = group.comm::<G>(OP)?;
            if comm.size() != 2 {
                return Err(GpuError::Shape {
                    op: OP,
                    detail: format!("the link to pipeline rank {peer} has {} ranks, not 2", comm.size()),
                });
            }
            self.links.insert(*peer, comm);
        }
        Ok(())
    }

    fn post_messages(&mut self, ops: &[LinkOp], damage: &[usize]) -> Result<(), GpuError> {
        const OP: &str = "DeviceStage::post_messages";
        let Some(first) = ops.first() else { return Ok(()) };
        let peer = first.peer();
        if let Some(o) = ops.iter().find(|o| o.peer() != peer) {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("a group of messages goes to one peer: {first:?} and {o:?}"),
            });
        }
        if let Some(&i) = damage.iter().find(|&&i| i >= ops.len()) {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("message {i} to damage of {}", ops.len()),
            });
        }
        let link = self.link(OP, peer)?;
        let (gpu, dtype) = (self.model.gpu(), self.model.dtype());
        let other = 1 - link.rank();
        let from = match &self.checked {
            Some(world) => Some(*world.get(&peer).ok_or_else(|| GpuError::Shape {
                op: OP,
                detail: format!("no world rank for pipeline rank {peer}'s checksums"),
            })?),
            None => None,
        };
        // Everything but the transfers first (allocation, waits for earlier sends, checksums and
        // damaged copies stay out of the group): the receives' buffers, each message's checksum
        // slot (a send's checksum is computed now, from the intact message) and a damaged send's
        // copy.
        let mut bufs = Vec::new();
        let mut slots = Vec::with_capacity(ops.len());
        let mut copies = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let slot = match *op {
                LinkOp::RecvInput { batch, seq, mb, .. } | LinkOp::RecvOutputGrad { batch, seq, mb, .. } => {
                    let n = self.model.message_elems(batch, seq);
                    bufs.push((self.model.message_buffer(n)?, n));
                    let what = if matches!(op, LinkOp::RecvInput { .. }) { "activation" } else { "gradient" };
                    from.map(|from| self.model.checksum_slot(Some(SumLabel { what, mb, from })))
                        .transpose()?
                }
                LinkOp::SendOutput { mb, .. } | LinkOp::SendInputGrad { mb, .. } => {
                    let slot = from.map(|_| self.model.checksum_slot(None)).transpose()?;
                    let bytes = {
                        let (data, n) = send_data(&self.model, op, mb)?;
                        if let Some(s) = slot {
                            self.model.checksum_sent(data, n * dtype.size(), s)?;
                        }
                        n * dtype.size()
                    };
                    if damage.contains(&i) {
                        let copy = self.model.message_buffer(bytes / dtype.size())?;
                        let (data, _) = send_data(&self.model, op, mb)?;
                        gpu.copy(Dev::new(&copy), data, bytes)?;
                        checksum::damage_message(gpu, Dev::new(&copy))?;
                        copies.push((i, copy));
                    }
                    slot
                }
            };
            slots.push(slot);
        }
        let model = &self.model;
        let mut next = 0;
        let queued = link.grouped(&mut || {
            for (i, op) in ops.iter().enumerate() {
                match *op {
                    LinkOp::SendOutput { mb, .. } | LinkOp::SendInputGrad { mb, .. } => {
                        let (data, n) = send_data(model, op, mb)?;
                        match copies.iter().find(|c| c.0 == i) {
                            Some((_, copy)) => link.send(gpu, Dev::new(copy), n, dtype, other)?,
                            None => link.send(gpu, data, n, dtype, other)?,
                        }
                    }
                    LinkOp::RecvInput { .. } | LinkOp::RecvOutputGrad { .. } => {
                        let (buf, n) = &bufs[next];
                        link.recv(gpu, Dev::new(buf), *n, dtype, other)?;
                        next += 1;
                    }
                }
                // The checksum travels right behind its message (8 bytes as two fp32 words:
                // moved, never computed with).
                if let Some(s) = slots[i] {
                    let sum = model.checksum_dev(s, false)?;
                    match op {
                        LinkOp::SendOutput { .. } | LinkOp::SendInputGrad { .. } => {
                            link.send(gpu, sum, 2, DType::F32, other)?
                        }
                        _ => link.recv(gpu, sum, 2, DType::F32, other)?,
                    }
                }
            }
            Ok(())
        });
        let ready = |mark: u64| -> super::model::Ready {
            let link = link.clone();
            Box::new(move || link.compute_after(gpu, mark))
        };
        let mark = match queued.and_then(|()| link.mark(gpu)) {
            Ok(m) => m,
            Err(e) => {
                // Receives (and sends of damaged copies) may be queued: their buffers stay
                // (free, behind a mark) until the link has landed them or the model goes.
                let last = link.mark(gpu).ok();
                for buf in bufs.into_iter().map(|b| b.0).chain(copies.into_iter().map(|c| c.1)) {
                    self.model.recycle_message_after(buf, last.map(ready));
                }
                return Err(e);
            }
        };
        for (_, copy) in copies {
            self.model.recycle_message_after(copy, Some(ready(mark)));
        }
        let mut bufs = bufs.into_iter();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                LinkOp::SendOutput { .. } => {}
                LinkOp::SendInputGrad { mb, .. } => self.model.input_grad_sent(mb, Some(ready(mark))),
                LinkOp::RecvInput { mb, .. } | LinkOp::RecvOutputGrad { mb, .. } => {
                    let Some((buf, _)) = bufs.next() else { break };
                    let kind = if matches!(op, LinkOp::RecvInput { .. }) {
                        self.model.input_arriving(mb, buf, Some(ready(mark)))?;
                        Arrival::Input
                    } else {
                        self.model.output_grad_arriving(mb, buf, Some(ready(mark)))?;
                        Arrival::OutputGrad
                    };
                    let check = ArrivalCheck { slot: slots[i], damage: damage.contains(&i) };
                    if check.slot.is_some() || check.damage {
                        self.model.check_arrival(kind, mb, check);
                    }
                }
            }
        }
        Ok(())
    }

    fn check_links(&mut self, peers: &[(usize, usize)]) -> Result<(), GpuError> {
        let world: std::collections::BTreeMap<usize, usize> = peers.iter().copied().collect();
        if let Some(p) = self.links.keys().find(|p| !world.contains_key(p)) {
            return Err(GpuError::Shape {
                op: "DeviceStage::check_links",
                detail: format!("no world rank given for the link to pipeline rank {p}"),
            });
        }
        self.checked = Some(world);
        Ok(())
    }

    fn keep_input_grad(&mut self, mb: u64) -> Result<(), GpuError> {
        GpuGpt::keep_input_grad(&mut self.model, mb)
    }

    fn hand_output(&mut self, mb: u64, next: &mut dyn DeviceStage) -> Result<(), GpuError> {
        let next = same_device::<G>("DeviceStage::hand_output", next)?;
        let (out, n) = self.model.output_buffer(mb)?;
        let buf = next.model.message_buffer(n)?;
        self.model.gpu().copy(Dev::new(&buf), out, n * self.model.dtype().size())?;
        next.model.input_arriving(mb, buf, None)
    }

    fn hand_input_grad(&mut self, mb: u64, prev: &mut dyn DeviceStage) -> Result<(), GpuError> {
        let prev = same_device::<G>("DeviceStage::hand_input_grad", prev)?;
        let buf = self.model.take_kept_input_grad(mb)?;
        prev.model.output_grad_arriving(mb, buf, None)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn use_links(&mut self, on: bool) -> Result<(), GpuError> {
        // Waits of earlier steps (through the host, or evaluation) are not this step's, nor
        // the checksums of a step that failed.
        self.model.take_stalled_seconds()?;
        self.model.reset_checksums();
        self.step_start = match on && !self.links.is_empty() {
            true => Some(self.model.gpu().stream_time()?),
            false => None,
        };
        Ok(())
    }

    fn finish_links(&mut self) -> Result<Option<LinkTiming>, GpuError> {
        let gpu = self.model.gpu();
        for link in self.links.values() {
            link.finish(gpu)?;
        }
        // Every message of the step was used: an arrival nothing read, or a kept gradient
        // never sent, is a schedule the runtime executed wrongly.
        if let n @ 1.. = self.model.messages_held() {
            return Err(GpuError::Shape {
                op: "DeviceStage::finish_links",
                detail: format!("{n} pipeline messages still held on the device at the end of the step"),
            });
        }
        self.model.verify_checksums()?;
        let Some(start) = self.step_start.take() else { return Ok(None) };
        let end = gpu.stream_time()?;
        let span_s = gpu.stream_seconds(&start, &end)?;
        let stalled_s = self.model.take_stalled_seconds()?;
        Ok(Some(LinkTiming { span_s, stalled_s }))
    }

    fn poison_output(&mut self, mb: u64, value: f32) -> Result<(), GpuError> {
        let dtype = self.model.dtype();
        let (out, _) = self.model.output_buffer(mb)?;
        self.model.gpu().write(out, &super::encode(&[value], dtype))
    }
}

/// The data a send op reads (a stage's output, or a kept input gradient) and its element count.
fn send_data<'m, G: Gpu>(
    model: &'m GpuGpt<'_, G>,
    op: &LinkOp,
    mb: u64,
) -> Result<(Dev<'m, G::Buf>, usize), GpuError> {
    match op {
        LinkOp::SendOutput { .. } => model.output_buffer(mb),
        _ => model.kept_input_grad(mb),
    }
}

/// `other` as a stage of this device type.
fn same_device<'a, G: Gpu + 'static>(
    op: &'static str,
    other: &'a mut dyn DeviceStage,
) -> Result<&'a mut GpuStage<G>, GpuError> {
    other
        .as_any_mut()
        .downcast_mut::<GpuStage<G>>()
        .ok_or(GpuError::Shape { op, detail: "the other stage is on another device".into() })
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

/// The arena ranges of `0..n` outside `done` (which it sorts and empties): what a step's
/// reductions or drains have not covered.
pub fn complement(done: &mut Vec<std::ops::Range<usize>>, n: usize) -> Vec<std::ops::Range<usize>> {
    done.sort_by_key(|r| r.start);
    let mut gaps = Vec::new();
    let mut at = 0;
    for r in done.drain(..) {
        if r.start > at {
            gaps.push(at..r.start.min(n));
        }
        at = at.max(r.end);
    }
    if at < n {
        gaps.push(at..n);
    }
    gaps
}

/// A data-parallel group on a device, made by [`StageFactory::reduce_group`] and handed to
/// [`StageFactory::make`] for every chunk of the rank (they share it, as they share the
/// device). Opaque: it holds the device's own communicator type.
#[derive(Clone)]
pub struct DeviceGroup {
    comm: Arc<dyn std::any::Any + Send + Sync>,
    describe: String,
}

impl DeviceGroup {
    fn new<G: Gpu + 'static>(comm: Arc<dyn DeviceComm<G>>, describe: String) -> Self {
        DeviceGroup { comm: Arc::new(comm), describe }
    }

    /// The communicator of a `G` device.
    fn comm<G: Gpu + 'static>(&self, op: &'static str) -> Result<Arc<dyn DeviceComm<G>>, GpuError> {
        self.comm.downcast_ref::<Arc<dyn DeviceComm<G>>>().cloned().ok_or_else(|| GpuError::Shape {
            op,
            detail: format!("the device group ({}) belongs to another device", self.describe),
        })
    }

    /// What carries the reductions, for logs ("NCCL" or "through the host").
    pub fn describe(&self) -> &str {
        &self.describe
    }
}

impl std::fmt::Debug for DeviceGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceGroup({})", self.describe)
    }
}

/// What a factory builds: a chunk's device stage (config, layer range, host parameters, and the
/// device group it sums its gradients over, if any).
type MakeStage = dyn Fn(&GptConfig, LayerRange, &[f32], Option<&DeviceGroup>) -> StageResult + Send + Sync;
type StageResult = Result<Box<dyn DeviceStage>, GpuError>;

type MakeGroup = dyn Fn(Box<dyn Comm>) -> Result<DeviceGroup, GpuError> + Send + Sync;

/// Builds the [`DeviceStage`] of a chunk (model config, layer range, initial host parameters)
/// on one device in one precision, and the device's data-parallel groups; what the runtime's
/// `RunOptions::device` holds.
#[derive(Clone)]
pub struct StageFactory {
    make: Arc<MakeStage>,
    /// How the device's data-parallel groups are made; `None`: the runtime reduces on the host.
    group: Option<Arc<MakeGroup>>,
    dtype: DType,
    memory: Arc<dyn Fn() -> MemoryStats + Send + Sync>,
    describe: String,
}

impl StageFactory {
    /// Stages on `gpu` (which lives as long as the process: leak it, or use a `shared()` one)
    /// in `dtype`, without device groups: the runtime sums their gradients on the host (what
    /// suits ranks that share one GPU). See [`StageFactory::with_host_groups`] and
    /// [`StageFactory::cuda_nccl`].
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
            make: Arc::new(
                move |cfg: &GptConfig, range: LayerRange, host: &[f32], group: Option<&DeviceGroup>| {
                    let dp = group.map(|g| g.comm::<G>("StageFactory::make")).transpose()?;
                    let model = GpuGpt::from_range_params(gpu, cfg, range, host, dtype)?;
                    Ok(Box::new(GpuStage {
                        model,
                        dp,
                        reduced: Vec::new(),
                        queued: false,
                        zero: None,
                        links: std::collections::BTreeMap::new(),
                        checked: None,
                        step_start: None,
                    }) as Box<dyn DeviceStage>)
                },
            ),
            group: None,
            memory: Arc::new(move || gpu.memory()),
            dtype,
            describe,
        }
    }

    /// These stages with device groups that sum through the host ([`HostComm`]: download, the
    /// CPU communicator's all-reduce, upload; blocking): the device-group logic on any device
    /// (the emulator tests it this way).
    #[must_use]
    pub fn with_host_groups<G: Gpu + 'static>(self, _gpu: &'static G) -> Self {
        let group = Arc::new(|comm: Box<dyn Comm>| {
            let comm: Arc<dyn DeviceComm<G>> = Arc::new(HostComm::new(comm));
            Ok(DeviceGroup::new(comm, "through the host".into()))
        });
        StageFactory { group: Some(group), ..self }
    }

    /// Stages on a CUDA `gpu` whose data-parallel groups are NCCL communicators (one process
    /// per GPU: NCCL refuses two ranks of one communicator on one device). Each group's rank 0
    /// creates the NCCL unique id and broadcasts it over the group's CPU communicator; joining
    /// is bounded by `timeout`.
    pub fn cuda_nccl(gpu: &'static CudaGpu, dtype: DType, timeout: std::time::Duration) -> Self {
        let group = Arc::new(move |comm: Box<dyn Comm>| {
            let id = super::nccl::broadcast_unique_id(&*comm)?;
            let nccl = NcclComm::init(gpu, id, comm.rank(), comm.size(), comm.group_name(), timeout)?;
            let comm: Arc<dyn DeviceComm<CudaGpu>> = Arc::new(nccl);
            Ok(DeviceGroup::new(comm, "NCCL".into()))
        });
        StageFactory { group: Some(group), ..Self::new(gpu, dtype) }
    }

    /// Whether the device has data-parallel groups of its own ([`StageFactory::reduce_group`]).
    pub fn has_device_groups(&self) -> bool {
        self.group.is_some()
    }

    /// The device group over the ranks of `comm` (a CPU communicator of the data-parallel
    /// group, used for nothing else), for [`StageFactory::make`].
    ///
    /// # Errors
    /// No device groups; the device's communicator cannot be created (NCCL missing, a peer
    /// that never joins).
    pub fn reduce_group(&self, comm: Box<dyn Comm>) -> Result<DeviceGroup, GpuError> {
        match &self.group {
            Some(make) => make(comm),
            None => Err(GpuError::Shape {
                op: "StageFactory::reduce_group",
                detail: format!(
                    "{} has no device groups (made without with_host_groups or NCCL)",
                    self.describe
                ),
            }),
        }
    }

    /// The device link over the two ranks of `comm` (a CPU communicator of a pair of pipeline
    /// ranks, used for setup only) for [`DeviceStage::set_links`]: made as the device groups
    /// are (NCCL, or through the host).
    ///
    /// # Errors
    /// As [`StageFactory::reduce_group`]; a communicator not of two ranks.
    pub fn link_group(&self, comm: Box<dyn Comm>) -> Result<DeviceGroup, GpuError> {
        if comm.size() != 2 {
            return Err(GpuError::Shape {
                op: "StageFactory::link_group",
                detail: format!("a device link joins two ranks; {} has {}", comm.group_name(), comm.size()),
            });
        }
        self.reduce_group(comm)
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

    /// The stage of layer `range` with parameters `host`, reducing its gradients over `group`
    /// on the device when given ([`Finished::Reduce`]).
    ///
    /// # Errors
    /// As [`GpuGpt::from_range_params`]; a group of another factory's device.
    pub fn make(
        &self,
        cfg: &GptConfig,
        range: LayerRange,
        host: &[f32],
        group: Option<&DeviceGroup>,
    ) -> Result<Box<dyn DeviceStage>, GpuError> {
        (self.make)(cfg, range, host, group)
    }
}

impl std::fmt::Debug for StageFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageFactory({})", self.describe)
    }
}
