//! Collectives on both backends against a naive reference, for world sizes 1–8 and awkward
//! lengths; cross-backend bit equality; p2p ordering by tag; timeouts and dead peers.

use std::time::{Duration, Instant};

use half::bf16;
use troupe::comm::{Buf, Comm, CommError, CommOptions, DType, ReduceOp, chunk_range, inproc, tcp};

fn opts() -> CommOptions {
    CommOptions {
        timeout: Duration::from_secs(5),
        segment_bytes: 64, // tiny segments exercise the pipelining
        checksum: true,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Inproc,
    Tcp,
}

fn make_world(b: Backend, n: usize, o: CommOptions) -> Vec<Box<dyn Comm>> {
    match b {
        Backend::Inproc => inproc::world(n, o).unwrap(),
        Backend::Tcp => tcp::local_world(n, o).unwrap(),
    }
}

/// Runs `f` on every rank in its own thread and returns the results by rank.
fn on_all<R: Send + 'static>(
    comms: Vec<Box<dyn Comm>>,
    f: impl Fn(Box<dyn Comm>) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Deterministic awkward values (not exactly representable sums).
fn input(rank: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + rank * 104_729 + salt) % 1000) as f32 * 0.0137 - 3.1).collect()
}

/// The documented fold: chunk c is reduced in rank order c+1, c+2, …, c+n (mod n).
fn reference_sum(xs: &[Vec<f32>]) -> Vec<f32> {
    let n = xs.len();
    let len = xs[0].len();
    let mut out = vec![0.0f32; len];
    for c in 0..n {
        for i in chunk_range(len, n, c) {
            let mut acc = xs[(c + 1) % n][i];
            for k in 2..=n {
                acc += xs[(c + k) % n][i];
            }
            out[i] = acc;
        }
    }
    out
}

const LENS: [usize; 6] = [0, 1, 3, 7, 64, 1001];

fn check_all_reduce(b: Backend, n: usize) {
    for (salt, &len) in LENS.iter().enumerate() {
        let xs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len, salt)).collect();
        let want = reference_sum(&xs);
        let xs2 = xs.clone();
        let got = on_all(make_world(b, n, opts()), move |c| {
            let x = Buf::F32(xs2[c.rank()].clone());
            c.all_reduce(x, ReduceOp::Sum).wait().unwrap()
        });
        for (r, g) in got.into_iter().enumerate() {
            let g = g.into_f32().unwrap();
            assert_eq!(bits(&g), bits(&want), "{b:?} n={n} len={len} rank {r}");
            // And the naive f64 sum agrees to rounding.
            for i in 0..len {
                let exact: f64 = xs.iter().map(|x| f64::from(x[i])).sum();
                assert!((f64::from(g[i]) - exact).abs() < 1e-3, "{b:?} n={n} len={len} i={i}");
            }
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn all_reduce_sum_inproc_all_sizes() {
    for n in 1..=8 {
        check_all_reduce(Backend::Inproc, n);
    }
}

#[test]
fn all_reduce_sum_tcp_all_sizes() {
    for n in 1..=8 {
        check_all_reduce(Backend::Tcp, n);
    }
}

fn int_ops(b: Backend, n: usize) {
    let len = 13;
    let got = on_all(make_world(b, n, opts()), move |c| {
        let r = c.rank() as i64;
        let x: Vec<i64> = (0..len as i64).map(|i| i * 10 + r).collect();
        let sum = c.all_reduce(Buf::I64(x.clone()), ReduceOp::Sum).wait().unwrap();
        let max = c.all_reduce(Buf::I64(x.clone()), ReduceOp::Max).wait().unwrap();
        let avg = c.all_reduce(Buf::I64(x.clone()), ReduceOp::Avg).wait().unwrap();
        let rs = c.reduce_scatter(Buf::I64(x), ReduceOp::Sum).wait().unwrap();
        (sum, max, avg, rs)
    });
    let n64 = n as i64;
    let tri = n64 * (n64 - 1) / 2;
    for (r, (sum, max, avg, rs)) in got.into_iter().enumerate() {
        let want_sum: Vec<i64> = (0..len as i64).map(|i| i * 10 * n64 + tri).collect();
        assert_eq!(sum.into_i64().unwrap(), want_sum, "{b:?} n={n}");
        let want_max: Vec<i64> = (0..len as i64).map(|i| i * 10 + n64 - 1).collect();
        assert_eq!(max.into_i64().unwrap(), want_max);
        let want_avg: Vec<i64> = want_sum.iter().map(|s| s / n64).collect();
        assert_eq!(avg.into_i64().unwrap(), want_avg);
        let rs = rs.into_i64().unwrap();
        let own = chunk_range(len, n, r);
        assert_eq!(rs[own.clone()], want_sum[own], "{b:?} n={n} reduce_scatter rank {r}");
    }
}

#[test]
fn integer_reductions_and_reduce_scatter() {
    for n in [1, 2, 3, 5, 8] {
        int_ops(Backend::Inproc, n);
        int_ops(Backend::Tcp, n);
    }
}

fn gather_and_broadcast(b: Backend, n: usize) {
    let len = 11;
    let got = on_all(make_world(b, n, opts()), move |c| {
        let r = c.rank();
        let mut x = vec![bf16::ZERO; len];
        for i in chunk_range(len, n, r) {
            x[i] = bf16::from_f32((r * 20 + i) as f32);
        }
        let ag = c.all_gather(Buf::Bf16(x)).wait().unwrap();
        let root = n / 2;
        let src = if r == root { vec![7i64, 8, 9] } else { vec![0; 3] };
        let bc = c.broadcast(Buf::I64(src), root).wait().unwrap();
        c.barrier().wait().unwrap();
        (ag, bc)
    });
    for (ag, bc) in got {
        let ag = ag.into_bf16().unwrap();
        for owner in 0..n {
            for i in chunk_range(len, n, owner) {
                assert_eq!(ag[i].to_f32(), (owner * 20 + i) as f32, "{b:?} n={n}");
            }
        }
        assert_eq!(bc, Buf::I64(vec![7, 8, 9]));
    }
}

#[test]
fn all_gather_broadcast_barrier() {
    for n in [1, 2, 3, 4, 7] {
        gather_and_broadcast(Backend::Inproc, n);
        gather_and_broadcast(Backend::Tcp, n);
    }
}

fn mixed_run(b: Backend, n: usize) -> Vec<Vec<Buf>> {
    on_all(make_world(b, n, opts()), move |c| {
        let r = c.rank();
        let x = input(r, 333, 5);
        let y: Vec<bf16> = input(r, 77, 9).into_iter().map(bf16::from_f32).collect();
        vec![
            c.all_reduce(Buf::F32(x.clone()), ReduceOp::Avg).wait().unwrap(),
            c.all_reduce(Buf::F32(x.clone()), ReduceOp::Max).wait().unwrap(),
            c.reduce_scatter(Buf::F32(x), ReduceOp::Sum).wait().unwrap(),
            c.all_reduce(Buf::Bf16(y), ReduceOp::Sum).wait().unwrap(),
        ]
    })
}

#[test]
fn backends_are_bit_identical() {
    for n in [2, 3, 6] {
        let a = mixed_run(Backend::Inproc, n);
        let t = mixed_run(Backend::Tcp, n);
        for r in 0..n {
            for (k, (x, y)) in a[r].iter().zip(&t[r]).enumerate() {
                if k == 2 {
                    let own = chunk_range(x.len(), n, r);
                    let (x, y) = (x.clone().into_f32().unwrap(), y.clone().into_f32().unwrap());
                    assert_eq!(bits(&x[own.clone()]), bits(&y[own]), "n={n} rank {r} op {k}");
                } else {
                    assert_eq!(x.as_bytes(), y.as_bytes(), "n={n} rank {r} op {k}");
                }
            }
        }
    }
}

fn p2p_by_tag(b: Backend) {
    let got = on_all(make_world(b, 2, opts()), |c| {
        if c.rank() == 0 {
            for (tag, v) in [(3u64, 1i64), (1, 2), (3, 3), (2, 4)] {
                c.send(Buf::I64(vec![v]), 1, tag).wait().unwrap();
            }
            vec![]
        } else {
            // Receive out of send order: tag 2 first, then both tag-3 messages, then tag 1.
            let later = c.recv(DType::I64, 1, 0, 1);
            let mut out = vec![c.recv(DType::I64, 1, 0, 2).wait().unwrap()];
            out.push(c.recv(DType::I64, 1, 0, 3).wait().unwrap());
            out.push(c.recv(DType::I64, 1, 0, 3).wait().unwrap());
            out.push(later.wait().unwrap());
            out
        }
    });
    let want: Vec<Buf> = [4, 1, 3, 2].into_iter().map(|v| Buf::I64(vec![v])).collect();
    assert_eq!(got[1], want, "{b:?}");
}

#[test]
fn p2p_matches_by_tag_and_keeps_order() {
    p2p_by_tag(Backend::Inproc);
    p2p_by_tag(Backend::Tcp);
}

fn short() -> CommOptions {
    CommOptions { timeout: Duration::from_millis(300), ..opts() }
}

fn timeout_named(b: Backend) {
    let all_failed = std::sync::Arc::new(std::sync::Barrier::new(3));
    let got = on_all(make_world(b, 3, short()), move |c| {
        let start = Instant::now();
        // Rank 2 never joins the all-reduce; it waits for a message that never comes.
        let r = if c.rank() == 2 {
            c.recv(DType::F32, 4, 0, 42).wait().map(|_| ())
        } else {
            c.all_reduce(Buf::F32(vec![1.0; 4]), ReduceOp::Sum).wait().map(|_| ())
        };
        let took = start.elapsed();
        // Keep this rank alive until everyone has timed out, so only timeouts are seen.
        all_failed.wait();
        (r.unwrap_err(), took)
    });
    for (rank, (e, took)) in got.into_iter().enumerate() {
        assert!(took < Duration::from_secs(3), "{b:?} rank {rank} took {took:?}");
        let msg = e.to_string();
        assert!(matches!(e, CommError::Timeout { .. }), "{b:?}: {msg}");
        assert!(msg.contains(&format!("rank {rank}")), "{msg}");
        if rank == 2 {
            assert!(msg.contains("p2p tag 42") && msg.contains("peer 0"), "{msg}");
        } else {
            assert!(msg.contains("all_reduce") && msg.contains("group world"), "{msg}");
            assert!(msg.contains("sequence 0"), "{msg}");
        }
    }
}

#[test]
fn timeouts_name_op_group_rank_peer_and_tag() {
    timeout_named(Backend::Inproc);
    timeout_named(Backend::Tcp);
}

fn dead_peer(b: Backend) {
    let o = CommOptions { timeout: Duration::from_secs(20), ..opts() };
    let got = on_all(make_world(b, 3, o), |c| {
        if c.rank() == 1 {
            drop(c); // rank 1 dies before the collective
            return None;
        }
        let start = Instant::now();
        let e = c.all_reduce(Buf::F32(vec![1.0; 8]), ReduceOp::Sum).wait().unwrap_err();
        Some((e, start.elapsed()))
    });
    for (e, took) in got.into_iter().flatten() {
        assert!(took < Duration::from_secs(10), "{b:?}: dead peer took {took:?} to detect");
        let msg = e.to_string();
        // Rank 2 waits on rank 1 directly; rank 0 waits on rank 2, which fails and goes away.
        assert!(matches!(e, CommError::PeerLost { .. }), "{b:?}: {msg}");
        assert!(msg.contains("all_reduce"), "{msg}");
    }
}

#[test]
fn dead_peer_is_reported_before_the_timeout() {
    dead_peer(Backend::Inproc);
    dead_peer(Backend::Tcp);
}

#[test]
fn works_as_a_future() {
    let got = on_all(make_world(Backend::Tcp, 2, opts()), |c| {
        troupe::comm::block_on(async move {
            let x = c.all_reduce(Buf::I64(vec![c.rank() as i64 + 1; 3]), ReduceOp::Sum).await?;
            c.barrier().await?;
            Ok::<_, CommError>(x)
        })
    });
    for g in got {
        assert_eq!(g.unwrap(), Buf::I64(vec![3; 3]));
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let comms = make_world(Backend::Inproc, 2, opts());
    let c = &comms[0];
    let e = c.send(Buf::F32(vec![1.0]), 5, 0).wait().unwrap_err().to_string();
    assert!(e.contains("peer 5") && e.contains("rank 0"), "{e}");
    assert!(c.broadcast(Buf::F32(vec![]), 9).wait().is_err());
    assert!(c.new_group(&[1], "dp[1]").is_err(), "rank 0 is not a member");
    assert!(c.new_group(&[0, 0], "dup").is_err());
    // A length mismatch between ranks is named, not a panic.
    let got = on_all(make_world(Backend::Tcp, 2, opts()), |c| {
        if c.rank() == 0 {
            c.send(Buf::F32(vec![1.0; 3]), 1, 9).wait().map(|_| Buf::F32(vec![]))
        } else {
            c.recv(DType::F32, 4, 0, 9).wait()
        }
    });
    let e = got[1].clone().unwrap_err().to_string();
    assert!(e.contains("expected 4 × f32, got 3 × f32") && e.contains("p2p tag 9"), "{e}");
}

#[test]
fn subgroups_from_topology() {
    for b in [Backend::Inproc, Backend::Tcp] {
        subgroups_on(b);
    }
}

fn subgroups_on(b: Backend) {
    let topo = troupe::comm::Topology::new(8, 2, 2, 2).unwrap();
    let got = on_all(make_world(b, 8, opts()), move |c| {
        let r = c.rank();
        let (name, ranks) = topo.group(troupe::comm::GroupKind::Data, r);
        let dp = c.new_group(&ranks, &name).unwrap();
        let s = dp.all_reduce(Buf::I64(vec![r as i64]), ReduceOp::Sum).wait().unwrap();
        (ranks, s)
    });
    for (ranks, s) in got {
        let want: i64 = ranks.iter().map(|&x| x as i64).sum();
        assert_eq!(s, Buf::I64(vec![want]));
    }
}

#[test]
fn launcher_env_world_with_rank0_hosting_the_store() {
    use troupe::comm::env::LaunchEnv;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hs: Vec<_> = (0..3)
        .map(|r| {
            std::thread::spawn(move || {
                let env = LaunchEnv::explicit(r, 3, "127.0.0.1", port).unwrap();
                let c = tcp::connect_from_env(&env, opts()).unwrap();
                let s = c.all_reduce(Buf::I64(vec![1 << r]), ReduceOp::Sum).wait().unwrap();
                // Rank 0 owns the store: keep it alive until every rank has its result.
                c.barrier().wait().unwrap();
                s
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), Buf::I64(vec![7]));
    }
}
