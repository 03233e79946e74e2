//! The actor runtime (rank supervisor, stage actors, gradient reducer, optimizer shard, data
//! feeder). Not built yet: see the "actor runtime" issue. The folder exists so the layout in
//! ARCHITECTURE.md is the layout on disk.
