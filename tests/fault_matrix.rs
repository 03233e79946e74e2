//! The fault matrix (see `troupe::runtime::matrix`): every fault kind × pipeline phase × two
//! seeds on PP = 2 × DP = 2 in-process. Required: no hangs (every scenario returns), detection
//! within the timeout + 2 s, attribution of crash, hang, NaN, Inf and corrupt to the faulty rank
//! in every scenario, every restarted run bitwise equal to the fault-free run, no sample lost or
//! repeated, survived faults (delay, duplicate, reorder, slow) leaving the result unchanged, and a
//! flight recorder from every failing run.

use std::sync::Arc;
use std::time::Duration;

use troupe::data::SampleSource;
use troupe::models::Rng;
use troupe::runtime::faults::FaultKind;
use troupe::runtime::matrix;
use troupe::train::data::TokenWindows;

#[path = "common/scratch.rs"]
mod scratch;
use scratch::Scratch;

#[test]
fn every_fault_is_detected_named_and_survived() {
    let mut rng = Rng::derived(4, "fault-matrix");
    let tokens: Vec<u32> = (0..4000).map(|_| (rng.next_u64() % 61) as u32).collect();
    let data: Arc<dyn SampleSource> = Arc::new(TokenWindows::new(tokens, 16, 5).unwrap());
    let dir = Scratch::new("fault-matrix");
    let timeout = Duration::from_secs(1);
    let (rows, sum) = matrix::run(&data, &dir, &[1, 2], timeout, &mut |s| {
        eprintln!(
            "{} {} seed {}: detected {} in {:.2} s, attributed {:?}, resumed bitwise {:?} — {}",
            s.kind.name(),
            s.phase.name(),
            s.seed,
            s.detected,
            s.detect_s,
            s.attributed,
            s.resumed_bitwise,
            s.note
        );
    })
    .expect("fault-free run");
    let table = matrix::table(&rows, &sum, timeout);
    println!("{table}");
    assert_eq!(sum.hangs, 0, "{table}");
    assert!(sum.detect_max_s <= timeout.as_secs_f64() + 2.0, "{table}");
    // The rows at fault go last: a log cut to its tail still shows them.
    let unattributed: Vec<String> = rows
        .iter()
        .filter(|r| r.attributed == Some(false) && matrix::must_be_attributed(r.kind))
        .map(|r| format!("{} {} seed {}: {}", r.kind.name(), r.phase.name(), r.seed, r.note))
        .collect();
    assert_eq!(
        sum.attributed,
        sum.must_attribute,
        "attribution below 100%:\n{table}\nnot attributed (every rank's error):\n{}",
        unattributed.join("\n")
    );
    assert_eq!(sum.resumed_bitwise, sum.resumed, "a restarted run differs:\n{table}");
    assert!(sum.resumed > 10, "{table}");
    assert_eq!(sum.sample_errors, 0, "{table}");
    for r in &rows {
        assert!(!r.note.contains("DIFFERS"), "{table}");
        let must_fail = matches!(
            r.kind,
            FaultKind::Crash | FaultKind::Hang | FaultKind::Corrupt | FaultKind::Drop | FaultKind::CkptFail
        );
        assert_eq!(matrix::fails_the_run(r.kind), must_fail, "{}", r.kind.name());
        assert_eq!(r.detected, must_fail, "{} {}:\n{table}", r.kind.name(), r.phase.name());
        if r.detected {
            assert!(r.flight_files > 0, "no flight recorder for {}:\n{table}", r.fault);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fault that depends on the order of message handling (damage the 3rd message rank 0's
/// mailbox accepts) fails a run; the trace that failing run leaves, given to `--replay-order`,
/// makes re-runs fail in exactly the same way.
#[test]
fn a_recorded_order_reproduces_an_ordering_failure() {
    use troupe::config::Config;
    use troupe::runtime::{RunOptions, faults::FaultPlan, replay_order, train_inproc};
    let mut rng = Rng::derived(9, "replay-fault");
    let tokens: Vec<u32> = (0..4000).map(|_| (rng.next_u64() % 61) as u32).collect();
    let data: Arc<dyn SampleSource> = Arc::new(TokenWindows::new(tokens, 16, 5).unwrap());
    let sets = [
        "parallel.data_parallel_size=1",
        "parallel.pipeline_schedule=\"interleaved\"",
        "checkpoint.save_interval=0",
    ];
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::from_toml_str(matrix::MATRIX_CONFIG, "test", &sets).unwrap();
    let dir = Scratch::new("replay-fault");
    let fault: troupe::runtime::faults::Fault = "corrupt:rank=0,step=2,recv=3".parse().unwrap();
    let opts = |order| RunOptions {
        timeout: Duration::from_secs(2),
        trace_step: Some(2),
        flight_dir: Some(dir.to_path_buf()),
        faults: FaultPlan { faults: vec![fault.clone()], seed: 1 },
        replay_order: order,
        ..RunOptions::default()
    };
    let first =
        train_inproc(&cfg, data.clone(), opts(None), 2, None, None).expect_err("the fault fails the run");
    let text = std::fs::read_to_string(dir.join("trace-rank0.txt")).expect("the failing rank's trace");
    let trace = troupe::trace::Trace::parse(&text).unwrap();
    let order = replay_order(&trace);
    assert!(order[0].len() >= 3, "the trace holds the messages accepted before the failure: {order:?}");
    let first = first.to_string();
    assert!(first.contains("receive #3") && first.starts_with("rank 0, step 2"), "{first}");
    for _ in 0..3 {
        let again = train_inproc(&cfg, data.clone(), opts(Some(order.clone())), 2, None, None)
            .expect_err("fails again");
        assert_eq!(again.to_string(), first, "the replayed run failed differently");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
