//! Training: one step for any objective ([`step`]), the epoch loop ([`trainer`]), moving
//! experts to a new placement between steps ([`rebalance`]) and checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod rebalance;
pub mod step;
pub mod trainer;
