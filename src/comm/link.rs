//! [`Link`]: what a backend must provide — deliver a message to a peer's mailbox, and expose this
//! rank's mailbox. Ranks here are world (global) ranks; groups translate their own ranks.

use std::any::Any;
use std::sync::Arc;

use super::buf::{Buf, DType, Elem};
use super::error::LinkError;
use super::mailbox::{Key, Mailbox};

/// A backend's transport between the world's ranks.
pub(crate) trait Link: Send + Sync + 'static {
    /// This rank in the world.
    fn rank(&self) -> usize;
    /// Number of ranks in the world.
    fn world(&self) -> usize;
    /// Sends an owned buffer (moved when the backend can).
    fn send_buf(&self, to: usize, key: Key, buf: Buf) -> Result<(), LinkError>;
    /// Sends a copy of a slice.
    fn send_slice<T: Elem>(&self, to: usize, key: Key, data: &[T]) -> Result<(), LinkError>;
    /// Lends a shared vector (only backends whose ranks share memory; see `direct.rs`).
    fn send_shared(
        &self,
        to: usize,
        key: Key,
        dtype: DType,
        len: usize,
        data: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), LinkError> {
        let _ = (to, key, dtype, len, data);
        Err(LinkError::PeerLost(format!("the {} backend cannot lend memory", self.backend())))
    }
    /// Whether ranks share an address space (enables the shared-memory collectives).
    fn shares_memory(&self) -> bool {
        false
    }
    /// Where this rank's incoming messages land.
    fn mailbox(&self) -> &Mailbox;
    /// Backend name for messages.
    fn backend(&self) -> &'static str;
}
