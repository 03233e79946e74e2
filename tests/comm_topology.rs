//! Topology properties over many layouts: coordinates round-trip, groups partition the world and
//! have the right sizes, Megatron's order (tensor fastest, then data, then pipeline).

use proptest::prelude::*;
use troupe::comm::{GroupKind, Topology};

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layout_properties(tp in 1usize..5, pp in 1usize..5, dp in 1usize..5) {
        let world = tp * pp * dp;
        let t = Topology::new(world, tp, pp, dp).unwrap();
        for r in 0..world {
            let c = t.coords(r);
            prop_assert_eq!(t.rank(c), r);
            prop_assert_eq!(r, c.tp + tp * (c.dp + dp * c.pp));
            let g = t.tp_group(r);
            prop_assert_eq!(g.len(), tp);
            prop_assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "tp ranks are contiguous");
            prop_assert!(t.dp_group(r).windows(2).all(|w| w[1] == w[0] + tp));
            prop_assert!(t.pp_group(r).windows(2).all(|w| w[1] == w[0] + tp * dp));
            for kind in [GroupKind::Tensor, GroupKind::Data, GroupKind::Pipeline] {
                let (_, g) = t.group(kind, r);
                prop_assert!(g.contains(&r));
            }
            let e = t.embedding_group(r);
            let edge = c.pp == 0 || c.pp == pp - 1;
            prop_assert_eq!(e.contains(&r), edge, "only first and last stages are members");
            prop_assert_eq!(e.len(), if pp == 1 { 1 } else { 2 });
            prop_assert_eq!(t.coords(e[0]).pp, 0);
            prop_assert_eq!(t.coords(*e.last().unwrap()).pp, pp - 1);
        }
        for kind in [GroupKind::Tensor, GroupKind::Data, GroupKind::Pipeline] {
            let mut all: Vec<usize> = t.all_groups(kind).concat();
            all.sort_unstable();
            prop_assert_eq!(all, (0..world).collect::<Vec<_>>(), "groups partition the world");
        }
    }

    #[test]
    fn wrong_world_is_rejected(tp in 1usize..5, pp in 1usize..5, dp in 1usize..5, extra in 1usize..3) {
        let e = Topology::new(tp * pp * dp + extra, tp, pp, dp).unwrap_err().to_string();
        prop_assert!(e.contains("world size"));
    }
}
