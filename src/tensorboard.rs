//! TensorBoard event files: the scalars of a run (loss, learning rate, gradient norm, throughput,
//! validation loss) written where `--tensorboard-dir` points, under the tag names Megatron-LM uses,
//! so TensorBoard shows a troupe run next to a Megatron one.
//!
//! The format is TensorFlow's record file: each record is its length (u64, little-endian), a
//! masked CRC-32C of those 8 bytes (u32), the payload, and a masked CRC-32C of the payload. Each
//! payload is a serialized `tensorflow.Event` protocol buffer; the first carries only
//! `file_version = "brain.Event:2"`, the rest a wall time, a step and a `Summary` of
//! `simple_value` scalars (the form PyTorch's `SummaryWriter.add_scalar` writes). The few
//! protobuf fields needed are encoded here by hand; [`read_scalars`] decodes them back, checking
//! every CRC, for tests and for tools that read a run's scalars.
//!
//! Every record is written with one `write_all` straight to the file (no buffer to flush), so
//! TensorBoard sees each step as it ends and a killed run loses nothing it reported.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Errors writing or reading an event file.
#[derive(Debug, Error)]
pub enum TensorBoardError {
    #[error("TensorBoard event file: {op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TensorBoard event file {}: {what} at byte {offset}", path.display())]
    Corrupt { path: PathBuf, offset: u64, what: String },
}

/// The version record every event file starts with.
pub const FILE_VERSION: &str = "brain.Event:2";

/// One scalar as read back: its tag, step, value and wall time (seconds since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub value: f32,
    pub wall_time: f64,
}

/// Writes one event file in a directory.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it named as TensorFlow's writers
    /// name theirs (`events.out.tfevents.<seconds>.<host>.<pid>`, with a count after it if that
    /// exists), and writes the version record. A resumed run writes a file of its own beside the
    /// first; TensorBoard reads every file of the directory as one run.
    ///
    /// # Errors
    /// When the directory or the file cannot be created or written.
    pub fn create(dir: &Path) -> Result<Self, TensorBoardError> {
        fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TensorBoardError {
            let path = path.to_path_buf();
            move |source| TensorBoardError::Io { op, path, source }
        }
        fs::create_dir_all(dir).map_err(io("creating the directory", dir))?;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let base = format!("events.out.tfevents.{secs}.{host}.{}", std::process::id());
        let mut n = 0u32;
        let (file, path) = loop {
            let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(io("creating", &path)(e)),
            }
        };
        let mut w = Self { file, path };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        w.record(&event)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the scalars `values` (tag, value) at `step`, as one event.
    ///
    /// # Errors
    /// When the file cannot be written (a full disk, a removed directory on some filesystems).
    pub fn scalars(&mut self, step: i64, values: &[(&str, f32)]) -> Result<(), TensorBoardError> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, WIRE_32);
            value.extend_from_slice(&v.to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_key(&mut event, 2, WIRE_VARINT);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, payload: &[u8]) -> Result<(), TensorBoardError> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(payload.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(payload);
        rec.extend_from_slice(&masked_crc(payload).to_le_bytes());
        self.file.write_all(&rec).map_err(|source| TensorBoardError::Io {
            op: "writing",
            path: self.path.clone(),
            source,
        })
    }
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// TensorFlow's masked CRC-32C (Castagnoli): the CRC rotated right by 15 bits plus a constant, so
/// that a CRC of data holding CRCs stays well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

const WIRE_VARINT: u8 = 0;
const WIRE_64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, WIRE_64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads every scalar of an event file, in file order, checking each record's CRCs. Events
/// without a summary (the version record) give nothing; values other than `simple_value` are
/// skipped. A record cut short at the end (a writer still running, or killed mid-write) ends the
/// read without error, as TensorBoard treats it.
///
/// # Errors
/// When the file cannot be read, a CRC does not match, or a protobuf is malformed.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>, TensorBoardError> {
    let bytes =
        fs::read(path).map_err(|source| TensorBoardError::Io { op: "reading", path: path.into(), source })?;
    let corrupt = |offset: usize, what: String| TensorBoardError::Corrupt {
        path: path.into(),
        offset: offset as u64,
        what,
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap_or_default());
        if masked_crc(len_bytes) != len_crc {
            return Err(corrupt(at, "the length's CRC does not match".into()));
        }
        let start = at + 12;
        let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else {
            return Err(corrupt(at, format!("a record of {len} bytes")));
        };
        if end.checked_add(4).is_none_or(|e| e > bytes.len()) {
            break;
        }
        let payload = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap_or_default());
        if masked_crc(payload) != crc {
            return Err(corrupt(at, "the record's CRC does not match".into()));
        }
        decode_event(payload, &mut out).map_err(|what| corrupt(start, what))?;
        at = end + 4;
    }
    Ok(out)
}

/// A field of a protobuf message: its number and its value by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Splits a protobuf message into its fields.
fn fields(mut b: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    fn varint(b: &mut &[u8]) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("a varint cut short")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("a field of {n} bytes with {} left", b.len()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let f = match (key & 7) as u8 {
            WIRE_VARINT => Field::Varint(varint(&mut b)?),
            WIRE_64 => Field::Fixed64(take(&mut b, 8)?.try_into().map_err(|_| "fixed64")?),
            WIRE_LEN => {
                let n = usize::try_from(varint(&mut b)?).map_err(|_| "a length past usize")?;
                Field::Bytes(take(&mut b, n)?)
            }
            WIRE_32 => Field::Fixed32(take(&mut b, 4)?.try_into().map_err(|_| "fixed32")?),
            w => return Err(format!("wire type {w} of field {}", key >> 3)),
        };
        out.push((key >> 3, f));
    }
    Ok(out)
}

fn decode_event(payload: &[u8], out: &mut Vec<Scalar>) -> Result<(), String> {
    let (mut wall_time, mut step) = (0.0, 0i64);
    let mut summaries = Vec::new();
    for (n, f) in fields(payload)? {
        match (n, f) {
            (1, Field::Fixed64(b)) => wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Bytes(b)) => summaries.push(b),
            _ => {}
        }
    }
    for summary in summaries {
        for (n, f) in fields(summary)? {
            let (1, Field::Bytes(value)) = (n, f) else { continue };
            let (mut tag, mut simple) = (None, None);
            for (n, f) in fields(value)? {
                match (n, f) {
                    (1, Field::Bytes(t)) => {
                        tag = Some(String::from_utf8(t.to_vec()).map_err(|_| "a tag not in UTF-8")?);
                    }
                    (2, Field::Fixed32(v)) => simple = Some(f32::from_le_bytes(v)),
                    _ => {}
                }
            }
            if let (Some(tag), Some(value)) = (tag, simple) {
                out.push(Scalar { tag, step, value, wall_time });
            }
        }
    }
    Ok(())
}

/// Whether `path` names an event file (its name holds `tfevents`, as TensorBoard looks for).
pub fn is_event_file(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("tfevents"))
}

/// The event files of a directory ([`is_event_file`]), oldest name first.
///
/// # Errors
/// When the directory cannot be listed.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>, TensorBoardError> {
    let io = |source| TensorBoardError::Io { op: "listing", path: dir.into(), source };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if is_event_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crc_is_castagnolis_masked_as_tensorflow_masks_it() {
        // CRC-32C's check value (the CRC of "123456789") is 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let expected = 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), expected);
        // TensorFlow's first record of every file: the 8-byte length 24 of a version event.
        assert_ne!(masked_crc(&24u64.to_le_bytes()), crc32c::crc32c(&24u64.to_le_bytes()));
    }

    #[test]
    fn scalars_read_back_with_their_steps_tags_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("tb/run")).unwrap();
        w.scalars(1, &[("lm loss", 10.5), ("learning-rate", 3e-4)]).unwrap();
        w.scalars(300, &[("lm loss vs samples", -0.0)]).unwrap();
        w.scalars(1 << 40, &[("grad-norm", f32::INFINITY)]).unwrap();
        let files = event_files(&dir.path().join("tb/run")).unwrap();
        assert_eq!(files, [w.path().to_path_buf()]);
        assert!(w.path().file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
        let got: Vec<_> =
            read_scalars(w.path()).unwrap().into_iter().map(|s| (s.tag, s.step, s.value.to_bits())).collect();
        let want = [
            ("lm loss", 1, 10.5f32),
            ("learning-rate", 1, 3e-4),
            ("lm loss vs samples", 300, -0.0),
            ("grad-norm", 1 << 40, f32::INFINITY),
        ]
        .map(|(t, s, v)| (t.to_string(), s, v.to_bits()));
        assert_eq!(got, want);
        // The version record comes first: 8 + 4 bytes of header, then a double and the string.
        let bytes = fs::read(w.path()).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(&bytes[12 + len - FILE_VERSION.len()..12 + len], FILE_VERSION.as_bytes());
    }

    #[test]
    fn a_flipped_byte_is_found_and_a_cut_record_ends_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(7, &[("lm loss", 2.0)]).unwrap();
        w.scalars(8, &[("lm loss", 1.5)]).unwrap();
        let good = fs::read(w.path()).unwrap();
        // Cut inside the last record: the first scalar still reads.
        fs::write(w.path(), &good[..good.len() - 3]).unwrap();
        let s = read_scalars(w.path()).unwrap();
        assert_eq!(s.iter().map(|s| s.step).collect::<Vec<_>>(), [7]);
        // A flipped bit in the value: the payload's CRC catches it.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        fs::write(w.path(), &bad).unwrap();
        let e = read_scalars(w.path()).unwrap_err().to_string();
        assert!(e.contains("the record's CRC does not match"), "{e}");
    }

    #[test]
    fn a_second_writer_in_the_same_second_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(event_files(dir.path()).unwrap().len(), 2);
    }
}
