//! Optimizers: AdamW over a parameter table, and global-norm gradient clipping.

mod adamw;
mod clip;
mod lr;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, global_grad_norm};
pub use lr::LrSchedule;
