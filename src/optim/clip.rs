//! Global-norm gradient clipping (Megatron / PyTorch semantics): with total L2 norm `n` over all
//! gradients, multiply every gradient by `max_norm / (n + 1e-6)` when that factor is below 1.

use crate::kernels::Backend;

/// L2 norm over several gradient arenas, summed in f64 in a fixed order.
pub fn global_grad_norm(be: &dyn Backend, grads: &[&[f32]]) -> f64 {
    grads.iter().map(|g| be.sum_squares(g)).sum::<f64>().sqrt()
}

/// Clips in place; returns the norm before clipping. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(be: &dyn Backend, grads: &mut [&mut [f32]], max_norm: f32) -> f64 {
    let norm = grads.iter().map(|g| be.sum_squares(g)).sum::<f64>().sqrt();
    if max_norm > 0.0 {
        let coef = f64::from(max_norm) / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                be.scale(g, coef as f32);
            }
        }
    }
    norm
}
