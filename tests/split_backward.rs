//! Split backward (zero-bubble I = `backward_input`, W = `backward_weight`) against the fused
//! `backward`, bit for bit: every parameter gradient (before and after folding the tied `wte`
//! part), every input gradient a stage sends back, and every `ready` report, for the full model
//! and for pipeline cuts with an embedding-only, a middle, an empty and a head-only range. With
//! several microbatches whose I's and W's interleave, the reference is the fused backward run in
//! the order of the W's (gradients accumulate in W order). Plus the error cases.
//!
//! Everything is compared against the fused path computed in the same process, never against
//! stored numbers, and one check confirms the comparison is sharp enough to see a change of
//! accumulation order.

use anyhow::{Context, Result, ensure};
use troupe::kernels::Profiled;
use troupe::models::Rng;
use troupe::{Backend, CpuBackend, Gpt, GptConfig, LayerRange, ModelError, StageInput};

fn cfg() -> GptConfig {
    GptConfig {
        vocab_size: 61,
        make_vocab_size_divisible_by: 16,
        seq_length: 12,
        num_layers: 3,
        hidden_size: 24,
        num_attention_heads: 3,
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One microbatch: id, shape, tokens and targets.
struct Mb {
    id: u64,
    batch: usize,
    seq: usize,
    tokens: Vec<u32>,
    targets: Vec<u32>,
}

/// `count` microbatches of varying shapes (so buffers of several sizes are pooled), random ids.
fn microbatches(cfg: &GptConfig, count: usize, seed: u64) -> Vec<Mb> {
    let shapes = [(2, 12), (1, 7), (3, 5), (2, 12), (1, 12)];
    let mut rng = Rng::new(seed);
    let mut tok =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect() };
    (0..count)
        .map(|i| {
            let (batch, seq) = shapes[i % shapes.len()];
            Mb { id: 10 + 7 * i as u64, batch, seq, tokens: tok(batch * seq), targets: tok(batch * seq) }
        })
        .collect()
}

/// The model cut at `cuts`, every parameter perturbed so LayerNorms are not trivially 1/0.
/// Deterministic: two calls give identical stages.
fn stages(cfg: &GptConfig, cuts: &[usize]) -> Result<Vec<Gpt>> {
    LayerRange::partition(cfg, cuts)?
        .into_iter()
        .map(|range| {
            let mut m = Gpt::new_range(cfg, range, 5)?;
            let mut rng = Rng::new(100 + range.first as u64);
            m.params_mut().iter_mut().for_each(|p| *p += (rng.normal() * 0.05) as f32);
            Ok(m)
        })
        .collect()
}

/// Forward of every microbatch through every stage (all end up in flight).
fn forward_all(be: &dyn Backend, stages: &mut [Gpt], mbs: &[Mb]) -> Result<()> {
    let last = stages.len() - 1;
    for mb in mbs {
        let mut hidden = Vec::new();
        for (i, st) in stages.iter_mut().enumerate() {
            let input = if i == 0 { StageInput::Tokens(&mb.tokens) } else { StageInput::Hidden(&hidden) };
            let targets = (i == last).then_some(&mb.targets[..]);
            st.forward(be, mb.id, mb.batch, mb.seq, input, targets, 1.0 / mbs.len() as f32)?;
            if i < last {
                hidden = st.output(mb.id).context("output")?.to_vec();
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Op {
    I(u64),
    W(u64),
}

/// Everything observable after a backward pass, per stage.
#[derive(Debug, PartialEq)]
struct Observed {
    /// Input gradient bits each non-embedding stage produced, per microbatch, in the order the
    /// stage computed them.
    input_grads: Vec<Vec<(u64, Vec<u32>)>>,
    /// `ready` reports: (stage, range, gradient bits at report time).
    reports: Vec<(usize, std::ops::Range<usize>, Vec<u32>)>,
    /// Gradient arenas before folding the tied `wte` part.
    grads_unfolded: Vec<Vec<u32>>,
    /// Gradient arenas after folding.
    grads: Vec<Vec<u32>>,
}

fn observe_grads(be: &dyn Backend, stages: &mut [Gpt], obs: &mut Observed) {
    for st in stages.iter_mut() {
        obs.grads_unfolded.push(bits(st.grads()));
        st.fold_tied_grad(be);
        obs.grads.push(bits(st.grads()));
    }
}

fn sorted(mut v: Vec<(u64, Vec<u32>)>) -> Vec<(u64, Vec<u32>)> {
    v.sort_by_key(|e| e.0);
    v
}

/// Runs `ops` on every stage, last stage first; each I takes the next stage's input gradient of
/// the same microbatch as its `dout`.
fn run_split(be: &dyn Backend, stages: &mut [Gpt], ops: &[Op]) -> Result<Observed> {
    let mut obs = Observed {
        input_grads: vec![Vec::new(); stages.len()],
        reports: Vec::new(),
        grads_unfolded: Vec::new(),
        grads: Vec::new(),
    };
    let mut douts: Vec<(u64, Vec<f32>)> = Vec::new();
    for s in (0..stages.len()).rev() {
        let st = &mut stages[s];
        let mut sent = Vec::new();
        for &op in ops {
            match op {
                Op::I(mb) => {
                    let dout = douts.iter().find(|d| d.0 == mb).map(|d| &d.1[..]);
                    let before = st.in_flight();
                    st.backward_input(be, mb, dout)?;
                    ensure!(st.in_flight() == before, "stage {s}: I of {mb} freed its activations");
                    if !st.range().embedding {
                        sent.push((mb, st.input_grad().to_vec()));
                    }
                }
                Op::W(mb) => {
                    st.backward_weight_with(be, mb, &mut |r, g| obs.reports.push((s, r, bits(g))))?;
                }
            }
        }
        ensure!(st.in_flight() == 0, "stage {s}: {} microbatches left in flight", st.in_flight());
        obs.input_grads[s] = sorted(sent.iter().map(|(mb, g)| (*mb, bits(g))).collect());
        douts = sent;
    }
    observe_grads(be, stages, &mut obs);
    Ok(obs)
}

/// The reference: fused backwards in `order` on every stage, last stage first.
fn run_fused(be: &dyn Backend, stages: &mut [Gpt], order: &[u64]) -> Result<Observed> {
    let mut obs = Observed {
        input_grads: vec![Vec::new(); stages.len()],
        reports: Vec::new(),
        grads_unfolded: Vec::new(),
        grads: Vec::new(),
    };
    let mut douts: Vec<(u64, Vec<f32>)> = Vec::new();
    for s in (0..stages.len()).rev() {
        let st = &mut stages[s];
        let mut sent = Vec::new();
        for &mb in order {
            let dout = douts.iter().find(|d| d.0 == mb).map(|d| &d.1[..]);
            st.backward_with(be, mb, dout, &mut |r, g| obs.reports.push((s, r, bits(g))))?;
            if !st.range().embedding {
                sent.push((mb, st.input_grad().to_vec()));
            }
        }
        obs.input_grads[s] = sorted(sent.iter().map(|(mb, g)| (*mb, bits(g))).collect());
        douts = sent;
    }
    observe_grads(be, stages, &mut obs);
    Ok(obs)
}

/// The microbatch ids in the order of the W's.
fn w_order(ops: &[Op]) -> Vec<u64> {
    ops.iter().filter_map(|op| if let Op::W(mb) = op { Some(*mb) } else { None }).collect()
}

/// Schedules over microbatch indices: (I or W, index).
const SCHEDULES: &[&[(char, usize)]] = &[
    &[('I', 0), ('W', 0)],
    &[('I', 0), ('I', 1), ('W', 0), ('I', 2), ('W', 1), ('W', 2)],
    &[('I', 0), ('I', 1), ('I', 2), ('I', 3), ('W', 3), ('W', 1), ('W', 0), ('W', 2)],
    &[('I', 0), ('W', 0), ('I', 1), ('I', 2), ('W', 2), ('I', 3), ('I', 4), ('W', 4), ('W', 1), ('W', 3)],
];

const CUTS: &[&[usize]] = &[&[], &[0, 3], &[1, 2], &[1, 1], &[3]];

fn ops_for(schedule: &[(char, usize)], mbs: &[Mb]) -> Vec<Op> {
    schedule.iter().map(|&(k, i)| if k == 'I' { Op::I(mbs[i].id) } else { Op::W(mbs[i].id) }).collect()
}

fn check(be: &dyn Backend, cuts: &[usize], schedule: &[(char, usize)]) -> Result<()> {
    let cfg = cfg();
    let count = schedule.iter().map(|e| e.1 + 1).max().context("empty schedule")?;
    let mbs = microbatches(&cfg, count, 7 + count as u64);
    let ops = ops_for(schedule, &mbs);

    let mut fused = stages(&cfg, cuts)?;
    forward_all(be, &mut fused, &mbs)?;
    let want = run_fused(be, &mut fused, &w_order(&ops))?;

    let mut split = stages(&cfg, cuts)?;
    forward_all(be, &mut split, &mbs)?;
    let got = run_split(be, &mut split, &ops)?;

    let what = format!("cuts {cuts:?}, schedule {ops:?}");
    for s in 0..fused.len() {
        ensure!(got.input_grads[s] == want.input_grads[s], "{what}: stage {s} input gradients differ");
        ensure!(got.grads_unfolded[s] == want.grads_unfolded[s], "{what}: stage {s} unfolded grads differ");
        ensure!(got.grads[s] == want.grads[s], "{what}: stage {s} gradients differ");
    }
    ensure!(got.reports == want.reports, "{what}: ready reports differ");
    ensure!(!want.reports.is_empty(), "{what}: no ready reports at all");
    Ok(())
}

#[test]
fn split_equals_fused_for_every_cut_and_schedule() -> Result<()> {
    let be = CpuBackend::new(2);
    for cuts in CUTS {
        for schedule in SCHEDULES {
            check(&be, cuts, schedule)?;
        }
    }
    Ok(())
}

/// The profiling wrapper forwards the split kernels (and the model uses them).
#[test]
fn split_through_profiled_backend() -> Result<()> {
    let be = Profiled::new(CpuBackend::new(2));
    check(&be, &[1, 2], SCHEDULES[1])?;
    let names: Vec<&str> = be.report().iter().map(|e| e.0).collect();
    for k in ["matmul_backward_input", "matmul_backward_weight", "matmul_backward"] {
        ensure!(names.contains(&k), "profile lacks {k}: {names:?}");
    }
    Ok(())
}

/// The comparisons above can fail: the same split run compared with fused backwards in the
/// I order (not the W order) differs, because float accumulation order matters.
#[test]
fn comparison_sees_accumulation_order() -> Result<()> {
    let be = CpuBackend::new(2);
    let cfg = cfg();
    let schedule = SCHEDULES[2];
    let mbs = microbatches(&cfg, 4, 11);
    let ops = ops_for(schedule, &mbs);
    let i_order: Vec<u64> = mbs.iter().map(|m| m.id).collect();
    ensure!(i_order != w_order(&ops), "the schedule must reorder the W's");
    let mut fused = stages(&cfg, &[])?;
    forward_all(&be, &mut fused, &mbs)?;
    let wrong = run_fused(&be, &mut fused, &i_order)?;
    let mut split = stages(&cfg, &[])?;
    forward_all(&be, &mut split, &mbs)?;
    let got = run_split(&be, &mut split, &ops)?;
    ensure!(got.grads != wrong.grads, "W order and I order gave the same bits: the test would be blind");
    Ok(())
}

#[test]
fn split_errors_name_the_microbatch_and_change_nothing() -> Result<()> {
    let be = CpuBackend::new(2);
    let cfg = cfg();
    let mbs = microbatches(&cfg, 2, 3);
    let (a, b) = (&mbs[0], &mbs[1]);
    let mut model = stages(&cfg, &[])?.remove(0);
    let mut reference = stages(&cfg, &[])?.remove(0);
    forward_all(&be, std::slice::from_mut(&mut reference), std::slice::from_ref(a))?;
    reference.backward(&be, a.id, None)?;
    reference.fold_tied_grad(&be);

    forward_all(&be, std::slice::from_mut(&mut model), std::slice::from_ref(a))?;
    let acts_only = model.activation_bytes();
    let id = a.id;
    let err = model.backward_weight(&be, id).expect_err("W before I");
    ensure!(err == ModelError::BackwardInputMissing { mb: id }, "{err:?}");
    ensure!(err.to_string().contains(&format!("microbatch {id}")), "message: {err}");
    let dummy = vec![0.0; a.batch * a.seq * cfg.hidden_size];
    let err = model.backward_input(&be, id, Some(&dummy)).expect_err("dout to the head");
    ensure!(matches!(err, ModelError::WrongStage(_)), "{err:?}");
    ensure!(model.in_flight() == 1 && model.activation_bytes() == acts_only, "a failed I changed state");

    model.backward_input(&be, id, None)?;
    ensure!(model.in_flight() == 1, "I must keep the activations in flight");
    let (n, c, l) = (a.batch * a.seq, cfg.hidden_size, cfg.num_layers);
    let kept = model.activation_bytes() - acts_only;
    ensure!(kept == 4 * n * c * (11 * l + 2), "I keeps {kept} bytes of output gradients");
    ensure!(model.grads().iter().all(|&g| g == 0.0), "I touched parameter gradients");

    let err = model.backward_input(&be, id, None).expect_err("I twice");
    ensure!(err == ModelError::BackwardInputDone { mb: id }, "{err:?}");
    ensure!(err.to_string().contains(&format!("microbatch {id}")), "message: {err}");
    let err = model.backward(&be, id, None).expect_err("fused backward after I");
    ensure!(err == ModelError::BackwardInputDone { mb: id }, "{err:?}");
    let err = model
        .forward(&be, id, a.batch, a.seq, StageInput::Tokens(&a.tokens), Some(&a.targets), 1.0)
        .expect_err("forward of a microbatch whose W is pending");
    ensure!(err == ModelError::MicrobatchInFlight { mb: id }, "{err:?}");
    let err = model.backward_input(&be, 999, None).expect_err("unknown I");
    ensure!(err == ModelError::UnknownMicrobatch { mb: 999 }, "{err:?}");
    let err = model.backward_weight(&be, 999).expect_err("unknown W");
    ensure!(err == ModelError::UnknownMicrobatch { mb: 999 }, "{err:?}");

    model.backward_weight(&be, id)?;
    ensure!(model.in_flight() == 0 && model.activation_bytes() == 0, "W must free the microbatch");
    let err = model.backward_weight(&be, id).expect_err("W twice");
    ensure!(err == ModelError::UnknownMicrobatch { mb: id }, "{err:?}");
    model.fold_tied_grad(&be);
    ensure!(bits(model.grads()) == bits(reference.grads()), "the failed calls changed the result");

    // Releasing a split microbatch drops both halves' state.
    forward_all(&be, std::slice::from_mut(&mut model), std::slice::from_ref(b))?;
    model.backward_input(&be, b.id, None)?;
    model.release(b.id);
    ensure!(model.in_flight() == 0 && model.activation_bytes() == 0, "release left state behind");
    let err = model.backward_weight(&be, b.id).expect_err("W after release");
    ensure!(err == ModelError::UnknownMicrobatch { mb: b.id }, "{err:?}");

    // A range without the head checks its output gradient before touching anything.
    let mut mid = stages(&cfg, &[1, 2])?.remove(1);
    let h = vec![0.5; a.batch * a.seq * cfg.hidden_size];
    mid.forward(&be, 1, a.batch, a.seq, StageInput::Hidden(&h), None, 1.0)?;
    let err = mid.backward_input(&be, 1, Some(&h[1..])).expect_err("short dout");
    ensure!(matches!(err, ModelError::BadLength { .. }), "{err:?}");
    let err = mid.backward_input(&be, 1, None).expect_err("missing dout");
    ensure!(matches!(err, ModelError::WrongStage(_)), "{err:?}");
    mid.backward_input(&be, 1, Some(&h))?;
    mid.backward_weight(&be, 1)?;
    Ok(())
}
