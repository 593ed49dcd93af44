//! A small seeded random number generator (SplitMix64).
//!
//! kiln promises that `--seed` reproduces a split or a synthetic dataset exactly, across machines and
//! across upgrades of third-party crates, so the generator is our own rather than `rand`'s, whose
//! streams may change between versions.

/// SplitMix64's increment, 2^64 / φ.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijection of `u64` whose outputs for nearby inputs are unrelated.
fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }

    /// A generator for an independent stream, e.g. one per image, so that changing one image's
    /// draws never shifts another's.
    ///
    /// The stream number and the parent's state both go through SplitMix64's finaliser, so that
    /// neighbouring streams start at unrelated points of the sequence. Combined as
    /// `state ^ stream * GOLDEN` (the generator's own step), stream `s + 1` was stream `s` one or
    /// two draws on: the samples of one batch repeated each other's mosaic partners, scales and
    /// flips.
    pub fn fork(&self, stream: u64) -> Self {
        Self { state: finalise(self.state ^ finalise(stream.wrapping_add(GOLDEN))) }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        finalise(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[low, high)`.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    pub fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }

    /// Standard normal draw (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_seed_different_stream() {
        let a: Vec<u64> = (0..8).scan(SeededRng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(SeededRng::new(7), |r, _| Some(r.next_u64())).collect();
        let c: Vec<u64> = (0..8).scan(SeededRng::new(8), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// Forked streams were shifted copies of each other (stream `s + 1` = stream `s` one draw
    /// on), which made neighbouring training samples share their augmentation. No draw of one
    /// stream may appear among another's, for neighbouring streams, epochs and seeds.
    #[test]
    fn forked_streams_share_no_draws() {
        for seed in [0u64, 1, 2, 7, 42] {
            let root = SeededRng::new(seed);
            for high in [0u64, 1 << 32, 2 << 32, (1 << 32) | (1 << 63), (1 << 62)] {
                let mut seen = std::collections::HashMap::new();
                for stream in 0..256u64 {
                    let mut rng = root.fork(high | stream);
                    for _ in 0..32 {
                        if let Some(other) = seen.insert(rng.next_u64(), stream) {
                            assert_eq!(other, stream, "seed {seed}: streams {other} and {stream} share a draw");
                        }
                    }
                }
            }
        }
        // Nested forks too (a per-sample stream forked again per decision).
        let a: Vec<u64> = (0..8).scan(SeededRng::new(3).fork(5).fork(1), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..8).scan(SeededRng::new(3).fork(6).fork(1), |r, _| Some(r.next_u64())).collect();
        assert!(a.iter().all(|x| !b.contains(x)));
    }

    /// The first draws of neighbouring streams are uncorrelated.
    #[test]
    fn neighbouring_streams_are_uncorrelated() {
        let root = SeededRng::new(0);
        let firsts: Vec<f64> = (0..4096u64).map(|s| root.fork(s).unit() - 0.5).collect();
        let seconds: Vec<f64> = (0..4096u64).map(|s| root.fork(s + 1).unit() - 0.5).collect();
        let shifted: Vec<f64> = (0..4096u64)
            .map(|s| {
                let mut r = root.fork(s);
                r.next_u64();
                r.unit() - 0.5
            })
            .collect();
        let corr = |a: &[f64], b: &[f64]| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            dot / (a.iter().map(|x| x * x).sum::<f64>() * b.iter().map(|y| y * y).sum::<f64>()).sqrt()
        };
        // Stream s's second draw against stream s + 1's first: 1.0 before the fix.
        let r = corr(&shifted, &seconds);
        assert!(r.abs() < 0.08, "correlation {r}");
        let r = corr(&firsts, &seconds);
        assert!(r.abs() < 0.08, "correlation {r}");
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SeededRng::new(1);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[rng.below(5)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800 && n < 1200), "{seen:?}");
    }
}
