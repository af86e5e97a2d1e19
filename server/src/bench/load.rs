//! The load generator: sends a workload's sessions to a [`Backend`] all at once, at Poisson
//! arrival times, or with a cap on sessions in flight, and records every request's timings
//! while sampling the server's counters. It knows nothing of HTTP or of the engine.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use tokio::sync::Semaphore;

use super::workload::Workload;

/// How requests are released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadPolicy {
    /// Every session starts at once (offline throughput).
    AllAtOnce,
    /// Sessions start at Poisson arrival times, this many per second.
    Rate(f64),
    /// At most this many sessions in flight (for single-turn workloads: requests).
    Concurrency(usize),
}

impl LoadPolicy {
    pub fn mode(&self) -> &'static str {
        match self {
            LoadPolicy::AllAtOnce => "all-at-once",
            LoadPolicy::Rate(_) => "rate",
            LoadPolicy::Concurrency(_) => "concurrency",
        }
    }
}

/// Start offsets in seconds of `n` Poisson arrivals at `rate` per second (exponential gaps,
/// the first one included), from `seed`.
pub fn poisson_arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let Ok(gap) = Exp::new(rate) else {
        return vec![0.0; n];
    };
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += gap.sample(&mut rng);
            t
        })
        .collect()
}

/// What a backend saw of one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// `(seconds since the request was sent, tokens)` of every streamed piece with tokens.
    pub pieces: Vec<(f64, usize)>,
    /// Seconds from sending to the end of the response.
    pub e2e_s: f64,
    /// The generated token ids, when the backend knows them.
    pub token_ids: Option<Vec<u32>>,
    /// The server's own count of generated tokens (`usage.completion_tokens`), when sent.
    pub usage_output_tokens: Option<usize>,
}

impl Completion {
    pub fn output_tokens(&self) -> usize {
        self.pieces.iter().map(|p| p.1).sum()
    }
}

/// Server-side counters at one moment; `None` where the backend cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub kv_blocks_used: Option<f64>,
    pub kv_blocks_total: Option<f64>,
    pub preemptions: Option<u64>,
    pub prefix_cache_queries: Option<u64>,
    pub prefix_cache_hits: Option<u64>,
    /// The server's GPU energy counter (`moe_gpu_energy_joules_total`), in joules.
    pub gpu_energy_joules: Option<f64>,
}

impl Counters {
    pub fn kv_usage(&self) -> Option<f64> {
        match (self.kv_blocks_used, self.kv_blocks_total) {
            (Some(u), Some(t)) if t > 0.0 => Some(u / t),
            _ => None,
        }
    }
}

/// Something that completes token-id prompts: the in-process engine or an HTTP server.
pub trait Backend: Send + Sync + 'static {
    /// Sends one greedy request for exactly `max_tokens` tokens (EOS ignored).
    fn send(&self, prompt: Vec<u32>, max_tokens: usize) -> impl Future<Output = Result<Completion, String>> + Send;
    /// The server's counters now.
    fn counters(&self) -> impl Future<Output = Counters> + Send;
    /// How often to sample [`Backend::counters`] during a run.
    fn sample_every(&self) -> Duration;
}

/// One request's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub session: usize,
    pub turn: usize,
    pub input_tokens: usize,
    pub expected_output_tokens: usize,
    /// Seconds from the start of the run to sending the request.
    pub sent_at_s: f64,
    pub result: Result<Completion, String>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub records: Vec<RequestRecord>,
    pub duration_s: f64,
    pub before: Counters,
    pub after: Counters,
    /// Highest KV-cache use (fraction of blocks) sampled during the run.
    pub peak_kv_usage: Option<f64>,
    /// Replies that were not known and were replaced by stand-in tokens in the history.
    pub stand_in_replies: usize,
}

/// Runs `workload` against `backend` under `load`; `on_request_done` is called after each
/// request (for a progress bar). Failed requests are recorded, never fatal; when a turn of
/// a session fails, its later turns are recorded as failed too.
pub async fn run_load<B: Backend>(
    backend: Arc<B>,
    workload: &Workload,
    load: LoadPolicy,
    on_request_done: Arc<dyn Fn() + Send + Sync>,
) -> RunOutcome {
    let before = backend.counters().await;
    let peak = Arc::new(Mutex::new(before.kv_usage()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (backend, peak, done) = (backend.clone(), peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(u) = backend.counters().await.kv_usage() {
                    if let Ok(mut p) = peak.lock() {
                        *p = Some(p.map_or(u, |p| p.max(u)));
                    }
                }
                tokio::time::sleep(backend.sample_every()).await;
            }
        })
    };
    let arrivals = match load {
        LoadPolicy::Rate(rate) => poisson_arrivals(workload.sessions.len(), rate, workload.spec.seed),
        _ => vec![0.0; workload.sessions.len()],
    };
    let permits = match load {
        LoadPolicy::Concurrency(n) => Some(Arc::new(Semaphore::new(n.max(1)))),
        _ => None,
    };
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workload.sessions.len());
    for (index, (plan, at)) in workload.sessions.iter().cloned().zip(arrivals).enumerate() {
        let (backend, permits, on_done) = (backend.clone(), permits.clone(), on_request_done.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            let _permit = match &permits {
                Some(p) => p.clone().acquire_owned().await.ok(),
                None => None,
            };
            let mut records = Vec::with_capacity(plan.turns());
            let mut stand_ins = 0;
            let mut prompt = plan.first_prompt.clone();
            for turn in 0..plan.turns() {
                let expected = plan.output_lens[turn];
                let sent_at_s = start.elapsed().as_secs_f64();
                let result = backend.send(prompt.clone(), expected).await;
                on_done();
                let reply = match &result {
                    Ok(c) => c.token_ids.clone().unwrap_or_else(|| {
                        stand_ins += 1;
                        plan.stand_in_replies[turn].clone()
                    }),
                    Err(_) => vec![],
                };
                let failed = result.is_err();
                records.push(RequestRecord {
                    session: index,
                    turn,
                    input_tokens: prompt.len(),
                    expected_output_tokens: expected,
                    sent_at_s,
                    result,
                });
                if failed {
                    for later in turn + 1..plan.turns() {
                        on_done();
                        records.push(RequestRecord {
                            session: index,
                            turn: later,
                            input_tokens: 0,
                            expected_output_tokens: plan.output_lens[later],
                            sent_at_s: start.elapsed().as_secs_f64(),
                            result: Err(format!("turn {turn} of the session failed")),
                        });
                    }
                    break;
                }
                match plan.next_prompt(turn, &prompt, &reply) {
                    Some(next) => prompt = next,
                    None => break,
                }
            }
            (records, stand_ins)
        }));
    }
    let mut records = Vec::with_capacity(workload.num_requests());
    let mut stand_in_replies = 0;
    for t in tasks {
        match t.await {
            Ok((r, s)) => {
                records.extend(r);
                stand_in_replies += s;
            }
            Err(e) => tracing::error!("a benchmark session task failed: {e}"),
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let after = backend.counters().await;
    let peak_kv_usage = peak.lock().ok().and_then(|p| *p);
    RunOutcome {
        records,
        duration_s,
        before,
        after,
        peak_kv_usage,
        stand_in_replies,
    }
}

#[cfg(test)]
mod tests {
    use super::poisson_arrivals;

    #[test]
    fn poisson_arrivals_are_seeded_increasing_and_average_one_over_rate() {
        let rate = 4.0;
        let t = poisson_arrivals(20_000, rate, 3);
        assert_eq!(t, poisson_arrivals(20_000, rate, 3));
        assert_ne!(t, poisson_arrivals(20_000, rate, 4));
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        let mean_gap = t[t.len() - 1] / t.len() as f64;
        assert!(
            (mean_gap - 1.0 / rate).abs() < 0.02 * (1.0 / rate),
            "mean gap {mean_gap}"
        );
        // Exponential gaps: the standard deviation equals the mean.
        let gaps: Vec<f64> = std::iter::once(t[0]).chain(t.windows(2).map(|w| w[1] - w[0])).collect();
        let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((var.sqrt() - mean_gap).abs() < 0.05 * mean_gap, "sd {}", var.sqrt());
    }
}
