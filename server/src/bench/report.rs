//! Benchmark reports: the `moe-bench/1` JSON schema (shared with `benches/hf_baseline.py`),
//! turning a run's raw records into its figures, and the one-row-per-run table on stdout.

use std::io::Write;

use moe_engine::ExpertLoad;
use serde::Serialize;
use serde_json::Value;

use super::load::{Completion, LoadPolicy, RunOutcome};
use super::stats::Summary;
use super::workload::{WorkloadKind, WorkloadSpec};
use crate::energy::EnergyFigures;

pub const SCHEMA: &str = "moe-bench/1";

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub schema: &'static str,
    pub tool: &'static str,
    pub started_at: String,
    pub device: DeviceInfo,
    pub model: ModelInfo,
    pub workload: WorkloadInfo,
    pub engine: Option<Value>,
    /// `moe bench serve` only: the URL and what `/v1/models` answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Value>,
    pub runs: Vec<RunReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: &'static str,
    pub name: String,
    pub gpu_index: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: Option<String>,
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadInfo {
    pub kind: WorkloadKind,
    pub input_len: Option<usize>,
    pub output_len: usize,
    pub num_prompts: Option<usize>,
    pub range_ratio: Option<f64>,
    pub sessions: Option<usize>,
    pub turns: Option<usize>,
    pub agent_prefix_len: Option<usize>,
    pub turn_input_len: Option<usize>,
    pub seed: u64,
}

impl WorkloadInfo {
    pub fn of(s: &WorkloadSpec) -> WorkloadInfo {
        let agent = s.kind == WorkloadKind::Agent;
        WorkloadInfo {
            kind: s.kind,
            input_len: (!agent).then_some(s.input_len),
            output_len: s.output_len,
            num_prompts: (!agent).then_some(s.num_prompts),
            range_ratio: (s.kind == WorkloadKind::Random).then_some(s.range_ratio),
            sessions: agent.then_some(s.sessions),
            turns: agent.then_some(s.turns),
            agent_prefix_len: agent.then_some(s.agent_prefix_len),
            turn_input_len: agent.then_some(s.turn_input_len),
            seed: s.seed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadInfo {
    pub mode: &'static str,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
}

impl LoadInfo {
    pub fn of(load: LoadPolicy) -> LoadInfo {
        LoadInfo {
            mode: load.mode(),
            concurrency: match load {
                LoadPolicy::Concurrency(n) => Some(n),
                _ => None,
            },
            request_rate: match load {
                LoadPolicy::Rate(r) => Some(r),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PrefixCacheFigures {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub hit_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerLoad {
    pub layer: usize,
    pub tokens_per_expert: Vec<u64>,
    pub imbalance: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpertLoadReport {
    pub layers: Vec<LayerLoad>,
    pub mean_imbalance: f64,
    pub max_imbalance: f64,
    /// Under expert parallelism: the tokens each expert group (the ranks holding a run of
    /// experts) computed, per layer, and their imbalance (what the slowest rank waits on).
    pub expert_parallel: Option<GroupLoadReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupLayerLoad {
    pub layer: usize,
    pub tokens_per_group: Vec<u64>,
    pub imbalance: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupLoadReport {
    pub groups: usize,
    pub layers: Vec<GroupLayerLoad>,
    pub mean_imbalance: f64,
    pub max_imbalance: f64,
}

/// Mean and max of `values` (0 when empty).
fn mean_max(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count().max(1) as f64;
    (values.clone().sum::<f64>() / n, values.fold(0.0, f64::max))
}

impl ExpertLoadReport {
    /// The report of `load`; `expert_groups` > 1 adds the per-group (per-rank) load.
    pub fn of(load: &ExpertLoad, expert_groups: usize) -> ExpertLoadReport {
        let layers: Vec<LayerLoad> = load
            .layers
            .iter()
            .map(|(&layer, counts)| LayerLoad {
                layer,
                tokens_per_expert: counts.clone(),
                imbalance: ExpertLoad::imbalance(counts),
            })
            .collect();
        let (mean_imbalance, max_imbalance) = mean_max(layers.iter().map(|l| l.imbalance));
        let expert_parallel = (expert_groups > 1).then(|| {
            let layers: Vec<GroupLayerLoad> = load
                .layers
                .iter()
                .map(|(&layer, counts)| {
                    let tokens_per_group = ExpertLoad::group_counts(counts, expert_groups);
                    GroupLayerLoad {
                        layer,
                        imbalance: ExpertLoad::imbalance(&tokens_per_group),
                        tokens_per_group,
                    }
                })
                .collect();
            let (mean_imbalance, max_imbalance) = mean_max(layers.iter().map(|l| l.imbalance));
            GroupLoadReport {
                groups: expert_groups,
                layers,
                mean_imbalance,
                max_imbalance,
            }
        });
        ExpertLoadReport {
            layers,
            mean_imbalance,
            max_imbalance,
            expert_parallel,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub load: LoadInfo,
    pub num_requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub expected_output_tokens: usize,
    /// The server's own count (`usage.completion_tokens` summed); null when any completed
    /// request came without usage (in-process runs: the engine's count).
    pub usage_output_tokens: Option<usize>,
    /// Completed requests whose streamed token count differed from the server's usage.
    pub token_count_mismatches: usize,
    /// Turns whose reply was unknown and replaced by seeded stand-in tokens in the history.
    pub stand_in_replies: usize,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    /// The batch's pure decode rate; null when no moment had every request decoding.
    pub steady_decode: Option<SteadyDecode>,
    pub peak_kv_cache_usage: Option<f64>,
    pub preemptions: Option<u64>,
    pub prefix_cache: Option<PrefixCacheFigures>,
    pub energy: Option<EnergyFigures>,
    pub expert_load: Option<ExpertLoadReport>,
    /// The first few distinct error messages of failed requests.
    pub errors: Vec<String>,
}

/// Output tokens per second over the window in which every completed request of the run
/// had its first token and none had its last: the whole batch decoding together, with no
/// prompt of the run still being read (what `llama-batched-bench` calls S_TG). Over a run
/// that sends every prompt at once, TPOT mixes that rate with the steps that read the other
/// prompts; this figure does not.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SteadyDecode {
    pub tokens_per_s: f64,
    /// Tokens that arrived inside the window.
    pub tokens: usize,
    pub window_s: f64,
}

impl SteadyDecode {
    /// From `(sent_at_s, completion)` of the run's completed requests.
    pub fn of<'a>(done: impl Iterator<Item = (f64, &'a Completion)> + Clone) -> Option<SteadyDecode> {
        let at = |sent: f64, piece: Option<&(f64, usize)>| piece.map(|p| sent + p.0);
        let start = done
            .clone()
            .map(|(s, c)| at(s, c.pieces.first()))
            .try_fold(f64::MIN, |a, t| Some(a.max(t?)))?;
        let end = done
            .clone()
            .map(|(s, c)| at(s, c.pieces.last()))
            .try_fold(f64::MAX, |a, t| Some(a.min(t?)))?;
        let window_s = end - start;
        let tokens: usize = done
            .flat_map(|(s, c)| c.pieces.iter().filter(move |p| s + p.0 > start && s + p.0 <= end))
            .map(|p| p.1)
            .sum();
        (window_s > 0.0 && tokens > 0).then(|| SteadyDecode {
            tokens_per_s: tokens as f64 / window_s,
            tokens,
            window_s,
        })
    }
}

fn delta(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

impl RunReport {
    /// The figures of one run. Energy comes from the server's own counter when its `/metrics`
    /// has one (it covers exactly the GPUs the server uses), else from `energy_mj`, this
    /// machine's NVML counter before and after, if read.
    pub fn of(
        load: LoadPolicy,
        outcome: &RunOutcome,
        expected_output_tokens: usize,
        energy_mj: Option<(u64, u64)>,
        expert_load: Option<&ExpertLoad>,
        expert_groups: usize,
    ) -> RunReport {
        let mut ttft = Vec::new();
        let mut tpot = Vec::new();
        let mut itl = Vec::new();
        let mut e2e = Vec::new();
        let (mut input_tokens, mut output_tokens, mut completed) = (0, 0, 0);
        let (mut usage_total, mut usage_known, mut mismatches) = (0, true, 0);
        let mut errors: Vec<String> = Vec::new();
        for r in &outcome.records {
            let c = match &r.result {
                Ok(c) => c,
                Err(e) => {
                    if errors.len() < 5 && !errors.contains(e) {
                        errors.push(e.clone());
                    }
                    continue;
                }
            };
            completed += 1;
            input_tokens += r.input_tokens;
            let out = c.output_tokens();
            output_tokens += out;
            match c.usage_output_tokens {
                Some(u) => {
                    usage_total += u;
                    mismatches += usize::from(u != out);
                }
                None => usage_known = false,
            }
            e2e.push(c.e2e_s * 1e3);
            if let Some(&(first, _)) = c.pieces.first() {
                ttft.push(first * 1e3);
                if out > 1 {
                    tpot.push((c.e2e_s - first) * 1e3 / (out - 1) as f64);
                }
            }
            itl.extend(c.pieces.windows(2).map(|w| (w[1].0 - w[0].0) * 1e3));
        }
        let secs = outcome.duration_s.max(f64::MIN_POSITIVE);
        let prefix_cache = match (
            delta(outcome.before.prefix_cache_queries, outcome.after.prefix_cache_queries),
            delta(outcome.before.prefix_cache_hits, outcome.after.prefix_cache_hits),
        ) {
            (Some(q), Some(h)) => Some(PrefixCacheFigures {
                queried_tokens: q,
                hit_tokens: h,
                hit_rate: if q == 0 { 0.0 } else { h as f64 / q as f64 },
            }),
            _ => None,
        };
        RunReport {
            load: LoadInfo::of(load),
            num_requests: outcome.records.len(),
            completed,
            failed: outcome.records.len() - completed,
            duration_s: outcome.duration_s,
            requests_per_s: completed as f64 / secs,
            input_tokens,
            output_tokens,
            expected_output_tokens,
            usage_output_tokens: (usage_known && completed > 0).then_some(usage_total),
            token_count_mismatches: mismatches,
            stand_in_replies: outcome.stand_in_replies,
            input_tokens_per_s: input_tokens as f64 / secs,
            output_tokens_per_s: output_tokens as f64 / secs,
            total_tokens_per_s: (input_tokens + output_tokens) as f64 / secs,
            ttft_ms: Summary::of(&ttft),
            tpot_ms: Summary::of(&tpot),
            itl_ms: Summary::of(&itl),
            e2e_ms: Summary::of(&e2e),
            steady_decode: SteadyDecode::of(
                outcome
                    .records
                    .iter()
                    .filter_map(|r| r.result.as_ref().ok().map(|c| (r.sent_at_s, c))),
            ),
            peak_kv_cache_usage: outcome.peak_kv_usage,
            preemptions: delta(outcome.before.preemptions, outcome.after.preemptions),
            prefix_cache,
            energy: match (outcome.before.gpu_energy_joules, outcome.after.gpu_energy_joules) {
                (Some(a), Some(b)) => EnergyFigures::of_joules(b - a, outcome.duration_s, output_tokens, "server"),
                _ => energy_mj.and_then(|(a, b)| EnergyFigures::between(a, b, outcome.duration_s, output_tokens)),
            },
            expert_load: expert_load.map(|l| ExpertLoadReport::of(l, expert_groups)),
            errors,
        }
    }

    /// A short label of the load, e.g. `c=8`, `rate=2`, `all`.
    pub fn load_label(&self) -> String {
        match (self.load.concurrency, self.load.request_rate) {
            (Some(c), _) => format!("c={c}"),
            (_, Some(r)) => format!("rate={r}"),
            _ => "all".into(),
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Writes one row per run: load, requests, throughput, latency percentiles, KV, cache, energy.
pub fn write_table(out: &mut impl Write, runs: &[RunReport]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<9} {:>8} {:>7} {:>7} {:>9} {:>9} {:>15} {:>9} {:>9} {:>8} {:>15} {:>6} {:>6} {:>6} {:>7} {:>11}",
        "load",
        "ok/fail",
        "secs",
        "req/s",
        "in tok/s",
        "out tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50",
        "ITL p50",
        "dec t/s",
        "e2e p50/p99 ms",
        "KV pk",
        "hit %",
        "preem",
        "tok/J",
        "imbal m/max"
    )?;
    for r in runs {
        writeln!(
            out,
            "{:<9} {:>8} {:>7.2} {:>7.2} {:>9.1} {:>9.1} {:>15} {:>9.2} {:>9.2} {:>8} {:>15} {:>6} {:>6} {:>6} {:>7} {:>11}",
            r.load_label(),
            format!("{}/{}", r.completed, r.failed),
            r.duration_s,
            r.requests_per_s,
            r.input_tokens_per_s,
            r.output_tokens_per_s,
            format!("{:.1}/{:.1}", r.ttft_ms.p50, r.ttft_ms.p99),
            r.tpot_ms.p50,
            r.itl_ms.p50,
            opt(r.steady_decode.map(|d| d.tokens_per_s), 1),
            format!("{:.1}/{:.1}", r.e2e_ms.p50, r.e2e_ms.p99),
            opt(r.peak_kv_cache_usage.map(|u| u * 100.0), 1),
            opt(r.prefix_cache.map(|p| p.hit_rate * 100.0), 1),
            r.preemptions.map_or("-".into(), |p| p.to_string()),
            opt(r.energy.map(|e| e.output_tokens_per_joule), 2),
            r.expert_load.as_ref().map_or("-".into(), |e| format!(
                "{:.2}/{:.2}",
                e.mean_imbalance, e.max_imbalance
            )),
        )?;
    }
    for r in runs {
        if let Some(ep) = r.expert_load.as_ref().and_then(|e| e.expert_parallel.as_ref()) {
            writeln!(
                out,
                "{:<9} expert-parallel load over {} groups (max/mean tokens a rank computes): mean {:.2}, worst layer {:.2}",
                r.load_label(),
                ep.groups,
                ep.mean_imbalance,
                ep.max_imbalance
            )?;
        }
    }
    Ok(())
}

/// The current time as RFC 3339 UTC, seconds precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::load::{Completion, Counters, LoadPolicy, RequestRecord, RunOutcome};
    use super::{RunReport, SteadyDecode};

    fn completion(pieces: &[(f64, usize)]) -> Completion {
        Completion {
            pieces: pieces.to_vec(),
            e2e_s: pieces.last().map_or(0.0, |p| p.0),
            token_ids: None,
            usage_output_tokens: None,
        }
    }

    /// Two requests sent together: one gets its first token at 1 s, the other (whose prompt
    /// was read second) at 3 s; both then get a token a second. The window runs from 3 s to
    /// the first request's last token, 6 s, and holds the tokens of both after 3 s.
    #[test]
    fn steady_decode_counts_only_the_window_where_every_request_decodes() {
        let early = completion(&[(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1), (5.0, 1), (6.0, 1)]);
        let late = completion(&[(3.0, 1), (4.0, 1), (5.0, 1), (6.0, 1), (7.0, 1), (8.0, 1)]);
        let got = SteadyDecode::of([(0.0, &early), (0.0, &late)].into_iter()).unwrap();
        // early: 4, 5, 6 s; late: 4, 5, 6 s.
        assert_eq!(got.tokens, 6);
        assert_eq!(got.window_s, 3.0);
        assert_eq!(got.tokens_per_s, 2.0);
        // Send times shift the window: sent 10 s apart, the requests never decode together.
        assert_eq!(SteadyDecode::of([(0.0, &early), (10.0, &late)].into_iter()), None);
        // One request: its tokens after the first over the time after the first (1 / TPOT).
        let one = SteadyDecode::of([(0.0, &early)].into_iter()).unwrap();
        assert_eq!((one.tokens, one.window_s), (5, 5.0));
        // A completion without tokens leaves no window.
        let empty = completion(&[]);
        assert_eq!(SteadyDecode::of([(0.0, &early), (0.0, &empty)].into_iter()), None);
    }

    /// One request of 10 output tokens over 2 s, with these counters around the run.
    fn outcome(before: Counters, after: Counters) -> RunOutcome {
        let done = Completion {
            pieces: vec![(0.5, 1), (1.0, 9)],
            e2e_s: 2.0,
            token_ids: None,
            usage_output_tokens: Some(10),
        };
        RunOutcome {
            records: vec![RequestRecord {
                session: 0,
                turn: 0,
                input_tokens: 4,
                expected_output_tokens: 10,
                sent_at_s: 0.0,
                result: Ok(done),
            }],
            duration_s: 2.0,
            before,
            after,
            peak_kv_usage: None,
            stand_in_replies: 0,
        }
    }

    #[test]
    fn energy_comes_from_the_servers_counter_when_it_has_one() {
        let at = |j| Counters {
            gpu_energy_joules: Some(j),
            ..Counters::default()
        };
        let local = Some((0, 40_000)); // 40 J on this machine's GPU
        let served = RunReport::of(
            LoadPolicy::AllAtOnce,
            &outcome(at(100.0), at(120.0)),
            10,
            local,
            None,
            1,
        );
        let e = served.energy.unwrap();
        assert_eq!(
            (e.source, e.joules, e.avg_power_w, e.output_tokens_per_joule),
            ("server", 20.0, 10.0, 0.5)
        );
        let plain = outcome(Counters::default(), Counters::default());
        let e = RunReport::of(LoadPolicy::AllAtOnce, &plain, 10, local, None, 1)
            .energy
            .unwrap();
        assert_eq!((e.source, e.joules), ("nvml", 40.0));
        assert!(RunReport::of(LoadPolicy::AllAtOnce, &plain, 10, None, None, 1)
            .energy
            .is_none());
    }
}
