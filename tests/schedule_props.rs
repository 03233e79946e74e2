//! Properties of the schedule layer over many (p, m, v): every generated program validates, and
//! with unit costs the simulator reproduces the textbook bubble and memory formulas.

use proptest::prelude::*;
use troupe::schedule::{
    Costs, Op, Program, ScheduleError, ScheduleKind, ScheduleSpec, Semantics, dry_run, from_text, generate,
    parse_program, simulate, to_text, validate,
};

const EPS: f64 = 1e-9;

fn unit(f: f64, b: f64, w: f64) -> Costs {
    Costs { forward: f, backward: b, backward_input: b - w, backward_weight: w, ..Costs::default() }
}

/// p ∈ 1..8, m ∈ p..4p.
fn pm() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=8).prop_flat_map(|p| (Just(p), p..=4 * p))
}

fn run(spec: ScheduleSpec, costs: Costs) -> (Program, troupe::schedule::Simulation) {
    let program = generate(&spec).expect("generate");
    validate(&program).expect("validate");
    let sim = simulate(&program, &costs).expect("simulate");
    (program, sim)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn gpipe_and_1f1b_bubble_is_p_minus_1_over_m((p, m) in pm()) {
        for kind in [ScheduleKind::Gpipe, ScheduleKind::OneFOneB] {
            let (_, sim) = run(ScheduleSpec::new(kind, p, m), Costs::default());
            let want = (p - 1) as f64 / m as f64;
            prop_assert!((sim.stats.bubble - want).abs() < EPS, "{kind} p={p} m={m}: {} vs {want}", sim.stats.bubble);
            // every rank is equally idle in these schedules
            for rank in &sim.stats.ranks {
                prop_assert!((rank.bubble - want).abs() < EPS);
            }
        }
    }

    #[test]
    fn peak_in_flight_matches_formulas((p, m) in pm()) {
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::OneFOneB, p, m), Costs::default());
        for (r, rank) in sim.stats.ranks.iter().enumerate() {
            prop_assert_eq!(rank.peak_in_flight, (p - r).min(m), "1f1b rank {}", r);
        }
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::Gpipe, p, m), Costs::default());
        for rank in &sim.stats.ranks {
            prop_assert_eq!(rank.peak_in_flight, m);
        }
    }

    #[test]
    fn interleaved_bubble_is_p_minus_1_over_vm((p, m) in pm(), v in 1usize..=4, pick in 0usize..64) {
        // any group size N that Megatron accepts: p <= N <= m, m mod N in {0} or >= p
        let valid: Vec<usize> = (p..=m).filter(|&n| m.is_multiple_of(n) || m % n >= p).collect();
        let n = valid[pick % valid.len()];
        let spec = ScheduleSpec { group_size: Some(n), ..ScheduleSpec::new(ScheduleKind::Interleaved, p, m).with_vpp(v) };
        let (_, sim) = run(spec, Costs::default());
        let want = (p - 1) as f64 / (v * m) as f64;
        prop_assert!((sim.stats.bubble - want).abs() < EPS, "p={p} m={m} v={v} N={n}: {} vs {want}", sim.stats.bubble);
    }

    #[test]
    fn interleaved_peak_matches_korthikanti((p, k) in (1usize..=8, 1usize..=4), v in 2usize..=4) {
        // N = p: rank r holds 2(p-r-1) + (v-1)p + 1 chunk-microbatches (capped by v*m)
        let m = k * p;
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::Interleaved, p, m).with_vpp(v), Costs::default());
        for (r, rank) in sim.stats.ranks.iter().enumerate() {
            let want = (2 * (p - r - 1) + (v - 1) * p + 1).min(v * m);
            prop_assert_eq!(rank.peak_in_flight, want, "p={} m={} v={} rank {}", p, m, v, r);
        }
    }

    #[test]
    fn zb_h1_bubble_is_a_third_of_1f1b((p, m) in pm()) {
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::ZbH1, p, m), unit(1.0, 2.0, 1.0));
        let want = (p - 1) as f64 / (3 * m) as f64;
        prop_assert!((sim.stats.bubble - want).abs() < EPS, "p={p} m={m}: {} vs {want}", sim.stats.bubble);
    }

    #[test]
    fn zb_h2_fills_the_span_with_at_most_2p_minus_1_in_flight((p, m) in pm()) {
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::ZbH2, p, m), unit(1.0, 2.0, 1.0));
        for (r, rank) in sim.stats.ranks.iter().enumerate() {
            prop_assert!(rank.peak_in_flight < 2 * p, "p={} m={} rank {}", p, m, r);
            if m >= 2 * p - 1 {
                prop_assert!(rank.span_bubble.abs() < EPS, "p={p} m={m} rank {r}: {}", rank.span_bubble);
            }
        }
        // only the staggered start is left: (p-1) forwards of idle over 3m of work
        if m >= 2 * p - 1 {
            let want = (p - 1) as f64 / (3 * m) as f64;
            prop_assert!((sim.stats.bubble - want).abs() < EPS, "p={p} m={m}: {}", sim.stats.bubble);
        }
    }

    #[test]
    fn zb_v_has_no_span_bubble_and_balanced_memory((p, m) in pm()) {
        let (_, sim) = run(ScheduleSpec::new(ScheduleKind::ZbV, p, m), unit(1.0, 2.0, 1.0));
        for (r, rank) in sim.stats.ranks.iter().enumerate() {
            if m >= 2 * p - 1 {
                // zero bubble inside each rank's own span; 2p half-size chunk activations each
                prop_assert!(rank.span_bubble.abs() < EPS, "p={p} m={m} rank {r}: {}", rank.span_bubble);
                prop_assert_eq!(rank.peak_in_flight, 2 * p, "p={} m={} rank {}", p, m, r);
            }
            prop_assert!(rank.peak_in_flight <= 2 * p);
        }
    }

    #[test]
    fn text_and_json_round_trip((p, m) in pm(), v in 1usize..=3, k in 0usize..6) {
        let kind = ScheduleKind::ALL[k];
        let vpp = match kind { ScheduleKind::Interleaved => v, other => other.default_vpp() };
        let spec = ScheduleSpec { group_size: Some(m), ..ScheduleSpec::new(kind, p, m).with_vpp(vpp) };
        let program = generate(&spec).expect("generate");
        prop_assert_eq!(&from_text(&to_text(&program)).expect("text"), &program);
        let json = serde_json::to_string(&program).expect("json");
        prop_assert_eq!(&parse_program(&json).expect("json parse"), &program);
        prop_assert!(dry_run(&program, Semantics::Buffered).is_ok());
    }
}

/// A small valid program to break in the negative tests below.
fn base() -> Program {
    generate(&ScheduleSpec::new(ScheduleKind::OneFOneB, 2, 2)).expect("generate")
}

fn expect_err(program: &Program, rank: usize, index: usize, needle: &str) -> ScheduleError {
    let err = validate(program).expect_err("validation should fail");
    let msg = err.to_string();
    assert!(msg.contains(&format!("rank {rank}")), "no rank in `{msg}`");
    assert!(msg.contains(&format!("instruction {index}")), "no index in `{msg}`");
    assert!(msg.contains(needle), "`{needle}` missing from `{msg}`");
    err
}

fn position(program: &Program, rank: usize, token: &str) -> usize {
    program.ranks[rank].iter().position(|op| op.to_string() == token).expect(token)
}

#[test]
fn duplicate_forward_is_named() {
    let mut p = base();
    p.ranks[0].insert(1, Op::Forward { mb: 0, chunk: 0 });
    let err = expect_err(&p, 0, 1, "(mb 0, chunk 0)");
    assert!(matches!(err, ScheduleError::Duplicate { .. }));
}

#[test]
fn backward_before_forward_is_named() {
    let mut p = base();
    let i = position(&p, 1, "0F1");
    let j = position(&p, 1, "0B1");
    p.ranks[1].swap(i, j);
    let err = expect_err(&p, 1, i, "(mb 1, chunk 0)");
    assert!(matches!(err, ScheduleError::Order { .. }), "{err}");
}

#[test]
fn missing_backward_is_named() {
    let p = from_text("pp=1 vpp=1 microbatches=2\n0: 0F0 0F1 0B0\n").unwrap();
    let err = expect_err(&p, 0, 3, "(mb 1, chunk 0)");
    assert!(matches!(err, ScheduleError::Missing { .. }), "{err}");
    let p = from_text("pp=1 vpp=1 microbatches=1\n0: 0F0 0I0\n").unwrap();
    let err = expect_err(&p, 0, 2, "(mb 0, chunk 0)");
    assert!(matches!(err, ScheduleError::Missing { .. }), "{err}");
}

#[test]
fn out_of_range_is_named() {
    let p = from_text("pp=1 vpp=1 microbatches=1\n0: 0F0 1F0 0B0\n").unwrap();
    let err = expect_err(&p, 0, 1, "1F0");
    assert!(matches!(err, ScheduleError::OutOfRange { .. }), "{err}");
    let p = from_text("pp=1 vpp=1 microbatches=1\n0: 0F0 0F3 0B0\n").unwrap();
    expect_err(&p, 0, 1, "microbatch 3");
}

#[test]
fn mixed_backward_is_named() {
    let mut p = base();
    let i = position(&p, 1, "0B0");
    p.ranks[1].insert(i + 1, Op::BackwardWeight { mb: 0, chunk: 0 });
    let err = expect_err(&p, 1, i + 1, "(mb 0, chunk 0)");
    assert!(matches!(err, ScheduleError::MixedBackward { .. }));
}

#[test]
fn weight_before_input_grad_is_named() {
    let text = "pp=1 vpp=1 microbatches=1\n0: 0F0 0W0 0I0\n";
    let p = from_text(text).unwrap();
    let err = expect_err(&p, 0, 1, "(mb 0, chunk 0)");
    assert!(matches!(err, ScheduleError::Order { .. }));
}

/// 1F1B on 2 ranks, 2 microbatches, written out by hand.
const GOOD: &str = "pp=2 vpp=1 microbatches=2
0: 0F0 0SA0:1 0F1 0SA1:1 0RG0:1 0B0 0RG1:1 0B1
1: 0RA0:0 0F0 0RA1:0 0B0 0SG0:0 0F1 0B1 0SG1:0
";

fn edited(rank: usize, f: impl FnOnce(&mut Vec<Op>)) -> Program {
    let mut p = from_text(GOOD).expect("parse");
    f(&mut p.ranks[rank]);
    p
}

#[test]
fn hand_written_program_is_valid() {
    validate(&from_text(GOOD).unwrap()).unwrap();
}

#[test]
fn receive_after_consumer_is_named() {
    // rank 0 runs the backward of mb 0 before receiving its gradient
    let p = edited(0, |ops| ops.swap(4, 5));
    let err = expect_err(&p, 0, 4, "(mb 0, chunk 0)");
    assert!(matches!(err, ScheduleError::Order { .. }), "{err}");
}

#[test]
fn send_without_receive_is_named() {
    // rank 0 sends mb 1's activation, rank 1 never posts the receive (and does not need it:
    // drop its forward's dependency by turning the receive into nothing and moving nothing else)
    let mut p = from_text(GOOD).unwrap();
    p.ranks[1].remove(2);
    let err = validate(&p).expect_err("must fail");
    // rank 1's forward of mb 1 now has no input: blamed with its index
    assert!(matches!(err, ScheduleError::Order { rank: 1, index: 4, mb: 1, chunk: 0, .. }), "{err}");
    // a receive whose send is missing is Unmatched on the receiver
    let p = edited(0, |ops| {
        ops.remove(3);
    });
    let err = expect_err(&p, 1, 2, "(mb 1, chunk 0)");
    assert!(matches!(err, ScheduleError::Unmatched { .. }), "{err}");
}

#[test]
fn wrong_peer_is_named() {
    let p = from_text("pp=3 vpp=1 microbatches=1\n0: 0F0 0SA0:2\n1: \n2: \n").unwrap();
    let err = expect_err(&p, 0, 1, "peer should be rank 1");
    assert!(matches!(err, ScheduleError::WrongPeer { expected: 1, .. }));
}

#[test]
fn circular_wait_is_a_deadlock() {
    let p =
        from_text("pp=2 vpp=1 microbatches=1\n0: 0F0 0RG0:1 0SA0:1 0B0\n1: 0RA0:0 0F0 0B0 0SG0:0\n").unwrap();
    match validate(&p) {
        Err(ScheduleError::Deadlock { blocked }) => {
            let at: Vec<(usize, usize)> = blocked.iter().map(|b| (b.rank, b.index)).collect();
            assert_eq!(at, [(0, 1), (1, 0)]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn crossed_sends_deadlock_only_under_rendezvous() {
    // rank 0 sends mb 1's activation before receiving mb 0's gradient, while rank 1 sends that
    // gradient before receiving mb 1: fine with mailboxes, a deadlock on rendezvous p2p
    let p = from_text(
        "pp=2 vpp=1 microbatches=2
0: 0F0 0SA0:1 0F1 0SA1:1 0RG0:1 0B0 0RG1:1 0B1
1: 0RA0:0 0F0 0B0 0SG0:0 0RA1:0 0F1 0B1 0SG1:0
",
    )
    .unwrap();
    assert!(dry_run(&p, Semantics::Buffered).is_ok());
    match validate(&p) {
        Err(ScheduleError::Deadlock { blocked }) => {
            let at: Vec<(usize, usize)> = blocked.iter().map(|b| (b.rank, b.index)).collect();
            assert_eq!(at, [(0, 3), (1, 3)]);
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

#[test]
fn interleaved_invalid_group_names_working_values() {
    let spec = ScheduleSpec::new(ScheduleKind::Interleaved, 4, 6);
    let msg = generate(&spec).expect_err("6 mod 4 = 2 < 4").to_string();
    assert!(msg.contains("group sizes that work for 6 microbatches: 6"), "{msg}");
}

#[test]
fn hostile_sizes_and_ranges_are_errors_not_panics() {
    for text in [
        "pp=99999999 vpp=99999999 microbatches=99999999\n0: 0F0\n",
        "pp=0 vpp=1 microbatches=1\n",
        "pp=2 vpp=1 microbatches=1\n0: 0F0\n",
        "pp=1 vpp=1 microbatches=1\n0: 5F0 0F9 0SA0:7\n",
        "pp=2 vpp=3 microbatches=1 placement=v\n0: 2F0\n1:\n",
    ] {
        let p = from_text(text).expect("parses");
        assert!(validate(&p).is_err(), "{text}");
        assert!(simulate(&p, &Costs::default()).is_err(), "{text}");
        assert!(dry_run(&p, Semantics::Rendezvous).is_err(), "{text}");
        assert!(troupe::schedule::lower(&p).is_err(), "{text}");
    }
    let huge = ScheduleSpec::new(ScheduleKind::OneFOneB, usize::MAX, usize::MAX);
    assert!(generate(&huge).is_err());
}
