//! Models with explicit forward and backward per layer (no autograd tape).

pub mod gpt;
pub mod params;
mod rng;

pub use rng::Rng;
