//! GPU energy from NVML: the total-energy counter (millijoules since the driver loaded) and
//! the power draw of the GPUs a run uses, the figures of one benchmark run, and the sliding
//! window behind `/metrics`' output tokens per joule. NVML is loaded at run time: without an
//! NVIDIA driver there is no meter and energy is absent (null in reports, no series in
//! `/metrics`), never zero; nothing here may fail a benchmark or a server.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;

/// Reads the energy counters and power of a set of GPUs (summed).
pub struct EnergyMeter {
    nvml: Nvml,
    /// NVML indices of the GPUs, first one first.
    gpus: Vec<u32>,
}

impl EnergyMeter {
    /// A meter over NVML GPU `gpu_index` alone.
    pub fn open(gpu_index: u32) -> Option<EnergyMeter> {
        Self::open_all(&[gpu_index])
    }

    /// A meter over `gpus` (NVML indices); `None` (with a note in the log) when NVML, one of
    /// the GPUs or its energy counter is missing.
    pub fn open_all(gpus: &[u32]) -> Option<EnergyMeter> {
        if gpus.is_empty() {
            return None;
        }
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::info!("no GPU energy figures: NVML is unavailable ({e})");
                return None;
            }
        };
        let meter = EnergyMeter {
            nvml,
            gpus: gpus.to_vec(),
        };
        match meter.millijoules() {
            Some(_) => Some(meter),
            None => {
                tracing::warn!("no GPU energy figures: a GPU of {gpus:?} has no readable energy counter");
                None
            }
        }
    }

    /// The first GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn gpu_name(&self) -> Option<String> {
        self.nvml.device_by_index(self.gpus[0]).ok()?.name().ok()
    }

    /// The first GPU's NVML index.
    pub fn gpu_index(&self) -> u32 {
        self.gpus[0]
    }

    /// The GPUs' NVML indices.
    pub fn gpus(&self) -> &[u32] {
        &self.gpus
    }

    /// The counters now, summed over the GPUs, in millijoules.
    pub fn millijoules(&self) -> Option<u64> {
        self.gpus.iter().try_fold(0u64, |sum, &g| {
            let mj = self.nvml.device_by_index(g).ok()?.total_energy_consumption().ok()?;
            sum.checked_add(mj)
        })
    }

    /// The power draw now, summed over the GPUs, in watts.
    pub fn watts(&self) -> Option<f64> {
        self.gpus.iter().try_fold(0.0, |sum, &g| {
            let mw = self.nvml.device_by_index(g).ok()?.power_usage().ok()?;
            Some(sum + mw as f64 / 1000.0)
        })
    }
}

/// NVML indices of CUDA ordinals `first..first + count`. With `CUDA_VISIBLE_DEVICES` a list of
/// integers, ordinal i is its i-th entry (NVML counts every GPU); otherwise the two are taken
/// to agree (set `CUDA_DEVICE_ORDER=PCI_BUS_ID` where they might not).
pub fn nvml_indices(first: u32, count: u32, cuda_visible_devices: Option<&str>) -> Vec<u32> {
    let visible: Option<Vec<u32>> = cuda_visible_devices.and_then(|v| {
        v.split(',')
            .map(|s| s.trim().parse().ok())
            .collect::<Option<Vec<u32>>>()
            .filter(|l| !l.is_empty())
    });
    (first..first.saturating_add(count))
        .map(|ordinal| match &visible {
            Some(list) => list.get(ordinal as usize).copied().unwrap_or(ordinal),
            None => ordinal,
        })
        .collect()
}

/// Energy of one run: joules, average power and output tokens per joule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EnergyFigures {
    pub joules: f64,
    pub avg_power_w: f64,
    pub output_tokens_per_joule: f64,
    /// Whose counter: "server" (the server's `/metrics`) or "nvml" (this machine's GPU).
    pub source: &'static str,
}

impl EnergyFigures {
    /// From two counter readings (millijoules) around a run; `None` if the counter did not
    /// advance (or wrapped) or the run took no time.
    pub fn between(start_mj: u64, end_mj: u64, duration_s: f64, output_tokens: usize) -> Option<EnergyFigures> {
        let joules = end_mj.checked_sub(start_mj)? as f64 / 1000.0;
        Self::of_joules(joules, duration_s, output_tokens, "nvml")
    }

    /// From `joules` spent over `duration_s`, read from `source`.
    pub fn of_joules(
        joules: f64,
        duration_s: f64,
        output_tokens: usize,
        source: &'static str,
    ) -> Option<EnergyFigures> {
        if !(joules > 0.0 && duration_s > 0.0) {
            return None;
        }
        Some(EnergyFigures {
            joules,
            avg_power_w: joules / duration_s,
            output_tokens_per_joule: output_tokens as f64 / joules,
            source,
        })
    }
}

/// Readings of (energy counter, output tokens) over a trailing span of time, for the output
/// tokens per joule of the last minute.
#[derive(Debug)]
pub struct EnergyWindow {
    span: Duration,
    /// (when, millijoules, output tokens so far), oldest first.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl EnergyWindow {
    pub fn new(span: Duration) -> Self {
        EnergyWindow {
            span,
            samples: VecDeque::new(),
        }
    }

    /// Adds a reading, dropping those older than the span (one older reading is kept so the
    /// window covers the whole span once it has run that long). A counter that went backwards
    /// (driver reload) restarts the window.
    pub fn push(&mut self, at: Instant, millijoules: u64, output_tokens: u64) {
        if let Some(&(_, mj, tokens)) = self.samples.back() {
            if millijoules < mj || output_tokens < tokens {
                self.samples.clear();
            }
        }
        self.samples.push_back((at, millijoules, output_tokens));
        while self.samples.len() > 2 && at.duration_since(self.samples[1].0) >= self.span {
            self.samples.pop_front();
        }
    }

    /// Output tokens per joule between the oldest and newest readings; `None` until the
    /// counter has advanced.
    pub fn tokens_per_joule(&self) -> Option<f64> {
        let (&(_, mj0, t0), &(_, mj1, t1)) = (self.samples.front()?, self.samples.back()?);
        let joules = mj1.checked_sub(mj0)? as f64 / 1000.0;
        (joules > 0.0).then(|| (t1 - t0) as f64 / joules)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{nvml_indices, EnergyFigures, EnergyWindow};

    #[test]
    fn energy_figures_from_counter_readings() {
        let e = EnergyFigures::between(1_000, 301_000, 2.0, 600).unwrap();
        assert_eq!(e.joules, 300.0);
        assert_eq!(e.avg_power_w, 150.0);
        assert_eq!(e.output_tokens_per_joule, 2.0);
        assert_eq!(e.source, "nvml");
        assert!(EnergyFigures::between(5, 5, 1.0, 10).is_none());
        assert!(EnergyFigures::between(9, 5, 1.0, 10).is_none());
        assert_eq!(
            EnergyFigures::of_joules(50.0, 0.5, 10, "server").unwrap().avg_power_w,
            100.0
        );
    }

    #[test]
    fn the_window_covers_the_last_span_and_restarts_when_the_counter_resets() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut w = EnergyWindow::new(Duration::from_secs(60));
        assert_eq!(w.tokens_per_joule(), None);
        w.push(s(0), 0, 0);
        assert_eq!(w.tokens_per_joule(), None, "one reading has no interval");
        // 100 W and 50 tokens/s for 90 s, then 200 W and 50 tokens/s.
        for i in 1..=90 {
            w.push(s(i), i * 100_000, i * 50);
        }
        assert_eq!(w.tokens_per_joule(), Some(0.5));
        for i in 91..=150 {
            w.push(s(i), 9_000_000 + (i - 90) * 200_000, i * 50);
        }
        // The last 60 s (plus at most one reading) are all at 200 W.
        assert_eq!(w.tokens_per_joule(), Some(0.25));
        w.push(s(151), 5, 7550);
        assert_eq!(w.tokens_per_joule(), None, "a counter that went back starts over");
    }

    #[test]
    fn cuda_ordinals_map_through_cuda_visible_devices() {
        assert_eq!(nvml_indices(0, 2, None), vec![0, 1]);
        assert_eq!(nvml_indices(1, 2, Some("3,5,7")), vec![5, 7]);
        assert_eq!(nvml_indices(0, 1, Some("GPU-8f1c")), vec![0], "UUIDs: left as ordinals");
    }
}
