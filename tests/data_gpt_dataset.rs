//! GPT dataset: samples equal windows of the shuffled document stream, splits partition the
//! sequences, index arrays are cached and rebuilt when parameters change or files rot, and blends
//! follow their weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use troupe::data::gpt_index::build_gpt_indices;
use troupe::data::{
    BlendEntry, BlendedDataset, CacheOutcome, DType, GptDataset, GptDatasetConfig, IndexCache, IndexWriter,
    IndexedDataset, SampleSource, Split,
};

/// Writes documents of the given lengths whose tokens are `base + running token number`, so every
/// token is unique and its origin is visible.
fn write_dataset(dir: &Path, name: &str, lengths: &[usize], base: u32) -> PathBuf {
    let prefix = dir.join(name);
    let mut w = IndexWriter::create(&prefix, DType::I32).unwrap();
    let mut next = base;
    for &len in lengths {
        let doc: Vec<u32> = (next..next + len as u32).collect();
        next += len as u32;
        w.add_document(&doc).unwrap();
    }
    w.finish().unwrap();
    prefix
}

fn config(seq_length: usize, seed: u64, split: &str, cache: IndexCache) -> GptDatasetConfig {
    GptDatasetConfig { seq_length, seed, split: split.to_owned(), add_extra_token: true, cache }
}

/// The token stream the document index describes.
fn stream(ds: &GptDataset) -> Vec<u32> {
    let ix = &ds.indices().document_index;
    let mut out = Vec::new();
    for p in 0..ix.len() {
        out.extend(ds.data().sequence(ix.get(p) as usize).unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn samples_are_windows_of_the_document_stream(
        lengths in prop::collection::vec(0usize..40, 1..30),
        seq_length in 1usize..16,
        extra_samples in 0u64..40,
        seed in 0..=u64::from(u32::MAX), // NumPy's RandomState seeds
    ) {
        let total: usize = lengths.iter().sum();
        prop_assume!(total > seq_length);
        let dir = tempfile::tempdir().unwrap();
        let prefix = write_dataset(dir.path(), "d", &lengths, 0);
        let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
        let per_epoch = ((total - 1) / seq_length) as u64;
        let cfg = config(seq_length, seed, "1", IndexCache::Off);
        let ds = GptDataset::build(data, Split::Train, Some(per_epoch + extra_samples), &cfg).unwrap();
        prop_assert!(ds.len() as u64 >= per_epoch + extra_samples);
        let stream = stream(&ds);
        let mut seen = vec![false; ds.len()];
        for i in 0..ds.len() {
            let j = ds.indices().shuffle_index.get(i) as usize;
            prop_assert!(!seen[j], "shuffle index repeats {}", j);
            seen[j] = true;
            let want = &stream[j * seq_length..j * seq_length + seq_length + 1];
            prop_assert_eq!(ds.sample(i).unwrap(), want.to_vec());
        }
        // Every document appears once per epoch.
        let ix = &ds.indices().document_index;
        prop_assert_eq!(ix.len() % lengths.len(), 0);
        let epochs = ix.len() / lengths.len();
        let mut counts = vec![0usize; lengths.len()];
        for p in 0..ix.len() {
            counts[ix.get(p) as usize] += 1;
        }
        prop_assert!(counts.iter().all(|&c| c == epochs));
    }
}

#[test]
fn splits_partition_the_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let lengths = vec![20usize; 1000];
    let prefix = write_dataset(dir.path(), "d", &lengths, 0);
    let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
    let cfg = config(16, 1, "949,50,1", IndexCache::Off);
    let ranges: Vec<_> = Split::ALL
        .iter()
        .map(|&s| {
            let ds = GptDataset::build(data.clone(), s, None, &cfg).unwrap();
            let ix = &ds.indices().document_index;
            assert!((0..ix.len()).all(|p| ds.sequence_range().contains(&(ix.get(p) as usize))));
            ds.sequence_range()
        })
        .collect();
    assert_eq!(ranges, vec![0..949, 949..999, 999..1000]);
    let empty = GptDataset::build(data, Split::Test, None, &config(16, 1, "98,2", IndexCache::Off));
    assert!(empty.is_err(), "an empty split cannot make samples");
}

#[test]
fn index_cache_is_reused_and_rebuilt_when_parameters_change_or_files_rot() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_dataset(dir.path(), "d", &[7, 30, 12, 50, 3, 19], 0);
    let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
    let cfg = config(8, 1234, "1", IndexCache::BesideData);
    let first = GptDataset::build(data.clone(), Split::Train, Some(40), &cfg).unwrap();
    let CacheOutcome::Built(desc) = first.cache_outcome().clone() else {
        panic!("expected a fresh build, got {:?}", first.cache_outcome());
    };
    assert!(desc.starts_with(dir.path().join("cache/GPTDataset_indices")));
    assert!(desc.to_string_lossy().ends_with("-GPTDataset-train-description.txt"));

    let second = GptDataset::build(data.clone(), Split::Train, Some(40), &cfg).unwrap();
    assert_eq!(second.cache_outcome(), &CacheOutcome::Loaded(desc.clone()));
    assert_eq!(second.indices(), first.indices());

    let reseeded = config(8, 99, "1", IndexCache::BesideData);
    let third = GptDataset::build(data.clone(), Split::Train, Some(40), &reseeded).unwrap();
    assert!(matches!(third.cache_outcome(), CacheOutcome::Built(p) if *p != desc));
    assert_ne!(third.indices().shuffle_index, first.indices().shuffle_index);

    // Truncate one cached array: the entry is rebuilt, identically.
    let npy = desc.to_string_lossy().replace("description.txt", "sample_index.npy");
    let bytes = std::fs::read(&npy).unwrap();
    std::fs::write(&npy, &bytes[..bytes.len() - 4]).unwrap();
    let fourth = GptDataset::build(data, Split::Train, Some(40), &cfg).unwrap();
    assert_eq!(fourth.cache_outcome(), &CacheOutcome::Built(desc));
    assert_eq!(fourth.indices(), first.indices());
}

#[test]
fn explicit_cache_dir_and_unwritable_cache_fall_back_to_memory() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_dataset(dir.path(), "d", &[40, 40], 0);
    let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
    let cache_dir = dir.path().join("elsewhere");
    let cfg = config(8, 1, "1", IndexCache::Dir(cache_dir.clone()));
    let ds = GptDataset::build(data.clone(), Split::Train, None, &cfg).unwrap();
    assert!(matches!(ds.cache_outcome(), CacheOutcome::Built(p) if p.starts_with(&cache_dir)));
    // A file where the cache directory should be: the build still succeeds, uncached.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"x").unwrap();
    let cfg = config(8, 1, "1", IndexCache::Dir(blocked.join("sub")));
    let ds = GptDataset::build(data, Split::Train, None, &cfg).unwrap();
    assert!(matches!(ds.cache_outcome(), CacheOutcome::NotCached(_)));
    assert_eq!(ds.len(), (80 - 1) / 8);
}

#[test]
fn blend_follows_weights() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_dataset(dir.path(), "a", &vec![33; 200], 0);
    let b = write_dataset(dir.path(), "b", &vec![17; 300], 1_000_000);
    let entries =
        vec![BlendEntry { weight: Some(0.3), prefix: a }, BlendEntry { weight: Some(0.7), prefix: b }];
    let cfg = config(16, 5, "1", IndexCache::Off);
    let blend = BlendedDataset::build(&entries, Split::Train, 1000, &cfg).unwrap();
    assert_eq!(blend.num_samples(), 1000);
    let mut from_b = 0;
    let mut tokens = Vec::new();
    for i in 0..blend.num_samples() {
        blend.sample_into(i, &mut tokens).unwrap();
        assert_eq!(tokens.len(), 17);
        let in_b = tokens[0] >= 1_000_000;
        assert!(tokens.iter().all(|&t| (t >= 1_000_000) == in_b));
        from_b += usize::from(in_b);
    }
    assert_eq!(from_b, 700);
    // A blend asking more of a dataset than several epochs give still works (more epochs).
    let big = BlendedDataset::build(&entries, Split::Train, 5000, &cfg).unwrap();
    assert_eq!(big.len(), 5000);
}

#[test]
fn unweighted_blend_is_proportional_to_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_dataset(dir.path(), "a", &vec![41; 100], 0);
    let b = write_dataset(dir.path(), "b", &vec![41; 300], 1_000_000);
    let entries: Vec<BlendEntry> =
        [a, b].into_iter().map(|prefix| BlendEntry { weight: None, prefix }).collect();
    let cfg = config(8, 5, "1", IndexCache::Off);
    let blend = BlendedDataset::build(&entries, Split::Train, 400, &cfg).unwrap();
    let w = blend.weights();
    assert!((w[0] - 0.25).abs() < 0.01 && (w[1] - 0.75).abs() < 0.01, "{w:?}");
}

/// Asking an unweighted blend for more samples than one epoch of its datasets repeats epochs
/// (keeping the size-proportional weights) instead of failing.
#[test]
fn unweighted_blend_spans_epochs_when_asked_for_more() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_dataset(dir.path(), "a", &vec![41; 100], 0);
    let b = write_dataset(dir.path(), "b", &vec![41; 300], 1_000_000);
    let entries: Vec<BlendEntry> =
        [a, b].into_iter().map(|prefix| BlendEntry { weight: None, prefix }).collect();
    let cfg = config(8, 5, "1", IndexCache::Off);
    let one_epoch = BlendedDataset::build(&entries, Split::Train, 400, &cfg).unwrap().num_samples();
    let blend = BlendedDataset::build(&entries, Split::Train, 10 * one_epoch as u64, &cfg).unwrap();
    assert_eq!(blend.num_samples(), 10 * one_epoch);
    let w = blend.weights();
    assert!((w[0] - 0.25).abs() < 0.01 && (w[1] - 0.75).abs() < 0.01, "{w:?}");
    let mut out = Vec::new();
    blend.sample_into(10 * one_epoch - 1, &mut out).unwrap();
    assert_eq!(out.len(), 9);
}

/// Index building for 10 million documents (pure index arithmetic, no files); run in release:
/// `cargo test --release --test data_gpt_dataset -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run in release"]
fn ten_million_documents_index_in_seconds() {
    let sizes: Vec<u32> = (0..10_000_000u32).map(|i| 200 + (i * 7919) % 1800).collect();
    let start = Instant::now();
    let (ix, plan) = build_gpt_indices(&sizes, 0..sizes.len(), 2048, None, 1234, true).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "10M documents, {} tokens, {} samples of 2048: {secs:.2} s",
        plan.tokens_per_epoch,
        ix.num_samples()
    );
    assert!(secs < 30.0);
}

#[test]
fn ranks_as_threads_build_the_same_cache_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let lengths: Vec<usize> = (0..300).map(|i| 5 + i % 37).collect();
    let prefix = write_dataset(dir.path(), "d", &lengths, 0);
    let data = Arc::new(IndexedDataset::open(&prefix).unwrap());
    let cfg = config(16, 3, "1", IndexCache::BesideData);
    let built: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| GptDataset::build(data.clone(), Split::Train, Some(500), &cfg)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert!(built.windows(2).all(|w| w[0].indices() == w[1].indices()));
    let again = GptDataset::build(data, Split::Train, Some(500), &cfg).unwrap();
    assert!(matches!(again.cache_outcome(), CacheOutcome::Loaded(_)));
    assert_eq!(again.indices(), built[0].indices());
}
