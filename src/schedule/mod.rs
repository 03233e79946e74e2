//! Pipeline schedules as programs: the per-rank instruction IR, its text and JSON forms, the
//! generators (GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-H2, ZB-V), the pass that inserts communication,
//! the validator (with a deadlock dry run) and the cost simulator. Pure logic, no I/O.
//!
//! ```
//! use troupe::schedule::{generate, simulate, validate, Costs, ScheduleKind, ScheduleSpec};
//! let program = generate(&ScheduleSpec::new(ScheduleKind::OneFOneB, 4, 8)).unwrap();
//! validate(&program).unwrap();
//! let sim = simulate(&program, &Costs::default()).unwrap();
//! assert!((sim.stats.bubble - 3.0 / 8.0).abs() < 1e-9); // (p-1)/m
//! ```

mod error;
mod generate;
mod greedy;
mod ir;
mod lower;
mod simulate;
mod text;
mod validate;

pub use error::{Blocked, Result, ScheduleError};
pub use generate::{ScheduleKind, ScheduleSpec, generate, generate_compute};
pub use ir::{Op, OpKind, Placement, Program};
pub use lower::lower;
pub use simulate::{
    Costs, RankStats, Simulation, Stats, TimedOp, chunk_peaks, peak_in_flight, simulate, simulate_with,
};
pub use text::{from_text, parse_op, parse_program, to_text};
pub use validate::{Semantics, dims_ok, dry_run, validate};
