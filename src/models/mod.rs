//! Models (being built: issue "GPT on CPU").
