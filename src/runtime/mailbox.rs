//! A rank's mailbox: activations and gradients that arrived (from a peer through the `Comm`, or
//! from a chunk on the same rank) wait here, keyed by `(direction, microbatch, chunk)`, until the
//! instruction that consumes them asks. Waiting is bounded by the communication timeout.
//!
//! With a replay order (from a recorded trace) the mailbox *accepts* messages only in that order:
//! one that arrives early is held back until every message before it has arrived, so the
//! consumers observe the recorded order of message handling.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    /// An activation, forward.
    Act,
    /// An input gradient, backward.
    Grad,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Act => "activation",
            Dir::Grad => "gradient",
        }
    }
}

/// `(direction, microbatch, local chunk of the consumer)`.
pub type Key = (Dir, u32, u32);

/// A delivered message, or why its receive failed.
pub type Msg = Result<crate::models::gpt::Hidden, String>;

#[derive(Default)]
struct Inner {
    ready: HashMap<Key, Msg>,
    /// Replay order and the position reached in it.
    order: Vec<Key>,
    next: usize,
    held: HashMap<Key, Msg>,
    /// Largest number of messages waiting at once.
    peak_depth: usize,
    /// Messages accepted this step, and an injected fault: damage the n-th.
    accepted: u32,
    corrupt_nth: Option<u32>,
}

/// Makes a message visible to its consumer, counting acceptances (for injected faults).
fn accept(g: &mut Inner, key: Key, data: Msg) {
    g.accepted += 1;
    let data = match (g.corrupt_nth, data) {
        (Some(n), Ok(_)) if n == g.accepted => Err(format!(
            "corrupt {} of microbatch {} for chunk {}: damaged on arrival (injected at this rank's receive #{n})",
            key.0.name(),
            key.1,
            key.2
        )),
        (_, d) => d,
    };
    g.ready.insert(key, data);
}

/// See the module docs.
#[derive(Default)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forces the order in which messages become visible (an empty order lifts it).
    pub fn set_order(&self, order: Vec<Key>) {
        let mut g = self.lock();
        g.order = order;
        g.next = 0;
    }

    /// Starts a new step: the replay order starts over; `corrupt_nth` arms an injected fault
    /// that damages the n-th message accepted in this step.
    pub fn new_step(&self, corrupt_nth: Option<u32>) {
        let mut g = self.lock();
        g.next = 0;
        g.accepted = 0;
        g.corrupt_nth = corrupt_nth;
    }

    /// Counts a message this rank receives over a device link (which bypasses the mailbox) as
    /// accepted; whether it is the one an armed fault damages (see [`Mailbox::new_step`]).
    pub fn count_device_arrival(&self) -> bool {
        let mut g = self.lock();
        g.accepted += 1;
        g.corrupt_nth == Some(g.accepted)
    }

    /// Delivers a message.
    pub fn put(&self, key: Key, data: Msg) {
        let mut g = self.lock();
        let gated = !g.order.is_empty() && g.order.contains(&key);
        if !gated {
            accept(&mut g, key, data);
        } else {
            g.held.insert(key, data);
            while let Some(&k) = g.order.get(g.next) {
                match g.held.remove(&k) {
                    Some(d) => {
                        accept(&mut g, k, d);
                        g.next += 1;
                    }
                    None => break,
                }
            }
        }
        let depth = g.ready.len() + g.held.len();
        g.peak_depth = g.peak_depth.max(depth);
        drop(g);
        self.notify.notify_waiters();
    }

    /// Takes the message for `key`, waiting up to `timeout` for it.
    ///
    /// # Errors
    /// `Err(())` when it has not arrived in time.
    pub async fn take(&self, key: Key, timeout: Duration) -> Result<Msg, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = self.lock().ready.remove(&key) {
                return Ok(d);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(());
            }
        }
    }

    /// Messages waiting now (delivered but not yet consumed).
    pub fn depth(&self) -> usize {
        let g = self.lock();
        g.ready.len() + g.held.len()
    }

    /// Largest depth seen; resets it.
    pub fn take_peak_depth(&self) -> usize {
        std::mem::take(&mut self.lock().peak_depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn order_gate_releases_in_recorded_order() {
        let mb = Mailbox::default();
        let a = (Dir::Act, 0, 0);
        let b = (Dir::Act, 1, 0);
        mb.set_order(vec![a, b]);
        let h = |x: f32| crate::models::gpt::Hidden::F32(vec![x]);
        mb.put(b, Ok(h(2.0)));
        // b is held until a arrives.
        assert!(mb.take(b, Duration::from_millis(20)).await.is_err());
        mb.put(a, Ok(h(1.0)));
        assert_eq!(mb.take(a, Duration::from_secs(1)).await.unwrap(), Ok(h(1.0)));
        assert_eq!(mb.take(b, Duration::from_secs(1)).await.unwrap(), Ok(h(2.0)));
        assert_eq!(mb.depth(), 0);
    }
}
