//! Mixture-of-experts feed-forward blocks with the experts spread over the workers.
//!
//! - [`gate`]: routing (top-1/top-2, capacity, balance and z losses), DeepSpeed's semantics.

pub mod gate;
