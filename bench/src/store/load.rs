//! The closed-loop write load: `clients` tasks, each issuing one write at a time over a shared
//! pool of connections, for a warm-up and then a measured window.

use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;

use crate::store::target::KvWriter;

/// The workload of one measured point.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Concurrent clients, each with one write in flight.
    pub clients: usize,
    /// Not measured: lets leaders settle, connections open, batching warm up.
    pub warmup: Duration,
    /// Measured window.
    pub measure: Duration,
    /// Bytes per value.
    pub value_bytes: usize,
}

/// Distinct keys written (8 hex digits each, so 8-byte keys).
const KEY_SPACE: u64 = 1 << 20;

/// What one point measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Writes started in the window and acknowledged.
    pub ops: u64,
    /// Writes that failed (any time).
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Latency of each acknowledged write of the window, sorted, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Length of the window.
    pub window: Duration,
}

impl Measured {
    /// Acknowledged writes per second.
    pub fn writes_per_s(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }

    /// The `q` quantile (0..=1) of latency in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = (q * self.latencies_us.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latencies_us.len()) - 1;
        self.latencies_us[i] as f64 / 1e3
    }

    /// Mean latency in milliseconds.
    pub fn mean_ms(&self) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.iter().sum::<u64>() as f64 / self.latencies_us.len() as f64 / 1e3
    }
}

/// A small fast generator of key numbers (xorshift64*), one per client task.
struct Keys(u64);

impl Keys {
    fn next(&mut self) -> String {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let n = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % KEY_SPACE;
        format!("{n:08x}")
    }
}

struct TaskResult {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Run `workload` with clients spread round robin over `writers`.
///
/// # Errors
/// No writer given, or a client task panicked.
pub async fn drive<W: KvWriter>(writers: &[W], workload: Workload) -> Result<Measured> {
    if writers.is_empty() {
        bail!("no connection to drive");
    }
    let start = Instant::now();
    let window_start = start + workload.warmup;
    let end = window_start + workload.measure;
    let value: Vec<u8> = (0..workload.value_bytes).map(|i| (i % 251) as u8).collect();
    let mut tasks = Vec::with_capacity(workload.clients);
    for client in 0..workload.clients {
        let writer = writers[client % writers.len()].clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut keys = Keys(0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1));
            let mut out = TaskResult {
                latencies_us: Vec::new(),
                errors: 0,
                first_error: None,
            };
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = writer.put(keys.next(), value.clone()).await;
                let took = began.elapsed();
                match result {
                    Ok(()) if began >= window_start => {
                        out.latencies_us.push(took.as_micros() as u64);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            out
        }));
    }
    let mut measured = Measured {
        ops: 0,
        errors: 0,
        first_error: None,
        latencies_us: Vec::new(),
        window: workload.measure,
    };
    for task in tasks {
        let out = task.await?;
        measured.errors += out.errors;
        if measured.first_error.is_none() {
            measured.first_error = out.first_error;
        }
        measured.latencies_us.extend(out.latencies_us);
    }
    measured.latencies_us.sort_unstable();
    measured.ops = measured.latencies_us.len() as u64;
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(latencies_us: Vec<u64>) -> Measured {
        Measured {
            ops: latencies_us.len() as u64,
            errors: 0,
            first_error: None,
            latencies_us,
            window: Duration::from_secs(2),
        }
    }

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let m = measured((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(m.quantile_ms(0.5), 50.0);
        assert_eq!(m.quantile_ms(0.99), 99.0);
        assert_eq!(m.quantile_ms(1.0), 100.0);
        assert_eq!(m.writes_per_s(), 50.0);
        assert!(measured(Vec::new()).quantile_ms(0.5).is_nan());
    }

    #[test]
    fn keys_are_eight_bytes() {
        let mut keys = Keys(7);
        for _ in 0..1000 {
            assert_eq!(keys.next().len(), 8);
        }
    }
}
