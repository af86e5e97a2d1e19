//! GPU tests of the MoE kernels (feature `cuda`, need a CUDA device) against the host
//! references of `moe_kernels::moe`: routing for every method, the permutation, and the
//! grouped expert GEMMs with the combine, over skewed routings (one expert takes most slots),
//! experts with no tokens, 1 token and 4096 tokens.
//!
//! Tolerances:
//! * Routing: expert ids must match exactly for every token whose reference choice is stable
//!   under a 1e-5 jitter of its logits (the kernel's `expf` and tree-ordered softmax sum may
//!   differ from the host's by an ulp, which can only flip a near-tie); at most 1% of tokens
//!   may be such near-ties. The logits are a shuffled grid of distinct values, so they are rare.
//!   Weights of stable tokens: 1e-5 relative.
//! * Permutation: integer outputs, exact.
//! * Grouped MLP: the reference computes in f32 from the same bf16 inputs; the kernel rounds
//!   `h` to bf16 before the down GEMM (relative 2^-9 per element, random in sign, so about
//!   2^-9 of the output's RMS after the sum) and the output to bf16 (2^-9 of the value), and
//!   accumulates in another order. Allowed per element: 1e-2 * rms(row) + 2^-8 * |ref|, and a
//!   cosine similarity >= 0.9999 per token.
use candle_core::{DType, Device, Result, Tensor};
use moe_kernels::cuda::{moe_experts, moe_permute, moe_route, TILE_ROWS};
use moe_kernels::dense::Weight;
use moe_kernels::moe::{
    grouped_expert_mlp, permute_by_expert, route, ExpertWeights, RoutingMethod, RoutingParams, Scoring,
};

use crate::common::{gpu, host, Rng};

fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `[tokens, experts]` logits: each row a shuffled grid of distinct values `spacing` apart.
fn grid_logits(rng: &mut Rng, tokens: usize, experts: usize, spacing: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens * experts);
    for _ in 0..tokens {
        let mut row: Vec<f32> = (0..experts)
            .map(|e| (e as f32 - experts as f32 / 2.0) * spacing)
            .collect();
        rng.shuffle(&mut row);
        out.extend(row);
    }
    out
}

fn params(method: RoutingMethod, top_k: usize, scoring: Scoring, groups: (usize, usize)) -> RoutingParams {
    RoutingParams {
        method,
        top_k,
        scoring,
        n_group: groups.0,
        topk_group: groups.1,
        normalize: false,
        scale: 1.0,
        use_bias: true,
    }
}

/// Tokens whose reference ids do not change when every logit moves by up to 1e-5.
fn stable_tokens(
    rng: &mut Rng,
    logits: &[f32],
    experts: usize,
    bias: &[f32],
    p: &RoutingParams,
    ids: &[u32],
) -> Vec<usize> {
    let jittered: Vec<Vec<u32>> = (0..2)
        .map(|_| {
            let l: Vec<f32> = logits.iter().map(|v| v + rng.uniform() * 1e-5).collect();
            route(&l, experts, Some(bias), p).0
        })
        .collect();
    let k = p.top_k;
    (0..logits.len() / experts)
        .filter(|t| {
            jittered
                .iter()
                .all(|j| j[t * k..(t + 1) * k] == ids[t * k..(t + 1) * k])
        })
        .collect()
}

#[test]
fn routing_kernel_matches_reference_for_every_method() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(23);
    let mut v3 = params(RoutingMethod::NoauxTc, 8, Scoring::Sigmoid, (8, 4));
    v3.normalize = true;
    v3.scale = 2.5;
    let mut k2 = params(RoutingMethod::NoauxTc, 8, Scoring::Sigmoid, (1, 1));
    k2.normalize = true;
    k2.scale = 2.827;
    let mut unbiased = v3;
    unbiased.use_bias = false;
    let cases = [
        (
            "v2-lite greedy",
            64,
            params(RoutingMethod::Greedy, 6, Scoring::Softmax, (1, 1)),
        ),
        (
            "v2 group-limited",
            160,
            params(RoutingMethod::GroupLimitedGreedy, 6, Scoring::Softmax, (8, 3)),
        ),
        ("v3 noaux_tc", 256, v3),
        ("v3 without bias", 256, unbiased),
        ("k2 noaux_tc, one group", 384, k2),
        (
            "1024 experts, top-32",
            1024,
            params(RoutingMethod::Greedy, 32, Scoring::Softmax, (1, 1)),
        ),
    ];
    for (name, experts, p) in cases {
        for tokens in [1usize, 5, 300] {
            let logits = grid_logits(&mut rng, tokens, experts, 0.013);
            let bias: Vec<f32> = grid_logits(&mut rng, 1, experts, 0.0007);
            let (want_ids, want_w) = route(&logits, experts, Some(&bias), &p);
            let stable = stable_tokens(&mut rng, &logits, experts, &bias, &p, &want_ids);
            let lg = Tensor::from_vec(logits, (tokens, experts), &dev)?;
            let bg = Tensor::from_vec(bias, experts, &dev)?;
            let (ids, w) = moe_route(&lg, Some(&bg), &p)?;
            let (ids, w) = (u32s(&ids), host(&w));
            let k = p.top_k;
            assert!(
                stable.len() * 100 >= tokens * 99,
                "{name}: {} of {tokens} stable",
                stable.len()
            );
            for t in stable {
                let r = t * k..(t + 1) * k;
                assert_eq!(
                    ids[r.clone()],
                    want_ids[r.clone()],
                    "{name}, token {t} of {tokens}: ids"
                );
                for (g, want) in w[r.clone()].iter().zip(&want_w[r]) {
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "{name}, token {t}: {g} vs {want}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Routings of `tokens * top_k` slots over `experts`: spread, skewed (most slots on expert 3),
/// and concentrated on a few experts (the rest get nothing).
fn routings(rng: &mut Rng, tokens: usize, top_k: usize, experts: usize) -> Vec<(&'static str, Vec<u32>)> {
    let slots = tokens * top_k;
    let spread = (0..slots).map(|_| (rng.next() % experts as u64) as u32).collect();
    let skewed = (0..slots)
        .map(|_| {
            if rng.next() % 10 < 9 {
                3
            } else {
                (rng.next() % experts as u64) as u32
            }
        })
        .collect();
    let few = (0..slots).map(|s| [1u32, 7, 8][s % 3]).collect();
    vec![("spread", spread), ("skewed", skewed), ("three experts", few)]
}

#[test]
fn permutation_matches_reference() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(29);
    for (tokens, top_k, experts) in [
        (0usize, 6usize, 64usize),
        (1, 6, 64),
        (16, 6, 64),
        (300, 8, 256),
        (4096, 8, 256),
        (4096, 6, 64),
    ] {
        for (name, ids) in routings(&mut rng, tokens, top_k, experts) {
            let want = permute_by_expert(&ids, experts, TILE_ROWS);
            let got = moe_permute(&Tensor::from_vec(ids, (tokens, top_k), &dev)?, experts)?;
            let case = format!("{name}, {tokens} tokens x {top_k} over {experts}");
            if tokens == 0 {
                assert_eq!(u32s(&got.num_tiles), vec![0], "{case}");
                continue;
            }
            assert_eq!(u32s(&got.counts), want.counts, "{case}: counts");
            assert_eq!(u32s(&got.offsets), want.offsets, "{case}: offsets");
            assert_eq!(u32s(&got.num_tiles), vec![want.num_tiles() as u32], "{case}: tiles");
            let rows = want.sorted_slots.len();
            assert_eq!(&u32s(&got.sorted_slots)[..rows], &want.sorted_slots[..], "{case}: rows");
            assert_eq!(
                &u32s(&got.tile_experts)[..want.num_tiles()],
                &want.tile_experts[..],
                "{case}"
            );
        }
    }
    Ok(())
}

struct Layer {
    x: Tensor,
    gate_up: Tensor,
    down: Tensor,
}

/// bf16 inputs on the CPU (weights scaled like a trained layer's: ~1/sqrt(fan_in)).
fn layer(rng: &mut Rng, tokens: usize, experts: usize, hidden: usize, inter: usize) -> Result<Layer> {
    let cpu = Device::Cpu;
    let bf = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &cpu)?.to_dtype(DType::BF16);
    Ok(Layer {
        x: bf(rng.vec(tokens * hidden, 1.0), &[tokens, hidden])?,
        gate_up: bf(
            rng.vec(experts * 2 * inter * hidden, (3.0 / hidden as f32).sqrt()),
            &[experts, 2 * inter, hidden],
        )?,
        down: bf(
            rng.vec(experts * hidden * inter, (3.0 / inter as f32).sqrt()),
            &[experts, hidden, inter],
        )?,
    })
}

fn assert_close_rows(got: &[f32], want: &[f32], hidden: usize, case: &str) {
    for (t, (g, w)) in got.chunks(hidden).zip(want.chunks(hidden)).enumerate() {
        let rms = (w.iter().map(|v| v * v).sum::<f32>() / hidden as f32).sqrt();
        let (mut dot, mut gg, mut ww) = (0f64, 0f64, 0f64);
        for (n, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-2 * rms + b.abs() / 256.0,
                "{case}: token {t} dim {n}: {a} vs {b} (row rms {rms})"
            );
            dot += (*a as f64) * (*b as f64);
            gg += (*a as f64).powi(2);
            ww += (*b as f64).powi(2);
        }
        if ww > 0.0 {
            let cos = dot / (gg.sqrt() * ww.sqrt()).max(1e-30);
            assert!(cos >= 0.9999, "{case}: token {t} cosine {cos}");
        }
    }
}

fn check_experts(
    rng: &mut Rng,
    tokens: usize,
    top_k: usize,
    experts: usize,
    hidden: usize,
    inter: usize,
) -> Result<()> {
    let dev = gpu();
    let l = layer(rng, tokens, experts, hidden, inter)?;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let (x32, gu32, d32) = (
        f32_of(&l.x)?,
        Weight::Dense(f32_of(&l.gate_up)?),
        Weight::Dense(f32_of(&l.down)?),
    );
    let (xg, gug, dg) = (
        l.x.to_device(&dev)?,
        l.gate_up.to_device(&dev)?,
        l.down.to_device(&dev)?,
    );
    for (name, ids) in routings(rng, tokens, top_k, experts) {
        let weights: Vec<f32> = (0..tokens * top_k).map(|_| 0.05 + rng.uniform().abs()).collect();
        let perm = permute_by_expert(&ids, experts, 1);
        let w = ExpertWeights {
            gate_up: &gu32,
            down: &d32,
        };
        let want = grouped_expert_mlp(&x32, w, &perm, &weights, top_k)?;
        let ids_g = Tensor::from_vec(ids, (tokens, top_k), &dev)?;
        let w_g = Tensor::from_vec(weights, (tokens, top_k), &dev)?;
        let got = moe_experts(&xg, &gug, &dg, &ids_g, &w_g, None)?;
        assert_eq!(got.dims(), &[tokens, hidden]);
        let case = format!("{name}: {tokens} tokens x top-{top_k}, {experts} experts, {hidden}/{inter}");
        assert_close_rows(&host(&got), &host(&want), hidden, &case);
        // Deterministic: the same input gives bit-identical output.
        let again = moe_experts(&xg, &gug, &dg, &ids_g, &w_g, None)?;
        assert_eq!(host(&again), host(&got), "{case}: second run differs");
    }
    Ok(())
}

#[test]
fn grouped_experts_match_reference_from_1_to_4096_tokens() -> Result<()> {
    let mut rng = Rng(31);
    for tokens in [1usize, 3, 16, 77, 300, 4096] {
        check_experts(&mut rng, tokens, 6, 64, 256, 192)?;
    }
    // Widths that are not multiples of the tiles (the kernels guard columns and K steps).
    check_experts(&mut rng, 37, 4, 16, 200, 104)?;
    Ok(())
}

#[test]
fn grouped_experts_match_reference_at_v2_lite_shape() -> Result<()> {
    let mut rng = Rng(37);
    for tokens in [1usize, 64] {
        check_experts(&mut rng, tokens, 6, 64, 2048, 1408)?;
    }
    Ok(())
}

#[test]
fn shared_output_is_added_before_the_single_rounding() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(41);
    let (tokens, top_k, experts, hidden, inter) = (9usize, 2usize, 8usize, 64usize, 32usize);
    let l = layer(&mut rng, tokens, experts, hidden, inter)?;
    let ids: Vec<u32> = (0..tokens * top_k).map(|s| (s % experts) as u32).collect();
    let weights = vec![0.5f32; tokens * top_k];
    let shared =
        Tensor::from_vec(rng.vec(tokens * hidden, 2.0), (tokens, hidden), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let perm = permute_by_expert(&ids, experts, 1);
    let (gu32, d32) = (
        Weight::Dense(l.gate_up.to_dtype(DType::F32)?),
        Weight::Dense(l.down.to_dtype(DType::F32)?),
    );
    let routed = grouped_expert_mlp(
        &l.x.to_dtype(DType::F32)?,
        ExpertWeights {
            gate_up: &gu32,
            down: &d32,
        },
        &perm,
        &weights,
        top_k,
    )?;
    let want = (routed + shared.to_dtype(DType::F32)?)?;
    let got = moe_experts(
        &l.x.to_device(&dev)?,
        &l.gate_up.to_device(&dev)?,
        &l.down.to_device(&dev)?,
        &Tensor::from_vec(ids, (tokens, top_k), &dev)?,
        &Tensor::from_vec(weights, (tokens, top_k), &dev)?,
        Some(&shared.to_device(&dev)?),
    )?;
    assert_close_rows(&host(&got), &host(&want), hidden, "with shared experts");
    Ok(())
}

#[test]
fn routing_then_experts_on_device_matches_host_routing() -> Result<()> {
    let dev = gpu();
    let mut rng = Rng(43);
    let (tokens, experts, hidden, inter) = (128usize, 64usize, 256usize, 192usize);
    let mut p = params(RoutingMethod::NoauxTc, 6, Scoring::Sigmoid, (8, 4));
    p.normalize = true;
    p.scale = 2.5;
    let l = layer(&mut rng, tokens, experts, hidden, inter)?;
    let logits = grid_logits(&mut rng, tokens, experts, 0.02);
    let bias = grid_logits(&mut rng, 1, experts, 0.001);
    let (ids, weights) = route(&logits, experts, Some(&bias), &p);
    let perm = permute_by_expert(&ids, experts, 1);
    let (gu32, d32) = (
        Weight::Dense(l.gate_up.to_dtype(DType::F32)?),
        Weight::Dense(l.down.to_dtype(DType::F32)?),
    );
    let w = ExpertWeights {
        gate_up: &gu32,
        down: &d32,
    };
    let want = grouped_expert_mlp(&l.x.to_dtype(DType::F32)?, w, &perm, &weights, p.top_k)?;
    let (ids_g, w_g) = moe_route(
        &Tensor::from_vec(logits, (tokens, experts), &dev)?,
        Some(&Tensor::from_vec(bias, experts, &dev)?),
        &p,
    )?;
    let got = moe_experts(
        &l.x.to_device(&dev)?,
        &l.gate_up.to_device(&dev)?,
        &l.down.to_device(&dev)?,
        &ids_g,
        &w_g,
        None,
    )?;
    assert_close_rows(&host(&got), &host(&want), hidden, "route + experts");
    Ok(())
}
