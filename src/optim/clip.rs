//! Global-norm gradient clipping (Megatron / PyTorch semantics): with total L2 norm `n` over all
//! gradients, multiply every gradient by `max_norm / (n + 1e-6)` when that factor is below 1.
//!
//! The norm is formed in a canonical order so that it has the same bits however the model is
//! split: the sum of squares of each parameter tensor (in f64, by [`Backend::sum_squares`]), then
//! those per-tensor sums added in f64 in the full model's tensor order. A pipeline rank computes
//! its tensors' sums, the ranks exchange them, and every rank adds the same list in the same
//! order ([`norm_from_tensor_sums`]).

use crate::kernels::Backend;
use crate::models::params::ParamTable;

/// L2 norm over several gradient arenas, summed in f64 in a fixed order.
pub fn global_grad_norm(be: &dyn Backend, grads: &[&[f32]]) -> f64 {
    grads.iter().map(|g| be.sum_squares(g)).sum::<f64>().sqrt()
}

/// Σ g² of each tensor of `table`, in table order.
pub fn tensor_sum_squares(be: &dyn Backend, table: &ParamTable, grads: &[f32]) -> Vec<f64> {
    table.specs().iter().map(|s| be.sum_squares(&grads[s.span.range()])).collect()
}

/// √(Σ sums) with the sums added left to right in f64.
pub fn norm_from_tensor_sums(sums: &[f64]) -> f64 {
    sums.iter().fold(0.0f64, |acc, &x| acc + x).sqrt()
}

/// The factor to multiply gradients by, or `None` when no clipping applies (`max_norm <= 0`
/// disables clipping).
pub fn clip_coefficient(norm: f64, max_norm: f32) -> Option<f32> {
    if max_norm <= 0.0 {
        return None;
    }
    let coef = f64::from(max_norm) / (norm + 1e-6);
    (coef < 1.0).then_some(coef as f32)
}

/// Clips in place; returns the norm before clipping. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(be: &dyn Backend, grads: &mut [&mut [f32]], max_norm: f32) -> f64 {
    let norm = grads.iter().map(|g| be.sum_squares(g)).sum::<f64>().sqrt();
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        for g in grads.iter_mut() {
            be.scale(g, coef);
        }
    }
    norm
}

/// Clips one model's arena with the canonical per-tensor norm; returns the norm before clipping.
pub fn clip_table_grad_norm(be: &dyn Backend, table: &ParamTable, grads: &mut [f32], max_norm: f32) -> f64 {
    let norm = norm_from_tensor_sums(&tensor_sum_squares(be, table, grads));
    if let Some(coef) = clip_coefficient(norm, max_norm) {
        be.scale(grads, coef);
    }
    norm
}
