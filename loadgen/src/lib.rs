//! stockplane's load generator.
//!
//! For now this crate holds one piece of it: [`popularity`], which decides which SKU a
//! simulated shopper asks for, from a seed, so that a run (and a benchmark built on it)
//! can be repeated exactly. The open-model driver, the virtual shoppers, the latency
//! histograms and the reports will grow around it.

pub mod popularity;

pub use popularity::{KeySampler, KeyStream, Popularity, PopularityError};
