//! Activations kept between a microbatch's forward and its backward, and the per-model scratch
//! used while computing. Sizes use N = B·T rows.
//!
//! Stored per layer (what backward reads): ln1 out, ln1 mean/rstd, qkv, attention out and its
//! row log-sum-exp (no T×T matrix), residual after attention, ln2 out, ln2 mean/rstd, MLP
//! pre-activation and GELU output, and the layer output (next layer's input). The head stores the
//! final LayerNorm output and stats and the dlogits written by the fused cross-entropy.

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
}

impl Scratch {
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
    }
}
