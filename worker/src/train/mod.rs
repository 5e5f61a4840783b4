//! Training: one step for any objective ([`step`]), the epoch loop ([`trainer`]), moving
//! experts to a new placement between steps ([`rebalance`]) or onto the survivors of a dead
//! worker ([`restore`]), and checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod rebalance;
pub mod restore;
pub mod step;
pub mod trainer;
