//! Data parallelism on GPUs: the gradient all-reduce that the CPU runtime's GradReducer does,
//! over device buffers.
//!
//! [`DeviceComm`] is what the GPU training loop and the runtime's device groups need from a
//! communicator: a sum all-reduce of a device range, queued so that it overlaps the rest of the
//! backward, an in-place reduce to one rank and an in-place broadcast (the distributed
//! optimizer's gradient reduction and parameter gather), point-to-point sends and receives
//! matched in the order queued (the pipeline's device links; grouped where an exchange pairs
//! them), and a bounded wait at the end. Two implementations:
//! - [`NcclComm`] on a [`CudaGpu`]: each all-reduce is queued on the communicator's stream after
//!   an event recorded on the compute stream (so it starts when backward has written that range,
//!   while later layers' backward keeps running); [`DeviceComm::finish`] polls NCCL with the
//!   communicator's timeout and orders later compute after the reductions — the GPU form of the
//!   CPU reducer's overlap.
//! - [`HostComm`] on any [`Gpu`] (the emulator in tests): copies the range to the host when the
//!   collective is queued (what NCCL would read: the data at that point of the stream), starts
//!   the CPU `Comm`'s collective (in-process or TCP), and on the emulator writes its result
//!   back only in [`DeviceComm::finish`] — as late as NCCL may — so that code which reads a
//!   range before `finish`, or writes one between the queueing and `finish`, sees the other
//!   values and fails its tests here instead of racing on a GPU. Where the GPU has no stable
//!   addresses ([`Gpu::stable_address`]: CUDA) the result is written back at once.

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
    /// Queues a send of `count` elements of `dtype` at `buf` to group rank `peer`, after the work
    /// queued on the GPU so far. Messages between two ranks match in the order queued: this is
    /// the peer's next [`DeviceComm::recv`] from this rank.
    fn send(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError>;
    /// Queues a receive of `count` elements of `dtype` into `buf` from group rank `peer` (its next
    /// send to this rank), after the work queued on the GPU so far.
    fn recv(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError>;
    /// Queues the sends and receives `f` queues as one group: with NCCL one launch between
    /// `ncclGroupStart` and `ncclGroupEnd`, so the two directions of an exchange progress
    /// together rather than one after the other (Megatron's batched send-forward-recv-backward).
    fn grouped(&self, f: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<(), GpuError>;
    /// Waits (bounded by the communicator's timeout) until every queued collective has finished,
    /// and orders later GPU work after them.
    fn finish(&self, gpu: &G) -> Result<(), GpuError>;
    /// Marks the collectives queued so far, for [`DeviceComm::compute_after`].
    fn mark(&self, gpu: &G) -> Result<u64, GpuError>;
    /// Orders the GPU work queued from now on after the collectives queued before `mark`,
    /// without a host wait where the GPU can (NCCL: the compute stream waits for an event; their
    /// errors and timeouts surface in the next [`DeviceComm::finish`]); through the host their
    /// results land now. A mark that an earlier call covered needs nothing.
    fn compute_after(&self, gpu: &G, mark: u64) -> Result<(), GpuError>;
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
        self.after_compute(gpu)?;
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
        self.after_compute(gpu)?;
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
        self.after_compute(gpu)?;
        NcclComm::broadcast(self, gpu, buf, count, dtype, root)
    }

    fn send(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, super::cuda::CudaBuf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        self.after_compute(gpu)?;
        NcclComm::send(self, gpu, buf, count, dtype, peer)
    }

    fn recv(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, super::cuda::CudaBuf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        self.after_compute(gpu)?;
        NcclComm::recv(self, gpu, buf, count, dtype, peer)
    }

    fn grouped(&self, f: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<(), GpuError> {
        self.group(f)
    }

    fn finish(&self, gpu: &CudaGpu) -> Result<(), GpuError> {
        self.wait(gpu, "waiting for the queued operations")?;
        self.compute_after_all(gpu)
    }

    fn mark(&self, gpu: &CudaGpu) -> Result<u64, GpuError> {
        NcclComm::mark(self, gpu)
    }

    fn compute_after(&self, gpu: &CudaGpu, mark: u64) -> Result<(), GpuError> {
        NcclComm::compute_after(self, gpu, mark)
    }
}

/// A CPU communicator used for device buffers by copying through the host (see the module
/// docs).
pub struct HostComm {
    comm: Box<dyn Comm>,
    /// Collectives queued and not yet landed, in the order queued, and how many were queued
    /// in all (a [`DeviceComm::mark`]).
    pending: std::sync::Mutex<(std::collections::VecDeque<Pending>, u64)>,
    /// Point-to-point messages queued so far, by (direction: sent, peer): the next one's tag.
    p2p: std::sync::Mutex<std::collections::HashMap<(bool, usize), u64>>,
}

/// A collective [`HostComm`] has started: its result goes to `target` (an address from
/// [`Gpu::stable_address`] and the bytes there) in [`DeviceComm::finish`] (or an earlier
/// [`DeviceComm::compute_after`]). `seq`: its place among all the collectives queued.
struct Pending {
    seq: u64,
    op: &'static str,
    work: Started,
    target: Option<(usize, usize)>,
    dtype: DType,
}

/// A CPU operation [`HostComm`] started: one that returns values, or a send.
enum Started {
    Values(crate::comm::Work<Buf>),
    Sent(crate::comm::Work<()>),
}

impl HostComm {
    pub fn new(comm: Box<dyn Comm>) -> Self {
        HostComm {
            comm,
            pending: std::sync::Mutex::new((std::collections::VecDeque::new(), 0)),
            p2p: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, (std::collections::VecDeque<Pending>, u64)> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lands, in order, the pending collectives queued before `mark`.
    fn land<G: Gpu>(&self, gpu: &G, mark: u64) -> Result<(), GpuError> {
        loop {
            let Some(p) = ({
                let mut pending = self.pending();
                if pending.0.front().is_some_and(|p| p.seq < mark) { pending.0.pop_front() } else { None }
            }) else {
                return Ok(());
            };
            let values = match p.work {
                Started::Values(w) => self.result(p.op, w)?,
                Started::Sent(w) => {
                    w.wait().map_err(|e| self.comm_err(p.op, &e))?;
                    continue;
                }
            };
            if let Some((addr, len)) = p.target {
                let bytes = encode(&values, p.dtype);
                if bytes.len() != len {
                    return Err(GpuError::Shape {
                        op: "HostComm::finish",
                        detail: format!("the {} returned {} bytes for {len}", p.op, bytes.len()),
                    });
                }
                // SAFETY: `addr` is the stable address of the collective's buffer, which the
                // caller keeps alive until the collective lands (as for NCCL), with `len` bytes
                // of room.
                unsafe { gpu.write_later(addr, &bytes)? };
            }
        }
    }

    fn comm_err(&self, op: &str, e: &dyn std::fmt::Display) -> GpuError {
        GpuError::Nccl {
            op: format!("{op} (through the host)"),
            rank: self.comm.rank(),
            group: self.comm.group_name().to_string(),
            detail: e.to_string(),
        }
    }

    /// The values of a finished collective, or its error naming `op`.
    fn result(&self, op: &str, work: crate::comm::Work<Buf>) -> Result<Vec<f32>, GpuError> {
        let out = work.wait().map_err(|e| self.comm_err(op, &e))?;
        let Buf::F32(values) = out else {
            return Err(GpuError::Shape { op: "HostComm", detail: format!("the {op} changed the type") });
        };
        Ok(values)
    }

    /// Starts the CPU collective `run` on the fp32 values of `count` elements of `dtype` at `buf`
    /// (downloaded now when `read` says the collective reads them — a broadcast's receivers
    /// pass zeros; bf16 widens exactly); its result is written back, when `keep` says this
    /// rank keeps it, in [`DeviceComm::finish`] (at once where the GPU has no stable addresses).
    /// `op` names the collective in errors.
    #[allow(clippy::too_many_arguments)]
    fn through_host<G: Gpu>(
        &self,
        op: &'static str,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        (read, keep): (bool, bool),
        run: impl FnOnce(&dyn Comm, Buf) -> crate::comm::Work<Buf>,
    ) -> Result<(), GpuError> {
        let mut bytes = vec![0u8; count * dtype.size()];
        if read {
            gpu.download(buf.buf, buf.offset, &mut bytes)?;
        }
        let work = run(&*self.comm, Buf::F32(decode(&bytes, dtype)));
        let mut pending = self.pending();
        let seq = pending.1;
        pending.1 += 1;
        match gpu.stable_address(buf) {
            Some((addr, room)) if room >= bytes.len() => {
                let target = keep.then_some((addr, bytes.len()));
                pending.0.push_back(Pending { seq, op, work: Started::Values(work), target, dtype });
                Ok(())
            }
            _ => {
                drop(pending);
                let values = self.result(op, work)?;
                if keep { gpu.write(buf, &encode(&values, dtype)) } else { Ok(()) }
            }
        }
    }

    /// The tag of the next message sent to (`sent`) or received from `peer`, after checking it.
    fn p2p_tag(&self, op: &'static str, sent: bool, peer: usize) -> Result<u64, GpuError> {
        if peer >= self.comm.size() || peer == self.comm.rank() {
            return Err(GpuError::Shape {
                op,
                detail: format!(
                    "peer {peer} from rank {} of a group of {}",
                    self.comm.rank(),
                    self.comm.size()
                ),
            });
        }
        let mut p2p = self.p2p.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = p2p.entry((sent, peer)).or_insert(0);
        *n += 1;
        Ok(*n - 1)
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
        self.through_host("all_reduce", gpu, buf, count, dtype, (true, true), |c, b| {
            c.all_reduce(b, ReduceOp::Sum)
        })
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
        self.through_host("reduce", gpu, buf, count, dtype, (true, keep), |c, b| {
            c.all_reduce(b, ReduceOp::Sum)
        })
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
        self.through_host("broadcast", gpu, buf, count, dtype, (!keep, keep), |c, b| c.broadcast(b, root))
    }

    fn send(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        let tag = self.p2p_tag("HostComm::send", true, peer)?;
        let mut bytes = vec![0u8; count * dtype.size()];
        gpu.download(buf.buf, buf.offset, &mut bytes)?;
        let work = self.comm.send(Buf::F32(decode(&bytes, dtype)), peer, tag);
        // Nothing to write back: pending only so that `finish` reports its failure.
        let mut pending = self.pending();
        let seq = pending.1;
        pending.1 += 1;
        pending.0.push_back(Pending { seq, op: "send", work: Started::Sent(work), target: None, dtype });
        Ok(())
    }

    fn recv(
        &self,
        gpu: &G,
        buf: Dev<'_, G::Buf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        let tag = self.p2p_tag("HostComm::recv", false, peer)?;
        self.through_host("recv", gpu, buf, count, dtype, (false, true), |c, _| {
            c.recv(crate::comm::DType::F32, count, peer, tag)
        })
    }

    fn grouped(&self, f: &mut dyn FnMut() -> Result<(), GpuError>) -> Result<(), GpuError> {
        // Through the host a send never waits for its receive: nothing to group.
        f()
    }

    fn finish(&self, gpu: &G) -> Result<(), GpuError> {
        self.land(gpu, u64::MAX)
    }

    fn mark(&self, _gpu: &G) -> Result<u64, GpuError> {
        Ok(self.pending().1)
    }

    fn compute_after(&self, gpu: &G, mark: u64) -> Result<(), GpuError> {
        self.land(gpu, mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{EmuGpu, download_f32, upload_f32};

    /// On the emulator a collective through the host reads the device range when queued and
    /// lands in [`DeviceComm::finish`], as NCCL's may: before it the range holds what it did,
    /// and a write between the two is overwritten — so the device-group tests catch code that
    /// reads a reduced range without waiting for it. Two ranks as threads, each on its own
    /// emulator.
    #[test]
    fn collectives_through_the_host_land_at_finish() {
        if super::super::emu::shared().is_none() {
            eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
            return;
        }
        let comms = crate::comm::inproc::world(2, crate::comm::CommOptions::default()).unwrap();
        let threads: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let gpu = EmuGpu::new().unwrap();
                    let group = HostComm::new(comm);
                    let me = group.comm.rank() as f32;
                    let start = [1.0 + me, 10.0 * (1.0 + me), 0.5 + me, -2.0 - me];
                    let buf = upload_f32(&gpu, &start, DType::Bf16).unwrap();
                    let at = |i: usize| Dev::new(&buf).at(i, DType::Bf16);
                    // Sum of elements 0..2, broadcast of 2..4 from rank 1.
                    DeviceComm::<EmuGpu>::all_reduce_sum(&group, &gpu, at(0), 2, DType::Bf16).unwrap();
                    DeviceComm::<EmuGpu>::broadcast(&group, &gpu, at(2), 2, DType::Bf16, 1).unwrap();
                    let queued = download_f32(&gpu, at(0), 4, DType::Bf16).unwrap();
                    gpu.write(at(0), &encode(&[99.0], DType::Bf16)).unwrap();
                    group.finish(&gpu).unwrap();
                    let done = download_f32(&gpu, at(0), 4, DType::Bf16).unwrap();
                    (start, queued, done)
                })
            })
            .collect();
        for t in threads {
            let (start, queued, done) = t.join().unwrap();
            assert_eq!(queued, start, "nothing lands before finish");
            assert_eq!(done, [3.0, 30.0, 1.5, -3.0], "sums of both ranks; rank 1's broadcast values");
        }
    }

    /// Sends and receives through the host match in the order queued, land at `finish` (the
    /// receiver's range keeps its values before), and a peer outside the pair is an error.
    #[test]
    fn point_to_point_through_the_host_matches_in_order() {
        if super::super::emu::shared().is_none() {
            eprintln!("SKIPPED: no kernel emulator (g++ missing or TROUPE_SKIP_EMU set)");
            return;
        }
        let comms = crate::comm::inproc::world(2, crate::comm::CommOptions::default()).unwrap();
        let threads: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let gpu = EmuGpu::new().unwrap();
                    let pair = HostComm::new(comm);
                    let me = pair.comm.rank();
                    let buf = upload_f32(&gpu, &[1.0, 2.0, 3.0, 4.0], DType::Bf16).unwrap();
                    let at = |i: usize| Dev::new(&buf).at(i, DType::Bf16);
                    let bad = DeviceComm::<EmuGpu>::send(&pair, &gpu, at(0), 1, DType::Bf16, me).is_err();
                    if me == 0 {
                        // Two messages: elements 0..2, then 2..4 (the receiver takes them in order).
                        DeviceComm::<EmuGpu>::grouped(&pair, &mut || {
                            DeviceComm::<EmuGpu>::send(&pair, &gpu, at(0), 2, DType::Bf16, 1)?;
                            DeviceComm::<EmuGpu>::send(&pair, &gpu, at(2), 2, DType::Bf16, 1)
                        })
                        .unwrap();
                    } else {
                        DeviceComm::<EmuGpu>::recv(&pair, &gpu, at(2), 2, DType::Bf16, 0).unwrap();
                        DeviceComm::<EmuGpu>::recv(&pair, &gpu, at(0), 2, DType::Bf16, 0).unwrap();
                    }
                    let queued = download_f32(&gpu, at(0), 4, DType::Bf16).unwrap();
                    DeviceComm::<EmuGpu>::finish(&pair, &gpu).unwrap();
                    (me, bad, queued, download_f32(&gpu, at(0), 4, DType::Bf16).unwrap())
                })
            })
            .collect();
        for t in threads {
            let (me, bad, queued, done) = t.join().unwrap();
            assert!(bad, "rank {me}: a send to itself was accepted");
            assert_eq!(queued, [1.0, 2.0, 3.0, 4.0], "rank {me}: nothing lands before finish");
            let want = if me == 0 { [1.0, 2.0, 3.0, 4.0] } else { [3.0, 4.0, 1.0, 2.0] };
            assert_eq!(done, want, "rank {me}: the first message into 2..4, the second into 0..2");
        }
    }
}
