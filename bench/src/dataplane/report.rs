//! The dataplane benchmark's results: tables on stdout, every figure in JSON, and an SVG plot
//! of latency (and one-service update time) against the number of services.

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::machine::MachineInfo;

/// The systems, in the order they are measured and shown.
pub const SYSTEMS: [&str; 4] = ["direct", "ebpf", "iptables", "ipvs"];

/// One system at one number of services.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// `direct`, `ebpf`, `iptables` or `ipvs`.
    pub system: &'static str,
    /// Services installed.
    pub services: u32,
    /// Why the system could not be measured, if it could not.
    pub unavailable: Option<String>,
    /// Timed connections that succeeded.
    pub samples: usize,
    /// Median first-connection latency (socket, connect, 1-byte request, 1-byte reply read),
    /// µs.
    pub p50_us: Option<f64>,
    /// Its 99th percentile, µs.
    pub p99_us: Option<f64>,
    /// Its mean, µs.
    pub mean_us: Option<f64>,
    /// Median of the `connect(2)` call alone (the handshake; where the load balancer works),
    /// µs.
    pub connect_p50_us: Option<f64>,
    /// Its 99th percentile, µs.
    pub connect_p99_us: Option<f64>,
    /// Median of the whole short connection including the close (the first version of this
    /// benchmark's figure), µs.
    pub closed_p50_us: Option<f64>,
    /// Its 99th percentile, µs.
    pub closed_p99_us: Option<f64>,
    /// Short connections (connect, 1 byte each way, close) per second.
    pub requests_per_s: Option<f64>,
    /// Failed connections.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Installing all the services, ms.
    pub load_ms: Option<f64>,
    /// Adding one service: median, ms.
    pub add_one_p50_ms: Option<f64>,
    /// Adding one service: the slowest of the timed adds, ms.
    pub add_one_max_ms: Option<f64>,
    /// eBPF only: adding one service, 99th percentile (nearest rank), ms.
    pub add_one_p99_ms: Option<f64>,
    /// eBPF only: the adds over 1 ms and what their thread did meanwhile.
    pub add_one_slow: SlowUpdates,
    /// Adds timed.
    pub add_one_samples: usize,
    /// iptables only: a full `iptables-restore` of every service (median), ms.
    pub full_restore_ms: Option<f64>,
    /// eBPF only: adding one Maglev service (its 1021-entry table written), median, ms.
    pub maglev_add_p50_ms: Option<f64>,
    /// eBPF only: Maglev add, 99th percentile, ms.
    pub maglev_add_p99_ms: Option<f64>,
    /// eBPF only: the slowest timed Maglev add, ms.
    pub maglev_add_max_ms: Option<f64>,
    /// eBPF only: changing one endpoint of a Maglev service (a new table published, the old
    /// one removed), median, ms.
    pub maglev_update_p50_ms: Option<f64>,
    /// eBPF only: Maglev endpoint change, 99th percentile, ms.
    pub maglev_update_p99_ms: Option<f64>,
    /// eBPF only: the slowest timed Maglev endpoint change, ms.
    pub maglev_update_max_ms: Option<f64>,
    /// eBPF only: the Maglev adds and changes over 1 ms and what their thread did meanwhile.
    pub maglev_slow: SlowUpdates,
    /// Maglev adds and changes timed (each).
    pub maglev_samples: usize,
}

impl Point {
    /// A point with nothing measured yet.
    pub fn new(system: &'static str, services: u32) -> Self {
        Point {
            system,
            services,
            unavailable: None,
            samples: 0,
            p50_us: None,
            p99_us: None,
            mean_us: None,
            connect_p50_us: None,
            connect_p99_us: None,
            closed_p50_us: None,
            closed_p99_us: None,
            requests_per_s: None,
            errors: 0,
            first_error: None,
            load_ms: None,
            add_one_p50_ms: None,
            add_one_max_ms: None,
            add_one_p99_ms: None,
            add_one_slow: SlowUpdates::default(),
            add_one_samples: 0,
            full_restore_ms: None,
            maglev_add_p50_ms: None,
            maglev_add_p99_ms: None,
            maglev_add_max_ms: None,
            maglev_update_p50_ms: None,
            maglev_update_p99_ms: None,
            maglev_update_max_ms: None,
            maglev_slow: SlowUpdates::default(),
            maglev_samples: 0,
        }
    }
}

/// Timed updates over 1 ms, to tell slow updates from a thread that was not running: an
/// update preempted on a loaded machine shows a wall time far above its CPU time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowUpdates {
    /// Updates that took more than 1 ms of wall time.
    pub over_1ms: usize,
    /// Of those, the ones during which the thread was preempted (an involuntary context
    /// switch).
    pub preempted: usize,
    /// The most CPU time (user and kernel) the thread spent in any one timed update, ms.
    pub cpu_max_ms: Option<f64>,
    /// Each update over 1 ms: (wall ms, thread CPU ms, involuntary context switches).
    pub worst: Vec<(f64, f64, u64)>,
}

/// One system against direct connects and against iptables, at one number of services.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Services installed.
    pub services: u32,
    /// The system.
    pub system: &'static str,
    /// p50 ÷ direct p50 (1.0 = no cost over connecting to the pod).
    pub p50_vs_direct: Option<f64>,
    /// p99 ÷ direct p99.
    pub p99_vs_direct: Option<f64>,
    /// requests/s ÷ direct requests/s.
    pub rps_vs_direct: Option<f64>,
    /// iptables p50 ÷ this p50 (2.0 = twice as fast as iptables).
    pub p50_speedup_over_iptables: Option<f64>,
    /// iptables p99 ÷ this p99.
    pub p99_speedup_over_iptables: Option<f64>,
    /// requests/s ÷ iptables requests/s.
    pub rps_vs_iptables: Option<f64>,
    /// `connect(2)` p50 ÷ direct's.
    pub connect_p50_vs_direct: Option<f64>,
    /// iptables `connect(2)` p50 ÷ this one's.
    pub connect_p50_speedup_over_iptables: Option<f64>,
    /// iptables `connect(2)` p99 ÷ this one's.
    pub connect_p99_speedup_over_iptables: Option<f64>,
}

/// The goals at the largest number of services measured.
#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// The number of services they were checked at.
    pub services: u32,
    /// eBPF p50 within 1.1× of direct.
    pub ebpf_p50_within_1_1x_direct: Option<bool>,
    /// eBPF p99 within 1.1× of direct (stricter; for the record).
    pub ebpf_p99_within_1_1x_direct: Option<bool>,
    /// eBPF p50 at least 2× better than iptables.
    pub ebpf_p50_2x_better_than_iptables: Option<bool>,
    /// Every timed one-service eBPF update under 1 ms (the slowest counts).
    pub ebpf_add_one_under_1ms: Option<bool>,
    /// `connect(2)` alone: eBPF p50 at least 2× better than iptables (for the record).
    pub ebpf_connect_p50_2x_better_than_iptables: Option<bool>,
    /// Every timed Maglev add and endpoint change under 1 ms (the slowest counts).
    pub ebpf_maglev_update_under_1ms: Option<bool>,
}

/// The whole run, as written to `dataplane.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `dataplane`.
    pub suite: &'static str,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    /// Where it ran.
    pub machine: MachineInfo,
    /// What was run.
    pub workload: Workload,
    /// Every point measured.
    pub points: Vec<Point>,
    /// Ratios per number of services.
    pub ratios: Vec<Ratio>,
    /// The goals, checked.
    pub goals: Goals,
}

/// The workload, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Numbers of services.
    pub services: Vec<u32>,
    /// Endpoints per service.
    pub endpoints_per_service: u32,
    /// Backend addresses in the server namespace.
    pub backend_addresses: u32,
    /// Unmeasured connections before the latency samples.
    pub warmup: usize,
    /// Sequential connections timed for latency.
    pub latency_samples: usize,
    /// Seconds of the throughput run.
    pub throughput_s: f64,
    /// Concurrent connection loops in the throughput run.
    pub throughput_threads: usize,
    /// `iptables-restore --version`.
    pub iptables: String,
    /// How each connection is made and what it targets.
    pub method: String,
    /// Where the client ran: `pod` or `node`.
    pub placement: &'static str,
    /// Whether the node had the pod network's NAT table (connection tracking for every system).
    pub node_nat: bool,
    /// The CPUs of the client and the echo server (`None`: the scheduler's choice).
    pub cpus: (Option<usize>, Option<usize>),
    /// `release` or `debug`: how the driver (client, echo server, map writes) was built.
    pub driver_build: &'static str,
}

fn find<'a>(points: &'a [Point], system: &str, services: u32) -> Option<&'a Point> {
    points
        .iter()
        .find(|p| p.system == system && p.services == services && p.unavailable.is_none())
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Every system's ratios against direct and iptables.
pub fn ratios(points: &[Point], scales: &[u32]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for &n in scales {
        let direct = find(points, "direct", n);
        let iptables = find(points, "iptables", n);
        for system in ["ebpf", "iptables", "ipvs"] {
            let Some(p) = find(points, system, n) else {
                continue;
            };
            out.push(Ratio {
                services: n,
                system,
                p50_vs_direct: div(p.p50_us, direct.and_then(|d| d.p50_us)),
                p99_vs_direct: div(p.p99_us, direct.and_then(|d| d.p99_us)),
                rps_vs_direct: div(p.requests_per_s, direct.and_then(|d| d.requests_per_s)),
                p50_speedup_over_iptables: div(iptables.and_then(|i| i.p50_us), p.p50_us),
                p99_speedup_over_iptables: div(iptables.and_then(|i| i.p99_us), p.p99_us),
                rps_vs_iptables: div(p.requests_per_s, iptables.and_then(|i| i.requests_per_s)),
                connect_p50_vs_direct: div(p.connect_p50_us, direct.and_then(|d| d.connect_p50_us)),
                connect_p50_speedup_over_iptables: div(
                    iptables.and_then(|i| i.connect_p50_us),
                    p.connect_p50_us,
                ),
                connect_p99_speedup_over_iptables: div(
                    iptables.and_then(|i| i.connect_p99_us),
                    p.connect_p99_us,
                ),
            });
        }
    }
    out
}

/// The goals at the largest scale.
pub fn goals(points: &[Point], ratios: &[Ratio], scales: &[u32]) -> Goals {
    let services = scales.iter().copied().max().unwrap_or(0);
    let ebpf = ratios
        .iter()
        .find(|r| r.services == services && r.system == "ebpf");
    Goals {
        services,
        ebpf_p50_within_1_1x_direct: ebpf.and_then(|r| r.p50_vs_direct).map(|v| v <= 1.1),
        ebpf_p99_within_1_1x_direct: ebpf.and_then(|r| r.p99_vs_direct).map(|v| v <= 1.1),
        ebpf_p50_2x_better_than_iptables: ebpf
            .and_then(|r| r.p50_speedup_over_iptables)
            .map(|v| v >= 2.0),
        ebpf_add_one_under_1ms: find(points, "ebpf", services)
            .and_then(|p| p.add_one_max_ms)
            .map(|v| v < 1.0),
        ebpf_connect_p50_2x_better_than_iptables: ebpf
            .and_then(|r| r.connect_p50_speedup_over_iptables)
            .map(|v| v >= 2.0),
        ebpf_maglev_update_under_1ms: find(points, "ebpf", services).and_then(|p| {
            match (p.maglev_add_max_ms, p.maglev_update_max_ms) {
                (Some(a), Some(u)) => Some(a.max(u) < 1.0),
                _ => None,
            }
        }),
    }
}

fn cell(v: Option<f64>, precision: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

/// Prints one point as a table row (the header is [`print_header`]).
pub fn print_row(p: &Point) {
    if let Some(why) = &p.unavailable {
        println!("{:>8} {:<9} unavailable: {why}", p.services, p.system);
        return;
    }
    println!(
        "{:>8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9}",
        p.services,
        p.system,
        cell(p.connect_p50_us, 1),
        cell(p.connect_p99_us, 1),
        cell(p.p50_us, 1),
        cell(p.p99_us, 1),
        cell(p.closed_p50_us, 1),
        cell(p.requests_per_s, 0),
        p.errors,
        cell(p.add_one_p50_ms, 3),
        cell(p.add_one_max_ms, 3),
        cell(p.full_restore_ms, 1),
        cell(p.load_ms, 1),
        cell(
            p.maglev_update_max_ms
                .zip(p.maglev_add_max_ms)
                .map(|(u, a)| u.max(a)),
            3
        ),
    );
}

/// Prints the eBPF update times of a point: percentiles, and the updates over 1 ms with the
/// CPU time and preemptions of their thread.
pub fn print_updates(p: &Point) {
    let slow = |s: &SlowUpdates| {
        format!(
            "{} over 1 ms ({} preempted; wall/cpu ms, preemptions: {}), most CPU in one: {} ms",
            s.over_1ms,
            s.preempted,
            s.worst
                .iter()
                .map(|(w, c, n)| format!("{w:.2}/{c:.3}/{n}"))
                .collect::<Vec<_>>()
                .join(" "),
            cell(s.cpu_max_ms, 3),
        )
    };
    println!(
        "{:>8} ebpf updates: add one p50/p99/max {}/{}/{} ms, {}",
        p.services,
        cell(p.add_one_p50_ms, 3),
        cell(p.add_one_p99_ms, 3),
        cell(p.add_one_max_ms, 3),
        slow(&p.add_one_slow),
    );
    if p.maglev_samples > 0 {
        println!(
            "{:>8} ebpf Maglev: add p50/p99/max {}/{}/{} ms, change p50/p99/max {}/{}/{} ms, {}",
            p.services,
            cell(p.maglev_add_p50_ms, 3),
            cell(p.maglev_add_p99_ms, 3),
            cell(p.maglev_add_max_ms, 3),
            cell(p.maglev_update_p50_ms, 3),
            cell(p.maglev_update_p99_ms, 3),
            cell(p.maglev_update_max_ms, 3),
            slow(&p.maglev_slow),
        );
    }
}

/// The header of the table [`print_row`] prints.
pub fn print_header() {
    println!(
        "\nconnect = the connect(2) call alone; first conn = socket + connect + 1-byte request + \
         1-byte reply; +close = the same to the end of close (the first version's figure)"
    );
    println!(
        "{:>8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "",
        "",
        "connect",
        "connect",
        "first",
        "first",
        "+close",
        "",
        "",
        "add1",
        "add1",
        "full-rst",
        "load",
        "maglev"
    );
    println!(
        "{:>8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "services",
        "system",
        "p50 µs",
        "p99 µs",
        "p50 µs",
        "p99 µs",
        "p50 µs",
        "conn/s",
        "errors",
        "p50 ms",
        "max ms",
        "ms",
        "ms",
        "max ms"
    );
}

/// Prints the ratios and goals.
pub fn print_summary(report: &Report) {
    println!(
        "\n{:>8} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "services",
        "system",
        "p50/dir",
        "p99/dir",
        "ipt÷p50",
        "ipt÷p99",
        "conn/dir",
        "ipt÷conn",
        "ipt÷c.p99",
        "rps/ipt"
    );
    for r in &report.ratios {
        println!(
            "{:>8} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.services,
            r.system,
            cell(r.p50_vs_direct, 2),
            cell(r.p99_vs_direct, 2),
            cell(r.p50_speedup_over_iptables, 2),
            cell(r.p99_speedup_over_iptables, 2),
            cell(r.connect_p50_vs_direct, 2),
            cell(r.connect_p50_speedup_over_iptables, 2),
            cell(r.connect_p99_speedup_over_iptables, 2),
            cell(r.rps_vs_iptables, 2),
        );
    }
    let show = |g: Option<bool>| match g {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let g = &report.goals;
    println!(
        "\ngoals at {} services (first-connection latency): eBPF p50 within 1.1x of direct: {} \
         (p99: {}); eBPF p50 2x better than iptables: {} (connect() alone: {}); every \
         one-service eBPF update under 1 ms: {} (Maglev services: {})",
        g.services,
        show(g.ebpf_p50_within_1_1x_direct),
        show(g.ebpf_p99_within_1_1x_direct),
        show(g.ebpf_p50_2x_better_than_iptables),
        show(g.ebpf_connect_p50_2x_better_than_iptables),
        show(g.ebpf_add_one_under_1ms),
        show(g.ebpf_maglev_update_under_1ms),
    );
    let m = &report.machine;
    let w = &report.workload;
    println!(
        "machine: {} ({} cores), kernel {}; {}; client in the {}'s namespace, node NAT table: {}; \
         client/server CPU: {}/{}; driver built {}",
        m.cpu_model,
        m.cores,
        m.kernel,
        w.iptables,
        w.placement,
        if w.node_nat { "yes" } else { "no" },
        w.cpus.0.map_or_else(|| "any".to_owned(), |c| c.to_string()),
        w.cpus.1.map_or_else(|| "any".to_owned(), |c| c.to_string()),
        w.driver_build
    );
}

/// Writes the report as pretty JSON.
///
/// # Errors
/// The file cannot be written.
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("encoding the report")?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

type Metric = fn(&Point) -> Option<f64>;

/// Plots p50 and p99 latency and the one-service update time against the number of services,
/// one line per system.
///
/// # Errors
/// The SVG cannot be drawn or written.
pub fn write_svg(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (2000, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let areas = root.split_evenly((1, 4));
    let colors: [(&str, RGBColor); 4] = [
        ("direct", RGBColor(90, 90, 90)),
        ("ebpf", RGBColor(31, 119, 180)),
        ("iptables", RED),
        ("ipvs", RGBColor(44, 160, 44)),
    ];
    let panels: [(&str, &str, Metric); 4] = [
        ("First connection (to the reply), p50", "µs", |p| p.p50_us),
        ("First connection (to the reply), p99", "µs", |p| p.p99_us),
        ("connect() alone, p50", "µs", |p| p.connect_p50_us),
        ("Adding one service, median", "ms (log)", |p| {
            p.add_one_p50_ms
        }),
    ];
    // The update panel also shows Maglev services' endpoint changes.
    let maglev: Metric = |p| p.maglev_update_p50_ms;
    let count = panels.len();
    let max_n = report.workload.services.iter().copied().max().unwrap_or(1) as f64;
    let min_n = report.workload.services.iter().copied().min().unwrap_or(1) as f64;
    let x_range = (min_n * 0.7)..(max_n * 1.4);
    for (i, (area, (title, unit, metric))) in areas.iter().zip(panels).enumerate() {
        let last = i + 1 == count;
        let values: Vec<f64> = report
            .points
            .iter()
            .filter_map(metric)
            .chain(
                report
                    .points
                    .iter()
                    .filter_map(|p| maglev(p).filter(|_| last)),
            )
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let top = values.iter().copied().fold(0.0_f64, f64::max) * 1.15;
        let series = |system: &str, metric: Metric| -> Vec<(f64, f64)> {
            report
                .points
                .iter()
                .filter(|p| p.system == system)
                .filter_map(|p| metric(p).map(|v| (f64::from(p.services), v)))
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect()
        };
        let series_of = |system: &str| series(system, metric);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60);
        // Update times span microseconds to seconds: a log axis keeps both visible.
        if last {
            let bottom = values.iter().copied().fold(f64::INFINITY, f64::min);
            let bottom = if bottom.is_finite() {
                bottom / 2.0
            } else {
                1e-3
            };
            let mut chart = builder
                .build_cartesian_2d(
                    x_range.clone().log_scale(),
                    (bottom..top.max(bottom * 10.0)).log_scale(),
                )
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("services")
                .y_desc(unit)
                .draw()
                .map_err(plot_err)?;
            for (system, color) in colors {
                draw_line(&mut chart, system, color, series_of(system))?;
            }
            let purple = RGBColor(148, 103, 189);
            draw_line(
                &mut chart,
                "ebpf maglev (change)",
                purple,
                series("ebpf", maglev),
            )?;
            legend(&mut chart)?;
        } else {
            let mut chart = builder
                .build_cartesian_2d(x_range.clone().log_scale(), 0.0_f64..top.max(1.0))
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("services")
                .y_desc(unit)
                .draw()
                .map_err(plot_err)?;
            for (system, color) in colors {
                draw_line(&mut chart, system, color, series_of(system))?;
            }
            legend(&mut chart)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn draw_line<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    system: &'static str,
    color: RGBColor,
    series: Vec<(f64, f64)>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    if series.is_empty() {
        return Ok(());
    }
    chart
        .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
        .map_err(plot_err)?
        .label(system)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(
            series
                .into_iter()
                .map(|xy| Circle::new(xy, 4, color.filled())),
        )
        .map_err(plot_err)?;
    Ok(())
}

fn legend<'a, DB, X, Y>(chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(plot_err)
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(system: &'static str, n: u32, p50: f64, add: Option<f64>) -> Point {
        Point {
            p50_us: Some(p50),
            p99_us: Some(p50 * 2.0),
            requests_per_s: Some(1e6 / p50),
            add_one_p50_ms: add,
            add_one_max_ms: add,
            ..Point::new(system, n)
        }
    }

    #[test]
    fn ratios_and_goals_compare_with_direct_and_iptables() {
        let points = vec![
            point("direct", 10_000, 100.0, None),
            point("ebpf", 10_000, 105.0, Some(0.05)),
            point("iptables", 10_000, 300.0, Some(400.0)),
            Point {
                unavailable: Some("no IPVS".into()),
                ..Point::new("ipvs", 10_000)
            },
        ];
        let ratios = ratios(&points, &[10_000]);
        assert_eq!(ratios.len(), 2, "unavailable systems get no ratios");
        let ebpf = &ratios[0];
        assert!((ebpf.p50_vs_direct.unwrap() - 1.05).abs() < 1e-9);
        assert!((ebpf.p50_speedup_over_iptables.unwrap() - 300.0 / 105.0).abs() < 1e-9);
        let goals = goals(&points, &ratios, &[100, 10_000]);
        assert_eq!(goals.services, 10_000);
        assert_eq!(goals.ebpf_p50_within_1_1x_direct, Some(true));
        assert_eq!(goals.ebpf_p50_2x_better_than_iptables, Some(true));
        assert_eq!(goals.ebpf_add_one_under_1ms, Some(true));
    }
}
