//! GPU energy from NVML's total-energy counter (millijoules since the driver loaded). NVML is
//! loaded at run time: without an NVIDIA driver there is no meter and energy is reported as
//! null; nothing here may fail a benchmark.

use nvml_wrapper::Nvml;

/// Reads the total-energy counter of one GPU.
pub struct EnergyMeter {
    nvml: Nvml,
    gpu_index: u32,
}

impl EnergyMeter {
    /// `None` (with a note in the log) when NVML or the GPU or its energy counter is missing.
    pub fn open(gpu_index: u32) -> Option<EnergyMeter> {
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::info!("no GPU energy figures: NVML is unavailable ({e})");
                return None;
            }
        };
        let meter = EnergyMeter { nvml, gpu_index };
        match meter.millijoules() {
            Some(_) => Some(meter),
            None => {
                tracing::warn!("no GPU energy figures: GPU {gpu_index} has no readable energy counter");
                None
            }
        }
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn gpu_name(&self) -> Option<String> {
        self.nvml.device_by_index(self.gpu_index).ok()?.name().ok()
    }

    pub fn gpu_index(&self) -> u32 {
        self.gpu_index
    }

    /// The counter now, in millijoules.
    pub fn millijoules(&self) -> Option<u64> {
        self.nvml
            .device_by_index(self.gpu_index)
            .ok()?
            .total_energy_consumption()
            .ok()
    }
}

/// Energy of one run: joules, average power and output tokens per joule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EnergyFigures {
    pub joules: f64,
    pub avg_power_w: f64,
    pub output_tokens_per_joule: f64,
}

impl EnergyFigures {
    /// From two counter readings (millijoules) around a run; `None` if the counter did not
    /// advance (or wrapped) or the run took no time.
    pub fn between(start_mj: u64, end_mj: u64, duration_s: f64, output_tokens: usize) -> Option<EnergyFigures> {
        let joules = end_mj.checked_sub(start_mj)? as f64 / 1000.0;
        if joules <= 0.0 || duration_s <= 0.0 {
            return None;
        }
        Some(EnergyFigures {
            joules,
            avg_power_w: joules / duration_s,
            output_tokens_per_joule: output_tokens as f64 / joules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::EnergyFigures;

    #[test]
    fn energy_figures_from_counter_readings() {
        let e = EnergyFigures::between(1_000, 301_000, 2.0, 600).unwrap();
        assert_eq!(e.joules, 300.0);
        assert_eq!(e.avg_power_w, 150.0);
        assert_eq!(e.output_tokens_per_joule, 2.0);
        assert!(EnergyFigures::between(5, 5, 1.0, 10).is_none());
        assert!(EnergyFigures::between(9, 5, 1.0, 10).is_none());
    }
}
