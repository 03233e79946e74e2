//! Token + position embedding on the GPU (`cuda/embedding.cu`): twins of
//! `Backend::encoder_forward` / `encoder_backward`.
//!
//! Shapes: tokens `[B, T]` u32; `out`, `dout` `[B, T, C]`, `wte` `[V, C]` and `wpe` `[≥ T, C]` of
//! `dtype`; the parameter gradients `dwte` `[V, C]` and `dwpe` `[≥ T, C]` are **fp32 for either
//! dtype** (Megatron's rule: parameter gradients are accumulated in fp32 across microbatches).
//! Forward overwrites `out`; backward **accumulates** into `dwte` and `dwpe` in fp32, never
//! rounding them to bf16.
//!
//! Deterministic backward without atomics: `dwpe[t]` is summed over the batch in order by one
//! thread per channel; for `dwte` the host groups the positions by token ([`TokenRuns`], a stable
//! sort, so each token's positions stay in increasing order) and one block per (token, channel
//! range) adds that token's rows in position order. The grouping is uploaded into a workspace the
//! **caller** allocates once ([`backward_workspace_bytes`]); the backward therefore takes the
//! tokens on the host, where the data loader has them anyway, and validates them there.
//!
//! The `_vec` kernels (16-byte accesses) are chosen as in [`super::layernorm`]: C a multiple of
//! 16 / element size and every pointer's byte offset a multiple of 16 (in the bf16 `_vec` kernels a
//! pack of 8 fp32 gradient values is two 16-byte accesses).

use super::{ELEMENTWISE_BLOCK, check_len, grid_1d};
use crate::gpu::{Arg, DType, Dev, Gpu, GpuError};

/// Checks the dimensions are non-zero and fit the kernels' 32-bit parameters; returns them as u32.
fn dims<const K: usize>(op: &'static str, named: [(&str, usize); K]) -> Result<[u32; K], GpuError> {
    let mut out = [0u32; K];
    for (o, (what, n)) in out.iter_mut().zip(named) {
        if n == 0 {
            return Err(GpuError::Shape { op, detail: format!("{what} is zero") });
        }
        *o = u32::try_from(n)
            .map_err(|_| GpuError::Shape { op, detail: format!("{what} = {n} does not fit in 32 bits") })?;
    }
    Ok(out)
}

/// Elements per thread access and the kernel-name infix for the chosen variant.
fn variant(dtype: DType, c: usize, offsets: &[usize]) -> (usize, &'static str) {
    let pack = 16 / dtype.size();
    if c.is_multiple_of(pack) && offsets.iter().all(|o| o.is_multiple_of(16)) {
        (pack, "vec_")
    } else {
        (1, "")
    }
}

/// `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]`. `tokens` is a device buffer of `B·T` u32; a token
/// id ≥ `v` cannot be checked here (it is on the device) and yields a row of NaN, never an
/// out-of-bounds read.
///
/// # Errors
/// [`GpuError::Shape`] when a buffer is too short or a dimension is zero or too large.
#[allow(clippy::too_many_arguments)]
pub fn encoder_forward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    out: Dev<'_, G::Buf>,
    tokens: Dev<'_, G::Buf>,
    wte: Dev<'_, G::Buf>,
    wpe: Dev<'_, G::Buf>,
    b: usize,
    t: usize,
    c: usize,
    v: usize,
) -> Result<(), GpuError> {
    const OP: &str = "encoder_forward";
    let [n32, t32, c32, v32] = dims(OP, [("B·T", b * t), ("T", t), ("C", c), ("V", v)])?;
    let n = b * t;
    check_len(gpu, OP, "out", out, n * c, dtype)?;
    check_len(gpu, OP, "tokens", tokens, n, DType::F32)?; // u32: 4 bytes, like F32
    check_len(gpu, OP, "wte", wte, v * c, dtype)?;
    check_len(gpu, OP, "wpe", wpe, t * c, dtype)?;
    let (pack, infix) = variant(dtype, c, &[out.offset, wte.offset, wpe.offset]);
    gpu.launch(
        &format!("encoder_forward_{infix}{}", dtype.suffix()),
        grid_1d(OP, n * c / pack, ELEMENTWISE_BLOCK)?,
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[
            Arg::Ptr(out),
            Arg::Ptr(tokens),
            Arg::Ptr(wte),
            Arg::Ptr(wpe),
            Arg::U32(n32),
            Arg::U32(t32),
            Arg::U32(c32),
            Arg::U32(v32),
        ],
    )
}

/// The positions `0..N` grouped by token for the `dwte` kernel: `positions` sorted stably by
/// token id, split into runs of one token each (`run_tokens[u]` owns
/// `positions[run_starts[u]..run_starts[u + 1]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRuns {
    pub positions: Vec<u32>,
    pub run_tokens: Vec<u32>,
    pub run_starts: Vec<u32>,
}

impl TokenRuns {
    /// Groups `tokens` (ids below `v`).
    ///
    /// # Errors
    /// [`GpuError::Shape`] naming the first token id ≥ `v` and its position, or when there are
    /// 2^32 or more positions.
    pub fn new(op: &'static str, tokens: &[u32], v: usize) -> Result<Self, GpuError> {
        let n = u32::try_from(tokens.len()).map_err(|_| GpuError::Shape {
            op,
            detail: format!("{} tokens do not fit in 32 bits", tokens.len()),
        })?;
        if let Some(i) = tokens.iter().position(|&tok| tok as usize >= v) {
            return Err(GpuError::Shape {
                op,
                detail: format!(
                    "token id {} at position {i} is outside the vocabulary of {v} rows",
                    tokens[i]
                ),
            });
        }
        let mut positions: Vec<u32> = (0..n).collect();
        positions.sort_by_key(|&i| tokens[i as usize]); // stable: equal tokens keep position order
        let mut run_tokens = Vec::new();
        let mut run_starts = Vec::new();
        for (k, &p) in positions.iter().enumerate() {
            let tok = tokens[p as usize];
            if run_tokens.last() != Some(&tok) {
                run_tokens.push(tok);
                run_starts.push(k as u32); // k < n ≤ u32::MAX
            }
        }
        run_starts.push(n);
        Ok(TokenRuns { positions, run_tokens, run_starts })
    }
}

/// Bytes of the workspace [`encoder_backward`] needs for `n = B·T` positions: positions, run
/// tokens and run starts at fixed offsets (0, 4n, 8n).
pub fn backward_workspace_bytes(n: usize) -> usize {
    (3 * n + 1) * 4
}

/// Embedding backward: `dwpe[t] += Σ_b dout[b,t]` (batch order) and `dwte[tok] += dout[b,t]` for
/// every position holding `tok` (position order). `dout` is of `dtype`; `dwte` and `dwpe` are
/// fp32 whatever `dtype` is. `tokens` are the `B·T` ids on the host;
/// `workspace` (at least [`backward_workspace_bytes`]`(B·T)` bytes) is overwritten with their
/// grouping before the kernels run. The result is bitwise the CPU backend's fp32
/// `encoder_backward` on `dout` widened to fp32 (in bf16 as well: only the loads differ).
///
/// # Errors
/// [`GpuError::Shape`] when a buffer is too short, a dimension is zero or too large, `tokens` does
/// not hold `B·T` ids, or an id is ≥ `v`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_backward<G: Gpu>(
    gpu: &G,
    dtype: DType,
    dwte: Dev<'_, G::Buf>,
    dwpe: Dev<'_, G::Buf>,
    dout: Dev<'_, G::Buf>,
    tokens: &[u32],
    workspace: &mut G::Buf,
    b: usize,
    t: usize,
    c: usize,
    v: usize,
) -> Result<(), GpuError> {
    const OP: &str = "encoder_backward";
    let [b32, t32, c32] = dims(OP, [("B", b), ("T", t), ("C", c)])?;
    let n = b * t;
    if n > i32::MAX as usize {
        // One block per distinct token: grid.x is limited to 2^31 − 1.
        return Err(GpuError::Shape { op: OP, detail: format!("B·T = {n} positions exceed 2^31 − 1") });
    }
    if tokens.len() != n {
        return Err(GpuError::Shape {
            op: OP,
            detail: format!("{} tokens for B·T = {b}·{t} = {n}", tokens.len()),
        });
    }
    check_len(gpu, OP, "dwte", dwte, v * c, DType::F32)?;
    check_len(gpu, OP, "dwpe", dwpe, t * c, DType::F32)?;
    check_len(gpu, OP, "dout", dout, n * c, dtype)?;
    let need = backward_workspace_bytes(n);
    if gpu.buf_len(workspace) < need {
        return Err(GpuError::Shape {
            op: OP,
            detail: format!(
                "workspace: {n} positions need {need} bytes, the buffer has {}",
                gpu.buf_len(workspace)
            ),
        });
    }
    let runs = TokenRuns::new(OP, tokens, v)?;
    let units = runs.run_tokens.len();
    let mut words = Vec::with_capacity(2 * n + units + 1);
    words.extend_from_slice(&runs.positions);
    words.extend_from_slice(&runs.run_tokens);
    words.resize(2 * n, 0);
    words.extend_from_slice(&runs.run_starts);
    gpu.upload(workspace, 0, bytemuck::cast_slice(&words))?;
    let ws = Dev::new(&*workspace);

    let (pack, infix) = variant(dtype, c, &[dwte.offset, dwpe.offset, dout.offset]);
    gpu.launch(
        &format!("encoder_backward_wpe_{infix}{}", dtype.suffix()),
        grid_1d(OP, t * c / pack, ELEMENTWISE_BLOCK)?,
        [ELEMENTWISE_BLOCK, 1, 1],
        0,
        &[Arg::Ptr(dwpe), Arg::Ptr(dout), Arg::U32(b32), Arg::U32(t32), Arg::U32(c32)],
    )?;
    // One block per (token, channel range): as many threads as packs in a row, up to 256.
    let packs = c / pack;
    let block = packs.next_multiple_of(32).min(256);
    let chunks = packs.div_ceil(block);
    let grid_y = u32::try_from(chunks).ok().filter(|&y| y <= 65_535).ok_or_else(|| GpuError::Shape {
        op: OP,
        detail: format!("C = {c} needs {chunks} blocks per row (max 65535)"),
    })?;
    gpu.launch(
        &format!("encoder_backward_wte_{infix}{}", dtype.suffix()),
        [units as u32, grid_y, 1], // units ≤ n < 2^31
        [block as u32, 1, 1],
        0,
        &[
            Arg::Ptr(dwte),
            Arg::Ptr(dout),
            Arg::Ptr(ws),
            Arg::Ptr(ws.at(n, DType::F32)),
            Arg::Ptr(ws.at(2 * n, DType::F32)),
            Arg::U32(c32),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_runs_keep_position_order_inside_each_token() {
        let runs = TokenRuns::new("t", &[5, 2, 5, 0, 2, 5], 6).unwrap();
        assert_eq!(runs.positions, [3, 1, 4, 0, 2, 5]);
        assert_eq!(runs.run_tokens, [0, 2, 5]);
        assert_eq!(runs.run_starts, [0, 1, 3, 6]);
    }

    #[test]
    fn out_of_vocabulary_tokens_are_named() {
        let err = TokenRuns::new("encoder_backward", &[1, 7, 2], 4).unwrap_err().to_string();
        assert!(err.contains("encoder_backward") && err.contains("token id 7 at position 1"), "{err}");
    }

    #[test]
    fn variants_follow_alignment() {
        assert_eq!(variant(DType::F32, 48, &[0, 16]), (4, "vec_"));
        assert_eq!(variant(DType::Bf16, 48, &[0, 16]), (8, "vec_"));
        assert_eq!(variant(DType::Bf16, 44, &[0]), (1, ""));
        assert_eq!(variant(DType::F32, 48, &[4]), (1, ""));
    }
}
