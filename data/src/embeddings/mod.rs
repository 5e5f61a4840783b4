//! Embeddings on storage, in clip-retrieval's layout: `.npy` matrices per part ([`npy`]),
//! a Parquet file of keys, captions and labels beside each ([`metadata`]), and the folder
//! layout that ties them together ([`layout`]). `contrail embed` writes it and
//! `contrail eval` reads it.

pub mod layout;
pub mod metadata;
pub mod npy;

pub use layout::{read, write_part, Embeddings, Part, Tower};
pub use metadata::Record;
pub use npy::Matrix;
