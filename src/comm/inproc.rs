//! In-process backend: ranks are threads of one process. A send moves the buffer (or a copy of a
//! ring segment) straight into the receiver's mailbox; there is no serialisation. Dropping a
//! rank's last communicator (including by a panicking thread unwinding) marks that rank dead in
//! every other mailbox, so peers waiting on it fail at once instead of at the timeout.

use std::any::Any;
use std::sync::Arc;

use super::buf::{Buf, DType, Elem, Payload};
use super::error::LinkError;
use super::group::Group;
use super::link::Link;
use super::mailbox::{Key, Mailbox};
use super::{Comm, CommError, CommOptions};

struct Hub {
    boxes: Vec<Mailbox>,
}

/// One rank's end of the in-process world.
pub(crate) struct InprocLink {
    rank: usize,
    hub: Arc<Hub>,
}

impl Link for InprocLink {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.hub.boxes.len()
    }
    fn send_buf(&self, to: usize, key: Key, buf: Buf) -> Result<(), LinkError> {
        self.hub.boxes[to].push(self.rank, key, Payload::Buf(buf));
        Ok(())
    }
    fn send_slice<T: Elem>(&self, to: usize, key: Key, data: &[T]) -> Result<(), LinkError> {
        self.send_buf(to, key, T::wrap(data.to_vec()))
    }
    fn send_shared(
        &self,
        to: usize,
        key: Key,
        dtype: DType,
        len: usize,
        data: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), LinkError> {
        self.hub.boxes[to].push(self.rank, key, Payload::Shared(dtype, len, data));
        Ok(())
    }
    fn shares_memory(&self) -> bool {
        true
    }
    fn mailbox(&self) -> &Mailbox {
        &self.hub.boxes[self.rank]
    }
    fn backend(&self) -> &'static str {
        "inproc"
    }
}

impl Drop for InprocLink {
    fn drop(&mut self) {
        let why =
            format!("in-process rank {} dropped its communicator (thread ended or panicked)", self.rank);
        for (r, b) in self.hub.boxes.iter().enumerate() {
            if r != self.rank {
                b.mark_dead(self.rank, why.clone());
            }
        }
    }
}

/// Creates a world of `n` in-process ranks: element r is rank r's world communicator. Move each
/// into its own thread.
///
/// # Errors
/// When `n` is 0 or a worker thread cannot be started.
pub fn world(n: usize, opts: CommOptions) -> Result<Vec<Box<dyn Comm>>, CommError> {
    if n == 0 {
        return Err(CommError::Setup {
            rank: 0,
            world: 0,
            msg: "an in-process world needs at least one rank".into(),
        });
    }
    let hub = Arc::new(Hub { boxes: (0..n).map(|_| Mailbox::default()).collect() });
    let members: Vec<usize> = (0..n).collect();
    (0..n)
        .map(|rank| {
            let link = Arc::new(InprocLink { rank, hub: hub.clone() });
            let g = Group::new(link, "world", members.clone(), opts.clone())?;
            Ok(Box::new(g) as Box<dyn Comm>)
        })
        .collect()
}
