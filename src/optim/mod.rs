//! Optimizers (being built: issue "GPT on CPU").
