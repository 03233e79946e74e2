//! The collective algorithms, written once over a [`Link`] so that every backend moves data in
//! the same order and folds in the same order. That is what makes results bit-identical across
//! backends.
//!
//! Ring, n ranks, group rank i, `next = i+1`, `prev = i-1` (mod n). The buffer is cut into n
//! chunks ([`chunk_range`]) and each chunk into segments of at most `segment_elems` elements, so
//! a segment can travel on while the next one is still being reduced (pipelining).
//!
//! Reduce-scatter: at step k (0 ≤ k < n−1) rank i sends chunk i−1−k and receives chunk i−2−k,
//! folding `received ⊕ own`. Chunk c therefore ends complete on rank c with the fixed fold order
//! `((x_{c+1} ⊕ x_{c+2}) ⊕ …) ⊕ x_{c+n}` (indices mod n), whatever the backend.
//!
//! All-gather: rank i starts with chunk i; at step k it sends chunk i−k and receives chunk
//! i−1−k. All-reduce = reduce-scatter, then all-gather (steps numbered from n), then the
//! average's division. Broadcast is a segmented chain starting at the root.

use std::ops::Range;

use super::CommError;
use super::buf::{Elem, ReduceOp, chunk_range, finish, fold_into};
use super::group::Ctx;
use super::link::Link;

fn segments(r: Range<usize>, seg: usize) -> impl Iterator<Item = (u32, Range<usize>)> {
    let seg = seg.max(1);
    let count = r.len().div_ceil(seg);
    (0..count).map(move |s| {
        let a = r.start + s * seg;
        (s as u32, a..(a + seg).min(r.end))
    })
}

/// Ring reduce-scatter; on return chunk `me` of `buf` holds the reduced values (not yet divided
/// for an average). Other chunks hold partial sums.
pub(crate) fn reduce_scatter_phase<T: Elem, L: Link>(
    cx: &Ctx<L>,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    let (n, i, len) = (cx.size(), cx.me(), buf.len());
    if n == 1 {
        return Ok(());
    }
    let (next, prev) = ((i + 1) % n, (i + n - 1) % n);
    let seg = cx.segment_elems::<T>();
    for (s, r) in segments(chunk_range(len, n, (i + n - 1) % n), seg) {
        cx.send(next, 0, s, &buf[r])?;
    }
    for k in 0..n - 1 {
        let rc = (i + 2 * n - 2 - k) % n;
        for (s, r) in segments(chunk_range(len, n, rc), seg) {
            let p = cx.recv::<T>(prev, k as u32, s, r.len())?;
            let part = cx.elems::<T>(&p, prev, k as u32, s)?;
            fold_into(op, part, &mut buf[r.clone()]);
            if k + 1 < n - 1 {
                cx.send(next, k as u32 + 1, s, &buf[r])?;
            }
        }
    }
    Ok(())
}

/// Ring all-gather; on entry chunk `me` of `buf` holds this rank's data. Steps are numbered from
/// `step0` so an all-reduce's two phases never share a key.
pub(crate) fn all_gather_phase<T: Elem, L: Link>(
    cx: &Ctx<L>,
    buf: &mut [T],
    step0: u32,
) -> Result<(), CommError> {
    let (n, i, len) = (cx.size(), cx.me(), buf.len());
    if n == 1 {
        return Ok(());
    }
    let (next, prev) = ((i + 1) % n, (i + n - 1) % n);
    let seg = cx.segment_elems::<T>();
    for (s, r) in segments(chunk_range(len, n, i), seg) {
        cx.send(next, step0, s, &buf[r])?;
    }
    for k in 0..n - 1 {
        let rc = (i + n - 1 - k) % n;
        let step = step0 + k as u32;
        for (s, r) in segments(chunk_range(len, n, rc), seg) {
            let p = cx.recv::<T>(prev, step, s, r.len())?;
            buf[r.clone()].copy_from_slice(cx.elems::<T>(&p, prev, step, s)?);
            if k + 1 < n - 1 {
                cx.send(next, step + 1, s, &buf[r])?;
            }
        }
    }
    Ok(())
}

pub(crate) fn all_reduce<T: Elem, L: Link>(
    cx: &Ctx<L>,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    reduce_scatter_phase(cx, buf, op)?;
    all_gather_phase(cx, buf, cx.size() as u32)?;
    finish(op, cx.size(), buf);
    Ok(())
}

pub(crate) fn reduce_scatter<T: Elem, L: Link>(
    cx: &Ctx<L>,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    reduce_scatter_phase(cx, buf, op)?;
    let r = chunk_range(buf.len(), cx.size(), cx.me());
    finish(op, cx.size(), &mut buf[r]);
    Ok(())
}

/// Segmented chain broadcast from group rank `root`.
pub(crate) fn broadcast<T: Elem, L: Link>(cx: &Ctx<L>, buf: &mut [T], root: usize) -> Result<(), CommError> {
    let (n, i) = (cx.size(), cx.me());
    if n == 1 {
        return Ok(());
    }
    let pos = (i + n - root) % n;
    let (next, prev) = ((i + 1) % n, (i + n - 1) % n);
    for (s, r) in segments(0..buf.len(), cx.segment_elems::<T>()) {
        if pos > 0 {
            let p = cx.recv::<T>(prev, 0, s, r.len())?;
            buf[r.clone()].copy_from_slice(cx.elems::<T>(&p, prev, 0, s)?);
        }
        if pos + 1 < n {
            cx.send(next, 0, s, &buf[r])?;
        }
    }
    Ok(())
}
