//! TCP backend: ranks are processes (or threads) with one `TCP_NODELAY` connection per pair of
//! ranks, used for p2p and for the ring collectives. A reader thread per connection drains frames
//! into the rank's mailbox as they arrive, so a sender never waits for the receiver to post a
//! receive and ring segments overlap with reduction.
//!
//! Frame: a 48-byte little-endian header, then `nbytes` of payload.
//!
//! ```text
//! magic u32 "TRUP" | kind u8 | dtype u8 | flags u8 (bit 0: checksum) | 0 u8
//! step u32 | segment u32 | group id u64 | tag or sequence u64 | nbytes u64 | checksum u64
//! ```
//!
//! Bootstrap: every rank listens on an ephemeral port, publishes `host:port` under
//! `tcp/<rank>` in the rendezvous store, dials every lower rank (sending a hello with its rank and
//! the world size) and accepts every higher rank. A dropped connection marks the peer dead, which
//! fails every wait on it at once.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::buf::{Buf, BytePool, DType, Elem, Payload};
use super::env::LaunchEnv;
use super::error::LinkError;
use super::group::Group;
use super::link::Link;
use super::mailbox::{Key, Kind, Mailbox};
use super::store::{StoreClient, StoreServer};
use super::{Comm, CommError, CommOptions};

const FRAME_MAGIC: u32 = 0x5055_5254; // "TRUP" little-endian
const HELLO_MAGIC: u32 = 0x4f4c_4548; // "HELO"
const HEADER: usize = 48;

/// Order-sensitive 64-bit checksum over the payload (cheap; catches corruption, not attacks).
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a)).rotate_left(23).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &x in tail {
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn header(key: &Key, dtype: DType, data: &[u8], with_sum: bool) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4] = key.kind as u8;
    h[5] = dtype.code();
    h[6] = u8::from(with_sum);
    h[8..12].copy_from_slice(&key.step.to_le_bytes());
    h[12..16].copy_from_slice(&key.seg.to_le_bytes());
    h[16..24].copy_from_slice(&key.group.to_le_bytes());
    h[24..32].copy_from_slice(&key.seq.to_le_bytes());
    h[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let sum = if with_sum { checksum(data) } else { 0 };
    h[40..48].copy_from_slice(&sum.to_le_bytes());
    h
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// One rank's end of a TCP world.
pub(crate) struct TcpLink {
    rank: usize,
    world: usize,
    writers: Vec<Option<Mutex<TcpStream>>>,
    mailbox: Arc<Mailbox>,
    checksum: bool,
    write_timeout: Duration,
    /// Rank 0 may host the rendezvous store; it lives as long as the link.
    _store: Option<StoreServer>,
}

impl TcpLink {
    fn writer(&self, to: usize) -> Result<MutexGuard<'_, TcpStream>, LinkError> {
        let w = self
            .writers
            .get(to)
            .and_then(Option::as_ref)
            .ok_or_else(|| LinkError::PeerLost(format!("no connection to rank {to}")))?;
        Ok(match w.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }

    fn write_frame(&self, to: usize, key: Key, dtype: DType, data: &[u8]) -> Result<(), LinkError> {
        let h = header(&key, dtype, data, self.checksum);
        let mut w = self.writer(to)?;
        let r = if data.len() <= 16 << 10 {
            let mut one = Vec::with_capacity(HEADER + data.len());
            one.extend_from_slice(&h);
            one.extend_from_slice(data);
            w.write_all(&one)
        } else {
            w.write_all(&h).and_then(|()| w.write_all(data))
        };
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LinkError::Timeout,
            _ => LinkError::PeerLost(format!("writing to rank {to}: {e}")),
        })
    }
}

impl Link for TcpLink {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn send_buf(&self, to: usize, key: Key, buf: Buf) -> Result<(), LinkError> {
        self.write_frame(to, key, buf.dtype(), buf.as_bytes())
    }
    fn send_slice<T: Elem>(&self, to: usize, key: Key, data: &[T]) -> Result<(), LinkError> {
        self.write_frame(to, key, T::DTYPE, bytemuck::cast_slice(data))
    }
    fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        for w in self.writers.iter().flatten() {
            if let Ok(s) = w.lock() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let _ = self.write_timeout;
    }
}

/// Reads frames from `peer` until the connection ends, then marks the peer dead.
fn reader_loop(mut s: TcpStream, peer: usize, mailbox: Arc<Mailbox>) {
    let why = match read_frames(&mut s, peer, &mailbox) {
        Ok(()) => format!("rank {peer} closed its connection"),
        Err(e) => format!("connection to rank {peer} failed: {e}"),
    };
    mailbox.mark_dead(peer, why);
}

fn read_frames(s: &mut TcpStream, peer: usize, mailbox: &Mailbox) -> std::io::Result<()> {
    let pool = Arc::new(BytePool::default());
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut h = [0u8; HEADER];
    loop {
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if le_u32(&h[0..4]) != FRAME_MAGIC {
            return Err(bad("bad frame magic".into()));
        }
        let kind = Kind::from_code(h[4]).ok_or_else(|| bad(format!("unknown frame kind {}", h[4])))?;
        let dtype = DType::from_code(h[5]).ok_or_else(|| bad(format!("unknown dtype {}", h[5])))?;
        let key = Key {
            group: le_u64(&h[16..24]),
            kind,
            seq: le_u64(&h[24..32]),
            step: le_u32(&h[8..12]),
            seg: le_u32(&h[12..16]),
        };
        let n = le_u64(&h[32..40]);
        if !n.is_multiple_of(dtype.size() as u64) || n > 1 << 40 {
            return Err(bad(format!("frame length {n} does not fit dtype {dtype}")));
        }
        let mut data = pool.take(n as usize);
        s.read_exact(data.bytes_mut())?;
        if h[6] & 1 == 1 && checksum(data.bytes()) != le_u64(&h[40..48]) {
            return Err(bad(format!("checksum mismatch on {}", key.describe())));
        }
        mailbox.push(peer, key, Payload::Bytes(dtype, data));
    }
}

fn setup_err(rank: usize, world: usize, msg: String) -> CommError {
    CommError::Setup { rank, world, msg }
}

fn hello(rank: usize, world: usize) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    b[8..12].copy_from_slice(&(world as u32).to_le_bytes());
    b
}

/// Dials `addr` until `deadline`.
fn dial(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accepts `count` peers (all of higher rank) until `deadline`; returns (rank, stream) pairs.
fn accept_peers(
    l: &TcpListener,
    rank: usize,
    world: usize,
    count: usize,
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>, CommError> {
    let err = |m: String| setup_err(rank, world, m);
    l.set_nonblocking(true).map_err(|e| err(format!("listener: {e}")))?;
    let mut got = Vec::new();
    while got.len() < count {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut b = [0u8; 12];
                s.read_exact(&mut b).map_err(|e| err(format!("hello from {from}: {e}")))?;
                let (m, r, w) = (le_u32(&b), le_u32(&b[4..]) as usize, le_u32(&b[8..]) as usize);
                if m != HELLO_MAGIC
                    || w != world
                    || r <= rank
                    || r >= world
                    || got.iter().any(|(x, _)| *x == r)
                {
                    return Err(err(format!("bad hello from {from}: rank {r} of {w} (magic {m:#x})")));
                }
                s.set_read_timeout(None).ok();
                got.push((r, s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let have: Vec<usize> = got.iter().map(|(r, _)| *r).collect();
                    return Err(err(format!(
                        "timed out waiting for higher ranks to connect; connected: {have:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(err(format!("accept: {e}"))),
        }
    }
    Ok(got)
}

/// Joins a TCP world of `world` ranks through a rendezvous store; returns the world
/// communicator. `host_store` keeps a store server alive as long as the communicator.
///
/// # Errors
/// [`CommError::Setup`] naming this rank and what did not happen in time.
pub fn connect(
    rank: usize,
    world: usize,
    store: &mut StoreClient,
    host_store: Option<StoreServer>,
    opts: CommOptions,
) -> Result<Box<dyn Comm>, CommError> {
    let err = |m: String| setup_err(rank, world, m);
    if rank >= world {
        return Err(err(format!("rank {rank} is not below the world size {world}")));
    }
    let deadline = Instant::now() + opts.timeout;
    let listener = TcpListener::bind("0.0.0.0:0").map_err(|e| err(format!("listen: {e}")))?;
    let port = listener.local_addr().map_err(|e| err(e.to_string()))?.port();
    let ip = store.local_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "127.0.0.1".into());
    store.set(&format!("tcp/{rank}"), format!("{ip}:{port}").as_bytes()).map_err(|e| err(e.to_string()))?;
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    for (peer, slot) in streams.iter_mut().enumerate().take(rank) {
        let left = deadline.saturating_duration_since(Instant::now());
        let addr = store.get(&format!("tcp/{peer}"), left).map_err(|e| err(e.to_string()))?;
        let addr = String::from_utf8_lossy(&addr).to_string();
        let mut s = dial(&addr, deadline).map_err(|e| err(format!("dialing rank {peer} at {addr}: {e}")))?;
        s.write_all(&hello(rank, world)).map_err(|e| err(format!("hello to rank {peer}: {e}")))?;
        *slot = Some(s);
    }
    for (peer, s) in accept_peers(&listener, rank, world, world - 1 - rank, deadline)? {
        streams[peer] = Some(s);
    }
    let mailbox = Arc::new(Mailbox::default());
    let mut writers = Vec::with_capacity(world);
    for (peer, s) in streams.into_iter().enumerate() {
        let Some(s) = s else {
            writers.push(None);
            continue;
        };
        s.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        s.set_write_timeout(Some(opts.timeout)).ok();
        let r = s.try_clone().map_err(|e| err(e.to_string()))?;
        let mb = mailbox.clone();
        std::thread::Builder::new()
            .name(format!("tcp-read-{rank}<-{peer}"))
            .spawn(move || reader_loop(r, peer, mb))
            .map_err(|e| err(format!("reader thread: {e}")))?;
        writers.push(Some(Mutex::new(s)));
    }
    let link = Arc::new(TcpLink {
        rank,
        world,
        writers,
        mailbox,
        checksum: opts.checksum,
        write_timeout: opts.timeout,
        _store: host_store,
    });
    let members: Vec<usize> = (0..world).collect();
    // Everyone is connected once a barrier over the new links completes. It runs in its own
    // group so the world's collective sequence numbers start at 0 as on every backend.
    Group::new(link.clone(), "bootstrap", members.clone(), opts.clone())?.barrier().wait()?;
    Ok(Box::new(Group::new(link, "world", members, opts)?))
}

/// Joins the world described by a launcher environment: under torchrun's agent store every rank
/// is a client; otherwise rank 0 hosts the store at `MASTER_ADDR:MASTER_PORT`. Keys live under
/// `troupe/attempt_<restart count>`.
///
/// # Errors
/// Store and connection failures, naming this rank.
pub fn connect_from_env(env: &LaunchEnv, opts: CommOptions) -> Result<Box<dyn Comm>, CommError> {
    let (rank, world) = (env.rank, env.world_size);
    let err = |m: String| setup_err(rank, world, m);
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let server = if rank == 0 && !env.use_agent_store {
        Some(
            StoreServer::start(&format!("0.0.0.0:{}", env.master_port))
                .map_err(|e| err(format!("hosting the store on port {}: {e}", env.master_port)))?,
        )
    } else {
        None
    };
    let mut store = StoreClient::connect(&addr, opts.timeout)
        .map_err(|e| err(e.to_string()))?
        .with_prefix(&format!("troupe/attempt_{}", env.restart_count));
    connect(rank, world, &mut store, server, opts)
}

/// A TCP world of `n` ranks in this process over loopback (for tests and benchmarks): element r
/// is rank r's communicator.
///
/// # Errors
/// When the loopback store or a connection fails.
pub fn local_world(n: usize, opts: CommOptions) -> Result<Vec<Box<dyn Comm>>, CommError> {
    let server = StoreServer::start("127.0.0.1:0").map_err(|e| setup_err(0, n, format!("store: {e}")))?;
    let addr = server.addr().to_string();
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (addr, opts) = (addr.clone(), opts.clone());
            std::thread::spawn(move || {
                let mut store = StoreClient::connect(&addr, opts.timeout)
                    .map_err(|e| setup_err(rank, n, e.to_string()))?;
                connect(rank, n, &mut store, None, opts)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for (rank, h) in handles.into_iter().enumerate() {
        let c = h.join().map_err(|_| setup_err(rank, n, "connect thread panicked".into()))??;
        out.push(c);
    }
    Ok(out)
}
