//! Per-request token sampling on host f32 logits: presence/frequency penalties, greedy,
//! temperature, top-k, min-p, top-p, and logprobs. The random draw of each step depends only on
//! (request seed, step), so the same seed gives the same tokens whatever else is in the batch,
//! and a preempted request that is recomputed draws the same tokens again.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

/// Most alternatives a request may ask logprobs for.
pub const MAX_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep tokens whose probability (after temperature) is at least `min_p` times the largest
    /// one; in [0, 1], 0 disables.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated; in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated; in [-2, 2].
    pub frequency_penalty: f32,
    /// Seed of this request's draws; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// `Some(n)`: report the logprob of the chosen token and of the `n` most likely ones
    /// (n <= 20).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return invalid(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return invalid(format!("logprobs must be at most {MAX_LOGPROBS}, got {n}"));
            }
        }
        Ok(())
    }
}

/// One drawn token, with its logprobs when the request asked for them.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Log-softmax of the raw logits at `token`; `None` unless logprobs were requested.
    pub logprob: Option<f32>,
    /// The `n` most likely tokens by raw logits, descending (ties: lower id first).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples tokens for one request. Holds no mutable state: each step's generator is derived
/// from (base seed, step).
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = match params.seed {
            Some(s) => s,
            None => ChaCha8Rng::from_os_rng().random(),
        };
        Ok(Sampler { params, seed })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether this request's token is the plain argmax of its logits for a request that has
    /// generated `generated` (greedy, no logprobs, no penalty in effect): then the step may
    /// pick it where the logits are, without sending them to the host.
    pub fn is_plain_greedy(&self, generated: &[u32]) -> bool {
        let p = &self.params;
        p.temperature == 0.0
            && p.logprobs.is_none()
            && ((p.presence_penalty == 0.0 && p.frequency_penalty == 0.0) || generated.is_empty())
    }

    /// The base seed of this request's draws (the OS-drawn one when none was given).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks token `step` (= `generated.len()`) from `logits` (`[vocab]`); `generated` is this
    /// request's output so far, which the penalties count.
    pub fn sample(&self, logits: &[f32], generated: &[u32], step: usize) -> SampledToken {
        let (logprob_of, top_logprobs) = match self.params.logprobs {
            Some(n) => {
                let lse = log_sum_exp(logits);
                (Some(lse), top_logprobs(logits, n, lse))
            }
            None => (None, Vec::new()),
        };
        let penalised = self.penalise(logits, generated);
        let token = self.choose(penalised.as_deref().unwrap_or(logits), step);
        SampledToken {
            token,
            logprob: logprob_of
                .map(|lse| (logits.get(token as usize).copied().unwrap_or(f32::NAN) as f64 - lse) as f32),
            top_logprobs,
        }
    }

    /// Logits with the presence/frequency penalties applied; `None` when they change nothing.
    fn penalise(&self, logits: &[f32], generated: &[u32]) -> Option<Vec<f32>> {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if (presence == 0.0 && frequency == 0.0) || generated.is_empty() {
            return None;
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        let mut out = logits.to_vec();
        for (t, c) in counts {
            if let Some(l) = out.get_mut(t as usize) {
                *l -= presence + frequency * c as f32;
            }
        }
        Some(out)
    }

    fn choose(&self, logits: &[f32], step: usize) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature as f64;
        // Candidates: non-NaN logits, cut to the top-k (ties: lower id first).
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let k = self.params.top_k;
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        let max = order.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        // Softmax at temperature t.
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] - max) as f64 / t).exp()).collect();
        normalise(&mut probs);
        // min-p: the largest probability is exp(0) / total, i.e. the max of `probs`.
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p as f64 * probs.iter().cloned().fold(0.0, f64::max);
            let (kept, kept_probs): (Vec<usize>, Vec<f64>) = order
                .iter()
                .copied()
                .zip(probs.iter().copied())
                .filter(|&(_, p)| p >= floor)
                .unzip();
            order = kept;
            probs = kept_probs;
        }
        // top-p: the smallest set of most likely tokens holding at least `top_p` of the mass.
        if self.params.top_p < 1.0 {
            let mut idx: Vec<usize> = (0..order.len()).collect();
            idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(order[a].cmp(&order[b])));
            let total: f64 = probs.iter().sum();
            let mut mass = 0.0;
            let mut keep = idx.len();
            for (n, &j) in idx.iter().enumerate() {
                mass += probs[j] / total;
                if mass >= self.params.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            idx.truncate(keep);
            order = idx.iter().map(|&j| order[j]).collect();
            probs = idx.iter().map(|&j| probs[j]).collect();
        }
        normalise(&mut probs);
        let draw: f64 = step_rng(self.seed, step).random();
        let mut acc = 0.0;
        for (p, &i) in probs.iter().zip(&order) {
            acc += p;
            if draw < acc {
                return i as u32;
            }
        }
        // Rounding left the draw past the last bucket: take the most likely candidate.
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(order[b].cmp(&order[a])));
        best.map_or_else(|| argmax(logits), |j| order[j] as u32)
    }
}

/// The generator of one step: ChaCha8 keyed by the request seed, on the stream numbered by the
/// step, so distinct (seed, step) pairs never share a stream.
fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64);
    rng
}

fn normalise(probs: &mut [f64]) {
    let total: f64 = probs.iter().sum();
    if total > 0.0 {
        probs.iter_mut().for_each(|p| *p /= total);
    }
}

/// log(sum(exp(logits))) over the non-NaN logits, in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (l as f64 - max).exp())
        .sum();
    max + sum.ln()
}

/// The `n` largest logits as (id, log-softmax), descending, ties lower id first.
fn top_logprobs(logits: &[f32], n: usize, lse: f64) -> Vec<(u32, f32)> {
    let mut ids: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if n == 0 {
        return Vec::new();
    }
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by_logit);
        ids.truncate(n);
    }
    ids.sort_by(by_logit);
    ids.into_iter()
        .map(|i| (i as u32, (logits[i] as f64 - lse) as f32))
        .collect()
}

/// The greedy rule, shared with the device's greedy choice ([`moe_kernels::sampling`]).
pub use moe_kernels::sampling::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Draws `n` consecutive steps with no penalties.
    fn run(s: &Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n).map(|step| s.sample(logits, &[], step).token).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let s = Sampler::new(SamplingParams::default()).unwrap();
        let out = s.sample(&[0.1, 3.0, -1.0, 3.0], &[], 0);
        assert_eq!(
            out,
            SampledToken {
                token: 1,
                logprob: None,
                top_logprobs: vec![]
            }
        );
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 0.5]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_limits_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draws = |seed| run(&Sampler::new(params(1.0, 1.0, 3, seed)).unwrap(), &logits, 200);
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let mut top3: Vec<usize> = (0..50).collect();
        top3.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let allowed: Vec<u32> = top3[..3].iter().map(|&i| i as u32).collect();
        assert!(draws(7).iter().all(|t| allowed.contains(t)));
        // With 200 draws over 3 tokens of similar mass, all three appear.
        for a in &allowed {
            assert!(draws(7).contains(a));
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds ~88% of the mass: top_p 0.5 must always pick it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let s = Sampler::new(params(1.0, 0.5, 0, 1)).unwrap();
        assert!(run(&s, &logits, 100).iter().all(|&t| t == 0));
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(Sampler::new(params(-1.0, 1.0, 0, 1)).is_err());
        assert!(Sampler::new(params(1.0, 0.0, 0, 1)).is_err());
        assert!(Sampler::new(params(f32::NAN, 1.0, 0, 1)).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let message = |p: SamplingParams| match p.validate() {
            Err(EngineError::InvalidRequest(m)) => m,
            other => panic!("expected InvalidRequest, got {other:?}"),
        };
        let d = SamplingParams::default;
        assert!(message(SamplingParams {
            temperature: -0.5,
            ..d()
        })
        .contains("temperature"));
        assert!(message(SamplingParams {
            temperature: f32::NAN,
            ..d()
        })
        .contains("temperature"));
        assert!(message(SamplingParams { top_p: 1.5, ..d() }).contains("top_p"));
        assert!(message(SamplingParams { top_p: f32::NAN, ..d() }).contains("top_p"));
        assert!(message(SamplingParams { min_p: -0.1, ..d() }).contains("min_p"));
        assert!(message(SamplingParams { min_p: 1.1, ..d() }).contains("min_p"));
        assert!(message(SamplingParams { min_p: f32::NAN, ..d() }).contains("min_p"));
        assert!(message(SamplingParams {
            presence_penalty: 2.5,
            ..d()
        })
        .contains("presence_penalty"));
        assert!(message(SamplingParams {
            presence_penalty: f32::NAN,
            ..d()
        })
        .contains("presence_penalty"));
        assert!(message(SamplingParams {
            frequency_penalty: -2.1,
            ..d()
        })
        .contains("frequency_penalty"));
        assert!(message(SamplingParams {
            logprobs: Some(21),
            ..d()
        })
        .contains("logprobs"));
        let edge = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logprobs: Some(20),
            ..d()
        };
        assert!(edge.validate().is_ok());
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        // Values exact in binary, so the ties below are real ties.
        let logits = [2.0, 1.75, 1.0, 0.0];
        let p = |presence, frequency| SamplingParams {
            presence_penalty: presence,
            frequency_penalty: frequency,
            ..SamplingParams::default()
        };
        let pick = |s: SamplingParams, generated: &[u32]| {
            Sampler::new(s)
                .unwrap()
                .sample(&logits, generated, generated.len())
                .token
        };
        assert_eq!(pick(p(0.0, 0.0), &[0, 0]), 0);
        // Token 0 twice: 0.125 + 2 * 0.0625 = 0.25 -> 1.75, a tie with token 1: lower id wins.
        assert_eq!(pick(p(0.125, 0.0625), &[0, 0]), 0);
        // 0.125 + 2 * 0.125 = 0.375 -> 1.625 < 1.75.
        assert_eq!(pick(p(0.125, 0.125), &[0, 0]), 1);
        // Presence counts once however often the token occurred: 2 - 0.5 = 1.5 < 1.75 ...
        assert_eq!(pick(p(0.5, 0.0), &[0, 0, 0, 0]), 1);
        // ... and 2 - 0.125 = 1.875 > 1.75.
        assert_eq!(pick(p(0.125, 0.0), &[0, 0, 0, 0]), 0);
        // Frequency counts each occurrence: token 0 three times 2 - 1.5 = 0.5, token 1 once 1.25.
        assert_eq!(pick(p(0.0, 0.5), &[0, 1, 0, 0]), 1);
        // Token 0 once 1.5, token 1 twice 0.75.
        assert_eq!(pick(p(0.0, 0.5), &[0, 1, 1]), 0);
        // Negative penalties encourage repeats: token 2 gets 1.0 + 2 = 3.0.
        assert_eq!(pick(p(-2.0, 0.0), &[2]), 2);
        // Ids outside the vocabulary are ignored.
        assert_eq!(pick(p(2.0, 2.0), &[99]), 0);
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // Probabilities ∝ e^0, e^-1, e^-2, e^-5: relative to the max 1, 0.37, 0.14, 0.007.
        let logits = [0.0, -1.0, -2.0, -5.0];
        let s = |min_p| {
            Sampler::new(SamplingParams {
                min_p,
                temperature: 1.0,
                seed: Some(3),
                ..Default::default()
            })
        };
        let seen = |min_p| {
            let mut v = run(&s(min_p).unwrap(), &logits, 400);
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(seen(0.2), vec![0, 1]);
        assert_eq!(seen(0.1), vec![0, 1, 2]);
        assert_eq!(seen(0.5), vec![0]);
        assert_eq!(seen(1.0), vec![0]);
        // min-p applies after temperature: at T=4 the ratios are e^-0.25, e^-0.5, e^-1.25.
        let hot = Sampler::new(SamplingParams {
            min_p: 0.5,
            temperature: 4.0,
            seed: Some(3),
            ..Default::default()
        });
        let mut v = run(&hot.unwrap(), &logits, 400);
        v.sort();
        v.dedup();
        assert_eq!(v, vec![0, 1, 2]);
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN, -1.0];
        let finite = [1.0f64, 3.0, 2.0, 3.0, -1.0];
        let lse = finite.iter().map(|l| l.exp()).sum::<f64>().ln();
        let expect = |i: usize| (logits[i] as f64 - lse) as f32;
        // Penalties and temperature do not change the reported logprobs.
        let s = Sampler::new(SamplingParams {
            logprobs: Some(3),
            presence_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        let out = s.sample(&logits, &[1, 3], 2);
        assert_eq!(out.token, 2); // 3.0 - 2 = 1.0 for tokens 1 and 3
        assert!((out.logprob.unwrap() - expect(2)).abs() < 1e-6);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![1, 3, 2]); // ties: lower id first
        for &(i, lp) in &out.top_logprobs {
            assert!((lp - expect(i as usize)).abs() < 1e-6);
        }
        // All of them: probabilities sum to 1, NaN left out.
        let all = Sampler::new(SamplingParams {
            logprobs: Some(20),
            temperature: 0.7,
            seed: Some(1),
            ..Default::default()
        })
        .unwrap()
        .sample(&logits, &[], 0);
        assert_eq!(all.top_logprobs.len(), 5);
        let total: f32 = all.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(all.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_ne!(all.token, 4);
        assert!((all.logprob.unwrap() - expect(all.token as usize)).abs() < 1e-6);
        // Some(0): the chosen token's logprob only.
        let zero = Sampler::new(SamplingParams {
            logprobs: Some(0),
            ..Default::default()
        })
        .unwrap();
        let out = zero.sample(&logits, &[], 0);
        assert_eq!((out.token, out.top_logprobs.len()), (1, 0));
        assert!((out.logprob.unwrap() - expect(1)).abs() < 1e-6);
    }

    #[test]
    fn draws_depend_only_on_seed_and_step() {
        let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
        let s = Sampler::new(params(1.0, 1.0, 0, 42)).unwrap();
        let forward = run(&s, &logits, 100);
        // Out of order, interleaved with another request's draws, from a fresh sampler.
        let again = Sampler::new(params(1.0, 1.0, 0, 42)).unwrap();
        let other = Sampler::new(params(1.0, 1.0, 0, 43)).unwrap();
        let mut backward = vec![0; 100];
        for step in (0..100).rev() {
            other.sample(&logits, &[], step);
            backward[step] = again.sample(&logits, &[], step).token;
        }
        assert_eq!(forward, backward);
        assert_ne!(forward, run(&other, &logits, 100));
        // Steps differ from one another (not one repeated draw).
        let mut distinct = forward.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 10);
        // An OS-drawn seed is fixed for the sampler's life.
        let os = Sampler::new(SamplingParams {
            temperature: 1.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(run(&os, &logits, 50), run(&os, &logits, 50));
        let replay = Sampler::new(params(1.0, 1.0, 0, os.seed())).unwrap();
        assert_eq!(run(&os, &logits, 50), run(&replay, &logits, 50));
    }

    #[test]
    fn nan_logits_are_never_chosen() {
        let logits = [f32::NAN, 0.0, f32::NAN, 0.1, f32::NAN];
        let s = Sampler::new(params(1.0, 1.0, 0, 5)).unwrap();
        assert!(run(&s, &logits, 200).iter().all(|&t| t == 1 || t == 3));
        let greedy = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(greedy.sample(&logits, &[], 0).token, 3);
    }
}
