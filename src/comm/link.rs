//! [`Link`]: what a backend must provide — deliver a message to a peer's mailbox, and expose this
//! rank's mailbox. Ranks here are world (global) ranks; groups translate their own ranks.

use super::buf::{Buf, Elem};
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
    /// Where this rank's incoming messages land.
    fn mailbox(&self) -> &Mailbox;
    /// Backend name for messages.
    fn backend(&self) -> &'static str;
}
