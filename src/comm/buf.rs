//! Buffers that travel through a [`super::Comm`]: an owned vector of f32, bf16 or i64, and the
//! element arithmetic the reductions use. The arithmetic is defined once here so every backend
//! folds the same way and produces the same bits.
//!
//! Chunking: a buffer of length L split over a group of n ranks gives chunk c the range
//! `[c·⌊L/n⌋ + min(c, L mod n), …)` of length `⌊L/n⌋ + (c < L mod n)`: the first `L mod n`
//! chunks hold one extra element. Reduce-scatter and all-gather use these ranges.

use std::any::Any;
use std::sync::Arc;

use half::bf16;

/// Element type of a [`Buf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
            DType::I64 => 8,
        }
    }
    pub(crate) fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::Bf16 => 2,
            DType::I64 => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(DType::F32),
            2 => Some(DType::Bf16),
            3 => Some(DType::I64),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::I64 => "i64",
        })
    }
}

/// An owned buffer. Operations take it by value and hand it back, so the in-process backend can
/// move it between threads without copying and a GPU backend can keep it until its stream is done.
#[derive(Debug, Clone, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    I64(Vec<i64>),
}

impl Buf {
    pub fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::Bf16(_) => DType::Bf16,
            Buf::I64(_) => DType::I64,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::Bf16(v) => v.len(),
            Buf::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A zero-filled buffer.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => Buf::F32(vec![0.0; len]),
            DType::Bf16 => Buf::Bf16(vec![bf16::ZERO; len]),
            DType::I64 => Buf::I64(vec![0; len]),
        }
    }
    /// The raw little-endian bytes (all supported targets are little-endian).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Buf::F32(v) => bytemuck::cast_slice(v),
            Buf::Bf16(v) => bytemuck::cast_slice(v),
            Buf::I64(v) => bytemuck::cast_slice(v),
        }
    }
    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self {
            Buf::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn into_bf16(self) -> Option<Vec<bf16>> {
        match self {
            Buf::Bf16(v) => Some(v),
            _ => None,
        }
    }
    pub fn into_i64(self) -> Option<Vec<i64>> {
        match self {
            Buf::I64(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("troupe's wire format assumes a little-endian target");

/// Reduction applied by all-reduce and reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the group size (integer division for i64).
    Avg,
    Max,
}

/// Element arithmetic shared by all backends.
pub(crate) trait Elem: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
    fn add(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn div(a: Self, n: usize) -> Self;
    fn slice(b: &Buf) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> Buf;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
    fn max(a: Self, b: Self) -> Self {
        // NaN-propagating: IEEE `max` would drop the NaN.
        if a.is_nan() {
            a
        } else if b.is_nan() || b > a {
            b
        } else {
            a
        }
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as f32
    }
    fn slice(b: &Buf) -> Option<&[Self]> {
        if let Buf::F32(v) = b { Some(v) } else { None }
    }
    fn wrap(v: Vec<Self>) -> Buf {
        Buf::F32(v)
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn add(a: Self, b: Self) -> Self {
        bf16::from_f32(a.to_f32() + b.to_f32())
    }
    fn max(a: Self, b: Self) -> Self {
        bf16::from_f32(<f32 as Elem>::max(a.to_f32(), b.to_f32()))
    }
    fn div(a: Self, n: usize) -> Self {
        bf16::from_f32(a.to_f32() / n as f32)
    }
    fn slice(b: &Buf) -> Option<&[Self]> {
        if let Buf::Bf16(v) = b { Some(v) } else { None }
    }
    fn wrap(v: Vec<Self>) -> Buf {
        Buf::Bf16(v)
    }
}

impl Elem for i64 {
    const DTYPE: DType = DType::I64;
    fn add(a: Self, b: Self) -> Self {
        a.wrapping_add(b)
    }
    fn max(a: Self, b: Self) -> Self {
        a.max(b)
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as i64
    }
    fn slice(b: &Buf) -> Option<&[Self]> {
        if let Buf::I64(v) = b { Some(v) } else { None }
    }
    fn wrap(v: Vec<Self>) -> Buf {
        Buf::I64(v)
    }
}

/// `acc[i] = acc[i] ⊕ x[i]` with the received partial on the left, so a ring fold is
/// `((x_{c+1} ⊕ x_{c+2}) ⊕ …)` on every backend.
pub(crate) fn fold_into<T: Elem>(op: ReduceOp, partial: &[T], own: &mut [T]) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            for (o, p) in own.iter_mut().zip(partial) {
                *o = T::add(*p, *o);
            }
        }
        ReduceOp::Max => {
            for (o, p) in own.iter_mut().zip(partial) {
                *o = T::max(*p, *o);
            }
        }
    }
}

/// Divides by `n` for [`ReduceOp::Avg`]; no-op otherwise.
pub(crate) fn finish<T: Elem>(op: ReduceOp, n: usize, xs: &mut [T]) {
    if op == ReduceOp::Avg && n > 1 {
        for x in xs {
            *x = T::div(*x, n);
        }
    }
}

/// Range of chunk `c` when `len` elements are split over `n` ranks (see the module docs).
pub fn chunk_range(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    let base = len / n;
    let rem = len % n;
    let start = c * base + c.min(rem);
    let size = base + usize::from(c < rem);
    start..start + size
}

/// Bytes received from the wire, stored 8-byte aligned so they can be viewed as any element type.
/// A buffer taken from a [`BytePool`] goes back to it when dropped, so steady-state receives do
/// not allocate (or page-fault) per frame.
#[derive(Debug)]
pub(crate) struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
    home: Option<Arc<BytePool>>,
}

impl AlignedBytes {
    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.give(std::mem::take(&mut self.words));
        }
    }
}

/// Recycled receive buffers (a few per connection).
#[derive(Debug, Default)]
pub(crate) struct BytePool {
    free: std::sync::Mutex<Vec<Vec<u64>>>,
}

impl BytePool {
    const KEEP: usize = 8;

    /// A buffer of `len` bytes; its contents are unspecified (the caller overwrites them).
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> AlignedBytes {
        let need = len.div_ceil(8);
        let reused = match self.free.lock() {
            Ok(mut f) => f.iter().position(|w| w.len() >= need).map(|i| f.swap_remove(i)),
            Err(_) => None,
        };
        AlignedBytes { words: reused.unwrap_or_else(|| vec![0u64; need]), len, home: Some(self.clone()) }
    }

    fn give(&self, words: Vec<u64>) {
        if let Ok(mut f) = self.free.lock()
            && f.len() < Self::KEEP
        {
            f.push(words);
        }
    }
}

/// A received message: moved in-process, or raw bytes from a socket.
#[derive(Debug)]
pub(crate) enum Payload {
    Buf(Buf),
    Bytes(DType, AlignedBytes),
    /// A lent `Arc<Vec<T>>` (in-process shared-memory collectives only).
    Shared(DType, usize, Arc<dyn Any + Send + Sync>),
}

impl Payload {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Payload::Buf(b) => b.dtype(),
            Payload::Bytes(d, _) | Payload::Shared(d, _, _) => *d,
        }
    }
    pub(crate) fn len(&self) -> usize {
        match self {
            Payload::Buf(b) => b.len(),
            Payload::Bytes(d, a) => a.len / d.size(),
            Payload::Shared(_, n, _) => *n,
        }
    }
    /// Views the elements; `None` when the dtype differs.
    pub(crate) fn elems<T: Elem>(&self) -> Option<&[T]> {
        match self {
            Payload::Buf(b) => T::slice(b),
            Payload::Bytes(_, a) => bytemuck::try_cast_slice(a.bytes()).ok(),
            Payload::Shared(_, _, a) => a.downcast_ref::<Vec<T>>().map(Vec::as_slice),
        }
    }
    /// Turns the payload into an owned buffer (moves when it already is one).
    pub(crate) fn into_buf(self) -> Buf {
        match self {
            Payload::Buf(b) => b,
            Payload::Bytes(d, a) => match d {
                DType::F32 => Buf::F32(pod_vec(a.bytes())),
                DType::Bf16 => Buf::Bf16(pod_vec(a.bytes())),
                DType::I64 => Buf::I64(pod_vec(a.bytes())),
            },
            Payload::Shared(d, _, a) => {
                let cloned = match d {
                    DType::F32 => a.downcast_ref::<Vec<f32>>().map(|v| Buf::F32(v.clone())),
                    DType::Bf16 => a.downcast_ref::<Vec<bf16>>().map(|v| Buf::Bf16(v.clone())),
                    DType::I64 => a.downcast_ref::<Vec<i64>>().map(|v| Buf::I64(v.clone())),
                };
                cloned.unwrap_or_else(|| Buf::zeros(d, 0))
            }
        }
    }
}

fn pod_vec<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    match bytemuck::try_cast_slice::<u8, T>(b) {
        Ok(s) => s.to_vec(),
        Err(_) => b.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_exactly() {
        for len in 0..40 {
            for n in 1..9 {
                let mut next = 0;
                for c in 0..n {
                    let r = chunk_range(len, n, c);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn max_propagates_nan() {
        assert!(<f32 as Elem>::max(f32::NAN, 1.0).is_nan());
        assert!(<f32 as Elem>::max(1.0, f32::NAN).is_nan());
        assert_eq!(<f32 as Elem>::max(1.0, 2.0), 2.0);
    }
}
