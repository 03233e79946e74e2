//! # troupe
//!
//! An actor-based, asynchronous training runtime for transformer language models (GPT and BERT,
//! Megatron-LM style). Every rank runs a small cast of actors that exchange activations and
//! gradients as messages; pipeline schedules are explicit, validated per-rank programs.
//!
//! This file is the table of contents; ARCHITECTURE.md describes the layers.
//!
//! ```
//! use troupe::{Backend, CpuBackend, Gpt, GptConfig, StageInput};
//! let cfg = GptConfig::tiny();
//! let be = CpuBackend::new(1);
//! let mut model = Gpt::new(&cfg, 1234).unwrap();
//! let tokens: Vec<u32> = (0..16).map(|t| t % 50).collect();
//! let targets: Vec<u32> = tokens.iter().map(|t| (t + 1) % 50).collect();
//! let loss = model
//!     .forward(&be, 0, 1, 16, StageInput::Tokens(&tokens), Some(&targets), 1.0)
//!     .unwrap()
//!     .unwrap();
//! model.backward(&be, 0, None).unwrap();
//! assert!((loss - (50f32).ln()).abs() < 0.5);
//! ```

pub mod comm;
pub mod data;
pub mod device;
pub mod gpu;
pub mod kernels;
pub mod memory;
pub mod models;
pub mod optim;
pub mod runtime;
pub mod telemetry;
pub mod tensor;
pub mod tensorboard;

pub use kernels::{Backend, CpuBackend};
pub use models::gpt::{Gpt, GptConfig, LayerRange, ModelError, StageInput};
pub mod checkpoint;
pub mod config;
pub mod schedule;
pub mod trace;
pub mod train;
