//! Writer of Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`, MMIDIDX version 1).
//!
//! Tokens are appended to the `.bin` as they arrive (memory stays O(sequences), not O(tokens));
//! lengths and document boundaries are kept and written as the `.idx` by
//! [`IndexWriter::finish`]. Both files are written under a `.tmp` name and renamed into place at
//! the end, so a crash never leaves a half-written dataset under the final name. The byte layout
//! is the one [`super::indexed`] documents; pointers are the running sum of length × itemsize.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::dtype::DType;
use super::indexed::{HEADER_LEN, MAGIC, VERSION, dataset_paths};

/// Errors of writing an indexed dataset.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token id {token} does not fit the {dtype} element type of {path}")]
    TokenTooLarge { path: PathBuf, token: u32, dtype: DType },
    #[error("{dtype} is not a token element type; use uint16 or int32")]
    NotTokenType { dtype: DType },
    #[error("sequence of {length} tokens is longer than the int32 length field allows")]
    SequenceTooLong { length: usize },
}

/// Appends `tokens` to `out` in the little-endian encoding of `dtype`.
///
/// # Errors
/// Returns the first token that does not fit `dtype` (uint16 holds < 65,536, int32 < 2^31).
pub fn encode_tokens(dtype: DType, tokens: &[u32], out: &mut Vec<u8>) -> Result<(), u32> {
    match dtype {
        DType::U16 => {
            out.reserve(tokens.len() * 2);
            for &t in tokens {
                let v = u16::try_from(t).map_err(|_| t)?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            out.reserve(tokens.len() * 4);
            for &t in tokens {
                let v = i32::try_from(t).map_err(|_| t)?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Encodes a complete `.idx` image from sequence lengths and document indices.
///
/// `document_indices` must start with 0 and end with `lengths.len()` (not checked here; the
/// reader checks it).
pub fn encode_index(dtype: DType, lengths: &[i32], document_indices: &[i64]) -> Vec<u8> {
    let s = lengths.len();
    let d = document_indices.len();
    let mut out = Vec::with_capacity(HEADER_LEN as usize + 12 * s + 8 * d);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype.code());
    out.extend_from_slice(&(s as u64).to_le_bytes());
    out.extend_from_slice(&(d as u64).to_le_bytes());
    for &len in lengths {
        out.extend_from_slice(&len.to_le_bytes());
    }
    let itemsize = dtype.size() as i64;
    let mut pointer = 0i64;
    for &len in lengths {
        out.extend_from_slice(&pointer.to_le_bytes());
        pointer += len as i64 * itemsize;
    }
    for &doc in document_indices {
        out.extend_from_slice(&doc.to_le_bytes());
    }
    out
}

/// Totals of a finished dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteSummary {
    pub sequences: u64,
    pub documents: u64,
    pub tokens: u64,
    pub bin_bytes: u64,
    pub idx_bytes: u64,
}

/// Streams sequences into a new indexed dataset.
#[derive(Debug)]
pub struct IndexWriter {
    dtype: DType,
    bin: BufWriter<File>,
    bin_tmp: PathBuf,
    idx_tmp: PathBuf,
    bin_path: PathBuf,
    idx_path: PathBuf,
    lengths: Vec<i32>,
    document_indices: Vec<i64>,
    tokens: u64,
    scratch: Vec<u8>,
}

/// A temporary name next to `path`, unique to this process and writer, so that several
/// processes preparing the same dataset at once (ranks opening a shared cache) never write into
/// each other's files; each renames its complete file into place.
fn tmp_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp-{}-{n}", std::process::id()));
    PathBuf::from(s)
}

impl IndexWriter {
    /// Starts `<prefix>.bin`/`.idx` with element type `dtype` (uint16 or int32).
    ///
    /// # Errors
    /// `NotTokenType` for other types, `Io` if the temporary `.bin` cannot be created.
    pub fn create(prefix: impl AsRef<Path>, dtype: DType) -> Result<Self, WriteError> {
        if !dtype.is_token_type() {
            return Err(WriteError::NotTokenType { dtype });
        }
        let (idx_path, bin_path) = dataset_paths(prefix.as_ref());
        let bin_tmp = tmp_path(&bin_path);
        let file =
            File::create(&bin_tmp).map_err(|source| WriteError::Io { path: bin_tmp.clone(), source })?;
        Ok(IndexWriter {
            dtype,
            bin: BufWriter::with_capacity(1 << 20, file),
            idx_tmp: tmp_path(&idx_path),
            bin_tmp,
            bin_path,
            idx_path,
            lengths: Vec::new(),
            document_indices: vec![0],
            tokens: 0,
            scratch: Vec::new(),
        })
    }

    /// The element type being written.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Appends one sequence of token ids (it joins the current document).
    ///
    /// # Errors
    /// `TokenTooLarge` if a token does not fit the element type; `Io` on a write failure.
    pub fn add_sequence(&mut self, tokens: &[u32]) -> Result<(), WriteError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let encoded = encode_tokens(self.dtype, tokens, &mut scratch);
        let result = match encoded {
            Ok(()) => self.add_encoded(&scratch, tokens.len()),
            Err(token) => {
                Err(WriteError::TokenTooLarge { path: self.bin_path.clone(), token, dtype: self.dtype })
            }
        };
        self.scratch = scratch;
        result
    }

    /// Appends one sequence already encoded by [`encode_tokens`] with this writer's type.
    ///
    /// # Errors
    /// `SequenceTooLong` past 2^31 − 1 tokens; `Io` on a write failure.
    pub fn add_encoded(&mut self, bytes: &[u8], num_tokens: usize) -> Result<(), WriteError> {
        debug_assert_eq!(bytes.len(), num_tokens * self.dtype.size());
        let length =
            i32::try_from(num_tokens).map_err(|_| WriteError::SequenceTooLong { length: num_tokens })?;
        self.bin.write_all(bytes).map_err(|source| WriteError::Io { path: self.bin_tmp.clone(), source })?;
        self.lengths.push(length);
        self.tokens += num_tokens as u64;
        Ok(())
    }

    /// Closes the current document: the sequences added since the last call form one document.
    pub fn end_document(&mut self) {
        self.document_indices.push(self.lengths.len() as i64);
    }

    /// Appends one document made of a single sequence.
    ///
    /// # Errors
    /// As [`IndexWriter::add_sequence`].
    pub fn add_document(&mut self, tokens: &[u32]) -> Result<(), WriteError> {
        self.add_sequence(tokens)?;
        self.end_document();
        Ok(())
    }

    /// Number of sequences written so far.
    pub fn sequences(&self) -> usize {
        self.lengths.len()
    }

    /// Abandons the dataset: removes the temporary `.bin` (the final names were never written).
    pub fn abort(self) {
        let IndexWriter { bin, bin_tmp, .. } = self;
        drop(bin);
        let _ = std::fs::remove_file(bin_tmp);
    }

    /// Flushes the `.bin`, writes the `.idx`, and renames both into place.
    ///
    /// Sequences added after the last [`IndexWriter::end_document`] become a final document.
    ///
    /// # Errors
    /// `Io` on any write, sync or rename failure; the temporary files are removed then (a full
    /// disk leaves no partial dataset behind).
    pub fn finish(self) -> Result<WriteSummary, WriteError> {
        let (bin_tmp, idx_tmp) = (self.bin_tmp.clone(), self.idx_tmp.clone());
        let done = self.write_and_rename();
        if done.is_err() {
            for tmp in [bin_tmp, idx_tmp] {
                let _ = std::fs::remove_file(tmp);
            }
        }
        done
    }

    fn write_and_rename(mut self) -> Result<WriteSummary, WriteError> {
        if *self.document_indices.last().unwrap_or(&0) != self.lengths.len() as i64 {
            self.end_document();
        }
        let bin_io = |source| WriteError::Io { path: self.bin_tmp.clone(), source };
        let file = self.bin.into_inner().map_err(|e| bin_io(e.into_error()))?;
        file.sync_all().map_err(bin_io)?;
        let bin_bytes = file.metadata().map_err(bin_io)?.len();
        drop(file);
        let image = encode_index(self.dtype, &self.lengths, &self.document_indices);
        let idx_io = |source| WriteError::Io { path: self.idx_tmp.clone(), source };
        let mut idx = File::create(&self.idx_tmp).map_err(idx_io)?;
        idx.write_all(&image).map_err(idx_io)?;
        idx.sync_all().map_err(idx_io)?;
        for (from, to) in [(&self.bin_tmp, &self.bin_path), (&self.idx_tmp, &self.idx_path)] {
            std::fs::rename(from, to).map_err(|source| WriteError::Io { path: to.clone(), source })?;
        }
        Ok(WriteSummary {
            sequences: self.lengths.len() as u64,
            documents: self.document_indices.len() as u64 - 1,
            tokens: self.tokens,
            bin_bytes,
            idx_bytes: image.len() as u64,
        })
    }
}
