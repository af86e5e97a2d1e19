//! Summary statistics of latency samples: mean, min, max and percentiles by linear
//! interpolation between closest ranks. Pure functions; no timing or I/O here.

use serde::Serialize;

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolating linearly between
/// the closest ranks: the value at fractional rank `p/100 * (n - 1)` (numpy's default).
/// `None` for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Mean, min, p50, p90, p99 and max of a sample, in the sample's unit (milliseconds in reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes `values` (any order; non-finite values are dropped). All zeros when empty.
    pub fn of(values: &[f64]) -> Summary {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return Summary::default();
        }
        sorted.sort_by(f64::total_cmp);
        let at = |p| percentile(&sorted, p).unwrap_or(0.0);
        Summary {
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            min: sorted[0],
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: sorted[sorted.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{percentile, Summary};

    #[test]
    fn percentiles_interpolate_between_closest_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        // rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // numpy.percentile(range(101), 99) == 99
        let hundred: Vec<f64> = (0..=100).map(f64::from).collect();
        assert!((percentile(&hundred, 99.0).unwrap() - 99.0).abs() < 1e-9);
    }

    #[test]
    fn summaries_are_ordered_and_ignore_order_of_input() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0, f64::NAN]);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.p50, 3.0);
        assert_eq!(s.mean, 3.0);
        assert!(s.min <= s.p50 && s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.max);
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}
