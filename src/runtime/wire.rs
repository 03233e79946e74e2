//! How activations and their gradients travel between pipeline stages: fp32, or bf16 when the
//! chunks compute in bf16 on a device (their outputs and input gradients are bf16 there, so the
//! bf16 message carries the same values in half the bytes, as Megatron sends them), with an
//! optional CRC32 of the payload appended (two bf16 elements, or one f32, holding its bits).
//! Payloads are [`Hidden`] values: a bf16 stage's come down from the device as bf16 and go out
//! without a conversion, and arrive as bf16 for the next stage's upload.

use half::bf16;

use crate::comm::{Buf, DType};
use crate::models::gpt::Hidden;

/// See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    pub dtype: DType,
    pub checksums: bool,
}

impl Wire {
    /// Elements of a message carrying `n` values (the checksum included).
    pub fn elements(&self, n: usize) -> usize {
        n + if !self.checksums {
            0
        } else if self.dtype == DType::Bf16 {
            2
        } else {
            1
        }
    }

    /// Bytes on the wire for `n` values.
    pub fn bytes(&self, n: usize) -> u64 {
        (self.elements(n) * self.dtype.size()) as u64
    }

    /// The message for `values` (fp32 rounded to nearest even for a bf16 wire: exact for values
    /// a bf16 device produced; bf16 values go as they are).
    pub fn pack(&self, values: Hidden) -> Buf {
        match self.dtype {
            DType::Bf16 => {
                let mut v: Vec<bf16> = match values {
                    Hidden::Bf16(v) => v,
                    Hidden::F32(v) => v.into_iter().map(bf16::from_f32).collect(),
                };
                if self.checksums {
                    let crc = crc32fast::hash(bytemuck::cast_slice(&v));
                    v.push(bf16::from_bits(crc as u16));
                    v.push(bf16::from_bits((crc >> 16) as u16));
                }
                Buf::Bf16(v)
            }
            _ => {
                let mut v = values.into_f32();
                if self.checksums {
                    let crc = crc32fast::hash(bytemuck::cast_slice(&v));
                    v.push(f32::from_bits(crc));
                }
                Buf::F32(v)
            }
        }
    }

    /// The values of a received message (bf16 stay bf16), its checksum checked; the error says
    /// what is wrong (`what` names the message, `from` its sender).
    pub fn unpack(&self, buf: Buf, what: &str, from: usize) -> Result<Hidden, String> {
        let bad = |want: u32, got: u32| {
            format!(
                "corrupt {what} from rank {from} (checksum {got:08x}, sent {want:08x}): the link from rank {from} damaged it"
            )
        };
        match (self.dtype, buf) {
            (DType::Bf16, Buf::Bf16(mut v)) => {
                if self.checksums {
                    let (Some(hi), Some(lo)) = (v.pop(), v.pop()) else {
                        return Err(format!("{what} from rank {from} is shorter than its checksum"));
                    };
                    let want = u32::from(lo.to_bits()) | (u32::from(hi.to_bits()) << 16);
                    let got = crc32fast::hash(bytemuck::cast_slice(&v));
                    if want != got {
                        return Err(bad(want, got));
                    }
                }
                Ok(Hidden::Bf16(v))
            }
            (DType::F32, Buf::F32(mut v)) => {
                if self.checksums {
                    let Some(want) = v.pop().map(f32::to_bits) else {
                        return Err(format!("{what} from rank {from} is shorter than its checksum"));
                    };
                    let got = crc32fast::hash(bytemuck::cast_slice(&v));
                    if want != got {
                        return Err(bad(want, got));
                    }
                }
                Ok(Hidden::F32(v))
            }
            (want, other) => Err(format!(
                "{what} from rank {from} arrived as {:?}, expected {want:?} (do both ranks run the same precision?)",
                other.dtype()
            )),
        }
    }

    /// Flips one mantissa bit of the first value (fault injection: a damaged link).
    pub fn corrupt(buf: &mut Buf) {
        match buf {
            Buf::F32(v) => {
                if let Some(x) = v.first_mut() {
                    *x = f32::from_bits(x.to_bits() ^ 0x0040_0000);
                }
            }
            Buf::Bf16(v) => {
                if let Some(x) = v.first_mut() {
                    *x = bf16::from_bits(x.to_bits() ^ 0x0040);
                }
            }
            Buf::I64(v) => {
                if let Some(x) = v.first_mut() {
                    *x ^= 1 << 20;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_values(n: usize) -> Vec<f32> {
        // Values a bf16 device produces: exactly representable in bf16.
        (0..n).map(|i| bf16::from_f32((i as f32 - 7.3) * 0.37).to_f32()).collect()
    }

    #[test]
    fn messages_round_trip_bit_for_bit_and_count_their_bytes() {
        for dtype in [DType::F32, DType::Bf16] {
            for checksums in [false, true] {
                let w = Wire { dtype, checksums };
                let v = bf16_values(33);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let as_bf16 = Hidden::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect());
                for sent in [Hidden::F32(v.clone()), as_bf16] {
                    let buf = w.pack(sent);
                    assert_eq!(buf.len(), w.elements(33));
                    assert_eq!(buf.dtype(), dtype);
                    assert_eq!(w.bytes(33), (buf.len() * dtype.size()) as u64);
                    let back = w.unpack(buf, "activation", 1).expect("unpacks").into_f32();
                    assert_eq!(bits(&back), bits(&v), "{dtype:?} checksums={checksums}");
                }
            }
        }
        assert_eq!(Wire { dtype: DType::Bf16, checksums: true }.bytes(10), 24);
        assert_eq!(Wire { dtype: DType::F32, checksums: true }.bytes(10), 44);
    }

    #[test]
    fn a_damaged_message_is_caught_with_the_sender_named() {
        for dtype in [DType::F32, DType::Bf16] {
            let w = Wire { dtype, checksums: true };
            let mut buf = w.pack(Hidden::F32(bf16_values(16)));
            Wire::corrupt(&mut buf);
            let err = w.unpack(buf, "gradient", 3).expect_err("checksum mismatch");
            assert!(err.contains("corrupt gradient from rank 3"), "{err}");
        }
    }

    #[test]
    fn a_message_of_the_other_precision_is_an_error() {
        let w = Wire { dtype: DType::Bf16, checksums: false };
        let err = w.unpack(Buf::F32(vec![1.0; 4]), "activation", 0).expect_err("dtype mismatch");
        assert!(err.contains("arrived as F32, expected Bf16"), "{err}");
        let short = Wire { dtype: DType::F32, checksums: true }.unpack(Buf::F32(vec![]), "activation", 2);
        assert!(short.is_err());
    }
}
