//! Tests of the routers (greedy, group-limited greedy, noaux_tc) against hand-computed routings, the `--router` spec parser and `build_router`'s config/override handling.

use super::*;
use crate::config::{MoeConfig, ScoringFunc, TopkMethod};
use crate::error::ModelError;

const E: f64 = std::f64::consts::E;

fn params(top_k: usize, scoring: ScoringFunc, groups: (usize, usize), normalize: bool, scale: f32) -> RouterParams {
    RouterParams {
        top_k,
        scoring,
        n_group: groups.0,
        topk_group: groups.1,
        normalize,
        scale,
        use_bias: true,
    }
}

fn input<'a>(logits: &'a [f32], num_experts: usize, bias: Option<&'a [f32]>) -> RouterInput<'a> {
    RouterInput {
        logits,
        num_experts,
        correction_bias: bias,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Logit whose sigmoid is `p`.
fn logit(p: f64) -> f32 {
    (p / (1.0 - p)).ln() as f32
}

fn assert_close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

fn moe(topk_method: TopkMethod, scoring_func: ScoringFunc, norm_topk_prob: bool, scale: f64) -> MoeConfig {
    let grouped = topk_method != TopkMethod::Greedy;
    MoeConfig {
        n_routed_experts: 8,
        n_shared_experts: 1,
        num_experts_per_tok: 2,
        moe_intermediate_size: 32,
        topk_method,
        scoring_func,
        n_group: if grouped { 4 } else { 1 },
        topk_group: if grouped { 2 } else { 1 },
        norm_topk_prob,
        routed_scaling_factor: scale,
        names: crate::deepseek::config::MOE_NAMES,
    }
}

fn spec(s: &str) -> RouterSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn greedy_softmax_picks_largest_and_weights_with_softmax() {
    let logits = [1.0, 2.0, 3.0, 0.0];
    // softmax denominators: e^0 + e^1 + e^2 + e^3
    let z = 1.0 + E + E * E + E * E * E;
    let r = GreedyRouter(params(2, ScoringFunc::Softmax, (1, 1), false, 1.0)).route(&input(&logits, 4, None));
    assert_eq!(r.top_k, 2);
    assert_eq!(r.expert_ids, [2, 1]);
    assert_close(&r.weights, &[E.powi(3) / z, E * E / z]);

    // Scaled only: same ratios times 3.
    let r = GreedyRouter(params(2, ScoringFunc::Softmax, (1, 1), false, 3.0)).route(&input(&logits, 4, None));
    assert_close(&r.weights, &[3.0 * E.powi(3) / z, 3.0 * E * E / z]);

    // Normalized then scaled: e^3/(e^3+e^2) = e/(1+e), summing to the scale.
    let r = GreedyRouter(params(2, ScoringFunc::Softmax, (1, 1), true, 2.0)).route(&input(&logits, 4, None));
    assert_eq!(r.expert_ids, [2, 1]);
    assert_close(&r.weights, &[2.0 * E / (1.0 + E), 2.0 / (1.0 + E)]);
    assert!((r.weights.iter().sum::<f32>() - 2.0).abs() < 1e-6);
}

#[test]
fn route_returns_row_major_tokens_by_top_k() {
    let logits = [
        1.0, 2.0, 3.0, 0.0, // token 0 -> 2, 1
        9.0, -1.0, 0.0, 8.0, // token 1 -> 0, 3
        0.0, 5.0, 0.0, 6.0, // token 2 -> 3, 1
    ];
    let router = GreedyRouter(params(2, ScoringFunc::Softmax, (1, 1), true, 1.0));
    let all = router.route(&input(&logits, 4, None));
    assert_eq!(input(&logits, 4, None).num_tokens(), 3);
    assert_eq!(all.expert_ids, [2, 1, 0, 3, 3, 1]);
    assert_eq!(all.weights.len(), 6);
    // Each row equals routing that token alone.
    for (t, row) in logits.chunks(4).enumerate() {
        let one = router.route(&input(row, 4, None));
        assert_eq!(one.expert_ids, all.expert_ids[2 * t..2 * t + 2]);
        assert_eq!(one.weights, all.weights[2 * t..2 * t + 2]);
    }
    // Token 1 normalized: e^9/(e^9+e^8) = e/(1+e).
    assert_close(&all.weights[2..4], &[E / (1.0 + E), 1.0 / (1.0 + E)]);
}

#[test]
fn group_limited_greedy_only_chooses_from_groups_with_best_max() {
    // Four groups of two. Group maxima 5, 4.95, 4.93, 0 keep groups 0 and 1; the global third
    // best (expert 4, 4.93) lives in group 2 and must not be chosen. Group 2 would win on the
    // sum of its top two, so this also shows V2 scores groups by their max.
    let logits = [5.0, 4.9, 4.95, 0.0, 4.93, 4.92, 0.0, 0.0];
    let greedy = GreedyRouter(params(3, ScoringFunc::Softmax, (1, 1), false, 1.0)).route(&input(&logits, 8, None));
    assert_eq!(greedy.expert_ids, [0, 2, 4]);

    let r =
        GroupLimitedGreedyRouter(params(3, ScoringFunc::Softmax, (4, 2), false, 1.0)).route(&input(&logits, 8, None));
    assert_eq!(r.expert_ids, [0, 2, 1]);
    // Weights are the softmax over all experts, not over the kept ones.
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    let want: Vec<f64> = [0usize, 2, 1].iter().map(|&i| (logits[i] as f64).exp() / z).collect();
    assert_close(&r.weights, &want);
}

#[test]
fn noaux_tc_correction_bias_changes_choice_but_not_weights() {
    let logits = [2.0, 1.0, 0.0, -1.0];
    let bias = [0.0, 0.0, 0.0, 3.0];
    let mut p = params(2, ScoringFunc::Sigmoid, (1, 1), true, 2.5);
    // Biased choice scores: σ(2)=.88, σ(1)=.73, σ(0)=.5, σ(-1)+3=3.27 -> experts 3, 0.
    let with_bias = NoauxTcRouter(p.clone()).route(&input(&logits, 4, Some(&bias)));
    assert_eq!(with_bias.expert_ids, [3, 0]);
    // Weights from the unbiased sigmoid scores, normalized, times 2.5.
    let (s3, s0) = (sigmoid(-1.0), sigmoid(2.0));
    assert_close(&with_bias.weights, &[2.5 * s3 / (s3 + s0), 2.5 * s0 / (s3 + s0)]);

    p.use_bias = false;
    let no_bias = NoauxTcRouter(p.clone()).route(&input(&logits, 4, Some(&bias)));
    assert_eq!(no_bias.expert_ids, [0, 1]);
    assert_ne!(no_bias.expert_ids, with_bias.expert_ids);
    let (s0, s1) = (sigmoid(2.0), sigmoid(1.0));
    assert_close(&no_bias.weights, &[2.5 * s0 / (s0 + s1), 2.5 * s1 / (s0 + s1)]);

    // use_bias with a checkpoint that has no bias is the same as no bias.
    p.use_bias = true;
    assert_eq!(NoauxTcRouter(p).route(&input(&logits, 4, None)), no_bias);

    // Not normalized: raw σ times the scale.
    let raw = NoauxTcRouter(params(2, ScoringFunc::Sigmoid, (1, 1), false, 2.5)).route(&input(&logits, 4, Some(&bias)));
    assert_close(&raw.weights, &[2.5 * sigmoid(-1.0), 2.5 * sigmoid(2.0)]);
}

#[test]
fn noaux_tc_scores_groups_by_sum_of_top_two() {
    // Two groups of four sigmoid scores:
    //   A = [.9, .5, .5, .5]: max .9, top-2 sum 1.4, total 2.4
    //   B = [.8, .75, .05, .05]: max .8, top-2 sum 1.55, total 1.65
    // Only the top-2 sum prefers B.
    let probs = [0.9, 0.5, 0.5, 0.5, 0.8, 0.75, 0.05, 0.05];
    let logits: Vec<f32> = probs.iter().map(|&p| logit(p)).collect();
    let r = NoauxTcRouter(params(2, ScoringFunc::Sigmoid, (2, 1), true, 2.0)).route(&input(&logits, 8, None));
    assert_eq!(r.expert_ids, [4, 5]);
    assert_close(&r.weights, &[2.0 * 0.8 / 1.55, 2.0 * 0.75 / 1.55]);

    // The V2 rule (max) on the same scores keeps group A instead (ties: lower index first).
    let v2 =
        GroupLimitedGreedyRouter(params(2, ScoringFunc::Sigmoid, (2, 1), true, 2.0)).route(&input(&logits, 8, None));
    assert_eq!(v2.expert_ids, [0, 1]);

    // Group choice uses the biased scores: a bias on A's 2nd expert (.5+.2 → top-2 sum 1.6)
    // flips the choice to A, while the weights stay unbiased.
    let bias = [0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let r = NoauxTcRouter(params(2, ScoringFunc::Sigmoid, (2, 1), true, 1.0)).route(&input(&logits, 8, Some(&bias)));
    assert_eq!(r.expert_ids, [0, 1]);
    assert_close(&r.weights, &[0.9 / 1.4, 0.5 / 1.4]);
}

#[test]
fn router_spec_parses_name_and_overrides() {
    let s = spec("greedy:top_k=4");
    assert_eq!(s.name, "greedy");
    assert_eq!(s.overrides, [("top_k".to_string(), "4".to_string())]);
    let s = spec("noaux_tc:bias=false,scale=1.0");
    assert_eq!(s.name, "noaux_tc");
    assert_eq!(
        s.overrides,
        [
            ("bias".to_string(), "false".to_string()),
            ("scale".to_string(), "1.0".to_string())
        ]
    );
    let s = spec("group_limited_greedy");
    assert!(s.overrides.is_empty());

    for bad in ["topk", "greedy:top_k", "noaux_tc:bias=false,scale"] {
        match bad.parse::<RouterSpec>() {
            Err(e @ ModelError::RouterSpec { .. }) => assert!(e.to_string().contains(bad), "{e}"),
            other => panic!("{bad}: expected a RouterSpec error, got {other:?}"),
        }
    }
    let e = "topk".parse::<RouterSpec>().unwrap_err().to_string();
    assert!(
        e.contains("greedy") && e.contains("noaux_tc"),
        "lists available routers: {e}"
    );
}

#[test]
fn build_router_validates_overrides() {
    let m = moe(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, 2.5);
    let expect_err = |s: &str, needle: &str| match build_router(&m, Some(&spec(s))) {
        Err(e @ ModelError::RouterSpec { .. }) => assert!(e.to_string().contains(needle), "{s}: {e}"),
        Err(other) => panic!("{s}: expected RouterSpec error, got {other:?}"),
        Ok(r) => panic!("{s}: accepted as {}", r.describe()),
    };
    expect_err("greedy:top_k=0", "top_k");
    expect_err("greedy:top_k=9", "top_k");
    expect_err("greedy:topk=2", "unknown key");
    expect_err("greedy:top_k=two", "top_k");
    expect_err("noaux_tc:scale=inf", "scale");
    expect_err("noaux_tc:n_group=3", "n_group");
    // 8 groups of 1: noaux_tc needs two per group.
    expect_err("noaux_tc:n_group=8,topk_group=2", "2 experts per group");

    let r = build_router(&m, Some(&spec("greedy:top_k=8"))).unwrap();
    assert_eq!(r.top_k(), 8);
    assert!(r.describe().starts_with("greedy:"), "{}", r.describe());
    let r = build_router(&m, Some(&spec("noaux_tc:bias=false,scale=1.0"))).unwrap();
    assert!(
        r.describe().contains("bias=false") && r.describe().contains("scale=1"),
        "{}",
        r.describe()
    );
}

#[test]
fn build_router_follows_topk_method_without_spec() {
    for (method, name) in [
        (TopkMethod::Greedy, "greedy:"),
        (TopkMethod::GroupLimitedGreedy, "group_limited_greedy:"),
        (TopkMethod::NoauxTc, "noaux_tc:"),
    ] {
        let r = build_router(&moe(method, ScoringFunc::Sigmoid, true, 1.0), None).unwrap();
        assert!(r.describe().starts_with(name), "{}", r.describe());
        assert_eq!(r.top_k(), 2);
    }
}

#[test]
fn norm_topk_prob_decides_renormalisation_and_overrides_win() {
    // (DeepSeek-V2's parser clears norm_topk_prob, since transformers ignores it there; see
    // deepseek::config's tests.)
    let logits = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let z = E + E * E + E.powi(3) + 5.0;
    let plain = moe(TopkMethod::Greedy, ScoringFunc::Softmax, false, 1.0);
    let v2 = build_router(&plain, None).unwrap().route(&input(&logits, 8, None));
    assert_eq!(v2.expert_ids, [2, 1]);
    assert_close(&v2.weights, &[E.powi(3) / z, E * E / z]);

    let normed = moe(TopkMethod::Greedy, ScoringFunc::Softmax, true, 1.0);
    let v3 = build_router(&normed, None).unwrap().route(&input(&logits, 8, None));
    assert_eq!(v3.expert_ids, [2, 1]);
    assert_close(&v3.weights, &[E / (1.0 + E), 1.0 / (1.0 + E)]);

    // An explicit override still normalizes a checkpoint that does not.
    let r = build_router(&plain, Some(&spec("greedy:normalize=true"))).unwrap();
    assert_close(
        &r.route(&input(&logits, 8, None)).weights,
        &[E / (1.0 + E), 1.0 / (1.0 + E)],
    );
}

#[test]
fn kernel_params_route_exactly_like_the_router() {
    // The GPU path routes with `kernel_params()`; it must be the same routing as `route()`,
    // for every built-in, with the checkpoint's knobs and with --router overrides.
    let logits: Vec<f32> = (0..5 * 8).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.31).collect();
    let bias: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.07).collect();
    let specs = [
        None,
        Some("greedy:top_k=3,scoring=softmax"),
        Some("group_limited_greedy:n_group=2,topk_group=1"),
        Some("noaux_tc:bias=false,normalize=false,scale=1.5"),
    ];
    for method in [TopkMethod::Greedy, TopkMethod::GroupLimitedGreedy, TopkMethod::NoauxTc] {
        for spec_text in specs {
            let cfg = moe(method, ScoringFunc::Sigmoid, true, 2.5);
            let r = build_router(&cfg, spec_text.map(spec).as_ref()).unwrap();
            let p = r.kernel_params().expect("built-in routers have kernel parameters");
            let want = r.route(&input(&logits, 8, Some(&bias)));
            let (ids, weights) = route(&logits, 8, Some(&bias), &p);
            assert_eq!((ids, weights), (want.expert_ids, want.weights), "{}", r.describe());
        }
    }
}
