//! The two processes the benchmark places in its namespaces: the echo server (one byte in, one
//! byte out, close) and the client, which measures first-connection latency and
//! short-connection throughput against a list of targets and prints its figures as JSON.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// Options of the hidden `dataplane-server` sub-command.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Port to listen on, on every address of the namespace.
    #[arg(long)]
    port: u16,
    /// Accepting threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Options of the hidden `dataplane-client` sub-command.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// File with one `IPV4:PORT` target per line; each connection picks one at random.
    #[arg(long)]
    targets: PathBuf,
    /// Unmeasured connections first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Sequential connections timed for the latency figures.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent connection loops in the throughput run.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the target choice (rounds use different seeds).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What the client measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientResult {
    /// Every timed connect + 1-byte request + 1-byte reply that succeeded, µs, in order.
    pub latencies_us: Vec<f64>,
    /// Short connections completed in the throughput run.
    pub completed: u64,
    /// Length of the throughput run, s.
    pub elapsed_s: f64,
    /// Failed connections over both runs.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
}

/// Serves forever: read one byte, answer one byte, close.
///
/// # Errors
/// The port cannot be bound.
pub fn serve(args: &ServerArgs) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", args.port))
        .with_context(|| format!("binding port {}", args.port))?;
    println!("ready");
    std::io::stdout().flush().ok();
    let mut threads = Vec::new();
    for _ in 0..args.threads.max(1) {
        let listener = listener.try_clone().context("cloning the listener")?;
        threads.push(std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).is_ok() {
                    let _ = conn.write_all(&byte);
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Measures and prints a [`ClientResult`] as JSON.
///
/// # Errors
/// The targets cannot be read.
pub fn client(args: &ClientArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.targets)
        .with_context(|| format!("reading {}", args.targets.display()))?;
    let targets: Vec<SocketAddr> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse::<SocketAddrV4>().map(SocketAddr::V4))
        .collect::<Result<_, _>>()
        .context("parsing the targets")?;
    anyhow::ensure!(!targets.is_empty(), "no targets");
    let errors = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let note = |e: std::io::Error, target: &SocketAddr| {
        errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = first_error.lock() {
            first.get_or_insert_with(|| format!("{target}: {e}"));
        }
    };

    let mut rng = Rng::seeded(1 + args.seed);
    for _ in 0..args.warmup {
        let t = &targets[rng.below(targets.len())];
        if let Err(e) = exchange(t) {
            note(e, t);
        }
    }
    let mut times = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let t = &targets[rng.below(targets.len())];
        let start = Instant::now();
        match exchange(t) {
            Ok(()) => times.push(start.elapsed()),
            Err(e) => note(e, t),
        }
    }

    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for seed in 0..args.threads.max(1) {
            let (targets, done, note) = (&targets, &done, &note);
            s.spawn(move || {
                let mut rng = Rng::seeded(seed as u64 + 2 + args.seed);
                while Instant::now() < deadline {
                    let t = &targets[rng.below(targets.len())];
                    match exchange(t) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => note(e, t),
                    }
                }
            });
        }
    });
    let result = ClientResult {
        latencies_us: times.iter().map(|d| d.as_secs_f64() * 1e6).collect(),
        completed: done.load(Ordering::Relaxed),
        elapsed_s: started.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().ok().and_then(|f| f.clone()),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// One short connection: connect, send a byte, read the byte back, close with a reset (so
/// neither side keeps the 4-tuple in TIME_WAIT and the port range suffices).
fn exchange(target: &SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(target, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"x")?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized `linger` value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    Ok(())
}

/// The `q` quantile of sorted values (nearest rank).
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// xorshift64*: enough to spread connections over services, with no dependency.
struct Rng(u64);

impl Rng {
    fn seeded(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&ms, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&ms, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&ms, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile::<Duration>(&[], 0.5), None);
    }

    #[test]
    fn the_generator_covers_every_target() {
        let mut rng = Rng::seeded(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[rng.below(10)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn exchanges_one_byte_with_the_echo_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut b = [0u8; 1];
                if conn.read_exact(&mut b).is_ok() {
                    let _ = conn.write_all(&b);
                }
            }
        });
        for _ in 0..3 {
            exchange(&addr).unwrap();
        }
    }
}
