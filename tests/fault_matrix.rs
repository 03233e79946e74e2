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

#[test]
fn every_fault_is_detected_named_and_survived() {
    let mut rng = Rng::derived(4, "fault-matrix");
    let tokens: Vec<u32> = (0..4000).map(|_| (rng.next_u64() % 61) as u32).collect();
    let data: Arc<dyn SampleSource> = Arc::new(TokenWindows::new(tokens, 16, 5).unwrap());
    let dir = std::env::temp_dir().join(format!("troupe-fault-matrix-{}", std::process::id()));
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
    assert_eq!(sum.attributed, sum.must_attribute, "attribution below 100%:\n{table}");
    assert_eq!(sum.resumed_bitwise, sum.resumed, "a restarted run differs:\n{table}");
    assert!(sum.resumed > 10, "{table}");
    assert_eq!(sum.sample_errors, 0, "{table}");
    for r in &rows {
        assert!(!r.note.contains("DIFFERS"), "{table}");
        let must_fail = matches!(
            r.kind,
            FaultKind::Crash | FaultKind::Hang | FaultKind::Corrupt | FaultKind::Drop | FaultKind::CkptFail
        );
        assert_eq!(r.detected, must_fail, "{} {}:\n{table}", r.kind.name(), r.phase.name());
        if r.detected {
            assert!(r.flight_files > 0, "no flight recorder for {}:\n{table}", r.fault);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
