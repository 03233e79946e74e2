//! Data pipeline: tokenizers, Megatron-compatible `.bin/.idx` datasets (writer and validating
//! mmap reader), the GPT sample construction (document, sample and shuffle indices, splits,
//! blends, cached index arrays), the data-parallel sampler, and the preprocessing pipeline that
//! turns text into an indexed dataset.
//!
//! Entry points for the trainer: [`IndexedDataset::open`], [`GptDataset::build`],
//! [`BlendedDataset::build`], [`DistributedSampler::new`] and [`preprocess_to_cache`].

pub mod dtype;
pub mod indexed;
pub mod writer;

pub use dtype::DType;
pub use indexed::{IndexError, IndexedDataset};
pub use writer::{IndexWriter, WriteError, WriteSummary};
