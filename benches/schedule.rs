//! Schedule pipeline at scale: generation, communication insertion, validation and simulation of
//! interleaved 1F1B with p = 64 ranks, m = 512 microbatches, v = 4 chunks (and each phase alone).

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use troupe::schedule::{Costs, ScheduleKind, ScheduleSpec, generate_compute, lower, simulate, validate};

fn spec() -> ScheduleSpec {
    ScheduleSpec::new(ScheduleKind::Interleaved, 64, 512).with_vpp(4)
}

fn bench(c: &mut Criterion) {
    let costs = Costs::default();
    let mut g = c.benchmark_group("schedule p64 m512 v4");
    g.sample_size(10);
    g.bench_function("all (generate+lower+validate+simulate)", |b| {
        b.iter(|| {
            let compute = generate_compute(&spec()).expect("generate");
            let program = lower(&compute).expect("lower");
            validate(&program).expect("validate");
            black_box(simulate(&program, &costs).expect("simulate").stats.makespan)
        })
    });
    let compute = generate_compute(&spec()).expect("generate");
    let program = lower(&compute).expect("lower");
    g.bench_function("generate", |b| b.iter(|| black_box(generate_compute(&spec()).expect("generate"))));
    g.bench_function("lower", |b| b.iter(|| black_box(lower(&compute).expect("lower"))));
    g.bench_function("validate", |b| b.iter(|| validate(black_box(&program)).expect("validate")));
    g.bench_function("simulate", |b| b.iter(|| black_box(simulate(&program, &costs).expect("simulate"))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
