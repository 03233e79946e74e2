//! `troupe bench comm`: times one collective over sizes and prints nccl-tests style rows
//! (time, algbw, busbw), beside the machine's reference measured in the same run: memcpy
//! bandwidth for the in-process backend, one raw loopback TCP stream for the TCP backend.
//!
//! busbw = algbw · 2(n−1)/n for all-reduce, · (n−1)/n for all-gather and reduce-scatter, · 1 for
//! p2p (each rank sends `size` bytes to the next rank and receives as much from the previous).
//! Under a launcher (`troupe launch`, `mpirun`, `srun`, `torchrun --no-python`) the TCP backend
//! uses the launcher's ranks and rank 0 prints; otherwise `--nproc N` ranks run as threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use troupe::comm::env::LaunchEnv;
use troupe::comm::{Buf, Comm, CommOptions, ReduceOp, chunk_range, inproc, tcp};

use super::UsageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// Threads of this process exchanging buffers in memory.
    Inproc,
    /// Processes (or threads) connected by TCP sockets, as `troupe launch` ranks are.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum OpArg {
    #[value(alias = "all-reduce")]
    AllReduce,
    #[value(alias = "all-gather")]
    AllGather,
    #[value(alias = "reduce-scatter")]
    ReduceScatter,
    P2p,
}

impl OpArg {
    /// The name `--op` takes.
    fn name(self) -> &'static str {
        match self {
            OpArg::AllReduce => "all_reduce",
            OpArg::AllGather => "all_gather",
            OpArg::ReduceScatter => "reduce_scatter",
            OpArg::P2p => "p2p",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct CommBenchArgs {
    /// Communication backend to time (with tcp under a launcher the launcher's ranks are timed;
    /// otherwise `--nproc` threads of this process).
    #[arg(long, value_enum, default_value = "inproc")]
    pub backend: BackendArg,
    /// Collective to time.
    #[arg(long, value_enum, default_value = "all_reduce")]
    pub op: OpArg,
    /// Ranks to start as threads when not under a launcher (default 4).
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Message sizes in bytes (suffixes K, M, G: powers of 1024).
    #[arg(long, num_args = 1.., default_values = ["1M"])]
    pub size: Vec<String>,
    /// Timed iterations per size (the best is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Verify one result of each size against the expected values (fails on a mismatch).
    #[arg(long)]
    pub check: bool,
    /// Ring segment size in bytes (the pipelining unit; suffixes as for --size).
    #[arg(long, default_value = "4M")]
    pub segment: String,
    /// Per-message timeout in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

fn parse_size(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num.parse().map_err(|_| UsageError(format!("--size {s:?} is not a byte count")))?;
    Ok(n.checked_mul(mult).ok_or_else(|| UsageError(format!("--size {s:?} is too large")))?)
}

fn bus_factor(op: OpArg, n: usize) -> f64 {
    let n = n as f64;
    match op {
        OpArg::AllReduce => 2.0 * (n - 1.0) / n,
        OpArg::AllGather | OpArg::ReduceScatter => (n - 1.0) / n,
        OpArg::P2p => 1.0,
    }
}

/// Input of rank r: small integers, so sums are exact and checkable.
fn input(r: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((r + i) % 7) as f32).collect()
}

fn run_op(c: &dyn Comm, op: OpArg, x: Vec<f32>) -> anyhow::Result<Vec<f32>> {
    let (n, r) = (c.size(), c.rank());
    let out = match op {
        OpArg::AllReduce => c.all_reduce(Buf::F32(x), ReduceOp::Sum).wait()?,
        OpArg::AllGather => c.all_gather(Buf::F32(x)).wait()?,
        OpArg::ReduceScatter => c.reduce_scatter(Buf::F32(x), ReduceOp::Sum).wait()?,
        OpArg::P2p if n == 1 => Buf::F32(x),
        OpArg::P2p => {
            let len = x.len();
            let rx = c.recv(troupe::comm::DType::F32, len, (r + n - 1) % n, 1);
            c.send(Buf::F32(x), (r + 1) % n, 1).wait()?;
            rx.wait()?
        }
    };
    out.into_f32().ok_or_else(|| anyhow!("result changed dtype"))
}

fn check(c: &dyn Comm, op: OpArg, len: usize) -> anyhow::Result<()> {
    let (n, r) = (c.size(), c.rank());
    let got = run_op(c, op, input(r, len))?;
    let inputs: Vec<Vec<f32>> = (0..n).map(|q| input(q, len)).collect();
    let sum = |i: usize| inputs.iter().map(|x| x[i]).sum::<f32>();
    let ok = match op {
        OpArg::AllReduce => (0..len).all(|i| got[i] == sum(i)),
        OpArg::ReduceScatter => chunk_range(len, n, r).all(|i| got[i] == sum(i)),
        OpArg::AllGather => (0..n).all(|o| chunk_range(len, n, o).all(|i| got[i] == inputs[o][i])),
        OpArg::P2p => got == inputs[(r + n - 1) % n],
    };
    if !ok {
        bail!("rank {r}: {} of {len} floats over {n} ranks gave wrong values", op.name());
    }
    Ok(())
}

/// Times `op` at each size on this rank; returns the slowest rank's best time per size.
fn time_rank(c: &dyn Comm, a: &CommBenchArgs, sizes: &[usize]) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for &bytes in sizes {
        let len = bytes / 4;
        if a.check {
            check(c, a.op, len)?;
        }
        let mut buf = input(c.rank(), len);
        buf = run_op(c, a.op, buf)?; // warm-up
        let mut best = f64::MAX;
        for _ in 0..a.iters.max(1) {
            c.barrier().wait()?;
            let t = Instant::now();
            buf = run_op(c, a.op, buf)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let ns = Buf::I64(vec![(best * 1e9) as i64]);
        let worst = c.all_reduce(ns, ReduceOp::Max).wait()?;
        let worst = worst.into_i64().and_then(|v| v.first().copied()).unwrap_or(0);
        out.push(worst as f64 / 1e9);
    }
    Ok(out)
}

/// Best memcpy bandwidth (bytes/s) for one buffer of `bytes`.
fn memcpy_bw(bytes: usize) -> f64 {
    let src = vec![1u8; bytes.max(1)];
    let mut dst = vec![0u8; bytes.max(1)];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best
}

/// Bandwidth (bytes/s) of one loopback TCP stream carrying `bytes` (best of three).
fn loopback_bw(bytes: usize) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let total = bytes.max(1);
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..3 {
            let mut left = total;
            while left > 0 {
                let k = left.min(chunk.len());
                s.write_all(&chunk[..k])?;
                left -= k;
            }
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    r.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut left = total;
        while left > 0 {
            let k = r.read(&mut buf[..left.min(1 << 20)])?;
            if k == 0 {
                bail!("loopback sender closed early");
            }
            left -= k;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    sender.join().map_err(|_| anyhow!("loopback sender panicked"))??;
    Ok(total as f64 / best)
}

fn threads(comms: Vec<Box<dyn Comm>>, a: &CommBenchArgs, sizes: &[usize]) -> anyhow::Result<Vec<f64>> {
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let (a, sizes) = (a.clone(), sizes.to_vec());
            std::thread::spawn(move || time_rank(c.as_ref(), &a, &sizes))
        })
        .collect();
    let mut first = None;
    for h in hs {
        let r = h.join().map_err(|_| anyhow!("a rank thread panicked"))??;
        first.get_or_insert(r);
    }
    first.ok_or_else(|| anyhow!("no ranks"))
}

pub fn comm(a: CommBenchArgs) -> anyhow::Result<()> {
    let sizes = a.size.iter().map(|s| parse_size(s)).collect::<anyhow::Result<Vec<_>>>()?;
    // The buffers are fp32: a size is a whole number of elements, and none is empty.
    if let Some((s, _)) = a.size.iter().zip(&sizes).find(|(_, b)| **b == 0 || **b % 4 != 0) {
        return Err(UsageError(format!(
            "--size {s}: must be a positive multiple of 4 bytes (fp32 elements)"
        ))
        .into());
    }
    if a.iters == 0 {
        return Err(UsageError("--iters must be at least 1".into()).into());
    }
    if a.timeout == 0 {
        return Err(UsageError("--timeout must be at least 1 second".into()).into());
    }
    if parse_size(&a.segment)? == 0 {
        return Err(UsageError("--segment must be positive".into()).into());
    }
    let opts = CommOptions {
        timeout: Duration::from_secs(a.timeout),
        segment_bytes: parse_size(&a.segment)?.max(1),
        ..CommOptions::default()
    };
    let launched = LaunchEnv::detect()?;
    let (n, is_root, times) = match (a.backend, &launched) {
        (BackendArg::Tcp, Some(env)) => {
            // Ranks started with different operations, sizes or counts would fail on a
            // malformed message or wait out the timeout; they agree first (see
            // `runtime::agree`) and a difference stops them at once, naming it.
            let mut mine = troupe::runtime::agree::Settings::of_binary();
            mine.set("--op", a.op.name());
            mine.set("--size", format!("{sizes:?}"));
            mine.set("--iters", a.iters.max(1));
            mine.set("--check", a.check);
            mine.set("--segment", opts.segment_bytes);
            let (c, _store) =
                super::train_parallel::join(env, opts, &mine).context("joining the launcher's TCP world")?;
            let t = time_rank(c.as_ref(), &a, &sizes)?;
            (c.size(), c.rank() == 0, t)
        }
        (b, _) => {
            let n = a.nproc.unwrap_or(4);
            if n == 0 {
                return Err(UsageError("--nproc must be at least 1".into()).into());
            }
            let comms = match b {
                BackendArg::Inproc => inproc::world(n, opts)?,
                BackendArg::Tcp => tcp::local_world(n, opts)?,
            };
            (n, true, threads(comms, &a, &sizes)?)
        }
    };
    if !is_root {
        return Ok(());
    }
    let (ref_name, backend) = match a.backend {
        BackendArg::Inproc => ("memcpy", "inproc"),
        BackendArg::Tcp => ("loopback-tcp", "tcp"),
    };
    println!(
        "# troupe bench comm: backend {backend}, op {}, {}, best of {}",
        a.op.name(),
        super::count(n as u64, "rank"),
        super::count(a.iters as u64, "iteration")
    );
    println!(
        "{:>12} {:>12} {:>12} {:>12} {:>14} {:>8}",
        "size(B)",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        format!("{ref_name}(GB/s)"),
        "bus/ref"
    );
    for (&bytes, &t) in sizes.iter().zip(&times) {
        let algbw = bytes as f64 / t.max(1e-12) / 1e9;
        let busbw = algbw * bus_factor(a.op, n);
        let reference = match a.backend {
            BackendArg::Inproc => memcpy_bw(bytes),
            BackendArg::Tcp => loopback_bw(bytes)?,
        } / 1e9;
        println!(
            "{bytes:>12} {:>12.1} {algbw:>12.3} {busbw:>12.3} {reference:>14.3} {:>8.2}",
            t * 1e6,
            busbw / reference
        );
    }
    Ok(())
}
