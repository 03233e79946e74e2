//! Rendezvous key-value store speaking PyTorch c10d's TCPStore wire protocol, client and server.
//!
//! Framing (see shared/reference/ecosystem.md §2): a request is one query-type byte and its
//! arguments; strings are a u64 little-endian length and the bytes; integers are little-endian.
//! Replies carry no type byte. Every connection opens with VALIDATE and the magic `0x3C85F7CE`.
//! The client puts `/` before every key, as torch's client does, so Python and Rust clients on
//! one store see the same keys; [`StoreClient::with_prefix`] adds a namespace (we use
//! `troupe/attempt_<restart count>` so keys from an earlier attempt never match).
//!
//! The server is thread-per-connection over one mutex-protected map; WAIT blocks its connection
//! until the keys exist or the client sends CANCEL_WAIT. All client calls are bounded by the
//! client's timeout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Magic sent with VALIDATE.
pub const MAGIC: u32 = 0x3C85_F7CE;

/// Query types (current layout, torch ≥ 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Query {
    Validate = 0,
    Set = 1,
    CompareSet = 2,
    Get = 3,
    Add = 4,
    Check = 5,
    Wait = 6,
    GetNumKeys = 7,
    DeleteKey = 8,
    Append = 9,
    MultiGet = 10,
    MultiSet = 11,
    CancelWait = 12,
    Ping = 13,
}

const MAX_KEY: u64 = 8 << 10;
const MAX_VALUE: u64 = 8 << 20;
const MAX_KEYS: u64 = 128 << 10;

/// A store failure, naming the operation, key and server address.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {op} of key {key:?} at {addr}: {source}")]
    Io { op: &'static str, key: String, addr: String, source: std::io::Error },
    #[error("store {op} of key {key:?} at {addr}: timed out after {timeout:?}")]
    Timeout { op: &'static str, key: String, addr: String, timeout: Duration },
    #[error("store {op} at {addr}: protocol error: {msg}")]
    Protocol { op: &'static str, addr: String, msg: String },
}

// ---------------------------------------------------------------- wire helpers

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

fn read_u8(s: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_bytes(s: &mut impl Read, max: u64) -> std::io::Result<Vec<u8>> {
    let n = read_u64(s)?;
    if n > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("length {n} exceeds the limit {max}"),
        ));
    }
    let mut v = vec![0u8; n as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

// ---------------------------------------------------------------- client

/// A connection to a TCPStore. Requests on one connection are strictly sequential.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    prefix: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects (retrying until `timeout`, as torch does while the server starts), sends
    /// VALIDATE and checks a PING echo.
    ///
    /// # Errors
    /// When no server answers within `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, StoreError> {
        let deadline = Instant::now() + timeout;
        let io =
            |source| StoreError::Io { op: "connect", key: String::new(), addr: addr.to_string(), source };
        let mut delay = Duration::from_millis(10);
        let stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(io)?
                .next()
                .ok_or_else(|| io(std::io::Error::other("address resolves to nothing")))
                .and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(io));
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() + delay >= deadline => return Err(e),
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        };
        stream.set_nodelay(true).map_err(io)?;
        let mut c = Self { stream, addr: addr.to_string(), prefix: String::new(), timeout };
        let mut req = vec![Query::Validate as u8];
        req.extend_from_slice(&MAGIC.to_le_bytes());
        c.send(&req, "validate", "")?;
        c.ping(std::process::id())?;
        Ok(c)
    }

    /// Namespaces every later key under `prefix/` (wire key `/prefix/key`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = format!("{}/", prefix.trim_end_matches('/'));
        self
    }

    /// A second connection to the same store with the same prefix (for a concurrent user).
    ///
    /// # Errors
    /// When the connection fails.
    pub fn reconnect(&self) -> Result<Self, StoreError> {
        let prefix = self.prefix.clone();
        let mut c = Self::connect(&self.addr, self.timeout)?;
        c.prefix = prefix;
        Ok(c)
    }

    /// The local address of this connection (the interface that reaches the store's host).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.stream.local_addr().ok()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn wire_key(&self, key: &str) -> String {
        format!("/{}{}", self.prefix, key)
    }

    fn send(&mut self, req: &[u8], op: &'static str, key: &str) -> Result<(), StoreError> {
        self.stream.set_write_timeout(Some(self.timeout)).ok();
        self.stream.write_all(req).map_err(|e| self.io_err(op, key, e))
    }

    fn io_err(&self, op: &'static str, key: &str, e: std::io::Error) -> StoreError {
        if is_timeout(&e) {
            StoreError::Timeout { op, key: key.to_string(), addr: self.addr.clone(), timeout: self.timeout }
        } else {
            StoreError::Io { op, key: key.to_string(), addr: self.addr.clone(), source: e }
        }
    }

    fn reply<T>(
        &mut self,
        op: &'static str,
        key: &str,
        f: impl FnOnce(&mut TcpStream) -> std::io::Result<T>,
    ) -> Result<T, StoreError> {
        self.stream.set_read_timeout(Some(self.timeout)).ok();
        let r = f(&mut self.stream);
        r.map_err(|e| self.io_err(op, key, e))
    }

    /// PING with a nonce; the server echoes it.
    ///
    /// # Errors
    /// I/O errors, or a wrong echo.
    pub fn ping(&mut self, nonce: u32) -> Result<(), StoreError> {
        let mut req = vec![Query::Ping as u8];
        req.extend_from_slice(&nonce.to_le_bytes());
        self.send(&req, "ping", "")?;
        let got = self.reply("ping", "", read_u32)?;
        if got != nonce {
            return Err(StoreError::Protocol {
                op: "ping",
                addr: self.addr.clone(),
                msg: format!("echo {got} for nonce {nonce}"),
            });
        }
        Ok(())
    }

    /// SET `key` to `value`.
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut req = vec![Query::Set as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        put_bytes(&mut req, value);
        self.send(&req, "set", key)
    }

    /// WAIT until `key` exists (bounded by `timeout`), then GET it.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] when the key does not appear in time.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.wait(&[key], timeout)?;
        let mut req = vec![Query::Get as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        self.send(&req, "get", key)?;
        self.reply("get", key, |s| read_bytes(s, MAX_VALUE))
    }

    /// ADD `delta` to the decimal counter at `key` (missing counts as 0); returns the new value.
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut req = vec![Query::Add as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        req.extend_from_slice(&delta.to_le_bytes());
        self.send(&req, "add", key)?;
        self.reply("add", key, read_u64).map(|v| v as i64)
    }

    /// Whether all keys exist (never blocks).
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn check(&mut self, keys: &[&str]) -> Result<bool, StoreError> {
        let mut req = vec![Query::Check as u8];
        req.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            put_bytes(&mut req, self.wire_key(k).as_bytes());
        }
        let first = keys.first().copied().unwrap_or("");
        self.send(&req, "check", first)?;
        Ok(self.reply("check", first, read_u8)? == 0)
    }

    /// Blocks until all keys exist or `timeout` passes; on timeout cancels the wait on the
    /// server (CANCEL_WAIT) so the connection stays usable.
    ///
    /// # Errors
    /// [`StoreError::Timeout`] naming the first key.
    pub fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        let mut req = vec![Query::Wait as u8];
        req.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            put_bytes(&mut req, self.wire_key(k).as_bytes());
        }
        let first = keys.first().copied().unwrap_or("");
        self.send(&req, "wait", first)?;
        self.stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).ok();
        match read_u8(&mut self.stream) {
            Ok(0) => return Ok(()),
            Ok(other) => {
                return Err(StoreError::Protocol {
                    op: "wait",
                    addr: self.addr.clone(),
                    msg: format!("unexpected wait reply {other}"),
                });
            }
            Err(e) if !is_timeout(&e) => return Err(self.io_err("wait", first, e)),
            Err(_) => {}
        }
        self.send(&[Query::CancelWait as u8], "wait", first)?;
        // Discard a STOP_WAITING that raced with the cancel, until WAIT_CANCELED.
        while self.reply("wait", first, read_u8)? == 0 {}
        Err(StoreError::Timeout { op: "wait", key: first.to_string(), addr: self.addr.clone(), timeout })
    }

    /// COMPARE_SET: replaces the value when it equals `expected` (a missing key matches an empty
    /// `expected`); returns the value now stored (see ecosystem.md §2.4 for the missing-key case).
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn compare_set(&mut self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut req = vec![Query::CompareSet as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        put_bytes(&mut req, expected);
        put_bytes(&mut req, desired);
        self.send(&req, "compare_set", key)?;
        self.reply("compare_set", key, |s| read_bytes(s, MAX_VALUE))
    }

    /// DELETE_KEY; returns whether the key existed.
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let mut req = vec![Query::DeleteKey as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        self.send(&req, "delete", key)?;
        Ok(self.reply("delete", key, read_u64)? == 1)
    }

    /// GETNUMKEYS: every key in the store, any prefix.
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn num_keys(&mut self) -> Result<i64, StoreError> {
        self.send(&[Query::GetNumKeys as u8], "num_keys", "")?;
        self.reply("num_keys", "", read_u64).map(|v| v as i64)
    }

    /// APPEND bytes to a key (creating it).
    ///
    /// # Errors
    /// I/O errors and timeouts.
    pub fn append(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut req = vec![Query::Append as u8];
        put_bytes(&mut req, self.wire_key(key).as_bytes());
        put_bytes(&mut req, value);
        self.send(&req, "append", key)
    }
}

// ---------------------------------------------------------------- server

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    cv: Condvar,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Vec<u8>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A TCPStore server on its own threads; stops (closing every connection) when dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl StoreServer {
    /// Listens on `bind` (port 0 picks a free port; see [`StoreServer::addr`]).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(bind: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let table = Arc::new(Table::default());
        let (stop2, conns2) = (stop.clone(), conns.clone());
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, table, stop2, conns2))?;
        Ok(Self { addr, stop, conns })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor with a throwaway connection, then close every client connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        let conns = match self.conns.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for c in conns.iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    table: Arc<Table>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = conn else { continue };
        let _ = stream.set_nodelay(true);
        if let Ok(c) = stream.try_clone()
            && let Ok(mut g) = conns.lock()
        {
            g.push(c);
        }
        let (table, stop) = (table.clone(), stop.clone());
        let _ = std::thread::Builder::new().name("store-conn".into()).spawn(move || {
            // A protocol violation or a closed socket ends this connection only; shut it
            // down explicitly because the server keeps a clone for its own shutdown.
            let _ = serve(&mut stream, &table, &stop);
            let _ = stream.shutdown(Shutdown::Both);
        });
    }
}

fn serve(s: &mut TcpStream, t: &Table, stop: &AtomicBool) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    if read_u8(s)? != Query::Validate as u8 || read_u32(s)? != MAGIC {
        return Err(bad("connection did not start with VALIDATE and the magic".into()));
    }
    loop {
        let q = read_u8(s)?;
        let mut out = Vec::new();
        match q {
            1 => {
                let (k, v) = (read_bytes(s, MAX_KEY)?, read_bytes(s, MAX_VALUE)?);
                t.lock().insert(k, v);
                t.cv.notify_all();
            }
            2 => put_bytes(&mut out, &compare_set(s, t)?),
            3 => {
                let k = read_bytes(s, MAX_KEY)?;
                let v = t.lock().get(&k).cloned().unwrap_or_default();
                put_bytes(&mut out, &v);
            }
            4 => out.extend_from_slice(&add(s, t)?.to_le_bytes()),
            5 => {
                let keys = read_keys(s)?;
                let m = t.lock();
                out.push(u8::from(!keys.iter().all(|k| m.contains_key(k))));
            }
            6 => {
                let keys = read_keys(s)?;
                serve_wait(s, t, stop, &keys)?;
            }
            7 => out.extend_from_slice(&(t.lock().len() as i64).to_le_bytes()),
            8 => {
                let k = read_bytes(s, MAX_KEY)?;
                let gone = t.lock().remove(&k).is_some();
                out.extend_from_slice(&i64::from(gone).to_le_bytes());
            }
            9 => {
                let (k, v) = (read_bytes(s, MAX_KEY)?, read_bytes(s, MAX_VALUE)?);
                t.lock().entry(k).or_default().extend_from_slice(&v);
                t.cv.notify_all();
            }
            10 => {
                let keys = read_keys(s)?;
                let m = t.lock();
                for k in &keys {
                    put_bytes(&mut out, m.get(k).map(Vec::as_slice).unwrap_or_default());
                }
            }
            11 => {
                let n = read_u64(s)?.min(MAX_KEYS);
                for _ in 0..n {
                    let (k, v) = (read_bytes(s, MAX_KEY)?, read_bytes(s, MAX_VALUE)?);
                    t.lock().insert(k, v);
                }
                t.cv.notify_all();
            }
            12 => out.push(1),
            13 => out.extend_from_slice(&read_u32(s)?.to_le_bytes()),
            other => return Err(bad(format!("unknown query type {other}"))),
        }
        if !out.is_empty() {
            s.write_all(&out)?;
        }
    }
}

/// COMPARE_SET semantics of ecosystem.md §2.4; returns the value to reply with.
fn compare_set(s: &mut TcpStream, t: &Table) -> std::io::Result<Vec<u8>> {
    let k = read_bytes(s, MAX_KEY)?;
    let (exp, des) = (read_bytes(s, MAX_VALUE)?, read_bytes(s, MAX_VALUE)?);
    let mut m = t.lock();
    let now = match m.get(&k) {
        None if exp.is_empty() => {
            m.insert(k, des.clone());
            des
        }
        None => exp,
        Some(cur) if *cur == exp => {
            m.insert(k, des.clone());
            des
        }
        Some(cur) => cur.clone(),
    };
    drop(m);
    t.cv.notify_all();
    Ok(now)
}

/// ADD: the value is an i64 in ASCII decimal; a missing key counts as 0.
fn add(s: &mut TcpStream, t: &Table) -> std::io::Result<i64> {
    let k = read_bytes(s, MAX_KEY)?;
    let delta = read_u64(s)? as i64;
    let mut m = t.lock();
    let cur = match m.get(&k) {
        None => 0,
        Some(v) => std::str::from_utf8(v).ok().and_then(|x| x.parse::<i64>().ok()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "ADD on a non-numeric value")
        })?,
    };
    let new = cur.wrapping_add(delta);
    m.insert(k, new.to_string().into_bytes());
    drop(m);
    t.cv.notify_all();
    Ok(new)
}

fn read_keys(s: &mut TcpStream) -> std::io::Result<Vec<Vec<u8>>> {
    let n = read_u64(s)?;
    if n > MAX_KEYS {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "too many keys"));
    }
    (0..n).map(|_| read_bytes(s, MAX_KEY)).collect()
}

/// Answers STOP_WAITING once every key exists, or WAIT_CANCELED if the client sends CANCEL_WAIT.
fn serve_wait(s: &mut TcpStream, t: &Table, stop: &AtomicBool, keys: &[Vec<u8>]) -> std::io::Result<()> {
    loop {
        {
            let m = t.lock();
            if keys.iter().all(|k| m.contains_key(k)) {
                return s.write_all(&[0]);
            }
            let _ = t.cv.wait_timeout(m, Duration::from_millis(20));
        }
        if stop.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("store stopped"));
        }
        s.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        let got = s.read(&mut b);
        s.set_nonblocking(false)?;
        match got {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if b[0] == Query::CancelWait as u8 => return s.write_all(&[1]),
            Ok(_) => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "request during WAIT"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
