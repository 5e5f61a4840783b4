//! Contrastive objectives. Each computes the loss of this rank's anchors against embeddings
//! gathered from every rank, so the distributed step can backprop into the gathered tensor.

pub mod clip;
pub mod info_nce;
pub mod moco;
pub mod swav;

pub use info_nce::{l2_normalize, nt_xent_anchor_losses, nt_xent_loss, LocalAnchors};
