//! Streaming readers of raw corpora: JSON lines (`.jsonl`, optionally gzip-compressed) and plain
//! text (one document per line, or per blank-line-separated paragraph), and the per-record
//! extraction of a document's text.
//!
//! The reader only splits the byte stream into records (each tagged with its first line number);
//! JSON parsing and UTF-8 checking happen in [`extract_text`], which the preprocessing workers run
//! in parallel. A record that cannot be turned into text is *malformed*: reported with its line
//! number and reason, never silently dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::MultiGzDecoder;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// How a corpus file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// One JSON object per line; the document is the string under the JSON key.
    JsonLines,
    /// Plain text, one document per line.
    TextLines,
    /// Plain text, documents separated by one or more blank lines.
    TextParagraphs,
}

impl InputFormat {
    /// The format suggested by a file name (`.jsonl`, `.json`, `.ndjson`, with or without
    /// `.gz`, are JSON lines; anything else is text, one document per line).
    pub fn from_path(path: &Path) -> InputFormat {
        let name = path.to_string_lossy().to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if [".jsonl", ".json", ".ndjson"].iter().any(|e| name.ends_with(e)) {
            InputFormat::JsonLines
        } else {
            InputFormat::TextLines
        }
    }
}

/// Errors of reading a corpus.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path} near line {line}: {source}")]
    Io {
        path: PathBuf,
        line: u64,
        #[source]
        source: std::io::Error,
    },
}

/// One raw record: the bytes of a line (or paragraph) and the number of its first line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawRecord {
    pub line: u64,
    pub bytes: Vec<u8>,
}

/// Counts the bytes read from the underlying file (compressed bytes for `.gz`).
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Splits a corpus file into records, streaming (memory independent of the file size).
pub struct RecordReader {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    format: InputFormat,
    line: u64,
    file_bytes_read: Arc<AtomicU64>,
    file_len: u64,
    pending: Vec<u8>,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("line", &self.line)
            .finish()
    }
}

impl RecordReader {
    /// Opens `path` (gzip if it ends in `.gz`) as records of `format`.
    ///
    /// # Errors
    /// [`InputError::Open`] if the file cannot be opened.
    pub fn open(path: &Path, format: InputFormat) -> Result<Self, InputError> {
        let io = |source| InputError::Open { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let count = Arc::new(AtomicU64::new(0));
        let counted = CountingReader { inner: file, count: count.clone() };
        let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        let reader: Box<dyn BufRead + Send> = if gz {
            let decoder = MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counted));
            Box::new(BufReader::with_capacity(1 << 20, decoder))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, counted))
        };
        Ok(RecordReader {
            path: path.to_owned(),
            reader,
            format,
            line: 0,
            file_bytes_read: count,
            file_len,
            pending: Vec::new(),
        })
    }

    /// Size of the file on disk (compressed size for `.gz`).
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// A shared counter of the file bytes consumed so far, for progress display.
    pub fn file_bytes_read(&self) -> Arc<AtomicU64> {
        self.file_bytes_read.clone()
    }

    fn read_line(&mut self, buf: &mut Vec<u8>) -> Result<bool, InputError> {
        buf.clear();
        let n = self.reader.read_until(b'\n', buf).map_err(|source| InputError::Io {
            path: self.path.clone(),
            line: self.line + 1,
            source,
        })?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            buf.pop();
        }
        Ok(true)
    }

    /// The next record, or `None` at the end of the file. Blank lines are skipped in JSON-lines
    /// input (they are not documents) and separate paragraphs in paragraph mode; in line mode an
    /// empty line is an empty document.
    ///
    /// # Errors
    /// [`InputError::Io`] on a read or decompression failure.
    pub fn next_record(&mut self) -> Result<Option<RawRecord>, InputError> {
        let mut line = std::mem::take(&mut self.pending);
        match self.format {
            InputFormat::TextLines => {
                let found = self.read_line(&mut line)?;
                Ok(found.then_some(RawRecord { line: self.line, bytes: line }))
            }
            InputFormat::JsonLines => loop {
                if !self.read_line(&mut line)? {
                    return Ok(None);
                }
                if !line.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Some(RawRecord { line: self.line, bytes: line }));
                }
            },
            InputFormat::TextParagraphs => self.next_paragraph(line),
        }
    }

    fn next_paragraph(&mut self, mut line: Vec<u8>) -> Result<Option<RawRecord>, InputError> {
        let mut record = RawRecord::default();
        loop {
            if !self.read_line(&mut line)? {
                break;
            }
            let blank = line.iter().all(u8::is_ascii_whitespace);
            if blank && !record.bytes.is_empty() {
                break;
            }
            if blank {
                continue;
            }
            if record.bytes.is_empty() {
                record.line = self.line;
            } else {
                record.bytes.push(b'\n');
            }
            record.bytes.extend_from_slice(&line);
        }
        self.pending = line;
        Ok((!record.bytes.is_empty()).then_some(record))
    }
}

impl Iterator for RecordReader {
    type Item = Result<RawRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// Finds the string under `key` in a JSON object, skipping every other value without building it.
struct ExtractKey<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for ExtractKey<'_> {
    type Value = Option<Result<String, &'static str>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ExtractKey<'_> {
    type Value = Option<Result<String, &'static str>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_key) = map.next_key_seed(KeyIs(self.0))? {
            if is_key && found.is_none() {
                let value: serde_json::Value = map.next_value()?;
                found = Some(match value {
                    serde_json::Value::String(s) => Ok(s),
                    _ => Err("is not a string"),
                });
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Deserializes a map key to whether it equals the wanted key.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// The text of a record: the JSON string under `json_key`, or the record itself as UTF-8 text.
///
/// # Errors
/// A short reason (not JSON, no such key, not a string, not UTF-8) for a malformed record.
pub fn extract_text(format: InputFormat, json_key: &str, bytes: &[u8]) -> Result<String, String> {
    match format {
        InputFormat::JsonLines => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let found = ExtractKey(json_key)
                .deserialize(&mut de)
                .and_then(|v| de.end().map(|()| v))
                .map_err(|e| format!("not a JSON object: {e}"))?;
            match found {
                Some(Ok(text)) => Ok(text),
                Some(Err(why)) => Err(format!("key {json_key:?} {why}")),
                None => Err(format!("no key {json_key:?}")),
            }
        }
        _ => String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to())),
    }
}

/// Splits text into sentences: after `.`, `!` or `?` (and any closing quotes or brackets) that
/// is followed by whitespace. A simple rule-based stand-in for NLTK's punkt, which Megatron uses;
/// sentences are trimmed and empty ones dropped.
pub fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if !matches!(c, '.' | '!' | '?') {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            if matches!(d, '"' | '\'' | ')' | ']' | '”' | '’' | '.' | '!' | '?') {
                end = j + d.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        if chars.peek().is_none_or(|&(_, d)| d.is_whitespace()) {
            let sentence = text[start..end].trim();
            if !sentence.is_empty() {
                out.push(sentence);
            }
            start = end;
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_extraction() {
        let f = InputFormat::JsonLines;
        assert_eq!(extract_text(f, "text", br#"{"id": 3, "text": "hi \u00e9"}"#), Ok("hi é".into()));
        assert_eq!(extract_text(f, "text", br#"{"meta": {"text": 1}, "text": "x"}"#), Ok("x".into()));
        assert!(extract_text(f, "text", br#"{"id": 3}"#).unwrap_err().contains("no key"));
        assert!(extract_text(f, "text", br#"{"text": 5}"#).unwrap_err().contains("not a string"));
        assert!(extract_text(f, "text", br#"{"text": "a""#).is_err());
        assert!(extract_text(f, "text", br#"[1, 2]"#).is_err());
        assert!(extract_text(f, "text", br#"{"text": "a"} trailing"#).is_err());
        assert!(extract_text(InputFormat::TextLines, "", b"\xff\xfe").is_err());
    }

    #[test]
    fn sentences() {
        assert_eq!(
            split_sentences("Hello there. How are you? I'm fine!  Bye"),
            vec!["Hello there.", "How are you?", "I'm fine!", "Bye"]
        );
        assert_eq!(split_sentences("3.14 is pi. \"Yes.\" Ok"), vec!["3.14 is pi.", "\"Yes.\"", "Ok"]);
        assert!(split_sentences("   ").is_empty());
    }

    #[test]
    fn format_from_name() {
        assert_eq!(InputFormat::from_path(Path::new("a.jsonl.gz")), InputFormat::JsonLines);
        assert_eq!(InputFormat::from_path(Path::new("a.JSON")), InputFormat::JsonLines);
        assert_eq!(InputFormat::from_path(Path::new("a.txt")), InputFormat::TextLines);
    }
}
