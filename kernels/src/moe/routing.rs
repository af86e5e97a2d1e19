//! Routing math shared by every built-in router, on host `f32` slices: scores (softmax or
//! sigmoid), the optional correction bias, group-limited selection, top-k, renormalisation and
//! routed scaling. `moe-models`' routers call [`route`]; the CUDA routing kernel reproduces it
//! (same selection order, same tie rule, same summation order of the renormalisation).

/// How gate logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// Which experts a token may choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMethod {
    /// Top-k over all experts (`greedy`).
    Greedy,
    /// DeepSeek-V2's device-limited routing: keep the `topk_group` groups with the highest
    /// single score; the other groups' scores become 0 (`group_limited_greedy`).
    GroupLimitedGreedy,
    /// DeepSeek-V3's auxiliary-loss-free routing: choose with `score + correction bias`,
    /// keeping the groups whose two best biased scores sum highest (the others become -inf);
    /// weight with the unbiased scores (`noaux_tc`).
    NoauxTc,
}

/// Everything a routing needs besides the logits (and the bias, for `NoauxTc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingParams {
    pub method: RoutingMethod,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Groups the experts split into (ignored by `Greedy`); must divide the expert count.
    pub n_group: usize,
    /// Groups kept per token (ignored by `Greedy`).
    pub topk_group: usize,
    /// Divide the chosen weights by their sum (plus 1e-20).
    pub normalize: bool,
    /// Multiply the chosen weights by this (DeepSeek's `routed_scaling_factor`).
    pub scale: f32,
    /// Add the correction bias when choosing (`NoauxTc` only).
    pub use_bias: bool,
}

fn scores(logits: &[f32], scoring: Scoring) -> Vec<f32> {
    match scoring {
        Scoring::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        Scoring::Softmax => {
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|e| e / sum).collect()
        }
    }
}

/// Indices of the `k` largest values (ties: lower index first), in descending order.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Keeps the `topk_group` best groups (by `group_score`) and sets the rest to `fill`.
fn mask_groups(choice: &mut [f32], n_group: usize, topk_group: usize, fill: f32, group_score: impl Fn(&[f32]) -> f32) {
    let per_group = choice.len() / n_group;
    let group_scores: Vec<f32> = choice.chunks(per_group).map(&group_score).collect();
    let keep = top_k_indices(&group_scores, topk_group);
    for (g, chunk) in choice.chunks_mut(per_group).enumerate() {
        if !keep.contains(&g) {
            chunk.iter_mut().for_each(|v| *v = fill);
        }
    }
}

/// Experts chosen for one token's scores `s` (`[E]`), in descending order of preference.
fn choose(s: &[f32], bias: Option<&[f32]>, p: &RoutingParams) -> Vec<usize> {
    match p.method {
        RoutingMethod::Greedy => top_k_indices(s, p.top_k),
        RoutingMethod::GroupLimitedGreedy => {
            let mut masked = s.to_vec();
            mask_groups(&mut masked, p.n_group, p.topk_group, 0.0, |g| {
                g.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
            });
            top_k_indices(&masked, p.top_k)
        }
        RoutingMethod::NoauxTc => {
            let mut choice: Vec<f32> = match bias.filter(|_| p.use_bias) {
                Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
                None => s.to_vec(),
            };
            mask_groups(&mut choice, p.n_group, p.topk_group, f32::NEG_INFINITY, |g| {
                top_k_indices(g, 2).iter().map(|&i| g[i]).sum()
            });
            top_k_indices(&choice, p.top_k)
        }
    }
}

/// Routes every token: `logits` is row-major `[tokens, num_experts]` in f32, `bias` the
/// `[num_experts]` correction bias (used by `NoauxTc` when `use_bias`). Returns row-major
/// `[tokens, top_k]` expert ids and weights; within a token, ids are in descending order of
/// their choice value (ties: lower id first).
///
/// The caller validates `params` (top_k <= E, groups dividing E, enough experts in the kept
/// groups); `moe-models`' `--router` parser does.
pub fn route(logits: &[f32], num_experts: usize, bias: Option<&[f32]>, p: &RoutingParams) -> (Vec<u32>, Vec<f32>) {
    let tokens = logits.len() / num_experts.max(1);
    let mut expert_ids = Vec::with_capacity(tokens * p.top_k);
    let mut weights = Vec::with_capacity(tokens * p.top_k);
    for row in logits.chunks(num_experts.max(1)) {
        let s = scores(row, p.scoring);
        let chosen = choose(&s, bias, p);
        let mut w: Vec<f32> = chosen.iter().map(|&i| s[i]).collect();
        if p.normalize {
            let sum: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= sum);
        }
        w.iter_mut().for_each(|x| *x *= p.scale);
        expert_ids.extend(chosen.iter().map(|&i| i as u32));
        weights.extend(w);
    }
    (expert_ids, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: RoutingMethod, top_k: usize, groups: (usize, usize)) -> RoutingParams {
        RoutingParams {
            method,
            top_k,
            scoring: Scoring::Softmax,
            n_group: groups.0,
            topk_group: groups.1,
            normalize: false,
            scale: 1.0,
            use_bias: true,
        }
    }

    #[test]
    fn ties_go_to_the_lower_expert_id() {
        let (ids, _) = route(
            &[1.0, 3.0, 3.0, 1.0],
            4,
            None,
            &params(RoutingMethod::Greedy, 3, (1, 1)),
        );
        assert_eq!(ids, vec![1, 2, 0]);
    }

    #[test]
    fn group_limited_masks_to_zero_and_noaux_to_minus_infinity() {
        // Sigmoid scores of 0 (logit -inf) in the kept group tie with the masked group's 0.0
        // under group_limited_greedy (the lower, masked id wins, as in transformers), but
        // never under noaux_tc, whose masked value is -inf.
        let logits = [f32::NEG_INFINITY, -30.0, 5.0, f32::NEG_INFINITY];
        let mut p = params(RoutingMethod::GroupLimitedGreedy, 2, (2, 1));
        p.scoring = Scoring::Sigmoid;
        let (ids, _) = route(&logits, 4, None, &p);
        assert_eq!(ids, vec![2, 0]);
        p.method = RoutingMethod::NoauxTc;
        let (ids, _) = route(&logits, 4, None, &p);
        assert_eq!(ids, vec![2, 3]);
    }

    #[test]
    fn normalisation_sums_in_choice_order_then_scales() {
        let mut p = params(RoutingMethod::Greedy, 2, (1, 1));
        p.scoring = Scoring::Sigmoid;
        p.normalize = true;
        p.scale = 2.5;
        let (ids, w) = route(&[0.0, 2.0, -1.0], 3, None, &p);
        assert_eq!(ids, vec![1, 0]);
        let (a, b) = (1.0 / (1.0 + (-2.0f32).exp()), 0.5f32);
        let sum = a + b + 1e-20;
        assert_eq!(w, vec![a / sum * 2.5, b / sum * 2.5]);
    }
}
