//! Benchmarks shared by `moe bench` (in-process engine) and `moe bench serve` (any
//! OpenAI-compatible server): seeded workloads, load policies, per-request timing, energy,
//! expert load, and the JSON / table / SVG reports. The CLI glue is `cli::bench`.

pub mod http;
pub mod in_process;
pub mod load;
pub mod plot;
pub mod report;
pub mod stats;
pub mod workload;

use std::io::IsTerminal;
use std::sync::Arc;

use moe_engine::ExpertLoad;

use crate::energy::EnergyMeter;
use load::{run_load, Backend, LoadPolicy};
use report::RunReport;
use workload::Workload;

/// Hooks of the backend under test that the load generator does not see.
pub struct RunHooks<'a> {
    /// Called before each run (e.g. to restart the expert-load counters).
    pub before_run: &'a dyn Fn(),
    /// The expert load accumulated over the run, when counted.
    pub expert_load: &'a dyn Fn() -> Option<ExpertLoad>,
    /// Expert-parallel groups of the model under test (1 without expert parallelism).
    pub expert_groups: usize,
}

/// Runs `workload` once per load policy, in order, and reports each run.
pub async fn run_suite<B: Backend>(
    backend: Arc<B>,
    workload: &Workload,
    loads: &[LoadPolicy],
    meter: Option<&EnergyMeter>,
    hooks: RunHooks<'_>,
) -> Vec<RunReport> {
    let mut reports = Vec::with_capacity(loads.len());
    for &load in loads {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(workload.num_requests() as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{msg:>10} {bar:40} {pos}/{len} requests {elapsed} (eta {eta})")
            {
                bar.set_style(style);
            }
            bar.set_message(match load {
                LoadPolicy::AllAtOnce => "all".to_string(),
                LoadPolicy::Rate(r) => format!("rate={r}"),
                LoadPolicy::Concurrency(c) => format!("c={c}"),
            });
            bar
        });
        let tick = bar.clone();
        let on_done: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(b) = &tick {
                b.inc(1);
            }
        });
        (hooks.before_run)();
        let energy_start = meter.and_then(EnergyMeter::millijoules);
        let outcome = run_load(backend.clone(), workload, load, on_done).await;
        let energy_end = meter.and_then(EnergyMeter::millijoules);
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let expert_load = (hooks.expert_load)();
        let report = RunReport::of(
            load,
            &outcome,
            workload.expected_output_tokens(),
            energy_start.zip(energy_end),
            expert_load.as_ref(),
            hooks.expert_groups,
        );
        if report.failed > 0 {
            tracing::warn!(
                "{} of {} requests failed; first errors: {:?}",
                report.failed,
                report.num_requests,
                report.errors
            );
            eprintln!(
                "warning: {} of {} requests failed ({})",
                report.failed,
                report.num_requests,
                report.errors.first().map_or("", String::as_str)
            );
        }
        if report.token_count_mismatches > 0 {
            eprintln!(
                "warning: {} requests streamed a different number of tokens than their usage says",
                report.token_count_mismatches
            );
        }
        reports.push(report);
    }
    reports
}
