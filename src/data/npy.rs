//! Index arrays of the GPT dataset and their on-disk form, NumPy `.npy` version 1.0.
//!
//! Megatron caches its document, sample and shuffle indices as `.npy` files; troupe writes the
//! same container (little-endian, C order, 1-D or 2-D) so the arrays can be inspected with
//! `numpy.load`. Element types follow Megatron: int32 where the values fit, int64 otherwise, and
//! uint32 for shuffle indices. A header is `\x93NUMPY`, version `1 0`, a u16 header length, then a
//! Python dict literal padded with spaces and a newline to a multiple of 64 bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of reading or writing an index array file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid index array: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// A flat array of indices in one of the element types Megatron uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexArray {
    I32(Vec<i32>),
    I64(Vec<i64>),
    U32(Vec<u32>),
}

impl IndexArray {
    /// The narrowest signed type that holds every value (int32 if it fits, else int64).
    pub fn signed_from(values: Vec<u64>) -> Self {
        if values.iter().all(|&v| v <= i32::MAX as u64) {
            IndexArray::I32(values.into_iter().map(|v| v as i32).collect())
        } else {
            IndexArray::I64(values.into_iter().map(|v| v as i64).collect())
        }
    }

    /// uint32 if every value fits, else int64 (Megatron's rule for the shuffle index).
    pub fn unsigned_from(values: Vec<u64>) -> Self {
        if values.iter().all(|&v| v <= u32::MAX as u64) {
            IndexArray::U32(values.into_iter().map(|v| v as u32).collect())
        } else {
            IndexArray::I64(values.into_iter().map(|v| v as i64).collect())
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            IndexArray::I32(v) => v.len(),
            IndexArray::I64(v) => v.len(),
            IndexArray::U32(v) => v.len(),
        }
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as u64 (negative values, never written by troupe, read as 0).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn get(&self, i: usize) -> u64 {
        match self {
            IndexArray::I32(v) => v[i].max(0) as u64,
            IndexArray::I64(v) => v[i].max(0) as u64,
            IndexArray::U32(v) => v[i] as u64,
        }
    }

    /// The largest element, if any.
    pub fn max(&self) -> Option<u64> {
        (0..self.len()).map(|i| self.get(i)).max()
    }

    fn descr(&self) -> &'static str {
        match self {
            IndexArray::I32(_) => "<i4",
            IndexArray::I64(_) => "<i8",
            IndexArray::U32(_) => "<u4",
        }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            IndexArray::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            IndexArray::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            IndexArray::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

const NPY_MAGIC: &[u8] = b"\x93NUMPY\x01\x00";

/// The bytes of a `.npy` v1.0 file holding `array` with shape `(len / cols, cols)`, or `(len,)`
/// when `cols` is 1.
pub fn encode_npy(array: &IndexArray, cols: usize) -> Vec<u8> {
    let shape =
        if cols == 1 { format!("({},)", array.len()) } else { format!("({}, {})", array.len() / cols, cols) };
    let mut header =
        format!("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", array.descr(), shape);
    let unpadded = NPY_MAGIC.len() + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(NPY_MAGIC.len() + 2 + header.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&array.to_le_bytes());
    out
}

/// Writes `array` to `path` atomically (a temporary file renamed into place).
///
/// # Errors
/// [`NpyError::Io`] on any file-system failure.
pub fn write_npy(path: &Path, array: &IndexArray, cols: usize) -> Result<(), NpyError> {
    write_atomic(path, &encode_npy(array, cols))
        .map_err(|source| NpyError::Io { path: path.to_owned(), source })
}

/// Writes `bytes` under a temporary name beside `path` and renames it into place. The temporary
/// name carries the process and thread, so concurrent builders (ranks as processes or as threads)
/// never write the same temporary file; the last rename wins with identical content.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    let thread: String =
        format!("{:?}", std::thread::current().id()).chars().filter(char::is_ascii_digit).collect();
    tmp.push(format!(".tmp{}-{thread}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a `.npy` file written by [`write_npy`]; returns the array and its shape.
///
/// # Errors
/// [`NpyError::Io`] if unreadable, [`NpyError::Format`] if the header or size is not as expected.
pub fn read_npy(path: &Path) -> Result<(IndexArray, Vec<usize>), NpyError> {
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io { path: path.to_owned(), source })?;
    decode_npy(&bytes).map_err(|reason| NpyError::Format { path: path.to_owned(), reason })
}

fn decode_npy(bytes: &[u8]) -> Result<(IndexArray, Vec<usize>), String> {
    if bytes.len() < 10 || &bytes[..8] != NPY_MAGIC {
        return Err("missing the NUMPY v1.0 magic".to_owned());
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-UTF-8 header")?;
    if header.contains("'fortran_order': True") {
        return Err("Fortran order is not supported".to_owned());
    }
    let descr = ["<i4", "<i8", "<u4"]
        .into_iter()
        .find(|d| header.contains(&format!("'descr': '{d}'")))
        .ok_or("element type is not <i4, <i8 or <u4")?;
    let shape_text = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or("no shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text:?}")))
        .collect::<Result<_, _>>()?;
    let count = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or("shape overflows")?;
    let data = &bytes[10 + header_len..];
    let itemsize = if descr == "<i8" { 8 } else { 4 };
    if Some(data.len()) != count.checked_mul(itemsize) {
        return Err(format!("{} data bytes for shape {shape:?} of {descr}", data.len()));
    }
    let array = match descr {
        "<i4" => IndexArray::I32(
            data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        ),
        "<u4" => IndexArray::U32(
            data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        ),
        _ => IndexArray::I64(
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
    };
    Ok((array, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_numpy_v1_and_64_aligned() {
        let bytes = encode_npy(&IndexArray::I32(vec![1, 2, 3, 4]), 2);
        assert_eq!(&bytes[..8], NPY_MAGIC);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }"));
        assert!(header.ends_with('\n'));
        let (back, shape) = decode_npy(&bytes).unwrap();
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(back, IndexArray::I32(vec![1, 2, 3, 4]));
    }

    #[test]
    fn round_trip_each_type_and_reject_bad_sizes() {
        for a in [
            IndexArray::signed_from(vec![0, 1, 1 << 40]),
            IndexArray::unsigned_from(vec![3, 2, 1]),
            IndexArray::signed_from(vec![]),
        ] {
            let bytes = encode_npy(&a, 1);
            assert_eq!(decode_npy(&bytes).unwrap().0, a);
            assert!(decode_npy(&bytes[..bytes.len() - 1]).is_err());
        }
        assert!(matches!(IndexArray::signed_from(vec![1 << 40]), IndexArray::I64(_)));
    }
}
