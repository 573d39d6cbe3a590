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
use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};

/// Options of the hidden `dataplane-server` sub-command.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Port to listen on, on every address of the namespace.
    #[arg(long)]
    port: u16,
    /// Accepting threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The CPU to run on (every thread); any CPU without it.
    #[arg(long)]
    cpu: Option<usize>,
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
    /// The CPU to run on (every thread); any CPU without it.
    #[arg(long)]
    cpu: Option<usize>,
}

/// What the client measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientResult {
    /// Every timed first connection that succeeded, in order: socket, connect, 1-byte request
    /// and 1-byte reply, µs (the clock stops when the reply byte has been read).
    pub latencies_us: Vec<f64>,
    /// The `connect(2)` call alone of the same connections, µs: where a load balancer works
    /// (a cgroup hook in the call, or the NAT of the SYN), the handshake included.
    pub connect_us: Vec<f64>,
    /// The same connections to the end of the close (RST sent), µs.
    pub closed_us: Vec<f64>,
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
/// `TCP_DEFER_ACCEPT` makes `accept` return when the request byte has arrived, so a
/// connection costs the server one wake-up instead of two (the same for every system
/// measured; it lowers the floor's scheduling noise, not what the data plane does).
///
/// # Errors
/// The port cannot be bound.
pub fn serve(args: &ServerArgs) -> Result<()> {
    pin(args.cpu)?;
    let listener = TcpListener::bind(("0.0.0.0", args.port))
        .with_context(|| format!("binding port {}", args.port))?;
    let seconds: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a correctly sized int value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting TCP_DEFER_ACCEPT");
    }
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
    pin(args.cpu)?;
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

    // The order of targets is drawn before the timed loop, so that the loop does nothing but
    // connections.
    let mut rng = Rng::seeded(1 + args.seed);
    let order: Vec<usize> = (0..args.warmup + args.samples)
        .map(|_| rng.below(targets.len()))
        .collect();
    let (warmup, timed) = order.split_at(args.warmup);
    for &i in warmup {
        if let Err(e) = exchange(&targets[i]) {
            note(e, &targets[i]);
        }
    }
    let mut times = Vec::with_capacity(args.samples);
    for &i in timed {
        match exchange(&targets[i]) {
            Ok(t) => times.push(t),
            Err(e) => note(e, &targets[i]),
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
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => note(e, t),
                    }
                }
            });
        }
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let result = ClientResult {
        latencies_us: times.iter().map(|t| us(t.reply)).collect(),
        connect_us: times.iter().map(|t| us(t.connect)).collect(),
        closed_us: times.iter().map(|t| us(t.closed)).collect(),
        completed: done.load(Ordering::Relaxed),
        elapsed_s: started.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().ok().and_then(|f| f.clone()),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Restricts the calling thread, and the threads it starts afterwards, to `cpu`.
fn pin(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    anyhow::ensure!(
        cpu < libc::CPU_SETSIZE as usize,
        "CPU {cpu} is beyond the affinity mask"
    );
    // SAFETY: `cpu_set_t` is a plain bit mask; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is inside the mask (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the mask is initialised and its size passed with it; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// The timings of one short connection.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// The `connect(2)` call alone.
    connect: Duration,
    /// From before `socket(2)` until the reply byte was read.
    reply: Duration,
    /// From before `socket(2)` until `close(2)` returned.
    closed: Duration,
}

/// How long a connect or a read may take before the connection counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// One short connection: a blocking connect (no non-blocking connect + poll, which adds
/// system calls and a wake-up that are not the data plane's), send a byte, read the byte back,
/// close with a reset (so neither side keeps the 4-tuple in TIME_WAIT and the port range
/// suffices).
fn exchange(target: &SocketAddr) -> std::io::Result<Timing> {
    let start = Instant::now();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(SockProtocol::TCP))?;
    // SO_SNDTIMEO bounds a blocking connect; SO_RCVTIMEO the read.
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_linger(Some(Duration::ZERO))?;
    let before_connect = Instant::now();
    socket.connect(&SockAddr::from(*target))?;
    let connect = before_connect.elapsed();
    let mut s = TcpStream::from(socket);
    s.write_all(b"x")?;
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte)?;
    let reply = start.elapsed();
    drop(s);
    Ok(Timing {
        connect,
        reply,
        closed: start.elapsed(),
    })
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
            let t = exchange(&addr).unwrap();
            assert!(t.connect <= t.reply && t.reply <= t.closed);
        }
    }
}
