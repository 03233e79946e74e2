//! ZB-H2 by greedy list scheduling, the way the zero-bubble authors' automatic scheduler works
//! (with its memory cap standing in for "H2"): the ranks are played on unit-time ticks
//! (F = I = W = 1, free communication) and, whenever a rank is free, it takes
//!
//! 1. the input-gradient backward I of its oldest microbatch whose output gradient has arrived
//!    (I is on the critical path back to rank 0);
//! 2. else the next forward, if its activation has arrived and fewer than `2(p−1−r)+1`
//!    microbatches are in flight on rank r (the number that fits before rank r's first gradient
//!    can come back, so rank 0 holds at most `2p−1`);
//! 3. else the oldest deferred weight-gradient W.
//!
//! The order of ops each rank took is the schedule. Only the order is kept; the simulator later
//! times it with the real costs.

use super::ir::Op;

/// What one rank has done so far.
struct Rank {
    ops: Vec<Op>,
    next_f: usize,
    next_i: usize,
    next_w: usize,
}

/// Compute order of ZB-H2 for `pp` ranks and `m` microbatches (one chunk per rank), or `None`
/// if the greedy play did not finish in the ticks it can possibly need (a bug, never expected).
pub(crate) fn zb_h2(pp: usize, m: usize) -> Option<Vec<Vec<Op>>> {
    const NEVER: usize = usize::MAX;
    // tick at which the F / I of (rank, mb) has finished
    let mut f_done = vec![NEVER; pp * m];
    let mut i_done = vec![NEVER; pp * m];
    let mut ranks: Vec<Rank> =
        (0..pp).map(|_| Rank { ops: Vec::with_capacity(3 * m), next_f: 0, next_i: 0, next_w: 0 }).collect();
    let mut tick = 0usize;
    // every tick in which nothing can run waits on a chain of at most p ranks; 3m ops per rank
    let limit = 3 * m * pp + 2 * pp + 8;
    while ranks.iter().any(|r| r.next_w < m) {
        if tick > limit {
            return None;
        }
        for (r, rank) in ranks.iter_mut().enumerate() {
            let ahead = 2 * (pp - 1 - r) + 1;
            let (nf, ni) = (rank.next_f, rank.next_i);
            let grad_ready = ni < nf && (r + 1 == pp || i_done[(r + 1) * m + ni] <= tick);
            let act_ready = nf < m && (r == 0 || f_done[(r - 1) * m + nf] <= tick);
            if grad_ready {
                rank.ops.push(Op::BackwardInput { mb: ni as u32, chunk: 0 });
                i_done[r * m + ni] = tick + 1;
                rank.next_i += 1;
            } else if act_ready && nf - ni < ahead && nf - rank.next_w < 2 * pp - 1 {
                rank.ops.push(Op::Forward { mb: nf as u32, chunk: 0 });
                f_done[r * m + nf] = tick + 1;
                rank.next_f += 1;
            } else if rank.next_w < rank.next_i {
                rank.ops.push(Op::BackwardWeight { mb: rank.next_w as u32, chunk: 0 });
                rank.next_w += 1;
            }
        }
        tick += 1;
    }
    Some(ranks.into_iter().map(|r| r.ops).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_once_in_order() {
        for (pp, m) in [(1, 1), (2, 2), (3, 7), (5, 9)] {
            let ranks = zb_h2(pp, m).unwrap();
            for ops in &ranks {
                assert_eq!(ops.len(), 3 * m);
                let pos = |want: Op| ops.iter().position(|&o| o == want).unwrap();
                for mb in 0..m as u32 {
                    let f = pos(Op::Forward { mb, chunk: 0 });
                    let i = pos(Op::BackwardInput { mb, chunk: 0 });
                    assert!(f < i && i < pos(Op::BackwardWeight { mb, chunk: 0 }));
                }
            }
        }
    }
}
