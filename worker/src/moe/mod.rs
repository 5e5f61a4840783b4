//! Mixture-of-experts feed-forward blocks with the experts spread over the workers.
//!
//! - [`gate`]: routing (top-1/top-2, capacity, balance and z losses), DeepSpeed's semantics.
//! - [`dispatch`]: which rank each routed token goes to, and the counts that travel first.
//! - [`layer`]: the block itself (gate, local experts, combine).
//! - [`exchange`]: the tokens' trip to the experts' holders and back, forward and backward.
//! - [`checkpoint`]: every expert under its global id in the checkpoint, whatever the placement.
//! - [`runtime`]: what the blocks of a model share: collective, placement, pass mode, the
//!   backward across the exchange cuts, load counts and the replica gradient sync.

pub mod checkpoint;
pub mod dispatch;
pub(crate) mod exchange;
pub mod gate;
pub mod layer;
pub mod runtime;

pub use layer::{ExpertInit, MoeFeedForward};
pub use runtime::{is_expert_param, BlockLoad, MoeRuntime, MoeSettings, Pass};
