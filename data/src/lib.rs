//! contrail-data: WebDataset shards from object storage to ready batches, with no libtorch.

pub mod sample;
pub use sample::{BadSampleCounts, BadSampleReason, Sample};
pub mod tar_stream;
pub mod shard_reader;
pub mod synth;
pub mod decode;
pub mod augment;
pub mod pipeline;
