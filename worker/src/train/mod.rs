//! Training: one step ([`step`]), the epoch loop ([`trainer`]) and checkpoints ([`checkpoint`]).

pub mod accumulate;
pub mod checkpoint;
pub mod step;
pub mod trainer;
