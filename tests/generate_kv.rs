//! The KV-cache decoder gives the same next-token logits as a full forward over the prefix
//! (tolerance 2e-5 relative: same f32 arithmetic, different summation order in attention), and
//! sampling is reproducible for a seed.

use anyhow::{Result, ensure};
use troupe::models::Rng;
use troupe::models::gpt::{Generator, Sampling, sample};
use troupe::{CpuBackend, Gpt, GptConfig};

#[test]
fn kv_cache_logits_equal_full_forward() -> Result<()> {
    let cfg = GptConfig {
        vocab_size: 61,
        make_vocab_size_divisible_by: 16,
        seq_length: 12,
        num_layers: 3,
        hidden_size: 24,
        num_attention_heads: 3,
    };
    let be = CpuBackend::new(2);
    let mut model = Gpt::new(&cfg, 42)?;
    // Perturb every parameter so LayerNorm weights and biases are not trivially 1/0.
    let mut rng = Rng::new(3);
    model.params_mut().iter_mut().for_each(|p| *p += (rng.normal() * 0.05) as f32);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 61).collect();
    let full = model.logits(&be, &tokens, 1, 12)?.into_vec();
    let mut g = Generator::new(&model)?;
    for (t, &tok) in tokens.iter().enumerate() {
        let step = g.push(&be, tok)?;
        let want = &full[t * 61..(t + 1) * 61];
        let max_ref = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let err = step.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        ensure!(err / max_ref < 2e-5, "position {t}: rel err {}", err / max_ref);
    }
    // Past the context the window slides instead of failing.
    g.push(&be, 5)?;
    Ok(())
}

#[test]
fn sampling_is_seeded_and_respects_filters() {
    let logits = [0.0f32, 3.0, 1.0, 2.5, -1.0];
    let greedy = Sampling { temperature: 0.0, ..Sampling::default() };
    assert_eq!(sample(&logits, greedy, &mut Rng::new(0)), 1);
    let top2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
    let mut rng = Rng::new(9);
    for _ in 0..200 {
        let t = sample(&logits, top2, &mut rng);
        assert!(t == 1 || t == 3, "top-k 2 drew {t}");
    }
    let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 };
    assert!((0..100).all(|_| sample(&logits, nucleus, &mut rng) == 1), "p = 0.5 keeps only the top token");
    let a: Vec<u32> = (0..20)
        .map({
            let mut r = Rng::new(5);
            move |_| sample(&logits, Sampling::default(), &mut r)
        })
        .collect();
    let b: Vec<u32> = (0..20)
        .map({
            let mut r = Rng::new(5);
            move |_| sample(&logits, Sampling::default(), &mut r)
        })
        .collect();
    assert_eq!(a, b);
}
