//! Heartbeats through the rendezvous store (multi-process runs): every rank bumps its own counter
//! `hb/<rank>` every `interval`, and watches everyone else's. A peer whose counter has not moved
//! for `bound` is dead or hung (a stopped process keeps its connections open, so the transport
//! cannot tell); the watcher then raises an alarm naming it, which the rank's watchdog turns into
//! an error. Counters, not clocks, so hosts need not agree on the time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::comm::store::StoreClient;

/// The alarm a heartbeat watcher raises: `Some(text naming the silent rank)`.
pub type Alarm = Arc<Mutex<Option<String>>>;

/// A running heartbeat; stops when dropped.
pub struct Heartbeat {
    alarm: Alarm,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating as `rank` of `world` and watching the others.
    pub fn start(mut store: StoreClient, rank: usize, world: usize, bound: Duration) -> Heartbeat {
        let alarm: Alarm = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (alarm.clone(), stop.clone());
        let interval = (bound / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
        let thread = std::thread::Builder::new()
            .name(format!("troupe-heartbeat-{rank}"))
            .spawn(move || {
                let mut last: Vec<(i64, Instant)> = vec![(-1, Instant::now()); world];
                while !s.load(Ordering::Relaxed) {
                    if store.add(&format!("hb/{rank}"), 1).is_err() {
                        raise(&a, "the rendezvous store stopped answering (its host is gone)".into());
                        return;
                    }
                    for (peer, seen) in last.iter_mut().enumerate().filter(|(p, _)| *p != rank) {
                        let Ok(v) = store.add(&format!("hb/{peer}"), 0) else { continue };
                        if v != seen.0 {
                            *seen = (v, Instant::now());
                        } else if seen.1.elapsed() > bound {
                            raise(
                                &a,
                                format!(
                                    "rank {peer} sent no heartbeat through the store for {:.1} s: dead or hung",
                                    seen.1.elapsed().as_secs_f64()
                                ),
                            );
                            return;
                        }
                    }
                    // Woken early when the heartbeat is dropped.
                    std::thread::park_timeout(interval);
                }
            })
            .ok();
        Heartbeat { alarm, stop, thread }
    }

    /// The alarm this heartbeat raises.
    pub fn alarm(&self) -> Alarm {
        self.alarm.clone()
    }
}

fn raise(alarm: &Alarm, text: String) {
    let mut g = alarm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    g.get_or_insert(text);
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
