//! [`Group`]: the one implementation of [`Comm`] over any [`Link`]. Collectives run in issue
//! order on the group's own worker thread (its "stream", as NCCL orders work on a CUDA stream),
//! each numbered by a per-group sequence number that keys its messages. Sends run on the caller's
//! thread and never wait for the receiver; each receive waits on its own thread, so pipeline
//! p2p never queues behind a collective.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::buf::{Buf, DType, Elem, Payload, ReduceOp};
use super::error::LinkError;
use super::link::Link;
use super::mailbox::{Key, Kind};
use super::work::{Completer, Work, work_pair};
use super::{Comm, CommError, CommOptions, direct, ring};

type Job = Box<dyn FnOnce() + Send>;

/// FNV-1a, stable across processes, for group ids.
pub(crate) fn group_id(name: &str, members: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    name.bytes().for_each(&mut eat);
    for m in members {
        m.to_le_bytes().into_iter().for_each(&mut eat);
    }
    h
}

/// What one operation needs: the group's identity and this operation's key.
pub(crate) struct Ctx<L: Link> {
    link: Arc<L>,
    name: Arc<str>,
    id: u64,
    members: Arc<[usize]>,
    me: usize,
    opts: CommOptions,
    kind: Kind,
    seq: u64,
    scratch: Arc<Mutex<Option<Lent>>>,
}

/// A vector this rank lent in its previous collective, kept so the next one can reuse its memory
/// once every borrower has dropped it (a fresh multi-megabyte allocation per operation costs
/// thousands of page faults).
pub(crate) type Lent = Arc<dyn std::any::Any + Send + Sync>;

impl<L: Link> Ctx<L> {
    /// The previous lent vector, if it has the right type and nobody borrows it any more.
    pub(crate) fn take_scratch<T: Elem>(&self) -> Option<Vec<T>> {
        let lent = match self.scratch.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }?;
        Arc::try_unwrap(lent.downcast::<Vec<T>>().ok()?).ok()
    }
    /// Remembers `lent` for [`Ctx::take_scratch`].
    pub(crate) fn keep_scratch(&self, lent: Lent) {
        match self.scratch.lock() {
            Ok(mut g) => *g = Some(lent),
            Err(p) => *p.into_inner() = Some(lent),
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.members.len()
    }
    pub(crate) fn me(&self) -> usize {
        self.me
    }
    pub(crate) fn segment_elems<T: Elem>(&self) -> usize {
        (self.opts.segment_bytes / T::DTYPE.size()).max(1)
    }
    fn key(&self, step: u32, seg: u32) -> Key {
        Key { group: self.id, kind: self.kind, seq: self.seq, step, seg }
    }
    fn err(&self, peer: usize, key: Key, e: LinkError) -> CommError {
        let (op, group, rank) = (self.kind.name(), self.name.to_string(), self.link.rank());
        let (peer, tag) = (self.members[peer], key.describe());
        match e {
            LinkError::Timeout => {
                CommError::Timeout { op, group, rank, peer, tag, timeout: self.opts.timeout }
            }
            LinkError::PeerLost(reason) => CommError::PeerLost { op, group, rank, peer, tag, reason },
            LinkError::Mismatch { expected, got } => CommError::Mismatch {
                op,
                group,
                rank,
                peer,
                tag,
                detail: format!("expected {expected}, got {got}"),
            },
        }
    }
    pub(crate) fn send<T: Elem>(
        &self,
        peer: usize,
        step: u32,
        seg: u32,
        data: &[T],
    ) -> Result<(), CommError> {
        let key = self.key(step, seg);
        self.link.send_slice(self.members[peer], key, data).map_err(|e| self.err(peer, key, e))
    }
    /// Receives one segment and checks its dtype and length.
    pub(crate) fn recv<T: Elem>(
        &self,
        peer: usize,
        step: u32,
        seg: u32,
        len: usize,
    ) -> Result<Payload, CommError> {
        let key = self.key(step, seg);
        let deadline = Instant::now() + self.opts.timeout;
        let p = self
            .link
            .mailbox()
            .take(self.members[peer], key, deadline)
            .map_err(|e| self.err(peer, key, e))?;
        if p.dtype() != T::DTYPE || p.len() != len {
            let e = LinkError::Mismatch {
                expected: format!("{len} × {}", T::DTYPE),
                got: format!("{} × {}", p.len(), p.dtype()),
            };
            return Err(self.err(peer, key, e));
        }
        Ok(p)
    }
    /// Lends `data` to group rank `peer`.
    pub(crate) fn send_shared(
        &self,
        peer: usize,
        step: u32,
        data: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<(), CommError> {
        let key = self.key(step, 0);
        // Only direct.rs lends, always a Vec of a supported element type.
        let (dtype, len) = shared_shape(&*data).unwrap_or((DType::F32, 0));
        self.link.send_shared(self.members[peer], key, dtype, len, data).map_err(|e| self.err(peer, key, e))
    }
    /// Borrows a vector lent by group rank `peer`, checking its type and length.
    pub(crate) fn recv_shared<T: Elem>(
        &self,
        peer: usize,
        step: u32,
        len: usize,
    ) -> Result<Arc<Vec<T>>, CommError> {
        let p = self.recv::<T>(peer, step, 0, len)?;
        let key = self.key(step, 0);
        match p {
            Payload::Shared(_, _, a) => a.downcast::<Vec<T>>().map_err(|_| {
                let e = LinkError::Mismatch {
                    expected: format!("a lent {} vector", T::DTYPE),
                    got: "another type".into(),
                };
                self.err(peer, key, e)
            }),
            _ => Err(self.err(
                peer,
                key,
                LinkError::Mismatch { expected: "a lent vector".into(), got: "a copied message".into() },
            )),
        }
    }
    pub(crate) fn elems<'a, T: Elem>(
        &self,
        p: &'a Payload,
        peer: usize,
        step: u32,
        seg: u32,
    ) -> Result<&'a [T], CommError> {
        p.elems::<T>().ok_or_else(|| {
            let e = LinkError::Mismatch {
                expected: format!("aligned {}", T::DTYPE),
                got: "unaligned bytes".into(),
            };
            self.err(peer, self.key(step, seg), e)
        })
    }
}

/// Element type and length of a lent vector.
fn shared_shape(a: &(dyn std::any::Any + Send + Sync)) -> Option<(DType, usize)> {
    if let Some(v) = a.downcast_ref::<Vec<f32>>() {
        return Some((DType::F32, v.len()));
    }
    if let Some(v) = a.downcast_ref::<Vec<half::bf16>>() {
        return Some((DType::Bf16, v.len()));
    }
    a.downcast_ref::<Vec<i64>>().map(|v| (DType::I64, v.len()))
}

/// A communicator for one group of world ranks over a shared link.
pub(crate) struct Group<L: Link> {
    link: Arc<L>,
    name: Arc<str>,
    id: u64,
    members: Arc<[usize]>,
    me: usize,
    opts: CommOptions,
    seq: AtomicU64,
    stream: Mutex<mpsc::Sender<Job>>,
    scratch: Arc<Mutex<Option<Lent>>>,
}

macro_rules! typed {
    ($buf:expr, |$v:ident| $body:expr) => {
        match $buf {
            Buf::F32($v) => $body,
            Buf::Bf16($v) => $body,
            Buf::I64($v) => $body,
        }
    };
}

impl<L: Link> Group<L> {
    /// A group of `members` (world ranks, in group-rank order); this rank must be one of them.
    pub(crate) fn new(
        link: Arc<L>,
        name: &str,
        members: Vec<usize>,
        opts: CommOptions,
    ) -> Result<Self, CommError> {
        let rank = link.rank();
        let Some(me) = members.iter().position(|&m| m == rank) else {
            return Err(CommError::Invalid {
                op: "new_group",
                group: name.into(),
                rank,
                msg: format!("rank {rank} is not a member of {members:?}"),
            });
        };
        let mut sorted = members.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != members.len() || sorted.last().is_some_and(|&m| m >= link.world()) {
            return Err(CommError::Invalid {
                op: "new_group",
                group: name.into(),
                rank,
                msg: format!("members {members:?} repeat a rank or exceed world size {}", link.world()),
            });
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("comm-{name}-{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| CommError::Invalid {
                op: "new_group",
                group: name.into(),
                rank,
                msg: format!("cannot start the group's worker thread: {e}"),
            })?;
        Ok(Self {
            id: group_id(name, &members),
            link,
            name: name.into(),
            members: members.into(),
            me,
            opts,
            seq: AtomicU64::new(0),
            stream: Mutex::new(tx),
            scratch: Arc::default(),
        })
    }

    fn gone(&self, op: &'static str) -> CommError {
        CommError::WorkerGone { op, group: self.name.to_string(), rank: self.link.rank() }
    }

    fn invalid(&self, op: &'static str, msg: String) -> CommError {
        CommError::Invalid { op, group: self.name.to_string(), rank: self.link.rank(), msg }
    }

    fn ctx(&self, kind: Kind, seq: u64) -> Ctx<L> {
        Ctx {
            link: self.link.clone(),
            name: self.name.clone(),
            id: self.id,
            members: self.members.clone(),
            me: self.me,
            opts: self.opts.clone(),
            kind,
            seq,
            scratch: self.scratch.clone(),
        }
    }

    /// Queues `f` on the group's stream; sequence numbers are taken in issue order.
    fn enqueue<R: Send + 'static>(
        &self,
        kind: Kind,
        f: impl FnOnce(&Ctx<L>) -> Result<R, CommError> + Send + 'static,
    ) -> Work<R> {
        let (work, done): (Work<R>, Completer<R>) = work_pair(self.gone(kind.name()));
        let stream = match self.stream.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let cx = self.ctx(kind, self.seq.fetch_add(1, Ordering::SeqCst));
        // If the worker is gone the job (and its completer) is dropped: the work fails cleanly.
        let _ = stream.send(Box::new(move || done.complete(f(&cx))));
        work
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), CommError> {
        if peer >= self.members.len() || peer == self.me {
            return Err(self.invalid(
                op,
                format!("peer {peer} is not another rank of this group of {}", self.members.len()),
            ));
        }
        Ok(())
    }
}

impl<L: Link> Comm for Group<L> {
    fn rank(&self) -> usize {
        self.me
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn global_rank(&self) -> usize {
        self.link.rank()
    }
    fn group_name(&self) -> &str {
        &self.name
    }
    fn members(&self) -> &[usize] {
        &self.members
    }
    fn backend(&self) -> &'static str {
        self.link.backend()
    }

    fn send(&self, buf: Buf, peer: usize, tag: u64) -> Work<()> {
        let r = self.check_peer("send", peer).and_then(|()| {
            let cx = self.ctx(Kind::P2p, tag);
            let key = cx.key(0, 0);
            self.link.send_buf(self.members[peer], key, buf).map_err(|e| cx.err(peer, key, e))
        });
        Work::ready(r, self.gone("send"))
    }

    fn recv(&self, dtype: DType, len: usize, peer: usize, tag: u64) -> Work<Buf> {
        if let Err(e) = self.check_peer("recv", peer) {
            return Work::ready(Err(e), self.gone("recv"));
        }
        let (work, done) = work_pair(self.gone("recv"));
        let cx = self.ctx(Kind::P2p, tag);
        let spawned =
            std::thread::Builder::new().name(format!("recv-{}-{tag}", self.name)).spawn(move || {
                let r = typed!(Buf::zeros(dtype, 0), |v| { recv_owned(&cx, peer, len, &v) });
                done.complete(r);
            });
        if let Err(e) = spawned {
            return Work::ready(
                Err(self.invalid("recv", format!("cannot start a receive thread: {e}"))),
                self.gone("recv"),
            );
        }
        work
    }

    fn all_reduce(&self, mut buf: Buf, op: ReduceOp) -> Work<Buf> {
        let shared = self.link.shares_memory();
        self.enqueue(Kind::AllReduce, move |cx| {
            if shared {
                typed!(&mut buf, |v| direct::all_reduce(cx, v, op))?;
            } else {
                typed!(&mut buf, |v| ring::all_reduce(cx, v, op))?;
            }
            Ok(buf)
        })
    }

    fn reduce_scatter(&self, mut buf: Buf, op: ReduceOp) -> Work<Buf> {
        let shared = self.link.shares_memory();
        self.enqueue(Kind::ReduceScatter, move |cx| {
            if shared {
                typed!(&mut buf, |v| direct::reduce_scatter(cx, v, op))?;
            } else {
                typed!(&mut buf, |v| ring::reduce_scatter(cx, v, op))?;
            }
            Ok(buf)
        })
    }

    fn all_gather(&self, mut buf: Buf) -> Work<Buf> {
        let shared = self.link.shares_memory();
        self.enqueue(Kind::AllGather, move |cx| {
            if shared {
                typed!(&mut buf, |v| direct::all_gather(cx, v))?;
            } else {
                typed!(&mut buf, |v| ring::all_gather_phase(cx, v, 0))?;
            }
            Ok(buf)
        })
    }

    fn broadcast(&self, mut buf: Buf, root: usize) -> Work<Buf> {
        if root >= self.members.len() {
            let e = self
                .invalid("broadcast", format!("root {root} is outside the group of {}", self.members.len()));
            return Work::ready(Err(e), self.gone("broadcast"));
        }
        self.enqueue(Kind::Broadcast, move |cx| {
            typed!(&mut buf, |v| ring::broadcast(cx, v, root))?;
            Ok(buf)
        })
    }

    fn barrier(&self) -> Work<()> {
        let n = self.members.len();
        self.enqueue(Kind::Barrier, move |cx| {
            // One element per rank: every rank's chunk must travel the whole ring.
            ring::all_reduce(cx, &mut vec![0i64; n], ReduceOp::Sum)
        })
    }

    fn new_group(&self, ranks: &[usize], name: &str) -> Result<Box<dyn Comm>, CommError> {
        let mut members = Vec::with_capacity(ranks.len());
        for &r in ranks {
            match self.members.get(r) {
                Some(&g) => members.push(g),
                None => {
                    return Err(self.invalid(
                        "new_group",
                        format!("rank {r} is outside this group of {}", self.members.len()),
                    ));
                }
            }
        }
        let g = Group::new(self.link.clone(), name, members, self.opts.clone())?;
        Ok(Box::new(g))
    }
}

/// Waits for a p2p message; `_like` only selects the element type.
fn recv_owned<T: Elem, L: Link>(cx: &Ctx<L>, peer: usize, len: usize, _like: &[T]) -> Result<Buf, CommError> {
    let p = cx.recv::<T>(peer, 0, 0, len)?;
    Ok(p.into_buf())
}
