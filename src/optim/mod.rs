//! Optimizers: AdamW over a parameter table, and global-norm gradient clipping.

mod adamw;
mod clip;
mod lr;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{
    clip_coefficient, clip_grad_norm, clip_table_grad_norm, global_grad_norm, norm_from_tensor_sums,
    tensor_sum_squares,
};
pub use lr::LrSchedule;
