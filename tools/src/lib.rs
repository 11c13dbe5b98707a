//! What the measurement tools share: latency figures from timed samples.

use std::time::Duration;

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// The latency figures of `samples` (sorted in place); `None` when there are none.
pub fn latency(samples: &mut [Duration]) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Nearest rank.
    let rank = |p: f64| {
        let i = (p * samples.len() as f64).ceil() as usize;
        samples[i.clamp(1, samples.len()) - 1]
    };
    let total: Duration = samples.iter().sum();
    Some(Latency {
        p50: ms(rank(0.50)),
        p99: ms(rank(0.99)),
        max: ms(samples[samples.len() - 1]),
        mean: ms(total) / samples.len() as f64,
    })
}

/// p50, p99, max and mean as table cells with two decimals (`-` when there are no samples).
pub fn cells(l: Option<Latency>) -> [String; 4] {
    match l {
        Some(l) => [l.p50, l.p99, l.max, l.mean].map(|v| format!("{v:.2}")),
        None => ["-", "-", "-", "-"].map(String::from),
    }
}
