//! A model chunk as the runtime holds it: the host [`Gpt`] (parameters, gradients, the table the
//! reducer, optimizer shard and checkpoints work on) and, on a GPU run, the chunk's
//! [`DeviceStage`] that does its forwards and backwards (see `crate::gpu::stage`).
//!
//! [`Stage`] dereferences to the host model, so the runtime reads and writes parameters and
//! gradients as on the CPU; any mutable access marks the host parameters as newer than the
//! device's, and the next device forward uploads them first (once per step in practice: after
//! the optimizer). The compute calls (`forward`, `backward_with`, `output`, `input_grad`, …) are
//! the stage's own and go to the device when there is one. The device's gradients are added into
//! the host arena by [`Stage::sync_grads`] after the chunk's last backward of the step (most of
//! them already during that backward, range by range as it finishes them, so the data-parallel
//! reduction overlaps the rest of the backward: [`Stage::backward_report`]); adding keeps a
//! gradient the host already holds (an injected NaN).

use std::ops::{Deref, DerefMut};

use crate::gpu::stage::{DeviceStage, StageFactory};
use crate::kernels::Backend;
use crate::models::gpt::{Gpt, ModelError, StageInput};

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
    /// The device's latest input gradient, on the host.
    dinput: Vec<f32>,
    /// Arena ranges drained to the host since the last sync (zero on the device).
    drained: Vec<std::ops::Range<usize>>,
}

fn dev_err(e: crate::gpu::GpuError) -> ModelError {
    ModelError::Device(e.to_string())
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
            dinput: Vec::new(),
            drained: Vec::new(),
        }
    }

    /// The chunk `host` with its compute on the device `factory` makes (from the host's
    /// current parameters), or on the CPU without a factory.
    ///
    /// # Errors
    /// The device stage cannot be built (an unsupported shape, out of device memory).
    pub fn new(host: Gpt, factory: Option<&StageFactory>) -> Result<Self, ModelError> {
        let Some(f) = factory else { return Ok(Self::cpu(host)) };
        let dev = f.make(host.config(), host.range(), host.params()).map_err(dev_err)?;
        Ok(Stage { dev: Some(dev), ..Self::cpu(host) })
    }

    /// Whether the compute runs on a device.
    pub fn on_device(&self) -> bool {
        self.dev.is_some()
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
        if self.params_dirty {
            dev.set_params(self.host.params()).map_err(dev_err)?;
            self.params_dirty = false;
        }
        dev.forward(mb, batch, seq, input, targets, loss_scale).map_err(dev_err)
    }

    /// Output hidden states of in-flight `mb` (what a stage without the head sends).
    ///
    /// # Errors
    /// Device errors.
    pub fn output_vec(&self, mb: u64) -> Result<Option<Vec<f32>>, ModelError> {
        match &self.dev {
            None => Ok(self.host.output(mb).map(<[f32]>::to_vec)),
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
        dout: Option<&[f32]>,
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
        dout: Option<&[f32]>,
        report: bool,
        ready: &mut dyn FnMut(std::ops::Range<usize>, &[f32]),
    ) -> Result<(), ModelError> {
        if self.dev.is_none() {
            return self.host.backward_with(be, mb, dout, ready);
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
        dout: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        if self.dev.is_none() {
            return self.host.backward_input(be, mb, dout);
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
        let Stage { host, dev, dev_zero, dev_grads, dinput, drained: done, .. } = self;
        let Some(dev) = dev.as_mut() else { return Ok(()) };
        let weights = !matches!(half, Half::Input(..));
        if *dev_zero && weights {
            dev.zero_grads().map_err(dev_err)?;
            *dev_zero = false;
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
        let drained: Option<&mut crate::gpu::stage::Drained<'_>> =
            if report { Some(&mut drain) } else { None };
        match half {
            Half::Both(mb, dout) => dev.backward(mb, dout, drained),
            Half::Input(mb, dout) => dev.backward_input(mb, dout),
            Half::Weight(mb) => dev.backward_weight(mb, drained),
        }
        .map_err(dev_err)?;
        // Gradients not drained (all of them, or ranges never reported such as a head-only
        // stage's tied wte) wait on the device for `sync_grads`.
        *dev_grads |= weights;
        if matches!(half, Half::Weight(_)) || host.range().embedding {
            // Nothing comes back: wait for the device, so the job's time (in traces and the
            // bubble report) is the device's.
            dev.synchronize().map_err(dev_err)
        } else {
            *dinput = dev.input_grad().map_err(dev_err)?;
            Ok(())
        }
    }

    /// Gradient of the range input after the latest backward.
    pub fn input_grad(&self) -> &[f32] {
        match self.dev {
            None => self.host.input_grad(),
            Some(_) => &self.dinput,
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
        self.drained.clear();
    }

    /// Adds the gradients the device accumulated since the last sync into the host arena (a
    /// no-op on the CPU). Call after the chunk's last backward of the step, before reading them.
    ///
    /// # Errors
    /// Device errors.
    pub fn sync_grads(&mut self) -> Result<(), ModelError> {
        let Some(dev) = self.dev.as_mut() else { return Ok(()) };
        if !self.dev_grads {
            return Ok(());
        }
        // Only what was not drained during the backward (drained ranges are zero there).
        let n = self.host.grads().len();
        for gap in undrained(&mut self.drained, n) {
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

/// The parts of `0..n` outside `drained` (which it sorts and empties).
fn undrained(drained: &mut Vec<std::ops::Range<usize>>, n: usize) -> Vec<std::ops::Range<usize>> {
    drained.sort_by_key(|r| r.start);
    let mut gaps = Vec::new();
    let mut at = 0;
    for r in drained.drain(..) {
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

#[cfg(test)]
mod tests {
    use super::undrained;

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
    Both(u64, Option<&'a [f32]>),
    Input(u64, Option<&'a [f32]>),
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
        self.params_dirty = self.dev.is_some();
        &mut self.host
    }
}
