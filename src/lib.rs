//! # troupe
//!
//! An actor-based, asynchronous training runtime for transformer language models (GPT and BERT,
//! Megatron-LM style). Every rank runs a small cast of actors that exchange activations and
//! gradients as messages; pipeline schedules are explicit, validated per-rank programs.
//!
//! This file is the table of contents; see ARCHITECTURE.md for the layers.

pub mod actors;
pub mod comm;
pub mod kernels;
pub mod models;
pub mod optim;
