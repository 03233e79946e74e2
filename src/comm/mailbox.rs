//! A rank's inbox: received messages queued by (sender, key), where the key carries the group,
//! the message kind (p2p or which collective), the tag or collective sequence number, the ring
//! step and the segment. Messages with equal keys from one sender keep their send order.
//! A sender marked dead wakes every waiter on it at once, so a lost peer is reported without
//! waiting for the timeout; messages it delivered before dying can still be received.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::buf::Payload;
use super::error::LinkError;

/// Message kinds on the wire. p2p tags are the user's; collectives use their sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(crate) enum Kind {
    P2p = 1,
    AllReduce = 2,
    ReduceScatter = 3,
    AllGather = 4,
    Broadcast = 5,
    Barrier = 6,
}

impl Kind {
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Kind::P2p,
            2 => Kind::AllReduce,
            3 => Kind::ReduceScatter,
            4 => Kind::AllGather,
            5 => Kind::Broadcast,
            6 => Kind::Barrier,
            _ => return None,
        })
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::P2p => "p2p",
            Kind::AllReduce => "all_reduce",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast => "broadcast",
            Kind::Barrier => "barrier",
        }
    }
}

/// Identifies one message of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub group: u64,
    pub kind: Kind,
    /// p2p: the user tag; collectives: the group's sequence number.
    pub seq: u64,
    pub step: u32,
    pub seg: u32,
}

impl Key {
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            Kind::P2p => format!("p2p tag {}", self.seq),
            _ => {
                format!("{} sequence {} step {} segment {}", self.kind.name(), self.seq, self.step, self.seg)
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    queues: HashMap<(usize, Key), VecDeque<Payload>>,
    dead: HashMap<usize, String>,
}

/// Messages received by one rank, from any peer, for any group.
#[derive(Default)]
pub(crate) struct Mailbox {
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub(crate) fn push(&self, from: usize, key: Key, p: Payload) {
        self.lock().queues.entry((from, key)).or_default().push_back(p);
        self.cv.notify_all();
    }

    /// Marks `peer` dead (first reason wins) and wakes all waiters.
    pub(crate) fn mark_dead(&self, peer: usize, reason: String) {
        self.lock().dead.entry(peer).or_insert(reason);
        self.cv.notify_all();
    }

    /// Waits for the next message from `from` with `key` until `deadline`.
    pub(crate) fn take(&self, from: usize, key: Key, deadline: Instant) -> Result<Payload, LinkError> {
        let mut g = self.lock();
        loop {
            if let Some(q) = g.queues.get_mut(&(from, key))
                && let Some(p) = q.pop_front()
            {
                if q.is_empty() {
                    g.queues.remove(&(from, key));
                }
                return Ok(p);
            }
            if let Some(reason) = g.dead.get(&from) {
                return Err(LinkError::PeerLost(reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LinkError::Timeout);
            }
            g = match self.cv.wait_timeout(g, deadline - now) {
                Ok(r) => r.0,
                Err(p) => p.into_inner().0,
            };
        }
    }
}
