//! Kernel interface and backends (being built: issue "GPT on CPU").
