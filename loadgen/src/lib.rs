//! stockplane's load generator.
//!
//! For now this crate holds [`popularity`], which decides which SKU a simulated shopper
//! asks for, from a seed, so that a run (and a benchmark built on it) can be repeated
//! exactly; [`machine`], the header every benchmark report starts with; and the
//! end-to-end benchmark driver, the `stockplane-e2e` binary (`src/bin/e2e.rs`). The
//! open-model shopper driver and the rendered reports will grow around them.

pub mod machine;
pub mod popularity;

pub use popularity::{KeySampler, KeyStream, Popularity, PopularityError};
