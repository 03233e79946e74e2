//! NCCL communicators over device buffers of a [`CudaGpu`]: the GPU counterpart of
//! `crate::comm::Comm`, with the same failure rules — every wait is bounded, errors name the
//! operation, the rank and the group, and a communicator that times out is aborted
//! (`ncclCommAbort`) so no rank hangs.
//!
//! Each communicator has a stream of its own ([`CudaGpu::new_comm_stream`]): operations are
//! enqueued there (ordered after compute with [`NcclComm::after_compute`]) and return at once;
//! [`NcclComm::wait`] polls the stream's event and `ncclCommGetAsyncError` until the work is
//! done, an error is reported, or the timeout passes. With a stream per communicator a
//! pipeline link's receive that waits for its peer holds back nothing of the data-parallel group's
//! sums, and they hold back none of its sends. Different communicators then run concurrently,
//! which NCCL allows when every rank issues each communicator's operations in the same order
//! (the runtime issues them in program order, the same on the ranks of a group).
//!
//! The unique id is shared through the rendezvous store (the c10d TCPStore every launcher
//! provides): rank 0 creates it and sets `<prefix>/nccl_id`, the others read it with a timeout.
//!
//! Finding the library: cudarc looks for `libnccl.so` (and versioned names that do not include
//! `libnccl.so.2`). pip's `nvidia-nccl-cu13` ships only `site-packages/nvidia/nccl/lib/libnccl.so.2`,
//! so a directory with a `libnccl.so` link to it must be on `LD_LIBRARY_PATH` (`bench/gpu.sh`
//! makes one); [`nccl_available`] says exactly that when the library is missing.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cudarc::nccl::{result as nr, sys as ns};

use super::cuda::{CudaBuf, CudaGpu};
use super::{DType, Dev, GpuError};
use crate::comm::store::StoreClient;
use crate::comm::{Comm, ReduceOp};

/// Checks that libnccl can be loaded (cudarc panics on the first call otherwise).
pub fn nccl_available() -> Result<(), GpuError> {
    // SAFETY: only tries to open the library by its usual names.
    if unsafe { ns::is_culib_present() } {
        Ok(())
    } else {
        Err(GpuError::Nccl {
            op: "loading libnccl".into(),
            rank: 0,
            group: String::new(),
            detail: "libnccl.so was not found on LD_LIBRARY_PATH; with pip's nvidia-nccl-cu13, make a \
                     directory with `ln -s …/site-packages/nvidia/nccl/lib/libnccl.so.2 libnccl.so` and put it \
                     on LD_LIBRARY_PATH (bench/gpu.sh does this)"
                .into(),
        })
    }
}

/// Shares an NCCL unique id through the rendezvous store: rank 0 creates and publishes it, the
/// others wait for it (at most `timeout`).
pub fn share_unique_id(
    store: &mut StoreClient,
    prefix: &str,
    rank: usize,
    timeout: Duration,
) -> Result<ns::ncclUniqueId, GpuError> {
    let key = format!("{prefix}/nccl_id");
    let store_err = |op: &str, e: &dyn std::fmt::Display| GpuError::Nccl {
        op: op.to_string(),
        rank,
        group: prefix.to_string(),
        detail: e.to_string(),
    };
    if rank == 0 {
        nccl_available()?;
        let id = nr::get_uniqueid().map_err(|e| store_err("creating the unique id", &format!("{e:?}")))?;
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        store.set(&key, &bytes).map_err(|e| store_err("publishing the unique id", &e))?;
        Ok(id)
    } else {
        let bytes =
            store.get(&key, timeout).map_err(|e| store_err("reading the unique id from rank 0", &e))?;
        if bytes.len() != 128 {
            return Err(store_err("reading the unique id", &format!("{} bytes, expected 128", bytes.len())));
        }
        let mut id = ns::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as std::ffi::c_char;
        }
        Ok(id)
    }
}

/// Shares an NCCL unique id over a CPU communicator of the group (its broadcast; for groups
/// that have no store key of their own, such as the runtime's data-parallel groups): the
/// group's rank 0 creates it. A rank 0 that cannot (no NCCL there) says so to the others, so
/// that every rank reports the failure instead of waiting.
///
/// # Errors
/// NCCL missing here or at rank 0; the broadcast fails or times out.
pub fn broadcast_unique_id(comm: &dyn Comm) -> Result<ns::ncclUniqueId, GpuError> {
    let (rank, group) = (comm.rank(), comm.group_name().to_string());
    let err =
        |op: &str, detail: String| GpuError::Nccl { op: op.to_string(), rank, group: group.clone(), detail };
    // Word 0: 1 when rank 0 made an id; words 1..=16: the id's 128 bytes.
    let mut words = vec![0i64; 17];
    let mut failure = None;
    if rank == 0 {
        match nccl_available()
            .and_then(|()| nr::get_uniqueid().map_err(|e| err("creating the unique id", format!("{e:?}"))))
        {
            Ok(id) => {
                words[0] = 1;
                let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
                for (w, b) in words[1..].iter_mut().zip(bytes.chunks_exact(8)) {
                    *w = i64::from_le_bytes(b.try_into().unwrap_or_default());
                }
            }
            Err(e) => failure = Some(e),
        }
    } else {
        nccl_available()?;
    }
    let got = comm
        .broadcast(crate::comm::Buf::I64(words), 0)
        .wait()
        .map_err(|e| err("broadcasting the unique id", e.to_string()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let crate::comm::Buf::I64(words) = got else {
        return Err(err("broadcasting the unique id", "the broadcast changed the type".into()));
    };
    if words.len() != 17 || words[0] != 1 {
        return Err(err("broadcasting the unique id", "rank 0 of the group could not create one".into()));
    }
    let mut id = ns::ncclUniqueId { internal: [0; 128] };
    let bytes: Vec<u8> = words[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    for (d, s) in id.internal.iter_mut().zip(&bytes) {
        *d = *s as std::ffi::c_char;
    }
    Ok(id)
}

/// One NCCL communicator.
pub struct NcclComm {
    raw: ns::ncclComm_t,
    rank: usize,
    size: usize,
    name: String,
    timeout: Duration,
    aborted: AtomicBool,
    /// This communicator's stream (NCCL's operations are queued there).
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    /// Events recorded on the communicator's stream by [`NcclComm::mark`], oldest first, and
    /// the next mark's number.
    marks: std::sync::Mutex<(Vec<(u64, cudarc::driver::CudaEvent)>, u64)>,
}

// SAFETY: NCCL communicators may be used from any thread as long as calls on one communicator
// are not concurrent; troupe issues them from the rank's one communication actor.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn nccl_type(d: DType) -> ns::ncclDataType_t {
    match d {
        DType::F32 => ns::ncclDataType_t::ncclFloat32,
        DType::Bf16 => ns::ncclDataType_t::ncclBfloat16,
    }
}

fn nccl_op(op: ReduceOp) -> ns::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ns::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ns::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ns::ncclRedOp_t::ncclMax,
    }
}

struct SendPtr(ns::ncclComm_t);
// SAFETY: the pointer is only handed to the thread that creates the communicator.
unsafe impl Send for SendPtr {}

impl NcclComm {
    /// Joins the communicator `name` of `size` ranks as `rank` on `gpu`'s device. Initialisation
    /// runs on a helper thread so that a peer that never joins is reported after `timeout`
    /// instead of blocking forever.
    pub fn init(
        gpu: &CudaGpu,
        id: ns::ncclUniqueId,
        rank: usize,
        size: usize,
        name: &str,
        timeout: Duration,
    ) -> Result<Self, GpuError> {
        nccl_available()?;
        let stream = gpu.new_comm_stream()?;
        let err = |op: &str, detail: String| GpuError::Nccl {
            op: op.to_string(),
            rank,
            group: name.to_string(),
            detail,
        };
        let ctx = gpu.context().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result =
                ctx.bind_to_thread().map_err(|e| format!("binding the context: {e}")).and_then(|()| {
                    let mut raw = std::ptr::null_mut();
                    // SAFETY: `raw` receives the new communicator; the id came from rank 0.
                    unsafe { nr::comm_init_rank(&mut raw, size as i32, id, rank as i32) }
                        .map(|_| SendPtr(raw))
                        .map_err(|e| format!("{:?}", e.0))
                });
            let _ = tx.send(result);
        });
        let raw = match rx.recv_timeout(timeout) {
            Ok(Ok(p)) => p.0,
            Ok(Err(detail)) => return Err(err("ncclCommInitRank", detail)),
            Err(_) => {
                return Err(err(
                    "ncclCommInitRank",
                    format!("not every rank joined within {timeout:?} (a peer is missing or crashed)"),
                ));
            }
        };
        Ok(NcclComm {
            raw,
            rank,
            size,
            name: name.to_string(),
            timeout,
            aborted: AtomicBool::new(false),
            stream,
            marks: std::sync::Mutex::new((Vec::new(), 0)),
        })
    }

    /// Makes this communicator's stream wait for everything queued on `gpu`'s compute stream
    /// so far (an event, not a host wait): what is queued next reads what the compute wrote.
    pub fn after_compute(&self, gpu: &CudaGpu) -> Result<(), GpuError> {
        gpu.after_compute(&self.stream)
    }

    /// Makes `gpu`'s compute stream wait for everything queued on this communicator so far.
    pub fn compute_after_all(&self, gpu: &CudaGpu) -> Result<(), GpuError> {
        gpu.compute_after(&self.stream)
    }

    /// Marks the work queued on the communicator's stream so far (an event recorded there);
    /// [`NcclComm::compute_after`] with the mark orders later compute after it.
    pub fn mark(&self, _gpu: &CudaGpu) -> Result<u64, GpuError> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.err("marking the communication stream", format!("{e}")))?;
        let mut marks = self.marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = marks.1;
        marks.1 += 1;
        marks.0.push((id, event));
        Ok(id)
    }

    /// Makes the compute stream wait for the communication queued before `mark` (no host
    /// wait; the collectives' errors surface in the next [`NcclComm::wait`]). A mark an
    /// earlier call already covered needs nothing.
    pub fn compute_after(&self, gpu: &CudaGpu, mark: u64) -> Result<(), GpuError> {
        let mut marks = self.marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pos) = marks.0.iter().position(|(id, _)| *id == mark) {
            gpu.compute_waits(&marks.0[pos].1)?;
            marks.0.drain(..=pos);
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn err(&self, op: &str, detail: String) -> GpuError {
        GpuError::Nccl { op: op.to_string(), rank: self.rank, group: self.name.clone(), detail }
    }

    /// Checks that `count` elements of `dtype` fit at `d` (NCCL would read or write past the end).
    fn fits(
        &self,
        gpu: &CudaGpu,
        op: &'static str,
        d: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
    ) -> Result<(), GpuError> {
        use super::Gpu;
        super::check_range(
            op,
            &format!("rank {} of {}", self.rank, self.name),
            d.offset,
            count * dtype.size(),
            gpu.buf_len(d.buf),
        )
    }

    fn check(&self, op: &str, r: Result<nr::NcclStatus, nr::NcclError>) -> Result<(), GpuError> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(self.err(op, "the communicator was aborted after an earlier failure".into()));
        }
        r.map(|_| ()).map_err(|e| self.err(op, format!("{:?}", e.0)))
    }

    /// In-place all-reduce of `count` elements.
    pub fn all_reduce(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "all_reduce", buf, count, dtype)?;
        let p = gpu.device_ptr(buf) as *mut c_void;
        // SAFETY: `p` is device memory of this context with room for `count` elements (caller).
        let r = unsafe {
            nr::all_reduce(p, p, count, nccl_type(dtype), nccl_op(op), self.raw, self.stream.cu_stream() as _)
        };
        self.check("all_reduce", r)
    }

    /// Reduce-scatter: `send` holds `size · recv_count` elements, `recv` gets this rank's chunk.
    pub fn reduce_scatter(
        &self,
        gpu: &CudaGpu,
        send: Dev<'_, CudaBuf>,
        recv: Dev<'_, CudaBuf>,
        recv_count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "reduce_scatter", send, recv_count * self.size, dtype)?;
        self.fits(gpu, "reduce_scatter", recv, recv_count, dtype)?;
        let (s, r) = (gpu.device_ptr(send) as *const c_void, gpu.device_ptr(recv) as *mut c_void);
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::reduce_scatter(
                s,
                r,
                recv_count,
                nccl_type(dtype),
                nccl_op(op),
                self.raw,
                self.stream.cu_stream() as _,
            )
        };
        self.check("reduce_scatter", res)
    }

    /// All-gather: every rank contributes `send_count` elements; `recv` gets `size · send_count`.
    pub fn all_gather(
        &self,
        gpu: &CudaGpu,
        send: Dev<'_, CudaBuf>,
        recv: Dev<'_, CudaBuf>,
        send_count: usize,
        dtype: DType,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "all_gather", send, send_count, dtype)?;
        self.fits(gpu, "all_gather", recv, send_count * self.size, dtype)?;
        let (s, r) = (gpu.device_ptr(send) as *const c_void, gpu.device_ptr(recv) as *mut c_void);
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::all_gather(s, r, send_count, nccl_type(dtype), self.raw, self.stream.cu_stream() as _)
        };
        self.check("all_gather", res)
    }

    /// In-place sum-style reduction to `root`: `root`'s buffer gets the reduction of every
    /// rank's; the others' buffers are left as they were.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "reduce", buf, count, dtype)?;
        let p = gpu.device_ptr(buf) as *mut c_void;
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::reduce(
                p,
                p,
                count,
                nccl_type(dtype),
                nccl_op(op),
                root as i32,
                self.raw,
                self.stream.cu_stream() as _,
            )
        };
        self.check("reduce", res)
    }

    /// In-place broadcast from `root`.
    pub fn broadcast(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
        root: usize,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "broadcast", buf, count, dtype)?;
        let p = gpu.device_ptr(buf) as *mut c_void;
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::broadcast(p, p, count, nccl_type(dtype), root as i32, self.raw, self.stream.cu_stream() as _)
        };
        self.check("broadcast", res)
    }

    /// Point-to-point send of `count` elements to `peer` (pair with the peer's `recv`; put both
    /// directions of a pipeline exchange in one [`NcclComm::group`]).
    pub fn send(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "send", buf, count, dtype)?;
        let p = gpu.device_ptr(buf) as *const c_void;
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::send(p, count, nccl_type(dtype), peer as i32, self.raw, self.stream.cu_stream() as _)
        };
        self.check("send", res)
    }

    /// Point-to-point receive of `count` elements from `peer`.
    pub fn recv(
        &self,
        gpu: &CudaGpu,
        buf: Dev<'_, CudaBuf>,
        count: usize,
        dtype: DType,
        peer: usize,
    ) -> Result<(), GpuError> {
        self.fits(gpu, "recv", buf, count, dtype)?;
        let p = gpu.device_ptr(buf) as *mut c_void;
        // SAFETY: as in all_reduce.
        let res = unsafe {
            nr::recv(p, count, nccl_type(dtype), peer as i32, self.raw, self.stream.cu_stream() as _)
        };
        self.check("recv", res)
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd` (paired sends and receives of a
    /// schedule step are issued together so they cannot deadlock).
    pub fn group<R>(&self, f: impl FnOnce() -> Result<R, GpuError>) -> Result<R, GpuError> {
        self.check("ncclGroupStart", nr::group_start())?;
        let out = f();
        let end = self.check("ncclGroupEnd", nr::group_end());
        let out = out?;
        end?;
        Ok(out)
    }

    /// Waits until everything enqueued on the communicator's stream has finished, polling NCCL's
    /// asynchronous error state; aborts the communicator after the timeout. `op` names the
    /// operation in errors.
    pub fn wait(&self, _gpu: &CudaGpu, op: &str) -> Result<(), GpuError> {
        let event =
            self.stream.record_event(None).map_err(|e| self.err(op, format!("recording an event: {e}")))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if event.try_is_complete().map_err(|e| self.err(op, format!("querying the event: {e}")))? {
                return Ok(());
            }
            let mut state = ns::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is alive; `state` receives the result.
            unsafe { ns::ncclCommGetAsyncError(self.raw, &mut state) };
            if state != ns::ncclResult_t::ncclSuccess && state != ns::ncclResult_t::ncclInProgress {
                self.abort();
                return Err(self.err(op, format!("asynchronous NCCL error {state:?}; communicator aborted")));
            }
            if start.elapsed() > self.timeout {
                self.abort();
                return Err(self.err(
                    op,
                    format!(
                        "did not complete within {:?} (a peer is missing or stuck); communicator aborted",
                        self.timeout
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Aborts the communicator: pending NCCL work on every rank of it fails instead of hanging.
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: aborting is valid at any time after initialisation, once.
            unsafe {
                let _ = nr::comm_abort(self.raw);
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::Acquire) {
            // SAFETY: destroyed once; no work is pending after the owner's last wait.
            unsafe {
                let _ = nr::comm_destroy(self.raw);
            }
        }
    }
}
