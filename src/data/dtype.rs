//! Element types of Megatron's `.bin` files and their one-byte codes in the `.idx` header.
//!
//! The code table is Megatron-LM's `DType` enum (identical in the legacy and the core
//! `indexed_dataset.py`): 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
//! 8 uint16. Token data is uint16 when the vocabulary has fewer than 65,500 entries and int32
//! otherwise (`DType.optimal_dtype`); troupe reads and writes those two as tokens and recognises
//! the others so that it can name them in an error.

/// One element type of a `.bin` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F64,
    F32,
    U16,
}

/// Vocabulary size from which tokens no longer fit the uint16 encoding (Megatron's threshold).
pub const UINT16_VOCAB_LIMIT: usize = 65_500;

impl DType {
    /// The header code of this type.
    pub fn code(self) -> u8 {
        match self {
            DType::U8 => 1,
            DType::I8 => 2,
            DType::I16 => 3,
            DType::I32 => 4,
            DType::I64 => 5,
            DType::F64 => 6,
            DType::F32 => 7,
            DType::U16 => 8,
        }
    }

    /// The type with header code `code`, if there is one.
    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::U8,
            2 => DType::I8,
            3 => DType::I16,
            4 => DType::I32,
            5 => DType::I64,
            6 => DType::F64,
            7 => DType::F32,
            8 => DType::U16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// NumPy's name for the type, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::U16 => "uint16",
        }
    }

    /// Whether troupe reads this type as token ids.
    pub fn is_token_type(self) -> bool {
        matches!(self, DType::U16 | DType::I32)
    }

    /// The token type Megatron picks for a vocabulary of `vocab_size` entries.
    pub fn for_vocab_size(vocab_size: usize) -> DType {
        if vocab_size < UINT16_VOCAB_LIMIT { DType::U16 } else { DType::I32 }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_megatron() {
        for code in 1..=8u8 {
            let dtype = DType::from_code(code).expect("known code");
            assert_eq!(dtype.code(), code);
        }
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(9), None);
        assert_eq!(DType::U16.code(), 8);
        assert_eq!(DType::I32.code(), 4);
    }

    #[test]
    fn vocab_threshold() {
        assert_eq!(DType::for_vocab_size(50_257), DType::U16);
        assert_eq!(DType::for_vocab_size(65_499), DType::U16);
        assert_eq!(DType::for_vocab_size(65_500), DType::I32);
    }
}
