//! Reader of Megatron's memory-mapped indexed datasets (`<prefix>.idx` + `<prefix>.bin`, MMIDIDX
//! version 1).
//!
//! Layout of the `.idx` (little-endian; S = sequence_count, D = document_count):
//!
//! | byte offset | size | field |
//! |---|---|---|
//! | 0  | 9   | magic `MMIDIDX\0\0` |
//! | 9  | 8   | version, u64 = 1 |
//! | 17 | 1   | dtype code (see [`DType`]) |
//! | 18 | 8   | sequence_count S, u64 |
//! | 26 | 8   | document_count D, u64 (number of documents + 1) |
//! | 34 | 4·S | sequence_lengths, int32, in tokens |
//! |    | 8·S | sequence_pointers, int64, byte offsets into `.bin` |
//! |    | 8·D | document_indices, int64: 0, then one past each document's last sequence |
//! |    | S   | optional sequence_modes, int8 (multimodal datasets; ignored) |
//!
//! Invariants after [`IndexedDataset::open`] succeeds: the header is valid, the `.idx` has exactly
//! the size the header implies, every length is ≥ 0, every pointer is ≥ 0, a multiple of the
//! element size, and `pointer + length·itemsize` lies inside the `.bin`; document_indices starts at
//! 0, never decreases and ends at S. Every violation is an [`IndexError`] naming the file, the
//! field and the byte offset. The arrays are decoded on access (the header is 34 bytes, so the
//! int32/int64 arrays are not aligned and are never reinterpreted in place).

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dtype::DType;

/// The nine magic bytes that open every MMIDIDX `.idx` file.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only index version troupe reads and writes.
pub const VERSION: u64 = 1;
/// Size of the fixed header; the arrays start here.
pub const HEADER_LEN: u64 = 34;

/// Errors of opening or reading an indexed dataset. Byte offsets are positions in the named file.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A dataset named by something other than its prefix, when the prefix it means is there.
    #[error("no dataset {given}: {why}; did you mean {prefix}?")]
    NotAPrefix { given: PathBuf, prefix: PathBuf, why: &'static str },
    #[error(
        "{path} is truncated: field `{field}` spans bytes {offset}..{end}, expected size ≥ {end}, \
         actual size {actual}"
    )]
    Truncated { path: PathBuf, field: &'static str, offset: u64, end: u64, actual: u64 },
    #[error("{path}: field `magic` at byte 0 is {found:02x?}, expected {MAGIC:02x?} (MMIDIDX)")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: field `version` at byte 9 is {found}, only version {VERSION} is supported")]
    BadVersion { path: PathBuf, found: u64 },
    #[error("{path}: field `dtype` at byte 17 has unknown code {code} (known codes are 1..=8)")]
    BadDtype { path: PathBuf, code: u8 },
    #[error(
        "{path}: field `dtype` at byte 17 is {dtype} (code {}), but token data must be uint16 \
         or int32", dtype.code()
    )]
    UnsupportedDtype { path: PathBuf, dtype: DType },
    #[error("{path}: field `{field}` at byte {offset} is {value}, which is impossibly large")]
    CountTooLarge { path: PathBuf, field: &'static str, offset: u64, value: u64 },
    #[error(
        "{path} has the wrong size: the header implies {expected} bytes (or {} with \
         sequence_modes), actual size {actual}", expected + modes
    )]
    SizeMismatch { path: PathBuf, expected: u64, modes: u64, actual: u64 },
    #[error("{path}: field `{field}[{index}]` at byte {offset} is {value}: {reason}")]
    BadEntry { path: PathBuf, field: &'static str, index: u64, offset: u64, value: i64, reason: &'static str },
    #[error(
        "{bin} is shorter than {idx} implies: expected size ≥ {expected}, actual size {actual} \
         (first sequence past the end: {index}, whose `sequence_pointers[{index}]` is at byte \
         {offset} of the .idx)"
    )]
    BinTooShort { bin: PathBuf, idx: PathBuf, expected: u64, actual: u64, index: u64, offset: u64 },
    #[error(
        "read outside sequence {index} of {path}: tokens {start}..{end} asked, the sequence has \
         {length}"
    )]
    OutOfRange { path: PathBuf, index: u64, start: u64, end: u64, length: u64 },
    #[error("{path}: token at byte {offset} is negative ({value})")]
    NegativeToken { path: PathBuf, offset: u64, value: i32 },
}

/// The `.idx` and `.bin` paths of a dataset prefix (`out_text_document` → `.idx`, `.bin`).
pub fn dataset_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut idx = prefix.as_os_str().to_owned();
    idx.push(".idx");
    let mut bin = prefix.as_os_str().to_owned();
    bin.push(".bin");
    (PathBuf::from(idx), PathBuf::from(bin))
}

/// Parsed and validated header fields of an `.idx` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHeader {
    pub dtype: DType,
    pub sequence_count: u64,
    pub document_count: u64,
    /// Whether the optional sequence_modes array is present.
    pub has_modes: bool,
}

impl IndexHeader {
    fn lengths_offset(&self) -> u64 {
        HEADER_LEN
    }
    fn pointers_offset(&self) -> u64 {
        HEADER_LEN + 4 * self.sequence_count
    }
    fn documents_offset(&self) -> u64 {
        self.pointers_offset() + 8 * self.sequence_count
    }
    fn arrays_end(&self) -> u64 {
        self.documents_offset() + 8 * self.document_count
    }
}

fn le_u64(bytes: &[u8], offset: u64) -> u64 {
    let o = offset as usize;
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[o..o + 8]);
    u64::from_le_bytes(buf)
}

fn le_i64(bytes: &[u8], offset: u64) -> i64 {
    le_u64(bytes, offset) as i64
}

fn le_i32(bytes: &[u8], offset: u64) -> i32 {
    let o = offset as usize;
    let mut buf = [0u8; 4];
    buf.copy_from_slice(&bytes[o..o + 4]);
    i32::from_le_bytes(buf)
}

/// Parses the header of an `.idx` image and checks that the file has the size it implies.
///
/// # Errors
/// [`IndexError::Truncated`] naming the first field that does not fit, `BadMagic`, `BadVersion`,
/// `BadDtype`, `UnsupportedDtype`, `CountTooLarge`, or `SizeMismatch` for trailing bytes.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<IndexHeader, IndexError> {
    let header = parse_fixed_fields(path, bytes)?;
    let need = |field, offset, len| need_bytes(path, bytes, field, offset, len);
    let s = header.sequence_count;
    need("sequence_lengths", header.lengths_offset(), 4 * s)?;
    need("sequence_pointers", header.pointers_offset(), 8 * s)?;
    need("document_indices", header.documents_offset(), 8 * header.document_count)?;
    let (expected, actual) = (header.arrays_end(), bytes.len() as u64);
    let has_modes = match actual {
        a if a == expected => false,
        a if a == expected + s && s > 0 => true,
        _ => {
            return Err(IndexError::SizeMismatch { path: path.to_owned(), expected, modes: s, actual });
        }
    };
    Ok(IndexHeader { has_modes, ..header })
}

/// `Truncated` unless bytes `offset..offset+len` of the file exist.
fn need_bytes(
    path: &Path,
    bytes: &[u8],
    field: &'static str,
    offset: u64,
    len: u64,
) -> Result<(), IndexError> {
    let (end, actual) = (offset.saturating_add(len), bytes.len() as u64);
    if actual < end {
        return Err(IndexError::Truncated { path: path.to_owned(), field, offset, end, actual });
    }
    Ok(())
}

/// The 34-byte fixed header: magic, version, dtype and the two counts.
fn parse_fixed_fields(path: &Path, bytes: &[u8]) -> Result<IndexHeader, IndexError> {
    let need = |field, offset, len| need_bytes(path, bytes, field, offset, len);
    let head = &bytes[..bytes.len().min(MAGIC.len())];
    if head != &MAGIC[..head.len()] {
        return Err(IndexError::BadMagic { path: path.to_owned(), found: head.to_vec() });
    }
    need("magic", 0, 9)?;
    need("version", 9, 8)?;
    let version = le_u64(bytes, 9);
    if version != VERSION {
        return Err(IndexError::BadVersion { path: path.to_owned(), found: version });
    }
    need("dtype", 17, 1)?;
    let dtype = DType::from_code(bytes[17])
        .ok_or_else(|| IndexError::BadDtype { path: path.to_owned(), code: bytes[17] })?;
    if !dtype.is_token_type() {
        return Err(IndexError::UnsupportedDtype { path: path.to_owned(), dtype });
    }
    need("sequence_count", 18, 8)?;
    need("document_count", 26, 8)?;
    let (sequence_count, document_count) = (le_u64(bytes, 18), le_u64(bytes, 26));
    // Counts above 2^56 would overflow the size arithmetic; no real file is that big.
    for (field, offset, value) in
        [("sequence_count", 18, sequence_count), ("document_count", 26, document_count)]
    {
        if value > 1 << 56 {
            return Err(IndexError::CountTooLarge { path: path.to_owned(), field, offset, value });
        }
    }
    Ok(IndexHeader { dtype, sequence_count, document_count, has_modes: false })
}

/// A validated, memory-mapped Megatron indexed dataset of token ids.
#[derive(Debug)]
pub struct IndexedDataset {
    idx_path: PathBuf,
    bin_path: PathBuf,
    idx: Mmap,
    bin: Mmap,
    header: IndexHeader,
}

/// The prefix a user who named `given` most likely meant, when that dataset exists: the file
/// name of one of its files (`x_text_document.bin`), or the `--output-prefix` that preprocessing
/// extends with `_text_document` (`x`).
fn meant_prefix(given: &Path) -> Option<(PathBuf, &'static str)> {
    let text = given.to_str()?;
    let exists = |p: &Path| dataset_paths(p).0.is_file();
    let stripped = text.strip_suffix(".bin").or_else(|| text.strip_suffix(".idx")).map(PathBuf::from);
    let extended = PathBuf::from(format!("{text}_text_document"));
    match stripped.filter(|p| exists(p)) {
        Some(p) => Some((p, "a dataset is named by its prefix, without .bin or .idx")),
        None => exists(&extended).then_some((
            extended,
            "preprocessing names a dataset OUTPUT_PREFIX_text_document (the JSON key's name)",
        )),
    }
}

fn map_file(path: &Path) -> Result<Mmap, IndexError> {
    let io = |source| IndexError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only and private to this process. Another process truncating or
    // rewriting the file while it is mapped is outside what troupe can guard against (as with any
    // mmap reader, including Megatron's); datasets are treated as immutable once written.
    unsafe { Mmap::map(&file) }.map_err(io)
}

impl IndexedDataset {
    /// Opens `<prefix>.idx` and `<prefix>.bin` and validates them completely (O(S + D)).
    ///
    /// # Errors
    /// Any [`IndexError`]: I/O, a bad header, a bad array entry, or a `.bin` shorter than the
    /// index implies.
    pub fn open(prefix: impl AsRef<Path>) -> Result<Self, IndexError> {
        let prefix = prefix.as_ref();
        let (idx, bin) = dataset_paths(prefix);
        if !idx.exists()
            && let Some((meant, why)) = meant_prefix(prefix)
        {
            return Err(IndexError::NotAPrefix { given: prefix.to_owned(), prefix: meant, why });
        }
        Self::open_files(&idx, &bin)
    }

    /// Opens an explicit `.idx`/`.bin` pair. See [`IndexedDataset::open`].
    ///
    /// # Errors
    /// As [`IndexedDataset::open`].
    pub fn open_files(idx_path: &Path, bin_path: &Path) -> Result<Self, IndexError> {
        let idx = map_file(idx_path)?;
        let header = parse_header(idx_path, &idx)?;
        let bin = map_file(bin_path)?;
        let dataset =
            IndexedDataset { idx_path: idx_path.to_owned(), bin_path: bin_path.to_owned(), idx, bin, header };
        dataset.validate_sequences()?;
        dataset.validate_documents()?;
        Ok(dataset)
    }

    fn bad_entry(&self, field: &'static str, index: u64, offset: u64, value: i64) -> BadEntry<'_> {
        BadEntry { path: &self.idx_path, field, index, offset, value }
    }

    fn validate_sequences(&self) -> Result<(), IndexError> {
        let itemsize = self.header.dtype.size() as u64;
        let actual = self.bin.len() as u64;
        let mut needed = 0u64;
        let mut first_past_end = None;
        for i in 0..self.header.sequence_count {
            let len_off = self.header.lengths_offset() + 4 * i;
            let ptr_off = self.header.pointers_offset() + 8 * i;
            let length = le_i32(&self.idx, len_off);
            let pointer = le_i64(&self.idx, ptr_off);
            if length < 0 {
                let e = self.bad_entry("sequence_lengths", i, len_off, length.into());
                return Err(e.because("a length must not be negative"));
            }
            if pointer < 0 {
                let e = self.bad_entry("sequence_pointers", i, ptr_off, pointer);
                return Err(e.because("a pointer must not be negative"));
            }
            if !(pointer as u64).is_multiple_of(itemsize) {
                let e = self.bad_entry("sequence_pointers", i, ptr_off, pointer);
                return Err(e.because("a pointer must be a multiple of the element size"));
            }
            let end = (pointer as u64).saturating_add(length as u64 * itemsize);
            if end > actual && first_past_end.is_none() {
                first_past_end = Some((i, ptr_off));
            }
            needed = needed.max(end);
        }
        match first_past_end {
            None => Ok(()),
            Some((index, offset)) => Err(IndexError::BinTooShort {
                bin: self.bin_path.clone(),
                idx: self.idx_path.clone(),
                expected: needed,
                actual,
                index,
                offset,
            }),
        }
    }

    fn validate_documents(&self) -> Result<(), IndexError> {
        let d = self.header.document_count;
        let s = self.header.sequence_count;
        let base = self.header.documents_offset();
        if d == 0 {
            return Err(IndexError::BadEntry {
                path: self.idx_path.clone(),
                field: "document_count",
                index: 0,
                offset: 26,
                value: 0,
                reason: "document_indices needs at least its leading 0",
            });
        }
        let mut previous = 0i64;
        for i in 0..d {
            let offset = base + 8 * i;
            let value = le_i64(&self.idx, offset);
            let e = self.bad_entry("document_indices", i, offset, value);
            if i == 0 && value != 0 {
                return Err(e.because("document_indices must start with 0"));
            }
            if value < previous {
                return Err(e.because("document_indices must not decrease"));
            }
            if value as u64 > s {
                return Err(e.because("document_indices must not exceed sequence_count"));
            }
            if i == d - 1 && value as u64 != s {
                return Err(e.because("the last document index must equal sequence_count"));
            }
            previous = value;
        }
        Ok(())
    }

    /// The header fields.
    pub fn header(&self) -> IndexHeader {
        self.header
    }

    /// The token element type (uint16 or int32).
    pub fn dtype(&self) -> DType {
        self.header.dtype
    }

    /// Number of sequences (S). With document-level preprocessing, one per document.
    pub fn len(&self) -> usize {
        self.header.sequence_count as usize
    }

    /// Whether the dataset holds no sequences.
    pub fn is_empty(&self) -> bool {
        self.header.sequence_count == 0
    }

    /// Number of documents (D − 1).
    pub fn num_documents(&self) -> usize {
        self.header.document_count as usize - 1
    }

    /// Path of the `.idx` file.
    pub fn idx_path(&self) -> &Path {
        &self.idx_path
    }

    /// Path of the `.bin` file.
    pub fn bin_path(&self) -> &Path {
        &self.bin_path
    }

    /// Size of the `.bin` file in bytes.
    pub fn bin_len(&self) -> u64 {
        self.bin.len() as u64
    }

    /// Length of sequence `i` in tokens.
    ///
    /// # Panics
    /// If `i >= self.len()` (a caller bug; the data itself was validated at open).
    pub fn sequence_length(&self, i: usize) -> u32 {
        assert!(i < self.len(), "sequence {i} out of range 0..{}", self.len());
        le_i32(&self.idx, self.header.lengths_offset() + 4 * i as u64) as u32
    }

    /// Byte offset of sequence `i` in the `.bin`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn sequence_pointer(&self, i: usize) -> u64 {
        assert!(i < self.len(), "sequence {i} out of range 0..{}", self.len());
        le_i64(&self.idx, self.header.pointers_offset() + 8 * i as u64) as u64
    }

    /// All sequence lengths, decoded.
    pub fn sequence_lengths(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.sequence_length(i)).collect()
    }

    /// The document_indices array, decoded (length = documents + 1).
    pub fn document_indices(&self) -> Vec<u64> {
        let base = self.header.documents_offset();
        (0..self.header.document_count).map(|i| le_i64(&self.idx, base + 8 * i) as u64).collect()
    }

    /// Total number of tokens over all sequences.
    pub fn total_tokens(&self) -> u64 {
        (0..self.len()).map(|i| self.sequence_length(i) as u64).sum()
    }

    /// Appends `length` tokens of sequence `i`, starting `offset` tokens in, to `out`
    /// (Megatron's `IndexedDataset.get(i, offset, length)`).
    ///
    /// # Errors
    /// [`IndexError::OutOfRange`] if the range leaves the sequence; `NegativeToken` for a negative
    /// int32 token.
    pub fn read_into(
        &self,
        i: usize,
        offset: usize,
        length: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), IndexError> {
        let seq_len = if i < self.len() { self.sequence_length(i) as u64 } else { 0 };
        let (start, end) = (offset as u64, offset as u64 + length as u64);
        if i >= self.len() || end > seq_len {
            return Err(IndexError::OutOfRange {
                path: self.bin_path.clone(),
                index: i as u64,
                start,
                end,
                length: seq_len,
            });
        }
        let itemsize = self.header.dtype.size();
        let first = self.sequence_pointer(i) as usize + offset * itemsize;
        let bytes = &self.bin[first..first + length * itemsize];
        out.reserve(length);
        match self.header.dtype {
            DType::U16 => out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)),
            _ => {
                for (k, c) in bytes.chunks_exact(4).enumerate() {
                    let value = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if value < 0 {
                        return Err(IndexError::NegativeToken {
                            path: self.bin_path.clone(),
                            offset: (first + 4 * k) as u64,
                            value,
                        });
                    }
                    out.push(value as u32);
                }
            }
        }
        Ok(())
    }

    /// All tokens of sequence `i`.
    ///
    /// # Errors
    /// As [`IndexedDataset::read_into`].
    pub fn sequence(&self, i: usize) -> Result<Vec<u32>, IndexError> {
        // An index past the end asks for one token so that read_into names the range.
        let len = if i < self.len() { self.sequence_length(i) as usize } else { 1 };
        let mut out = Vec::with_capacity(len);
        self.read_into(i, 0, len, &mut out)?;
        Ok(out)
    }
}

/// A bad array entry, waiting for its reason.
struct BadEntry<'a> {
    path: &'a Path,
    field: &'static str,
    index: u64,
    offset: u64,
    value: i64,
}

impl BadEntry<'_> {
    fn because(self, reason: &'static str) -> IndexError {
        IndexError::BadEntry {
            path: self.path.to_owned(),
            field: self.field,
            index: self.index,
            offset: self.offset,
            value: self.value,
            reason,
        }
    }
}
