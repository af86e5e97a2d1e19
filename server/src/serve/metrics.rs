//! Prometheus metrics of `/metrics`: engine gauges and counters (read from the engine at
//! scrape time), request latency histograms (recorded by the handlers) and, where NVML can
//! read the model's GPUs, their energy, power and output tokens per joule.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moe_engine::engine::EngineStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::energy::{EnergyMeter, EnergyWindow};

/// The span of `moe_output_tokens_per_joule`.
pub const ENERGY_WINDOW: Duration = Duration::from_secs(60);

/// The GPU energy series; they exist only with a meter (absent, not zero, without NVML).
struct GpuEnergy {
    meter: EnergyMeter,
    joules: Counter<f64, AtomicU64>,
    watts: Gauge<f64, AtomicU64>,
    tokens_per_joule: Gauge<f64, AtomicU64>,
    /// The counter reading already added to `joules` and the window of readings.
    seen: Mutex<(Option<u64>, EnergyWindow)>,
}

impl GpuEnergy {
    fn register(meter: EnergyMeter, registry: &mut Registry) -> Self {
        let energy = GpuEnergy {
            meter,
            joules: Counter::default(),
            watts: Gauge::default(),
            tokens_per_joule: Gauge::default(),
            seen: Mutex::new((None, EnergyWindow::new(ENERGY_WINDOW))),
        };
        registry.register(
            "gpu_energy_joules",
            "Energy the model's GPUs used since the server started (NVML's counter)",
            energy.joules.clone(),
        );
        registry.register(
            "gpu_power_watts",
            "Power the model's GPUs draw now",
            energy.watts.clone(),
        );
        registry.register(
            "output_tokens_per_joule",
            "Tokens generated per joule of GPU energy over the last minute",
            energy.tokens_per_joule.clone(),
        );
        energy
    }

    /// Reads the GPUs now; `generation_tokens` is the engine's total so far.
    fn sample(&self, generation_tokens: u64) {
        // Read under the lock, so readings and their bookkeeping stay in order when a scrape
        // and the once-a-second reading race.
        if let Ok(mut seen) = self.seen.lock() {
            let Some(mj) = self.meter.millijoules() else { return };
            let (last, window) = &mut *seen;
            if let Some(before) = *last {
                // A counter that went back (driver reload) adds nothing this time.
                self.joules.inc_by(mj.saturating_sub(before) as f64 / 1000.0);
            }
            *last = Some(mj);
            window.push(Instant::now(), mj, generation_tokens);
            if let Some(tpj) = window.tokens_per_joule() {
                self.tokens_per_joule.set(tpj);
            }
        }
        if let Some(w) = self.meter.watts() {
            self.watts.set(w);
        }
    }
}

pub struct Metrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    preemptions: Counter,
    kv_blocks_cached: Gauge,
    kv_bytes_used: Gauge,
    kv_bytes_total: Gauge,
    /// Cache bytes of one block (the model's KV-cache spec x block size).
    kv_block_bytes: u64,
    prefix_cache_queries: Counter,
    prefix_cache_hits: Counter,
    pub requests: Counter,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    /// Engine totals already added to the counters.
    seen: Mutex<EngineStats>,
    energy: Option<GpuEnergy>,
}

impl Metrics {
    /// Metrics of a server whose cache keeps `kv_bytes_per_token` bytes a token (all layers,
    /// from the model's KV-cache spec) in blocks of `block_size` tokens; with `meter`, the
    /// GPU energy series too.
    pub fn new(kv_bytes_per_token: usize, block_size: usize, meter: Option<EnergyMeter>) -> Self {
        let mut registry = Registry::with_prefix("moe");
        let running = Gauge::default();
        let waiting = Gauge::default();
        let kv_blocks_used = Gauge::default();
        let kv_blocks_total = Gauge::default();
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        let preemptions = Counter::default();
        let kv_blocks_cached = Gauge::default();
        let kv_bytes_used = Gauge::default();
        let kv_bytes_total = Gauge::default();
        let kv_bytes_per_token_gauge: Gauge = Gauge::default();
        kv_bytes_per_token_gauge.set(kv_bytes_per_token as i64);
        let prefix_cache_queries = Counter::default();
        let prefix_cache_hits = Counter::default();
        let requests = Counter::default();
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let inter_token = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let e2e = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register("num_requests_running", "Requests being computed", running.clone());
        registry.register(
            "num_requests_waiting",
            "Requests waiting to be scheduled",
            waiting.clone(),
        );
        registry.register(
            "kv_cache_blocks_used",
            "KV-cache blocks held by requests",
            kv_blocks_used.clone(),
        );
        registry.register(
            "kv_cache_blocks_total",
            "KV-cache blocks in all",
            kv_blocks_total.clone(),
        );
        registry.register(
            "kv_cache_bytes_per_token",
            "KV-cache bytes one token keeps over all layers (the model's cache spec)",
            kv_bytes_per_token_gauge,
        );
        registry.register(
            "kv_cache_bytes_used",
            "KV-cache bytes in blocks held by requests",
            kv_bytes_used.clone(),
        );
        registry.register("kv_cache_bytes_total", "KV-cache bytes in all", kv_bytes_total.clone());
        registry.register("prompt_tokens", "Prompt tokens admitted", prompt_tokens.clone());
        registry.register("generation_tokens", "Tokens generated", generation_tokens.clone());
        registry.register(
            "preemptions",
            "Requests preempted for lack of KV blocks",
            preemptions.clone(),
        );
        registry.register(
            "kv_cache_blocks_cached",
            "KV-cache blocks no request holds that keep a reusable prefix",
            kv_blocks_cached.clone(),
        );
        registry.register(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            prefix_cache_queries.clone(),
        );
        registry.register(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed again)",
            prefix_cache_hits.clone(),
        );
        registry.register("requests", "Requests accepted", requests.clone());
        registry.register("time_to_first_token_seconds", "Time to first token", ttft.clone());
        registry.register(
            "inter_token_latency_seconds",
            "Time between streamed tokens",
            inter_token.clone(),
        );
        registry.register(
            "e2e_request_latency_seconds",
            "Request latency, start to finish",
            e2e.clone(),
        );
        let energy = meter.map(|m| GpuEnergy::register(m, &mut registry));
        if let Some(e) = &energy {
            e.sample(0);
        }
        Metrics {
            registry,
            running,
            waiting,
            kv_blocks_used,
            kv_blocks_total,
            prompt_tokens,
            generation_tokens,
            preemptions,
            kv_blocks_cached,
            kv_bytes_used,
            kv_bytes_total,
            kv_block_bytes: (kv_bytes_per_token as u64).saturating_mul(block_size as u64),
            prefix_cache_queries,
            prefix_cache_hits,
            requests,
            ttft,
            inter_token,
            e2e,
            seen: Mutex::new(EngineStats::default()),
            energy,
        }
    }

    /// Whether the GPU energy series are exported.
    pub fn has_energy(&self) -> bool {
        self.energy.is_some()
    }

    /// Reads the GPUs' energy and power (the server does every second, for the window).
    pub fn sample_energy(&self, generation_tokens: u64) {
        if let Some(e) = &self.energy {
            e.sample(generation_tokens);
        }
    }

    /// Refreshes from the engine's stats and renders the text exposition format.
    pub fn render(&self, stats: EngineStats) -> String {
        self.running.set(stats.running as i64);
        self.waiting.set(stats.waiting as i64);
        self.kv_blocks_used.set(stats.blocks_used as i64);
        self.kv_blocks_total.set(stats.blocks_total as i64);
        self.kv_blocks_cached.set(stats.blocks_cached as i64);
        let bytes =
            |blocks: usize| i64::try_from((blocks as u64).saturating_mul(self.kv_block_bytes)).unwrap_or(i64::MAX);
        self.kv_bytes_used.set(bytes(stats.blocks_used));
        self.kv_bytes_total.set(bytes(stats.blocks_total));
        if let Ok(mut seen) = self.seen.lock() {
            self.prompt_tokens
                .inc_by(stats.prompt_tokens.saturating_sub(seen.prompt_tokens));
            self.generation_tokens
                .inc_by(stats.generation_tokens.saturating_sub(seen.generation_tokens));
            self.preemptions
                .inc_by(stats.preemptions.saturating_sub(seen.preemptions));
            self.prefix_cache_queries
                .inc_by(stats.prefix_cache_queries.saturating_sub(seen.prefix_cache_queries));
            self.prefix_cache_hits
                .inc_by(stats.prefix_cache_hits.saturating_sub(seen.prefix_cache_hits));
            *seen = stats;
        }
        self.sample_energy(stats.generation_tokens);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
