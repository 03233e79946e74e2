//! Data pipeline: tokenizers, Megatron-compatible `.bin/.idx` datasets (writer and validating
//! mmap reader), the GPT sample construction (document, sample and shuffle indices, splits,
//! blends, cached index arrays), the data-parallel sampler, and the preprocessing pipeline that
//! turns text into an indexed dataset.
//!
//! Entry points for the trainer: [`IndexedDataset::open`], [`GptDataset::build`],
//! [`BlendedDataset::build`], [`DistributedSampler::new`] and [`preprocess_to_cache`].

pub mod blend;
pub mod dtype;
pub mod gpt_dataset;
pub mod gpt_index;
pub mod indexed;
pub mod input;
pub mod npy;
pub mod preprocess;
pub mod rng;
pub mod sampler;
pub mod split;
pub mod tokenizer;
pub mod writer;

pub use blend::{BlendedDataset, SampleSource};
pub use dtype::DType;
pub use gpt_dataset::{
    CacheOutcome, DatasetError, GptDataset, GptDatasetConfig, IndexCache, inputs_labels_mask,
};
pub use indexed::{IndexError, IndexedDataset};
pub use preprocess::{PreprocessOptions, PreprocessReport, preprocess, preprocess_to_cache};
pub use sampler::{BatchLayout, DistributedSampler, SamplerError};
pub use split::{BlendEntry, Split, SplitError, parse_data_path, parse_split};
pub use tokenizer::{TextTokenizer, TokenizerError, TokenizerSpec};
pub use writer::{IndexWriter, WriteError, WriteSummary};
