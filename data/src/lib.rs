//! contrail-data: WebDataset shards from object storage to ready batches, and embeddings on
//! storage; no libtorch.

pub mod sample;
pub use sample::{BadSampleCounts, BadSampleReason, Sample};
pub mod augment;
pub mod decode;
pub mod embeddings;
pub mod import;
pub mod index;
pub mod pipeline;
pub mod shard_reader;
pub mod shuffle;
pub mod synth;
pub mod tar_stream;
