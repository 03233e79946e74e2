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
        gpu.comm_after_compute().unwrap();
        comm.all_reduce(gpu, Dev::new(&buf), x.len(), dtype, ReduceOp::Sum).unwrap();
        comm.all_gather(gpu, Dev::new(&buf), Dev::new(&out), x.len(), dtype).unwrap();
        comm.wait(gpu, "test").unwrap();
        gpu.compute_after_comm().unwrap();
        let want = download_f32(gpu, Dev::new(&buf), x.len(), dtype).unwrap();
        assert_eq!(download_f32(gpu, Dev::new(&out), x.len(), dtype).unwrap(), want, "{dtype:?}");
        let rounded = if dtype == DType::Bf16 { troupe::gpu::round_bf16(&x) } else { x.clone() };
        assert_eq!(want, rounded, "{dtype:?}: a one-rank sum is the identity");
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
