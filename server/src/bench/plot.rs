//! `--plot FILE.svg`: output throughput, and output tokens per joule when measured, against
//! concurrency, one panel each (plotters' SVG backend; no hand-written SVG).

use std::path::Path;

use plotters::prelude::*;

use super::report::RunReport;

/// The x value of a run: its concurrency cap, or for all-at-once runs the requests in
/// flight at the start (every session). Rate-driven runs have none and are left out.
fn concurrency_of(run: &RunReport, sessions: usize) -> Option<f64> {
    match (run.load.mode, run.load.concurrency) {
        (_, Some(c)) => Some(c as f64),
        ("all-at-once", None) => Some(sessions as f64),
        _ => None,
    }
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    points: &[(f64, f64)],
    color: RGBColor,
) -> anyhow::Result<()> {
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(f64::MIN_POSITIVE) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..x_max * 1.3).log_scale(), 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("concurrency (requests or sessions in flight)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
    Ok(())
}

/// Draws the runs into `path`. `sessions` is the workload's session count (the concurrency
/// of an all-at-once run).
pub fn write_plot(path: &Path, title: &str, runs: &[RunReport], sessions: usize) -> anyhow::Result<()> {
    let mut throughput = Vec::new();
    let mut per_joule = Vec::new();
    for r in runs {
        let Some(x) = concurrency_of(r, sessions) else { continue };
        throughput.push((x, r.output_tokens_per_s));
        if let Some(e) = r.energy {
            per_joule.push((x, e.output_tokens_per_joule));
        }
    }
    if throughput.is_empty() {
        anyhow::bail!(
            "--plot: no run has a concurrency to plot against (runs driven by --request-rate are not plotted)"
        );
    }
    throughput.sort_by(|a, b| a.0.total_cmp(&b.0));
    per_joule.sort_by(|a, b| a.0.total_cmp(&b.0));
    let height = if per_joule.is_empty() { 420 } else { 800 };
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
    if per_joule.is_empty() {
        panel(&root, title, "output tokens/s", &throughput, BLUE)?;
    } else {
        let halves = root.split_evenly((2, 1));
        panel(&halves[0], title, "output tokens/s", &throughput, BLUE)?;
        panel(
            &halves[1],
            "output tokens per joule (NVML)",
            "output tokens/J",
            &per_joule,
            RED,
        )?;
    }
    root.present()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
