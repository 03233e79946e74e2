//! Errors of the communication layer. Every variant that comes from an operation names the
//! operation, the group, this rank, the peer and the tag or collective sequence number, so a
//! timeout on one rank can be matched with what the peer was doing.

use std::time::Duration;

/// An operation's failure, with enough context to attribute it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    #[error("{op} in group {group}: rank {rank} timed out after {timeout:?} waiting for peer {peer} ({tag})")]
    Timeout { op: &'static str, group: String, rank: usize, peer: usize, tag: String, timeout: Duration },
    #[error("{op} in group {group}: rank {rank} lost peer {peer} ({tag}): {reason}")]
    PeerLost { op: &'static str, group: String, rank: usize, peer: usize, tag: String, reason: String },
    #[error("{op} in group {group}: rank {rank} got a mismatched message from peer {peer} ({tag}): {detail}")]
    Mismatch { op: &'static str, group: String, rank: usize, peer: usize, tag: String, detail: String },
    #[error("{op} in group {group}: rank {rank}: {msg}")]
    Invalid { op: &'static str, group: String, rank: usize, msg: String },
    #[error("{op} in group {group}: rank {rank}: the communicator's worker stopped before finishing")]
    WorkerGone { op: &'static str, group: String, rank: usize },
    #[error("connecting rank {rank} of {world}: {msg}")]
    Setup { rank: usize, world: usize, msg: String },
}

/// What a transport reports before the group adds op/group/tag context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkError {
    Timeout,
    PeerLost(String),
    Mismatch { expected: String, got: String },
}
