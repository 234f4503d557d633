//! Key popularity: which of `n` keys (SKUs) the next simulated request names.
//!
//! A flash sale is not uniform: a few products take most of the traffic. This module
//! draws key *ranks* in `0..n` (rank 0 is the most popular key) either uniformly or from
//! a Zipf distribution, `P(rank k) ∝ 1 / (k + 1)^s`, with `s = 1.1` by default
//! ([`Popularity::ZIPF_EXPONENT`]). Mapping ranks to real SKU ids (and scattering the
//! hot ones over the catalog) is the caller's business.
//!
//! Guarantees:
//! - **Deterministic**: a [`KeyStream`] is a pure function of its popularity, `n` and a
//!   `u64` seed (ChaCha8 from `rand_chacha`, whose output is stable across platforms and
//!   versions), so a run or a benchmark repeats exactly.
//! - **Cheap**: a sample costs O(1) expected time whatever `n` (up to `u64::MAX`; tested
//!   at 10,000,000), allocates nothing, and the sampler keeps a few words of state, no
//!   table. Uniform draws use `rand`'s `Uniform` (Lemire's multiply-reject); Zipf draws
//!   use `rand_distr::Zipf`, a rejection sampler over the continuous inverse CDF that
//!   accepts in about one or two tries for `s` near 1. A CDF table with a binary search
//!   would be exact too, but costs 80 MB and a cache miss per level at `n` = 10,000,000.
//! - **In range**: `rand_distr::Zipf` can return `n + 1` when floating-point rounding
//!   meets a uniform draw very close to 1 (rand_distr issue #54); ranks are clamped to
//!   `n - 1`, which shifts a probability of order 1e-16 and keeps the contract.
//!
//! This module must not read a clock or an OS-seeded RNG: the seed is the only source of
//! randomness.

use rand::distributions::{Distribution, Uniform};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// The shape of key popularity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Popularity {
    /// Every key equally likely.
    Uniform,
    /// Rank `k` (0-based) drawn with probability proportional to `1 / (k + 1)^exponent`.
    Zipf {
        /// The exponent `s`; 0 is uniform, larger is more skewed. Must be finite and >= 0.
        exponent: f64,
    },
}

impl Popularity {
    /// The Zipf exponent stockplane's scenarios use unless told otherwise: with
    /// 1,000,000 keys the top key takes about 12% of requests, the top 0.1% of keys
    /// about 69% and the top 1% about 82%.
    pub const ZIPF_EXPONENT: f64 = 1.1;

    /// Zipf popularity with [`Popularity::ZIPF_EXPONENT`].
    pub fn zipf() -> Popularity {
        Popularity::Zipf { exponent: Popularity::ZIPF_EXPONENT }
    }
}

/// Why a key sampler cannot be built.
#[derive(Debug, Error, PartialEq)]
pub enum PopularityError {
    /// There must be at least one key to draw.
    #[error("the number of keys must be at least 1")]
    NoKeys,
    /// The Zipf exponent is negative, infinite or NaN.
    #[error("the Zipf exponent must be finite and at least 0, not {0}")]
    BadExponent(f64),
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Uniform(Uniform<u64>),
    Zipf(rand_distr::Zipf<f64>),
}

/// Draws key ranks in `0..keys` with a given popularity, from any RNG the caller owns.
///
/// Implements [`Distribution<u64>`], so one RNG can drive several samplers (a shopper
/// choosing a SKU, then a cart size); [`KeyStream`] bundles it with a seeded RNG.
#[derive(Debug, Clone, Copy)]
pub struct KeySampler {
    keys: u64,
    popularity: Popularity,
    shape: Shape,
}

impl KeySampler {
    /// A sampler over `keys` keys (ranks `0..keys`) with the given popularity.
    pub fn new(popularity: Popularity, keys: u64) -> Result<KeySampler, PopularityError> {
        if keys == 0 {
            return Err(PopularityError::NoKeys);
        }
        let shape = match popularity {
            Popularity::Uniform => Shape::Uniform(Uniform::new(0, keys)),
            Popularity::Zipf { exponent } => {
                if !exponent.is_finite() || exponent < 0.0 {
                    return Err(PopularityError::BadExponent(exponent));
                }
                let zipf = rand_distr::Zipf::new(keys, exponent).map_err(|_| PopularityError::BadExponent(exponent))?;
                Shape::Zipf(zipf)
            }
        };
        Ok(KeySampler { keys, popularity, shape })
    }

    /// The number of keys drawn from.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// The popularity this sampler follows.
    pub fn popularity(&self) -> Popularity {
        self.popularity
    }
}

impl Distribution<u64> for KeySampler {
    /// One rank in `0..keys`; 0 is the most popular key.
    #[inline]
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match &self.shape {
            Shape::Uniform(uniform) => uniform.sample(rng),
            // The float is an integer in 1..=keys, or keys + 1 after a rounding slip.
            Shape::Zipf(zipf) => (zipf.sample(rng) as u64).clamp(1, self.keys) - 1,
        }
    }
}

/// An endless, seeded stream of key ranks: the same seed gives the same ranks.
#[derive(Debug, Clone)]
pub struct KeyStream {
    sampler: KeySampler,
    rng: ChaCha8Rng,
}

impl KeyStream {
    /// A stream over `keys` keys with the given popularity, seeded by `seed`.
    pub fn new(popularity: Popularity, keys: u64, seed: u64) -> Result<KeyStream, PopularityError> {
        Ok(KeyStream { sampler: KeySampler::new(popularity, keys)?, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// The next rank in `0..keys`.
    #[inline]
    pub fn next_rank(&mut self) -> u64 {
        self.sampler.sample(&mut self.rng)
    }

    /// The sampler this stream draws from.
    pub fn sampler(&self) -> &KeySampler {
        &self.sampler
    }
}

impl Iterator for KeyStream {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        Some(self.next_rank())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `P(rank k)` for a Zipf over `keys` keys, summed exactly.
    fn zipf_probabilities(keys: u64, exponent: f64, ranks: usize) -> Vec<f64> {
        let harmonic: f64 = (1..=keys).map(|k| (k as f64).powf(-exponent)).sum();
        (1..=ranks as u64).map(|k| (k as f64).powf(-exponent) / harmonic).collect()
    }

    /// Asserts that an observed frequency is within `sigmas` standard errors of `p`.
    fn assert_frequency(what: &str, count: u64, samples: u64, p: f64, sigmas: f64) {
        let observed = count as f64 / samples as f64;
        let sigma = (p * (1.0 - p) / samples as f64).sqrt();
        assert!(
            (observed - p).abs() <= sigmas * sigma,
            "{what}: observed {observed:.6}, theory {p:.6}, tolerance {:.6}",
            sigmas * sigma
        );
    }

    #[test]
    fn zipf_head_matches_theory() {
        let keys = 1_000_000;
        let samples = 2_000_000u64;
        let mut stream = KeyStream::new(Popularity::zipf(), keys, 7).expect("valid");
        let mut head = [0u64; 100];
        let mut head_total = 0u64;
        for rank in stream.by_ref().take(samples as usize) {
            assert!(rank < keys);
            if let Some(count) = head.get_mut(rank as usize) {
                *count += 1;
                head_total += 1;
            }
        }
        let theory = zipf_probabilities(keys, Popularity::ZIPF_EXPONENT, 100);
        // Rank 1 takes about 12% at this size; 5 standard errors is about ±0.12 points.
        assert!((0.11..0.13).contains(&theory[0]), "theory itself is off: {}", theory[0]);
        for rank in [0, 1, 2, 9, 99] {
            assert_frequency(&format!("rank {rank}"), head[rank], samples, theory[rank], 5.0);
        }
        let head_theory: f64 = theory.iter().sum();
        assert_frequency("top 100 ranks", head_total, samples, head_theory, 5.0);
        assert!(head[0] > head[1] && head[1] > head[9] && head[9] > head[99], "not decreasing: {head:?}");
    }

    #[test]
    fn zipf_tail_is_reached_and_bounded_at_ten_million_keys() {
        let keys = 10_000_000;
        let stream = KeyStream::new(Popularity::zipf(), keys, 11).expect("valid");
        let mut beyond_million = 0;
        let samples = 200_000;
        for rank in stream.take(samples) {
            assert!(rank < keys, "rank {rank} out of range");
            beyond_million += u64::from(rank >= 1_000_000);
        }
        // P(rank >= 1e6) = H(1e6..1e7) / H(1e7), about 0.24 / 10.3 with s = 1.1.
        let harmonic = |from: u64, to: u64| (from..=to).map(|k| (k as f64).powf(-1.1)).sum::<f64>();
        let p = harmonic(1_000_001, keys) / harmonic(1, keys);
        assert_frequency("ranks beyond the first million", beyond_million, samples as u64, p, 5.0);
    }

    #[test]
    fn uniform_covers_every_key_evenly() {
        let keys = 1_000u64;
        let samples = 1_000_000u64;
        let mut counts = vec![0u64; keys as usize];
        for rank in KeyStream::new(Popularity::Uniform, keys, 3).expect("valid").take(samples as usize) {
            counts[rank as usize] += 1;
        }
        let expected = (samples / keys) as f64;
        let chi_square: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
        // 999 degrees of freedom: mean 999, standard deviation about 44.7.
        assert!(chi_square < 999.0 + 6.0 * 44.7, "chi-square {chi_square} too large");
        assert!(chi_square > 999.0 - 6.0 * 44.7, "chi-square {chi_square} suspiciously small");
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(min.is_some_and(|min| min > 800) && max.is_some_and(|max| max < 1_200), "{min:?} {max:?}");
    }

    #[test]
    fn uniform_spans_ten_million_keys() {
        let keys = 10_000_000u64;
        let samples = 400_000u64;
        let (mut sum, mut max) = (0f64, 0u64);
        for rank in KeyStream::new(Popularity::Uniform, keys, 5).expect("valid").take(samples as usize) {
            assert!(rank < keys);
            sum += rank as f64;
            max = max.max(rank);
        }
        let mean = sum / samples as f64;
        // Standard error of the mean: keys / sqrt(12 * samples), about 4,564.
        assert!((mean - keys as f64 / 2.0).abs() < 6.0 * 4_564.0, "mean {mean}");
        assert!(max > keys - keys / 1_000, "max {max}");
    }

    #[test]
    fn the_seed_decides_the_stream() {
        for popularity in [Popularity::Uniform, Popularity::zipf()] {
            let a: Vec<u64> = KeyStream::new(popularity, 1_000_000, 42).expect("valid").take(1_000).collect();
            let b: Vec<u64> = KeyStream::new(popularity, 1_000_000, 42).expect("valid").take(1_000).collect();
            let c: Vec<u64> = KeyStream::new(popularity, 1_000_000, 43).expect("valid").take(1_000).collect();
            assert_eq!(a, b);
            assert_ne!(a, c);
        }
    }

    #[test]
    fn one_key_and_bad_parameters() {
        for popularity in [Popularity::Uniform, Popularity::zipf(), Popularity::Zipf { exponent: 0.0 }] {
            assert!(KeyStream::new(popularity, 1, 1).expect("valid").take(1_000).all(|rank| rank == 0));
            assert_eq!(KeySampler::new(popularity, 0).err(), Some(PopularityError::NoKeys));
        }
        for exponent in [-0.5, f64::INFINITY] {
            assert_eq!(
                KeySampler::new(Popularity::Zipf { exponent }, 10).err(),
                Some(PopularityError::BadExponent(exponent))
            );
        }
        assert!(KeySampler::new(Popularity::Zipf { exponent: f64::NAN }, 10).is_err());
    }
}
