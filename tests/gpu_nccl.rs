//! The NCCL communicator over device buffers (`troupe::gpu::nccl`). Needs a GPU and libnccl
//! (bench/gpu.sh puts pip's NCCL on the library path); elsewhere every test prints SKIPPED.
//! One GPU is enough: a one-rank communicator checks the calls, the stream ordering and the
//! result plumbing; a two-rank communicator whose second rank never joins checks that
//! initialisation is bounded by the timeout and names the rank and group.

use std::time::{Duration, Instant};

use troupe::comm::ReduceOp;
use troupe::comm::store::{StoreClient, StoreServer};
use troupe::gpu::nccl::{NcclComm, nccl_available, share_unique_id};
use troupe::gpu::{DType, Dev, Gpu, download_f32, upload_f32};

fn setup() -> Option<(&'static troupe::gpu::CudaGpu, StoreServer, StoreClient)> {
    let gpu = troupe::gpu::cuda::shared()?;
    if let Err(e) = nccl_available() {
        eprintln!("SKIPPED the NCCL tests: {e}");
        return None;
    }
    let server = StoreServer::start("127.0.0.1:0").expect("store");
    let store = StoreClient::connect(&server.addr().to_string(), Duration::from_secs(10)).expect("client");
    Some((gpu, server, store))
}

#[test]
fn one_rank_collectives_on_device_buffers() {
    let Some((gpu, _server, mut store)) = setup() else { return };
    let id = share_unique_id(&mut store, "one", 0, Duration::from_secs(10)).unwrap();
    let comm = NcclComm::init(gpu, id, 0, 1, "one", Duration::from_secs(30)).unwrap();
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
    for dtype in [DType::F32, DType::Bf16] {
        let buf = upload_f32(gpu, &x, dtype).unwrap();
        let out = gpu.alloc(x.len() * dtype.size()).unwrap();
        comm.after_compute(gpu).unwrap();
        comm.all_reduce(gpu, Dev::new(&buf), x.len(), dtype, ReduceOp::Sum).unwrap();
        comm.all_gather(gpu, Dev::new(&buf), Dev::new(&out), x.len(), dtype).unwrap();
        comm.wait(gpu, "test").unwrap();
        comm.compute_after_all(gpu).unwrap();
        let want = download_f32(gpu, Dev::new(&buf), x.len(), dtype).unwrap();
        assert_eq!(download_f32(gpu, Dev::new(&out), x.len(), dtype).unwrap(), want, "{dtype:?}");
        let rounded = if dtype == DType::Bf16 { troupe::gpu::round_bf16(&x) } else { x.clone() };
        assert_eq!(want, rounded, "{dtype:?}: a one-rank sum is the identity");
    }
}

/// The rest of the calls on one rank: a grouped send to itself and receive from itself (how a
/// schedule pairs a send with a receive) copies the buffer; broadcast from rank 0 and a
/// one-rank reduce-scatter are the identity; the operations' bounds checks refuse a count past
/// the buffer's end before calling NCCL.
#[test]
fn one_rank_point_to_point_broadcast_and_reduce_scatter() {
    let Some((gpu, _server, mut store)) = setup() else { return };
    let id = share_unique_id(&mut store, "p2p", 0, Duration::from_secs(10)).unwrap();
    let comm = NcclComm::init(gpu, id, 0, 1, "p2p", Duration::from_secs(30)).unwrap();
    let x: Vec<f32> = (0..777).map(|i| (i as f32).sin()).collect();
    for dtype in [DType::F32, DType::Bf16] {
        let rounded = if dtype == DType::Bf16 { troupe::gpu::round_bf16(&x) } else { x.clone() };
        let src = upload_f32(gpu, &x, dtype).unwrap();
        let dst = gpu.alloc(x.len() * dtype.size()).unwrap();
        let rs = gpu.alloc(x.len() * dtype.size()).unwrap();
        comm.after_compute(gpu).unwrap();
        comm.group(|| {
            comm.send(gpu, Dev::new(&src), x.len(), dtype, 0)?;
            comm.recv(gpu, Dev::new(&dst), x.len(), dtype, 0)
        })
        .unwrap();
        comm.broadcast(gpu, Dev::new(&src), x.len(), dtype, 0).unwrap();
        comm.reduce_scatter(gpu, Dev::new(&src), Dev::new(&rs), x.len(), dtype, ReduceOp::Sum).unwrap();
        comm.wait(gpu, "test").unwrap();
        comm.compute_after_all(gpu).unwrap();
        for (what, b) in [("received", &dst), ("broadcast", &src), ("reduce-scattered", &rs)] {
            let got = download_f32(gpu, Dev::new(b), x.len(), dtype).unwrap();
            assert_eq!(got, rounded, "{dtype:?}: {what}");
        }
        let err = comm.send(gpu, Dev::new(&src), x.len() + 1, dtype, 0).expect_err("past the end");
        assert!(err.to_string().contains("send"), "{err}");
    }
}

#[test]
fn a_missing_peer_is_an_error_after_the_timeout_not_a_hang() {
    let Some((gpu, _server, mut store)) = setup() else { return };
    let id = share_unique_id(&mut store, "two", 0, Duration::from_secs(10)).unwrap();
    let start = Instant::now();
    let err = NcclComm::init(gpu, id, 0, 2, "pair", Duration::from_secs(3)).err().expect("must fail");
    let msg = err.to_string();
    assert!(msg.contains("rank 0") && msg.contains("pair") && msg.contains("joined"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
}

/// The runtime's device groups on CUDA (`StageFactory::cuda_nccl`): the unique id goes over the
/// group's CPU communicator, the NCCL communicator joins, and a GPU stage's last backward and
/// its embedding-style sum run on it, and so do the distributed optimizer's gradient reduction
/// and parameter gather (`Stage::shard_optimizer`: NCCL reduces and broadcasts). One rank: the sums and the gather are the
/// identity, so the stage's gradients and updated parameters equal a stage's without a group,
/// bit for bit.
#[test]
fn a_one_rank_device_group_reduces_a_gpu_stage_in_place() {
    use troupe::kernels::CpuBackend;
    use troupe::models::gpt::{Gpt, GptConfig, LayerRange, StageInput};
    use troupe::runtime::stage::Stage;
    let Some((gpu, _server, _store)) = setup() else { return };
    let cfg = GptConfig { vocab_size: 64, hidden_size: 64, num_attention_heads: 1, ..GptConfig::tiny() };
    let range = LayerRange::full(&cfg);
    let factory = troupe::gpu::stage::StageFactory::cuda_nccl(gpu, DType::F32, Duration::from_secs(30));
    let cpu_comm = troupe::comm::inproc::world(1, troupe::comm::CommOptions::default()).unwrap().remove(0);
    let group = factory.reduce_group(cpu_comm).unwrap();
    assert_eq!(group.describe(), "NCCL");
    let be = CpuBackend::new(1);
    let tokens: Vec<u32> = (0..32).map(|i| (i * 7 % 64) as u32).collect();
    let targets: Vec<u32> = (0..32).map(|i| (i * 5 % 64) as u32).collect();
    let (mut grads, mut params) = (Vec::new(), Vec::new());
    for with_group in [false, true] {
        let host = Gpt::new_range(&cfg, range, 3).unwrap();
        let n = host.grads().len();
        let mut st = if with_group {
            Stage::with_device_group(host, &factory, &group).unwrap()
        } else {
            Stage::with_optimizer(host, Some(&factory), true).unwrap()
        };
        // The group's distributed optimizer over two buckets: one rank owns both; its backward
        // reduces them to itself and its update gathers them from itself (NCCL reduce and
        // broadcast).
        let ranges: Vec<_> =
            if with_group { vec![0..1000, 1000..n] } else { std::iter::once(0..n).collect() };
        if with_group {
            assert_eq!(st.shard_optimizer(&[1000..n, 0..1000]).unwrap(), ranges);
        }
        st.forward(&be, 0, 2, 16, StageInput::Tokens(&tokens), Some(&targets), 1.0).unwrap();
        st.backward_report(&be, 0, None, true, &mut |_, _| {}).unwrap();
        st.finish_grads(&be, true).unwrap();
        if with_group {
            let wte = st.wte_range().unwrap();
            assert!(st.all_reduce_grads_on_device(wte, &group).unwrap());
        }
        grads.push(st.read_grads(0..n).unwrap());
        let mut shard = troupe::runtime::shard::ChunkShard { ranges, m: vec![0.0; n], v: vec![0.0; n] };
        let adam = troupe::optim::AdamWConfig::default();
        st.optimizer_step(&be, &mut shard, &adam, 1, 1e-2, Some(0.5)).unwrap();
        st.pull_params().unwrap();
        params.push(st.params().to_vec());
    }
    assert_eq!(grads[0], grads[1], "a one-rank device group changed the gradients");
    assert!(
        params[0].iter().zip(&params[1]).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the one-rank distributed optimizer's update differs from the whole-arena update"
    );
}
