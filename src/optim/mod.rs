//! Optimizers: AdamW over a parameter table, and global-norm gradient clipping.

mod adamw;
mod clip;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, global_grad_norm};
