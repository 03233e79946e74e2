//! Deterministic test inputs: the MMIX linear congruential generator (Knuth's constants), one
//! stream per seed. Shared by the GPU kernel tests so each draws its inputs the same way.

#![allow(dead_code)] // each test file uses part of it

/// The generator's state; every draw advances it once.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed)
    }

    /// The next state.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0
    }

    /// In [0, 1): the state's top 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// `n` values uniform in [-scale/2, scale/2).
pub fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut g = Lcg::new(seed);
    (0..n).map(|_| (g.unit() - 0.5) * scale).collect()
}
