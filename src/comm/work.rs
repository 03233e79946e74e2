//! [`Work`]: the handle an asynchronous operation returns, like a `torch.distributed.Work` or an
//! NCCL call's stream position. It is a `Future` (await it from any executor) and can also be
//! waited on from a plain thread. Operations are bounded by their own timeout, so a `Work`
//! always completes; `wait_timeout` adds a caller-side bound on top.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::CommError;

struct State<T> {
    result: Option<Result<T, CommError>>,
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

/// A pending result of a communication operation.
#[must_use = "a Work does nothing useful unless it is waited on or awaited"]
pub struct Work<T> {
    shared: Arc<Shared<T>>,
    gone: CommError,
}

/// The producing side of a [`Work`]. Dropping it unfinished completes the work with
/// [`CommError::WorkerGone`].
pub(crate) struct Completer<T> {
    shared: Option<Arc<Shared<T>>>,
    gone: CommError,
}

pub(crate) fn work_pair<T>(gone: CommError) -> (Work<T>, Completer<T>) {
    let shared =
        Arc::new(Shared { state: Mutex::new(State { result: None, waker: None }), cv: Condvar::new() });
    (Work { shared: shared.clone(), gone: gone.clone() }, Completer { shared: Some(shared), gone })
}

impl<T> Work<T> {
    /// An already finished work.
    pub(crate) fn ready(result: Result<T, CommError>, gone: CommError) -> Self {
        let (w, c) = work_pair(gone);
        c.complete(result);
        w
    }

    /// Whether the result is available.
    pub fn is_done(&self) -> bool {
        self.lock().result.is_some()
    }

    /// Blocks until the operation finishes (bounded by the operation's own timeout).
    ///
    /// # Errors
    /// The operation's [`CommError`].
    pub fn wait(self) -> Result<T, CommError> {
        let mut st = self.lock();
        loop {
            if let Some(r) = st.result.take() {
                return r;
            }
            st = match self.shared.cv.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Like [`Work::wait`], but gives up after `limit` with [`CommError::WorkerGone`]'s context
    /// turned into a timeout message.
    ///
    /// # Errors
    /// The operation's error, or `Invalid` when `limit` passes first.
    pub fn wait_timeout(self, limit: Duration) -> Result<T, CommError> {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        loop {
            if let Some(r) = st.result.take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                let (op, group, rank) = match &self.gone {
                    CommError::WorkerGone { op, group, rank } => (*op, group.clone(), *rank),
                    _ => ("wait", String::new(), 0),
                };
                return Err(CommError::Invalid {
                    op,
                    group,
                    rank,
                    msg: format!("caller gave up waiting after {limit:?}"),
                });
            }
            st = match self.shared.cv.wait_timeout(st, deadline - now) {
                Ok(g) => g.0,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        match self.shared.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl<T> Future for Work<T> {
    type Output = Result<T, CommError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.lock();
        match st.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Completer<T> {
    pub(crate) fn complete(mut self, result: Result<T, CommError>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<T, CommError>) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let waker = {
            let mut st = match shared.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            st.result = Some(result);
            st.waker.take()
        };
        shared.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if self.shared.is_some() {
            let e = self.gone.clone();
            self.finish(Err(e));
        }
    }
}

/// Drives a future to completion on the current thread (for tests and the CLI; the runtime uses
/// its own executor).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}
