//! Activations kept between a microbatch's forward and its backward, and the per-model scratch
//! used while computing. Sizes use N = B·T rows.
//!
//! Stored per layer (what backward reads): ln1 out, ln1 mean/rstd, qkv, attention out and its
//! row log-sum-exp (no T×T matrix), residual after attention, ln2 out, ln2 mean/rstd, MLP
//! pre-activation and GELU output, and the layer output (next layer's input). The head stores the
//! final LayerNorm output and stats and the dlogits written by the fused cross-entropy.
//!
//! Between a split backward's input half (I) and its weight half (W) a microbatch also holds
//! [`OutputGrads`]: the gradient at the output of every op whose weight gradient W computes
//! (11·N·C floats per layer, N·C for the head and N·C for the embedding).

#[derive(Debug)]
pub(crate) struct LayerActs {
    pub ln1: Vec<f32>,
    pub ln1_mean: Vec<f32>,
    pub ln1_rstd: Vec<f32>,
    pub qkv: Vec<f32>,
    pub atty: Vec<f32>,
    pub lse: Vec<f32>,
    pub resid2: Vec<f32>,
    pub ln2: Vec<f32>,
    pub ln2_mean: Vec<f32>,
    pub ln2_rstd: Vec<f32>,
    pub fch: Vec<f32>,
    pub fch_gelu: Vec<f32>,
    pub out: Vec<f32>,
}

impl LayerActs {
    fn new(n: usize, c: usize, bnh: usize) -> Self {
        Self {
            ln1: vec![0.0; n * c],
            ln1_mean: vec![0.0; n],
            ln1_rstd: vec![0.0; n],
            qkv: vec![0.0; n * 3 * c],
            atty: vec![0.0; n * c],
            lse: vec![0.0; bnh],
            resid2: vec![0.0; n * c],
            ln2: vec![0.0; n * c],
            ln2_mean: vec![0.0; n],
            ln2_rstd: vec![0.0; n],
            fch: vec![0.0; n * 4 * c],
            fch_gelu: vec![0.0; n * 4 * c],
            out: vec![0.0; n * c],
        }
    }
}

#[derive(Debug)]
pub(crate) struct HeadActs {
    pub lnf: Vec<f32>,
    pub lnf_mean: Vec<f32>,
    pub lnf_rstd: Vec<f32>,
    /// Logits during forward; dlogits after the fused cross-entropy.
    pub dlogits: Vec<f32>,
    pub losses: Vec<f32>,
}

/// Everything one in-flight microbatch holds.
#[derive(Debug)]
pub(crate) struct Acts {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<u32>,
    /// The range's input hidden states (encoder output, or what the previous stage sent).
    pub input: Vec<f32>,
    pub layers: Vec<LayerActs>,
    pub head: Option<HeadActs>,
}

impl Acts {
    pub fn new(batch: usize, seq: usize, c: usize, nh: usize, layers: usize, vp: Option<usize>) -> Self {
        let n = batch * seq;
        Self {
            batch,
            seq,
            tokens: vec![0; n],
            input: vec![0.0; n * c],
            layers: (0..layers).map(|_| LayerActs::new(n, c, batch * nh * seq)).collect(),
            head: vp.map(|vp| HeadActs {
                lnf: vec![0.0; n * c],
                lnf_mean: vec![0.0; n],
                lnf_rstd: vec![0.0; n],
                dlogits: vec![0.0; n * vp],
                losses: vec![0.0; n],
            }),
        }
    }

    /// Bytes held, for memory accounting.
    pub fn bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|a| {
                a.ln1.len()
                    + a.ln1_mean.len()
                    + a.ln1_rstd.len()
                    + a.qkv.len()
                    + a.atty.len()
                    + a.lse.len()
                    + a.resid2.len()
                    + a.ln2.len()
                    + a.ln2_mean.len()
                    + a.ln2_rstd.len()
                    + a.fch.len()
                    + a.fch_gelu.len()
                    + a.out.len()
            })
            .sum();
        let h = self.head.as_ref().map_or(0, |h| {
            h.lnf.len() + h.lnf_mean.len() + h.lnf_rstd.len() + h.dlogits.len() + h.losses.len()
        });
        4 * (l + h + self.input.len()) + 4 * self.tokens.len()
    }
}

/// Floats (and token ids, 4 bytes each as well) of one microbatch's [`Acts`]: what
/// [`Acts::new`] allocates, computed without allocating (for memory estimates).
pub(crate) fn acts_words(
    batch: usize,
    seq: usize,
    c: usize,
    nh: usize,
    layers: usize,
    vp: Option<usize>,
) -> usize {
    let n = batch * seq;
    // ln1, atty, resid2, ln2, out: N·C; qkv 3·N·C; fch and its GELU 4·N·C each; four N-row
    // statistics; the attention log-sum-exp per (batch, head, position).
    let per_layer = 5 * n * c + 3 * n * c + 8 * n * c + 4 * n + batch * nh * seq;
    let head = vp.map_or(0, |vp| n * c + 2 * n + n * vp + n);
    n + n * c + layers * per_layer + head
}

/// Floats of one microbatch's [`OutputGrads`] (split backward only), without allocating.
pub(crate) fn output_grads_words(
    batch: usize,
    seq: usize,
    c: usize,
    layers: usize,
    head: bool,
    embedding: bool,
) -> usize {
    let n = batch * seq;
    layers * 11 * n * c + usize::from(head) * n * c + usize::from(embedding) * n * c
}

/// Floats of a model instance's [`Scratch`] for `n` rows (`split`: the weight half's sink too).
pub(crate) fn scratch_words(n: usize, c: usize, split: bool) -> usize {
    16 * n * c + 2 * c + usize::from(split) * n * c
}

/// Gradients at the outputs of one block's parametrised ops, from I for W. Each is what the
/// fused backward passes as `dout` to the op's weight gradient.
#[derive(Debug)]
pub(crate) struct LayerOutputGrads {
    /// `[N,C]` at the block output, which is the MLP projection's output (fcproj).
    pub dout: Vec<f32>,
    /// `[N,4C]` at the MLP's first matmul output (fc), after GELU backward.
    pub dfch: Vec<f32>,
    /// `[N,C]` at the second LayerNorm's output.
    pub dln2: Vec<f32>,
    /// `[N,C]` at the residual after attention, which is the attention projection's output.
    pub dresid2: Vec<f32>,
    /// `[N,3C]` at the fused QKV matmul output.
    pub dqkv: Vec<f32>,
    /// `[N,C]` at the first LayerNorm's output.
    pub dln1: Vec<f32>,
}

impl LayerOutputGrads {
    fn new(n: usize, c: usize) -> Self {
        Self {
            dout: vec![0.0; n * c],
            dfch: vec![0.0; n * 4 * c],
            dln2: vec![0.0; n * c],
            dresid2: vec![0.0; n * c],
            dqkv: vec![0.0; n * 3 * c],
            dln1: vec![0.0; n * c],
        }
    }

    fn len(&self) -> usize {
        self.dout.len()
            + self.dfch.len()
            + self.dln2.len()
            + self.dresid2.len()
            + self.dqkv.len()
            + self.dln1.len()
    }
}

/// What one microbatch keeps from its backward-input (I) to its backward-weight (W), besides its
/// activations. The head's dlogits already live in [`HeadActs`].
#[derive(Debug)]
pub(crate) struct OutputGrads {
    pub batch: usize,
    pub seq: usize,
    pub layers: Vec<LayerOutputGrads>,
    /// `[N,C]` at the final LayerNorm's output (head ranges).
    pub dlnf: Option<Vec<f32>>,
    /// `[N,C]` at the embedding output (embedding ranges).
    pub dembed: Option<Vec<f32>>,
}

impl OutputGrads {
    pub fn new(batch: usize, seq: usize, c: usize, layers: usize, head: bool, embedding: bool) -> Self {
        let n = batch * seq;
        Self {
            batch,
            seq,
            layers: (0..layers).map(|_| LayerOutputGrads::new(n, c)).collect(),
            dlnf: head.then(|| vec![0.0; n * c]),
            dembed: embedding.then(|| vec![0.0; n * c]),
        }
    }

    /// Bytes held, for memory accounting.
    pub fn bytes(&self) -> usize {
        let l: usize = self.layers.iter().map(LayerOutputGrads::len).sum();
        let edges = self.dlnf.as_ref().map_or(0, Vec::len) + self.dembed.as_ref().map_or(0, Vec::len);
        4 * (l + edges)
    }
}

/// Scratch shared by all microbatches of one model instance (reused, never per call).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    pub rows: usize,
    pub tmp: Vec<f32>,
    pub dres: Vec<f32>,
    pub dln: Vec<f32>,
    pub datty: Vec<f32>,
    pub dqkv: Vec<f32>,
    pub dbig1: Vec<f32>,
    pub dbig2: Vec<f32>,
    /// Gradient w.r.t. the range's input after a backward (sent to the previous stage).
    pub dinput: Vec<f32>,
    /// `[2C]`: where a split backward's input half sends the LayerNorm weight and bias
    /// gradients it does not keep (the weight half recomputes them into the arena).
    pub dparam_sink: Vec<f32>,
    /// `[N,C]` (sized per call, not by [`Scratch::ensure`], so a backward-weight never clears
    /// `dinput`): where the weight half sends the LayerNorm input gradients it does not need.
    pub dinp_sink: Vec<f32>,
}

impl Scratch {
    /// Bytes held (its vectors' lengths, as allocated).
    pub fn bytes(&self) -> usize {
        4 * (self.tmp.len()
            + self.dres.len()
            + self.dln.len()
            + self.datty.len()
            + self.dqkv.len()
            + self.dbig1.len()
            + self.dbig2.len()
            + self.dinput.len()
            + self.dparam_sink.len()
            + self.dinp_sink.len())
    }

    pub fn ensure(&mut self, n: usize, c: usize) {
        if self.rows == n {
            return;
        }
        self.rows = n;
        self.tmp = vec![0.0; n * c];
        self.dres = vec![0.0; n * c];
        self.dln = vec![0.0; n * c];
        self.datty = vec![0.0; n * c];
        self.dqkv = vec![0.0; n * 3 * c];
        self.dbig1 = vec![0.0; n * 4 * c];
        self.dbig2 = vec![0.0; n * 4 * c];
        self.dinput = vec![0.0; n * c];
        self.dparam_sink = vec![0.0; 2 * c];
    }
}
