//! Megatron `.bin/.idx` format: golden bytes written by hand from the format description, write/
//! read round trips, and corrupted files (each cut at a header field boundary, bad magic, bad
//! version, bad dtype, bad entries, a `.bin` shorter than the index) giving their named errors.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use troupe::data::indexed::{IndexError, parse_header};
use troupe::data::{DType, IndexWriter, IndexedDataset};

/// Two documents of uint16 tokens: [1, 2, 3] and [65535], as Megatron lays them out.
fn golden_idx() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[0x4D, 0x4D, 0x49, 0x44, 0x49, 0x44, 0x58, 0x00, 0x00]); // magic
    b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // version 1
    b.push(8); // dtype uint16
    b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]); // sequence_count
    b.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]); // document_count = documents + 1
    b.extend_from_slice(&[3, 0, 0, 0, 1, 0, 0, 0]); // sequence_lengths int32
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // sequence_pointers int64: 0
    b.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]); //                          6 bytes
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // document_indices int64: 0
    b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); //                         1
    b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]); //                         2
    b
}

fn golden_bin() -> Vec<u8> {
    vec![1, 0, 2, 0, 3, 0, 0xFF, 0xFF]
}

fn write_pair(dir: &Path, idx: &[u8], bin: &[u8]) -> PathBuf {
    let prefix = dir.join("ds");
    std::fs::write(dir.join("ds.idx"), idx).expect("write idx");
    std::fs::write(dir.join("ds.bin"), bin).expect("write bin");
    prefix
}

fn open_err(idx: &[u8], bin: &[u8]) -> IndexError {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = write_pair(dir.path(), idx, bin);
    let err = IndexedDataset::open(&prefix).expect_err("corrupt dataset must not open");
    let text = err.to_string();
    assert!(text.contains("ds."), "error names the file: {text}");
    err
}

#[test]
fn writer_produces_the_golden_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("out_text_document");
    let mut w = IndexWriter::create(&prefix, DType::U16).unwrap();
    w.add_document(&[1, 2, 3]).unwrap();
    w.add_document(&[65535]).unwrap();
    let summary = w.finish().unwrap();
    assert_eq!(summary.documents, 2);
    assert_eq!(summary.tokens, 4);
    let idx = std::fs::read(dir.path().join("out_text_document.idx")).unwrap();
    let bin = std::fs::read(dir.path().join("out_text_document.bin")).unwrap();
    assert_eq!(idx, golden_idx());
    assert_eq!(bin, golden_bin());
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "temporary files left behind");
}

/// A dataset that cannot be finished (here the `.idx` name is taken by a directory) is an error
/// naming the file, and leaves no temporary files behind.
#[test]
fn a_writer_that_cannot_finish_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("out_text_document");
    std::fs::create_dir(dir.path().join("out_text_document.idx")).unwrap();
    let mut w = IndexWriter::create(&prefix, DType::U16).unwrap();
    w.add_document(&[1, 2, 3]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("out_text_document.idx"), "{err}");
    let temporary: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(temporary.is_empty(), "left behind: {temporary:?}");
}

#[test]
fn reader_reads_the_golden_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_pair(dir.path(), &golden_idx(), &golden_bin());
    let ds = IndexedDataset::open(&prefix).unwrap();
    assert_eq!(ds.dtype(), DType::U16);
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.num_documents(), 2);
    assert_eq!(ds.sequence_lengths(), vec![3, 1]);
    assert_eq!(ds.document_indices(), vec![0, 1, 2]);
    assert_eq!(ds.sequence(0).unwrap(), vec![1, 2, 3]);
    assert_eq!(ds.sequence(1).unwrap(), vec![65535]);
    let mut out = Vec::new();
    ds.read_into(0, 1, 2, &mut out).unwrap();
    assert_eq!(out, vec![2, 3]);
    assert!(matches!(ds.read_into(0, 2, 2, &mut out), Err(IndexError::OutOfRange { .. })));
    assert!(matches!(ds.sequence(2), Err(IndexError::OutOfRange { .. })));
}

#[test]
fn int32_round_trip_with_multi_sequence_documents() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("s");
    let mut w = IndexWriter::create(&prefix, DType::I32).unwrap();
    w.add_sequence(&[100_000, 7]).unwrap();
    w.add_sequence(&[]).unwrap();
    w.add_sequence(&[2_000_000_000]).unwrap();
    w.end_document();
    w.add_sequence(&[5]).unwrap();
    w.finish().unwrap();
    let ds = IndexedDataset::open(&prefix).unwrap();
    assert_eq!(ds.dtype(), DType::I32);
    assert_eq!(ds.document_indices(), vec![0, 3, 4]);
    assert_eq!(ds.sequence(0).unwrap(), vec![100_000, 7]);
    assert_eq!(ds.sequence(1).unwrap(), Vec::<u32>::new());
    assert_eq!(ds.sequence(2).unwrap(), vec![2_000_000_000]);
    assert_eq!(ds.sequence(3).unwrap(), vec![5]);
    assert_eq!(ds.total_tokens(), 4);
}

/// A dataset named by one of its files, or by the output prefix preprocessing extended with
/// `_text_document`, is refused naming the prefix meant; a name with no such dataset near it is
/// the plain missing-file error.
#[test]
fn a_file_name_or_an_output_prefix_names_the_prefix_meant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = dir.path().join("corpus_text_document");
    std::fs::write(dir.path().join("corpus_text_document.idx"), golden_idx()).expect("write idx");
    std::fs::write(dir.path().join("corpus_text_document.bin"), golden_bin()).expect("write bin");
    assert!(IndexedDataset::open(&prefix).is_ok());
    for given in ["corpus_text_document.bin", "corpus_text_document.idx", "corpus"] {
        match IndexedDataset::open(dir.path().join(given)) {
            Err(e @ IndexError::NotAPrefix { .. }) => {
                assert!(e.to_string().ends_with(&format!("did you mean {}?", prefix.display())), "{e}");
                let why = if given == "corpus" { "preprocessing names" } else { "without .bin or .idx" };
                assert!(e.to_string().contains(why), "{e}");
            }
            other => panic!("{given}: {other:?}"),
        }
    }
    assert!(matches!(IndexedDataset::open(dir.path().join("other")), Err(IndexError::Io { .. })));
}

#[test]
fn token_that_does_not_fit_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = IndexWriter::create(dir.path().join("x"), DType::U16).unwrap();
    let err = w.add_document(&[70_000]).unwrap_err();
    assert!(err.to_string().contains("70000"), "{err}");
}

#[test]
fn empty_dataset_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("e");
    IndexWriter::create(&prefix, DType::U16).unwrap().finish().unwrap();
    let ds = IndexedDataset::open(&prefix).unwrap();
    assert!(ds.is_empty());
    assert_eq!(ds.num_documents(), 0);
}

#[test]
fn truncation_at_every_header_field_boundary_names_the_field() {
    let idx = golden_idx();
    let cases: &[(usize, &str)] = &[
        (0, "magic"),
        (5, "magic"),
        (9, "version"),
        (16, "version"),
        (17, "dtype"),
        (18, "sequence_count"),
        (25, "sequence_count"),
        (26, "document_count"),
        (33, "document_count"),
        (34, "sequence_lengths"),
        (41, "sequence_lengths"),
        (42, "sequence_pointers"),
        (57, "sequence_pointers"),
        (58, "document_indices"),
        (81, "document_indices"),
    ];
    for &(cut, want) in cases {
        match open_err(&idx[..cut], &golden_bin()) {
            IndexError::Truncated { field, actual, offset, end, .. } => {
                assert_eq!(field, want, "cut at {cut}");
                assert_eq!(actual, cut as u64);
                assert!(offset <= actual && actual < end, "cut at {cut}");
            }
            other => panic!("cut at {cut}: expected Truncated({want}), got {other:?}"),
        }
    }
}

#[test]
fn flipped_magic() {
    let mut idx = golden_idx();
    idx[3] ^= 0x20;
    assert!(matches!(open_err(&idx, &golden_bin()), IndexError::BadMagic { .. }));
    let legacy = b"TNTIDX\x00\x00";
    assert!(matches!(open_err(legacy, &[]), IndexError::BadMagic { .. }));
}

#[test]
fn bad_version() {
    let mut idx = golden_idx();
    idx[9] = 2;
    let err = open_err(&idx, &golden_bin());
    assert!(matches!(err, IndexError::BadVersion { found: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("byte 9"));
}

#[test]
fn bad_and_unsupported_dtype() {
    for code in [0u8, 9, 255] {
        let mut idx = golden_idx();
        idx[17] = code;
        let err = open_err(&idx, &golden_bin());
        assert!(matches!(err, IndexError::BadDtype { code: c, .. } if c == code));
        assert!(err.to_string().contains("byte 17"));
    }
    let mut idx = golden_idx();
    idx[17] = 7; // float32: valid code, not a token type
    assert!(matches!(open_err(&idx, &golden_bin()), IndexError::UnsupportedDtype { dtype: DType::F32, .. }));
}

#[test]
fn pointer_past_end_of_bin() {
    let mut idx = golden_idx();
    idx[50] = 200; // sequence_pointers[1] (byte 50) = 200
    match open_err(&idx, &golden_bin()) {
        IndexError::BinTooShort { index, offset, expected, actual, .. } => {
            assert_eq!((index, offset, expected, actual), (1, 50, 202, 8));
        }
        other => panic!("expected BinTooShort, got {other:?}"),
    }
}

#[test]
fn truncated_bin_reports_expected_and_actual_size() {
    let err = open_err(&golden_idx(), &golden_bin()[..5]);
    let text = err.to_string();
    assert!(matches!(err, IndexError::BinTooShort { expected: 8, actual: 5, .. }));
    assert!(text.contains("ds.bin") && text.contains("ds.idx"), "{text}");
    assert!(text.contains("expected size ≥ 8, actual size 5"), "{text}");
}

#[test]
fn bad_entries_are_named_with_their_offset() {
    let cases: &[(usize, u8, &str, u64)] = &[
        (37, 0x80, "sequence_lengths", 34),  // lengths[0] negative
        (42, 1, "sequence_pointers", 42),    // pointers[0] = 1: misaligned
        (57, 0x80, "sequence_pointers", 50), // pointers[1] negative
        (58, 1, "document_indices", 58),     // document_indices[0] != 0
        (66, 5, "document_indices", 66),     // document_indices[1] > sequence_count
        (74, 1, "document_indices", 74),     // last != sequence_count (and decreasing)
    ];
    for &(byte, value, want_field, want_offset) in cases {
        let mut idx = golden_idx();
        idx[byte] = value;
        match open_err(&idx, &golden_bin()) {
            IndexError::BadEntry { field, offset, .. } => {
                assert_eq!((field, offset), (want_field, want_offset), "byte {byte}");
            }
            other => panic!("byte {byte}: expected BadEntry, got {other:?}"),
        }
    }
}

#[test]
fn trailing_bytes_and_sequence_modes() {
    let mut idx = golden_idx();
    idx.push(0);
    assert!(matches!(open_err(&idx, &golden_bin()), IndexError::SizeMismatch { .. }));
    idx.push(0); // now exactly S extra bytes: the optional sequence_modes array
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_pair(dir.path(), &idx, &golden_bin());
    let ds = IndexedDataset::open(&prefix).unwrap();
    assert!(ds.header().has_modes);
    assert_eq!(ds.sequence(1).unwrap(), vec![65535]);
}

#[test]
fn huge_counts_are_rejected_without_overflow() {
    let mut idx = golden_idx();
    idx[18..26].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        open_err(&idx, &golden_bin()),
        IndexError::CountTooLarge { field: "sequence_count", offset: 18, .. }
    ));
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = IndexedDataset::open(dir.path().join("nope")).unwrap_err();
    assert!(matches!(err, IndexError::Io { .. }));
    assert!(err.to_string().contains("nope.idx"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(docs in prop::collection::vec(prop::collection::vec(0u32..70_000, 0..20), 0..20),
                  wide in any::<bool>()) {
        let dtype = if wide { DType::I32 } else { DType::U16 };
        let docs: Vec<Vec<u32>> = docs
            .into_iter()
            .map(|d| d.into_iter().map(|t| if wide { t } else { t % 65_536 }).collect())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("p");
        let mut w = IndexWriter::create(&prefix, dtype).unwrap();
        for d in &docs {
            w.add_document(d).unwrap();
        }
        w.finish().unwrap();
        let ds = IndexedDataset::open(&prefix).unwrap();
        prop_assert_eq!(ds.len(), docs.len());
        for (i, d) in docs.iter().enumerate() {
            prop_assert_eq!(&ds.sequence(i).unwrap(), d);
        }
    }

    /// Any single corrupted byte or cut either opens (and then reads in bounds) or gives an
    /// error: never a panic.
    #[test]
    fn corruption_never_panics(pos in 0usize..82, value in any::<u8>(), cut in 0usize..90) {
        let mut idx = golden_idx();
        idx[pos] = value;
        idx.truncate(cut.min(idx.len()));
        let _ = parse_header(Path::new("x.idx"), &idx);
        let dir = tempfile::tempdir().unwrap();
        let prefix = write_pair(dir.path(), &idx, &golden_bin());
        if let Ok(ds) = IndexedDataset::open(&prefix) {
            for i in 0..ds.len() {
                let _ = ds.sequence(i);
            }
        }
    }
}
