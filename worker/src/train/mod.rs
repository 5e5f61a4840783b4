//! Training: one step for any objective ([`step`], [`objectives`]), the epoch loop
//! ([`trainer`]) and checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod objectives;
pub mod step;
pub mod trainer;
