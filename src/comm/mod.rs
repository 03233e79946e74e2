//! Communication: the [`Comm`] trait (tagged point-to-point plus collectives, asynchronous, every
//! wait bounded by a timeout), its two CPU backends, the topology that derives the TP/PP/DP
//! groups, the c10d-compatible rendezvous store and the launcher environment.
//!
//! - [`inproc`]: ranks are threads of one process; buffers move through mailboxes.
//! - [`tcp`]: ranks are processes on one or many hosts; one TCP connection per pair of ranks.
//!
//! Both backends run the same ring algorithms ([`ring`](self)) with the same fold order, so the
//! same inputs give bit-identical outputs on either. A run under `torchrun`, `mpirun`, `srun`
//! or `troupe launch` builds its world with [`tcp::connect_from_env`].
//!
//! ```
//! use troupe::comm::{inproc, Buf, Comm, CommOptions, ReduceOp};
//! let comms = inproc::world(3, CommOptions::default()).unwrap();
//! let handles: Vec<_> = comms.into_iter().map(|c| std::thread::spawn(move || {
//!     let x = Buf::F32(vec![c.rank() as f32; 5]);
//!     c.all_reduce(x, ReduceOp::Sum).wait().unwrap()
//! })).collect();
//! for h in handles {
//!     assert_eq!(h.join().unwrap(), Buf::F32(vec![3.0; 5]));
//! }
//! ```

mod buf;
mod direct;
pub mod env;
mod error;
mod group;
pub mod inproc;
mod link;
mod mailbox;
mod ring;
pub mod store;
pub mod tcp;
mod topology;
mod work;

use std::time::Duration;

pub use buf::{Buf, DType, ReduceOp, chunk_range};
pub use error::CommError;
pub use topology::{Coords, GroupKind, Topology, TopologyError};
pub use work::{Work, block_on};

/// Settings shared by every operation of a communicator.
#[derive(Debug, Clone)]
pub struct CommOptions {
    /// Longest wait for any one message from a peer (default 10 minutes, as NCCL; tests use a
    /// few seconds). A dead peer is reported as soon as its connection drops.
    pub timeout: Duration,
    /// Ring segment size in bytes: the unit of pipelining.
    pub segment_bytes: usize,
    /// Add and verify a checksum on every TCP frame.
    pub checksum: bool,
}

impl Default for CommOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(600), segment_bytes: 4 << 20, checksum: false }
    }
}

/// A communicator over one group of ranks.
///
/// Every operation takes its buffer by value and returns a [`Work`]: a future (or a handle to
/// `wait` on) that yields the buffer back with the result. Collectives on one communicator run in
/// the order they were issued, on every rank — as NCCL orders them on a stream — so all ranks must
/// issue them in the same order. Point-to-point messages are matched by (peer, tag); messages
/// with the same tag from one peer arrive in send order.
///
/// Lengths need not divide the group size: chunk c of a length-L buffer is
/// [`chunk_range`]`(L, n, c)`.
pub trait Comm: Send + Sync {
    /// This rank within the group (0..size).
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// This rank in the world.
    fn global_rank(&self) -> usize;
    /// Name used in errors, e.g. `world` or `dp[1,3]`.
    fn group_name(&self) -> &str;
    /// World ranks of the members, in group-rank order.
    fn members(&self) -> &[usize];
    /// `inproc` or `tcp`.
    fn backend(&self) -> &'static str;

    /// Sends `buf` to group rank `peer` with `tag`. Completes once the message is handed to the
    /// transport; it does not wait for the receiver.
    fn send(&self, buf: Buf, peer: usize, tag: u64) -> Work<()>;
    /// Receives `len` elements of `dtype` from group rank `peer` with `tag`.
    fn recv(&self, dtype: DType, len: usize, peer: usize, tag: u64) -> Work<Buf>;
    /// Every rank gets the element-wise reduction over all ranks.
    fn all_reduce(&self, buf: Buf, op: ReduceOp) -> Work<Buf>;
    /// Chunk `rank` ([`chunk_range`]) of the result holds the reduction of that chunk over all
    /// ranks; the other chunks hold unspecified partial values.
    fn reduce_scatter(&self, buf: Buf, op: ReduceOp) -> Work<Buf>;
    /// In place: on entry chunk `rank` holds this rank's part; on return every chunk holds its
    /// owner's part.
    fn all_gather(&self, buf: Buf) -> Work<Buf>;
    /// Every rank gets `root`'s buffer (all ranks pass a buffer of the same length).
    fn broadcast(&self, buf: Buf, root: usize) -> Work<Buf>;
    /// Completes once every rank of the group has entered it.
    fn barrier(&self) -> Work<()>;
    /// A communicator for a subgroup given as ranks of this group (called by its members only,
    /// all with the same `ranks` and `name`; see [`Topology::group`]).
    ///
    /// # Errors
    /// When this rank is not in `ranks`, or a rank is repeated or out of range.
    fn new_group(&self, ranks: &[usize], name: &str) -> Result<Box<dyn Comm>, CommError>;
}
