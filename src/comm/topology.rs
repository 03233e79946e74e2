//! Rank ↔ (tp, dp, pp) coordinates and the process groups derived from them, in Megatron-LM's
//! order: tensor-parallel rank varies fastest, then data-parallel, then pipeline stage.
//!
//! ```text
//! rank = tp + TP·(dp + DP·pp)
//! ```
//!
//! Worked example: world 16 = TP 2 × DP 2 × PP 4.
//!
//! ```text
//!  rank:  0  1 | 2  3 || 4  5 | 6  7 || 8  9 |10 11 ||12 13 |14 15
//!  tp:    0  1 | 0  1 || 0  1 | 0  1 || 0  1 | 0  1 || 0  1 | 0  1
//!  dp:    0  0 | 1  1 || 0  0 | 1  1 || 0  0 | 1  1 || 0  0 | 1  1
//!  pp:    0  0   0  0 || 1  1   1  1 || 2  2   2  2 || 3  3   3  3
//! ```
//!
//! - TP groups (same dp, pp): [0,1] [2,3] [4,5] … [14,15]
//! - DP groups (same tp, pp): [0,2] [1,3] [4,6] [5,7] … [13,15]
//! - PP groups (same tp, dp): [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
//! - embedding groups (first and last stage of each PP group): [0,12] [1,13] [2,14] [3,15]
//!
//! ```
//! use troupe::comm::Topology;
//! let t = Topology::new(16, 2, 4, 2).unwrap();
//! assert_eq!(t.dp_group(5), vec![5, 7]);
//! assert_eq!(t.pp_group(5), vec![1, 5, 9, 13]);
//! assert_eq!(t.embedding_group(5), vec![1, 13]);
//! ```
//!
//! Pure arithmetic, no I/O; every function is total on valid ranks.

/// A rank's coordinates in the 3-D layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    /// Tensor-parallel rank (fastest-varying).
    pub tp: usize,
    /// Data-parallel rank.
    pub dp: usize,
    /// Pipeline stage (slowest-varying).
    pub pp: usize,
}

/// Layout of `world = tp · pp · dp` ranks. See the module docs for a worked example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    tp: usize,
    pp: usize,
    dp: usize,
}

/// Why a layout was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error(
        "world size {world} is not tensor-parallel {tp} × pipeline-parallel {pp} × data-parallel {dp} = {product}"
    )]
    WorldMismatch { world: usize, tp: usize, pp: usize, dp: usize, product: usize },
    #[error("parallel degrees must be at least 1 (got tp {tp}, pp {pp}, dp {dp})")]
    ZeroDegree { tp: usize, pp: usize, dp: usize },
}

impl Topology {
    /// Validates `world == tp · pp · dp` (all at least 1).
    ///
    /// # Errors
    /// [`TopologyError`] naming the four numbers when they do not fit.
    pub fn new(world: usize, tp: usize, pp: usize, dp: usize) -> Result<Self, TopologyError> {
        if tp == 0 || pp == 0 || dp == 0 {
            return Err(TopologyError::ZeroDegree { tp, pp, dp });
        }
        let product = tp.checked_mul(pp).and_then(|x| x.checked_mul(dp));
        if product != Some(world) {
            return Err(TopologyError::WorldMismatch {
                world,
                tp,
                pp,
                dp,
                product: product.unwrap_or(usize::MAX),
            });
        }
        Ok(Self { tp, pp, dp })
    }

    /// Builds a layout from TP and PP degrees, deriving `dp = world / (tp·pp)`.
    ///
    /// # Errors
    /// When `tp·pp` does not divide `world`.
    pub fn from_world(world: usize, tp: usize, pp: usize) -> Result<Self, TopologyError> {
        let dp = if tp == 0 || pp == 0 { 0 } else { world / (tp * pp).max(1) };
        Self::new(world, tp, pp, dp.max(1))
    }

    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }
    pub fn tp(&self) -> usize {
        self.tp
    }
    pub fn pp(&self) -> usize {
        self.pp
    }
    pub fn dp(&self) -> usize {
        self.dp
    }

    /// Coordinates of `rank`. `rank` must be below [`Topology::world`].
    pub fn coords(&self, rank: usize) -> Coords {
        Coords { tp: rank % self.tp, dp: (rank / self.tp) % self.dp, pp: rank / (self.tp * self.dp) }
    }

    /// Inverse of [`Topology::coords`].
    pub fn rank(&self, c: Coords) -> usize {
        c.tp + self.tp * (c.dp + self.dp * c.pp)
    }

    /// Ranks sharing `rank`'s dp and pp coordinates, ordered by tp.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tp).map(|tp| self.rank(Coords { tp, ..c })).collect()
    }

    /// Ranks sharing `rank`'s tp and pp coordinates, ordered by dp.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp).map(|dp| self.rank(Coords { dp, ..c })).collect()
    }

    /// Ranks sharing `rank`'s tp and dp coordinates, ordered by stage.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pp).map(|pp| self.rank(Coords { pp, ..c })).collect()
    }

    /// First and last stage of `rank`'s pipeline (one rank when there is one stage). Tied input
    /// and output embeddings all-reduce their gradients over this group. For a middle stage this
    /// is still its pipeline's pair, which does not contain `rank`: such ranks create no
    /// embedding communicator.
    pub fn embedding_group(&self, rank: usize) -> Vec<usize> {
        let g = self.pp_group(rank);
        if g.len() == 1 { g } else { vec![g[0], g[g.len() - 1]] }
    }

    /// Every distinct group of one kind, for creating communicators on all ranks.
    pub fn all_groups(&self, kind: GroupKind) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for r in 0..self.world() {
            let g = match kind {
                GroupKind::Tensor => self.tp_group(r),
                GroupKind::Data => self.dp_group(r),
                GroupKind::Pipeline => self.pp_group(r),
                GroupKind::Embedding => self.embedding_group(r),
            };
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }

    /// The group of `kind` containing `rank`, with a stable name such as `dp[1,3]`.
    pub fn group(&self, kind: GroupKind, rank: usize) -> (String, Vec<usize>) {
        let g = match kind {
            GroupKind::Tensor => self.tp_group(rank),
            GroupKind::Data => self.dp_group(rank),
            GroupKind::Pipeline => self.pp_group(rank),
            GroupKind::Embedding => self.embedding_group(rank),
        };
        let list: Vec<String> = g.iter().map(|r| r.to_string()).collect();
        (format!("{}[{}]", kind.short(), list.join(",")), g)
    }
}

/// Which of the derived groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    Tensor,
    Data,
    Pipeline,
    Embedding,
}

impl GroupKind {
    fn short(self) -> &'static str {
        match self {
            GroupKind::Tensor => "tp",
            GroupKind::Data => "dp",
            GroupKind::Pipeline => "pp",
            GroupKind::Embedding => "emb",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example() {
        let t = Topology::new(16, 2, 4, 2).unwrap();
        assert_eq!(t.coords(13), Coords { tp: 1, dp: 0, pp: 3 });
        assert_eq!(t.tp_group(6), vec![6, 7]);
        assert_eq!(t.dp_group(4), vec![4, 6]);
        assert_eq!(t.pp_group(2), vec![2, 6, 10, 14]);
        assert_eq!(t.embedding_group(10), vec![2, 14]);
        assert_eq!(t.all_groups(GroupKind::Pipeline).len(), 4);
        assert_eq!(t.group(GroupKind::Data, 5).0, "dp[5,7]");
    }

    #[test]
    fn mismatch_is_named() {
        let e = Topology::new(12, 2, 4, 2).unwrap_err().to_string();
        assert!(e.contains("12") && e.contains("16"), "{e}");
        assert!(Topology::new(4, 0, 1, 4).is_err());
    }
}
