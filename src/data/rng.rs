//! The seeded random number generator behind every data shuffle: NumPy's legacy
//! `numpy.random.RandomState`, bit for bit, so that troupe's document and sample shuffles are
//! Megatron-LM's for the same seed (Megatron shuffles with `RandomState(seed).shuffle`).
//!
//! - The generator is MT19937 (Matsumoto and Nishimura) seeded as `RandomState(seed)` seeds it: a
//!   32-bit seed through the reference `init_genrand`.
//! - `RandomState.shuffle` of a 1-D array swaps element `i` with element `j`, for `i` from the
//!   last index down to 1, where `j` is NumPy's `random_interval(i)`: the smallest all-ones mask
//!   covering `i`, and draws (32-bit while `i` fits in 32 bits, else two draws, high word first)
//!   masked and rejected until one is at most `i`.
//!
//! The name below is part of the index-cache key, so indices built by an earlier generator are
//! never reused. `tests/fixtures/megatron_gpt_indices.json` (from
//! `tools/reference/megatron_gpt_indices.py`) holds NumPy's own permutations to test against.

use thiserror::Error;

/// Name and version of the algorithm, recorded in cache descriptions.
pub const RNG_NAME: &str = "numpy-randomstate-mt19937-shuffle/v1";

const N: usize = 624;
const M: usize = 397;

/// A seed NumPy's `RandomState` does not take.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "seed {seed}: the data shuffles take NumPy's RandomState seeds, 0 to 4294967295 (as Megatron's --seed)"
)]
pub struct SeedError {
    pub seed: u64,
}

/// MT19937 as NumPy's `RandomState` runs it.
#[derive(Clone)]
pub struct Rng {
    state: Box<[u32; N]>,
    pos: usize,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl Rng {
    /// `numpy.random.RandomState(seed)`.
    ///
    /// # Errors
    /// A seed past 32 bits, which NumPy refuses too.
    pub fn new(seed: u64) -> Result<Self, SeedError> {
        let s = u32::try_from(seed).map_err(|_| SeedError { seed })?;
        let mut state = Box::new([0u32; N]);
        state[0] = s;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Ok(Rng { state, pos: N })
    }

    fn twist(&mut self) {
        let mt = &mut self.state;
        for i in 0..N {
            let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            mt[i] = mt[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    /// The next 32 random bits (tempered).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.twist();
        }
        let mut y = self.state[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next 64 random bits: two draws, the first the high word (NumPy's `next_uint64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        (hi << 32) | u64::from(self.next_u32())
    }

    /// A uniform integer in `0..=max` as NumPy's `random_interval(max)` draws it.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u64::from(u32::MAX) {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// Shuffles `items` in place as `RandomState.shuffle` shuffles a 1-D array.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.interval(i as u64) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_mt19937() {
        // The reference implementation's first outputs for init_genrand(5489).
        let mut rng = Rng::new(5489).unwrap();
        let got: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(got, [3_499_211_612, 581_869_302, 3_890_346_734]);
        // The 10000th output of the default seed, the C++ standard's check of std::mt19937.
        let mut rng = Rng::new(5489).unwrap();
        let last = (0..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    /// `tests/fixtures/megatron_gpt_indices.json` (NumPy's permutations and Megatron's indices).
    pub(crate) fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/megatron_gpt_indices.json")).unwrap()
    }

    /// A fixture array as integers.
    pub(crate) fn list(v: &serde_json::Value) -> Vec<u64> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    }

    /// `numpy.random.RandomState(seed).shuffle(numpy.arange(n))`, from NumPy itself.
    #[test]
    fn shuffles_are_numpys() {
        let fixture = fixture();
        for case in fixture["shuffles"].as_array().unwrap() {
            let (seed, n) = (case["seed"].as_u64().unwrap(), case["n"].as_u64().unwrap());
            let mut v: Vec<u64> = (0..n).collect();
            Rng::new(seed).unwrap().shuffle(&mut v);
            assert_eq!(v, list(&case["permutation"]), "seed {seed}, n {n}");
        }
        // Two shuffles from one state continue its stream.
        let one = &fixture["one_state"];
        let mut rng = Rng::new(one["seed"].as_u64().unwrap()).unwrap();
        let (mut a, mut b): (Vec<u64>, Vec<u64>) = ((0..50).collect(), (0..7).collect());
        rng.shuffle(&mut a);
        rng.shuffle(&mut b);
        assert_eq!((a, b), (list(&one["first"]), list(&one["second"])));
    }

    #[test]
    fn seeds_past_32_bits_are_refused_as_numpy_refuses_them() {
        assert!(Rng::new(u64::from(u32::MAX)).is_ok());
        let e = Rng::new(1 << 32).unwrap_err();
        assert!(e.to_string().contains("0 to 4294967295"), "{e}");
    }

    #[test]
    fn intervals_stay_in_range_and_wide_ones_take_two_draws() {
        let mut rng = Rng::new(3).unwrap();
        for max in [1u64, 2, 5, 1000, u64::from(u32::MAX)] {
            assert!((0..200).all(|_| rng.interval(max) <= max));
        }
        // Past 32 bits a draw is two words: the stream moves by two per accepted value at least.
        let (mut a, mut b) = (Rng::new(9).unwrap(), Rng::new(9).unwrap());
        let v = a.interval(1 << 40);
        assert!(v <= 1 << 40);
        let _ = b.next_u64();
        assert!(a.pos >= b.pos);
    }
}
