//! Data parallelism on GPUs: the gradient all-reduce that the CPU runtime's GradReducer does,
//! over device buffers.
//!
//! [`DeviceComm`] is what the GPU training loop and the runtime's device groups need from a
//! communicator: a sum all-reduce of a device range, queued so that it overlaps the rest of the
//! backward, an in-place reduce to one rank and an in-place broadcast (the distributed
//! optimizer's gradient reduction and parameter gather), and a bounded
//! wait at the end. Two implementations:
//! - [`NcclComm`] on a [`CudaGpu`]: each all-reduce is queued on the communication stream after
//!   an event recorded on the compute stream (so it starts when backward has written that range,
//!   while later layers' backward keeps running); [`DeviceComm::finish`] polls NCCL with the
//!   communicator's timeout and orders later compute after the reductions — the GPU form of the
//!   CPU reducer's overlap.
//! - [`HostComm`] on any [`Gpu`] (the emulator in tests): copies the range to the host, runs the
//!   CPU `Comm`'s all-reduce (in-process or TCP), copies it back. No overlap; same results.

use super::cuda::CudaGpu;
use super::nccl::NcclComm;
use super::{DType, Dev, Gpu, GpuError, decode, encode};
use crate::comm::{Buf, Comm, ReduceOp};

/// A data-parallel group as the GPU training loop uses it.
pub trait DeviceComm<G: Gpu>: Send + Sync {
    /// This rank in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Queues an in-place sum over the group of `count` elements of `dtype` at `buf`, after the
    /// work queued on the GPU so far.
    fn all_reduce_sum(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
    ) -> Result<(), GpuError>;
    /// Queues an in-place sum over the group into group rank `root`'s `count` elements of
    /// `dtype` at `buf`, after the work queued on the GPU so far; the other ranks' buffers keep
    /// their values (the distributed optimizer's gradient reduction: each part to its owner).
    fn reduce_sum(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError>;
    /// Queues an in-place broadcast from group rank `root` of `count` elements of `dtype` at
    /// `buf`, after the work queued on the GPU so far (every rank passes a buffer of the length).
    fn broadcast(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError>;
    /// Waits (bounded by the communicator's timeout) until every queued collective has finished,
    /// and orders later GPU work after them.
    fn finish(&self, gpu: &G) -> Result<(), GpuError>;
}

impl DeviceComm<CudaGpu> for NcclComm {
    fn rank(&self) -> usize {
        NcclComm::rank(self)
    }

    fn size(&self) -> usize {
        NcclComm::size(self)
    }

    fn all_reduce_sum(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, super::cuda::CudaBuf>,
        count: usize,
        dtype: DType,
    ) -> Result<(), GpuError> {
        gpu.comm_after_compute()?;
        self.all_reduce(gpu, buf, count, dtype, ReduceOp::Sum)
    }

    fn reduce_sum(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, super::cuda::CudaBuf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError> {
        gpu.comm_after_compute()?;
        self.reduce(gpu, buf, count, dtype, ReduceOp::Sum, root)
    }

    fn broadcast(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, super::cuda::CudaBuf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError> {
        gpu.comm_after_compute()?;
        NcclComm::broadcast(self, gpu, buf, count, dtype, root)
    }

    fn finish(&self, gpu: &CudaGpu) -> Result<(), GpuError> {
        self.wait(gpu, "gradient all-reduce")?;
        gpu.compute_after_comm()?;
        Ok(())
    }
}

/// A CPU communicator used for device buffers by copying through the host.
pub struct HostComm {
    comm: Box<dyn Comm>,
}

impl HostComm {
    pub fn new(comm: Box<dyn Comm>) -> Self {
        HostComm { comm }
    }

    /// Runs the CPU collective `run` on the fp32 values of `count` elements of `dtype` at `buf`
    /// (downloaded; bf16 widens exactly) and writes its result back when `keep` says this rank
    /// keeps it. `op` names the collective in errors.
    #[allow(clippy::too_many_arguments)]
    fn through_host<G: Gpu>(
        &self,
        op: &'static str,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        keep: bool,
        run: impl FnOnce(&dyn Comm, Buf) -> crate::comm::Work<Buf>,
    ) -> Result<(), GpuError> {
        let mut bytes = vec![0u8; count * dtype.size()];
        gpu.download(buf.buf, buf.offset, &mut bytes)?;
        let out = run(&*self.comm, Buf::F32(decode(&bytes, dtype))).wait().map_err(|e| GpuError::Nccl {
            op: format!("{op} (through the host)"),
            rank: self.comm.rank(),
            group: self.comm.group_name().to_string(),
            detail: e.to_string(),
        })?;
        let Buf::F32(values) = out else {
            return Err(GpuError::Shape { op: "HostComm", detail: format!("the {op} changed the type") });
        };
        if !keep {
            return Ok(());
        }
        gpu.write(buf, &encode(&values, dtype))
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<(), GpuError> {
        if root >= self.comm.size() {
            return Err(GpuError::Shape {
                op,
                detail: format!("root {root} of a group of {}", self.comm.size()),
            });
        }
        Ok(())
    }
}

impl<G: Gpu> DeviceComm<G> for HostComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn all_reduce_sum(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
    ) -> Result<(), GpuError> {
        self.through_host("all_reduce", gpu, buf, count, dtype, true, |c, b| c.all_reduce(b, ReduceOp::Sum))
    }

    fn reduce_sum(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError> {
        self.check_root("HostComm::reduce_sum", root)?;
        // The CPU communicator's all-reduce; only the root keeps the sum, as a reduce would.
        let keep = self.comm.rank() == root;
        self.through_host("reduce", gpu, buf, count, dtype, keep, |c, b| c.all_reduce(b, ReduceOp::Sum))
    }

    fn broadcast(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError> {
        self.check_root("HostComm::broadcast", root)?;
        // The root's values are its own already.
        let keep = self.comm.rank() != root;
        self.through_host("broadcast", gpu, buf, count, dtype, keep, |c, b| c.broadcast(b, root))
    }

    fn finish(&self, _gpu: &G) -> Result<(), GpuError> {
        Ok(())
    }
}
