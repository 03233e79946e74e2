//! Learning-rate schedule with Megatron's semantics (`OptimizerParamScheduler`): linear warm-up
//! from 0 to `max_lr` over `warmup` steps, then constant, linear or cosine decay to `min_lr` at
//! `decay` steps, then `min_lr`; or inverse-square-root decay, `max_lr · √(warmup / step)` floored
//! at `min_lr`. `step` counts completed optimizer steps, so the first update uses
//! `lr(0)` (0 during warm-up, as in Megatron).

use crate::config::{LrDecayStyle, WsdDecayStyle};

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub max_lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub decay: u64,
    pub style: LrDecayStyle,
    /// `WSD`: steps of the final decay, and its shape.
    pub wsd_decay: u64,
    pub wsd_style: WsdDecayStyle,
}

impl LrSchedule {
    /// The schedule a training config asks for (decay over `train_iters` unless
    /// `lr_decay_iters` says otherwise).
    pub fn from_train(t: &crate::config::TrainConfig) -> Self {
        LrSchedule {
            max_lr: t.lr,
            min_lr: t.min_lr,
            warmup: t.lr_warmup_iters,
            decay: t.lr_decay_iters.unwrap_or(t.train_iters),
            style: t.lr_decay_style,
            wsd_decay: t.lr_wsd_decay_iters,
            wsd_style: t.lr_wsd_decay_style,
        }
    }

    /// The rate for the update that follows `step` completed steps.
    pub fn lr(&self, step: u64) -> f32 {
        let (max, min) = (f64::from(self.max_lr), f64::from(self.min_lr));
        if self.warmup > 0 && step <= self.warmup {
            return (max * step as f64 / self.warmup as f64) as f32;
        }
        if self.style == LrDecayStyle::Constant {
            return self.max_lr;
        }
        if step > self.decay {
            return self.min_lr;
        }
        if self.style == LrDecayStyle::InverseSquareRoot {
            let (warmup, step) = (self.warmup.max(1) as f64, step.max(1) as f64);
            return (max * (warmup / step).sqrt()).max(min) as f32;
        }
        let span = (self.decay - self.warmup).max(1) as f64;
        let ratio = (step - self.warmup) as f64 / span;
        let coeff = match self.style {
            LrDecayStyle::Linear => 1.0 - ratio,
            LrDecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * ratio).cos() + 1.0),
            LrDecayStyle::Wsd => {
                let start = self.decay.saturating_sub(self.wsd_decay);
                if step <= start {
                    1.0
                } else {
                    let r = (step - start) as f64 / self.wsd_decay.max(1) as f64;
                    match self.wsd_style {
                        WsdDecayStyle::Exponential => 2.0 * 0.5f64.powf(r) - 1.0,
                        WsdDecayStyle::Linear => 1.0 - r,
                        WsdDecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * r).cos() + 1.0),
                        WsdDecayStyle::MinusSqrt => 1.0 - r.sqrt(),
                    }
                }
            }
            LrDecayStyle::Constant | LrDecayStyle::InverseSquareRoot => 1.0,
        };
        (min + coeff * (max - min)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(style: LrDecayStyle) -> LrSchedule {
        LrSchedule {
            max_lr: 1.0,
            min_lr: 0.1,
            warmup: 10,
            decay: 110,
            style,
            wsd_decay: 20,
            wsd_style: WsdDecayStyle::Exponential,
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = sched(LrDecayStyle::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-7);
        assert!((s.lr(10) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn decay_shapes_hit_their_midpoints_and_floor() {
        let cos = sched(LrDecayStyle::Cosine);
        assert!((cos.lr(60) - 0.55).abs() < 1e-6, "cosine midpoint is halfway");
        assert!((cos.lr(110) - 0.1).abs() < 1e-6);
        assert_eq!(cos.lr(1000), 0.1);
        let lin = sched(LrDecayStyle::Linear);
        assert!((lin.lr(35) - (0.1 + 0.75 * 0.9)).abs() < 1e-6);
        let c = sched(LrDecayStyle::Constant);
        assert_eq!(c.lr(500), 1.0);
        // Monotone non-increasing after warm-up.
        assert!((11..200).all(|s| cos.lr(s) <= cos.lr(s - 1) + 1e-7));
        // Inverse square root: the peak at the end of warm-up, half of it at four times the
        // warm-up, the floor once that is lower, the floor past the decay steps.
        let isr = sched(LrDecayStyle::InverseSquareRoot);
        assert_eq!((isr.lr(10), isr.lr(40)), (1.0, 0.5));
        assert!((isr.lr(90) - (1.0f64 / 3.0) as f32).abs() < 1e-7);
        let floor = LrSchedule { decay: 100_000, ..isr };
        assert_eq!((floor.lr(10_000), floor.lr(1000)), (0.1, (10.0f64 / 1000.0).sqrt() as f32));
        assert_eq!(isr.lr(111), 0.1);
        // WSD: stable at the peak until 20 steps before the decay ends, then down to the floor
        // in each shape (halfway: exponential 2·0.5^½ − 1, linear ½, cosine ½, minus-sqrt 1 − √½).
        let wsd = sched(LrDecayStyle::Wsd);
        assert_eq!((wsd.lr(11), wsd.lr(90)), (1.0, 1.0));
        for (style, half) in [
            (WsdDecayStyle::Exponential, 2.0 * 0.5f64.sqrt() - 1.0),
            (WsdDecayStyle::Linear, 0.5),
            (WsdDecayStyle::Cosine, 0.5),
            (WsdDecayStyle::MinusSqrt, 1.0 - 0.5f64.sqrt()),
        ] {
            let s = LrSchedule { wsd_style: style, ..wsd };
            assert!((f64::from(s.lr(100)) - (0.1 + 0.9 * half)).abs() < 1e-6, "{style:?}: {}", s.lr(100));
            assert!((s.lr(110) - 0.1).abs() < 1e-6, "{style:?}");
            assert!((91..=110).all(|i| s.lr(i) <= s.lr(i - 1)), "{style:?} decays");
        }
    }
}
