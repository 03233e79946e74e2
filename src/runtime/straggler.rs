//! When to warn about a straggler.
//!
//! Every step the ranks share their compute time, and rank 0 names the rank most behind: the one
//! whose time is the largest multiple of the smaller of its data-parallel peers' time that step
//! and its own best step so far (the metric `troupe_straggler_ratio` carries that every step).
//! One slow step is not a straggler: a page fault, another process on the core, or ranks sharing
//! fewer cores than they have threads make single steps slow, and a warning per step buries the
//! log. A warning is due when one rank was behind in at least half the steps of a logging
//! interval, each time by more than [`RATIO`] and by more than [`MIN_EXCESS_S`] seconds, and it
//! is given once for that interval. An interval shorter than [`MIN_STEPS`] steps (`--log-interval
//! 1`) is judged together with the next ones until they reach that many.

/// A step is slow when its compute time is more than this multiple of the baseline.
pub const RATIO: f64 = 1.5;

/// ...and more than this many seconds over it: millisecond steps of small models vary by
/// multiples without anything being wrong.
pub const MIN_EXCESS_S: f64 = 0.05;

/// The fewest steps a judgement covers: at one step per interval a single slow step would warn.
pub const MIN_STEPS: u32 = 4;

/// Counts slow steps per rank over one logging interval.
#[derive(Debug, Clone)]
pub struct StragglerWatch {
    slow: Vec<u32>,
    worst: Vec<f64>,
    steps: u32,
}

impl StragglerWatch {
    /// A watch over `world` ranks.
    pub fn new(world: usize) -> Self {
        Self { slow: vec![0; world], worst: vec![0.0; world], steps: 0 }
    }

    /// Records one step: the rank most behind, its compute time over its baseline, and the
    /// seconds by which it exceeded the baseline.
    pub fn observe(&mut self, rank: usize, ratio: f64, excess_s: f64) {
        self.steps += 1;
        if ratio > RATIO && excess_s > MIN_EXCESS_S && rank < self.slow.len() {
            self.slow[rank] += 1;
            self.worst[rank] = self.worst[rank].max(ratio);
        }
    }

    /// At the end of an interval: the warning due, if any, and a fresh count for the next (an
    /// interval of fewer than [`MIN_STEPS`] steps is carried into the next one instead).
    pub fn report(&mut self) -> Option<String> {
        if self.steps < MIN_STEPS {
            return None;
        }
        let steps = std::mem::take(&mut self.steps);
        let (rank, slow) =
            self.slow.iter().copied().enumerate().max_by_key(|&(r, n)| (n, std::cmp::Reverse(r)))?;
        let worst = self.worst[rank];
        self.slow.iter_mut().for_each(|n| *n = 0);
        self.worst.iter_mut().for_each(|w| *w = 0.0);
        (slow > 0 && 2 * slow >= steps).then(|| {
            format!(
                "straggler: rank {rank} computed more than {RATIO}× its peers' or its own best time in {slow} of the \
                 last {steps} steps (up to {worst:.1}×)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slow_step_is_not_a_straggler() {
        let mut w = StragglerWatch::new(4);
        w.observe(1, 3.0, 0.5);
        for _ in 0..4 {
            w.observe(2, 1.1, 0.01);
        }
        assert_eq!(w.report(), None);
    }

    #[test]
    fn a_rank_slow_in_half_the_interval_is_reported_once() {
        let mut w = StragglerWatch::new(4);
        for (rank, ratio) in [(3, 2.0), (0, 1.2), (3, 4.5), (1, 1.6), (3, 1.8), (2, 1.0)] {
            w.observe(rank, ratio, 0.2);
        }
        let msg = w.report().expect("rank 3 was slow in 3 of 6 steps");
        assert!(
            msg.contains("rank 3") && msg.contains("3 of the last 6 steps") && msg.contains("4.5×"),
            "{msg}"
        );
        // The count starts over: the next interval has nothing to report.
        for _ in 0..MIN_STEPS {
            w.observe(3, 1.0, 0.0);
        }
        assert_eq!(w.report(), None);
    }

    /// At one step per logging interval, steps are judged in windows of `MIN_STEPS`: a single
    /// slow step among them is not a straggler, two are.
    #[test]
    fn short_intervals_are_judged_together() {
        let mut w = StragglerWatch::new(2);
        for ratio in [1.9, 1.0, 1.0, 1.0] {
            w.observe(0, ratio, 0.2);
            assert_eq!(w.report(), None);
        }
        for ratio in [1.9, 1.0, 3.9] {
            w.observe(0, ratio, 0.2);
            assert_eq!(w.report(), None);
        }
        w.observe(0, 1.0, 0.2);
        let msg = w.report().expect("two slow steps of four");
        assert!(msg.contains("2 of the last 4 steps") && msg.contains("3.9×"), "{msg}");
    }

    #[test]
    fn small_excesses_do_not_count() {
        let mut w = StragglerWatch::new(2);
        for _ in 0..5 {
            w.observe(1, 3.3, 0.03);
        }
        assert_eq!(w.report(), None);
        for _ in 0..MIN_STEPS {
            w.observe(1, 3.3, 0.06);
        }
        assert!(w.report().is_some());
    }
}
